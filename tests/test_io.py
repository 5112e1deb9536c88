"""Adapter files: PEFT <-> pylora round trips with identical outputs on tiny Llama, GPT-2, BERT and a
Conv2d net; the broken-adapter corpus (each with its error, and the model untouched after it); a
hostile pickle that never runs; strict=False; saving; progress; `pylora info --adapter`."""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import pylora
from adapter_corpus import CASES as CORPUS
from conftest import PYTHON
from pylora import adapter_config
from pylora import io as pio
from models import BUILDERS, inputs, output

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")



pytestmark = pytest.mark.usefixtures("one_thread")


# Each case: (model kind, LoraConfig fields shared by PEFT and pylora).
CASES = {
    "llama_q_v": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama_all_linear": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear")),
    "llama_patterns_rslora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                            rank_pattern={"v_proj": 2, "layers.1.self_attn.o_proj": 6},
                                            alpha_pattern={"q_proj": 32}, use_rslora=True)),
    "llama_regex_exclude": ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|up_proj)",
                                          exclude_modules=["model.layers.0.mlp.up_proj"])),
    "llama_embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "llama_layers_lm_head_saved": ("llama", dict(r=2, lora_alpha=4, target_modules=["k_proj"], layers_to_transform=[1],
                                                 modules_to_save=["lm_head"])),
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "bert_bias_all": ("bert", dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                   bias="all")),
    "bert_lora_only_lora_bias": ("bert", dict(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                              target_modules=["query", "value"], bias="lora_only", lora_bias=True)),
    "convnet_conv_embedding": ("convnet", dict(r=2, lora_alpha=4, target_modules=["conv", "emb"],
                                               modules_to_save=["head"])),
    "convnet_conv_lora_bias": ("convnet", dict(r=3, lora_alpha=6, target_modules=["conv"], lora_bias=True)),
}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def perturb(model, seed):
    """Random non-zero values in everything the adapter trains (LoRA factors and biases, saved
    modules, biases per the bias mode): parity must not hold by accident (a zero B would be identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def peft_model(kind, fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(init_lora_weights=False, **fields))
    perturb(pm, 1)
    return pm.eval()


def pylora_config(fields):
    fields = dict(fields)
    if fields.get("task_type") == "SEQ_CLS":
        fields["modules_to_save"] = ["classifier"]  # PEFT adds the head for this task type itself
    return pylora.LoraConfig(init_lora_weights=False, **fields)


def pylora_model(kind, fields):
    model = pylora.inject(BUILDERS[kind](), pylora_config(fields))
    pylora.mark_only_lora_trainable(model)
    perturb(model, 2)
    return model.eval()


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def file_layout(d):
    from safetensors import safe_open

    with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def peft_view_of_config(d, task_type):
    """The LoraConfig PEFT builds from adapter_config.json, as a comparable dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = peft.PeftConfig.from_pretrained(str(d)).to_dict()
    c.pop("peft_version")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(c[key], (list, set)):
            c[key] = set(c[key])
    # PEFT adds the task's heads to modules_to_save when it builds the model; pylora's model names
    # only the head it has.
    c["modules_to_save"] = set(c["modules_to_save"] or []) | set(pio.TASK_HEADS.get(task_type, ()))
    return c


# ----------------------------------------------------------------------------------------------
# Round trips with identical outputs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_peft_to_pylora(case, tmp_path):
    kind, fields = CASES[case]
    pm = peft_model(kind, fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    expected = output(pm, kind)
    assert rel_err(output(BUILDERS[kind](), kind), expected) > 1e-2  # the adapter matters

    model = pylora.load_adapter(BUILDERS[kind](), tmp_path)
    assert rel_err(output(model, kind), expected) < 1e-5
    # What was loaded is the file's tensors, bit for bit.
    adapter = pio.read_adapter(tmp_path)
    params = dict(model.named_parameters())
    for name, mw in adapter.modules.items():
        assert torch.equal(bits(params[f"{name}.lora_A"]), bits(mw.lora_A))
        assert torch.equal(bits(params[f"{name}.lora_B"]), bits(mw.lora_B))
        if mw.lora_B_bias is not None:
            assert torch.equal(bits(params[f"{name}.lora_B_bias"]), bits(mw.lora_B_bias))
    assert {n: m.r for n, m in adapter.modules.items()} == \
        {n.removeprefix("base_model.model."): layer.r[("default")] for n, layer in pm.named_modules()
         if isinstance(layer, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("case", CASES)
def test_pylora_to_peft(case, tmp_path):
    kind, fields = CASES[case]
    model = pylora_model(kind, fields)
    expected = output(model, kind)
    assert rel_err(output(BUILDERS[kind](), kind), expected) > 1e-2
    pylora.save_adapter(model, tmp_path / "pylora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(BUILDERS[kind](), str(tmp_path / "pylora")).eval()
        assert rel_err(output(pm, kind), expected) < 1e-5
        # The same keys, shapes, metadata and config as PEFT's own file for this configuration.
        peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(init_lora_weights=False, **fields)) \
            .save_pretrained(tmp_path / "peft")
    assert file_layout(tmp_path / "pylora") == file_layout(tmp_path / "peft")
    assert file_layout(tmp_path / "pylora")[1] == {"format": "pt"}
    task_type = fields.get("task_type")
    assert peft_view_of_config(tmp_path / "pylora", task_type) == peft_view_of_config(tmp_path / "peft", task_type)


@pytest.mark.parametrize("case", CASES)
def test_pylora_to_pylora(case, tmp_path):
    kind, fields = CASES[case]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path)
    loaded = pylora.load_adapter(BUILDERS[kind](), tmp_path)
    assert torch.equal(output(loaded, kind), output(model, kind))
    # Every tensor of the model, bit for bit; only the frozen originals of modules_to_save stay the
    # base model's (PEFT's bias="all" writes their biases, which pylora does not apply).
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if ".original_module." not in key:
            assert torch.equal(bits(a[key]), bits(b[key])), key
    expected = {**pylora.get_config(model).to_dict(), "inference_mode": True}
    if fields["target_modules"] == "all-linear":  # written as the modules it selected, as PEFT writes it
        expected["target_modules"] = sorted(n for n, _ in pylora.lora_layers(model))
    assert pylora.get_config(loaded).to_dict() == expected


def test_reader_shapes_scales_and_extras_without_a_model(tmp_path):
    kind, fields = CASES["llama_patterns_rslora"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path)
    adapter = pio.read_adapter(tmp_path)
    assert isinstance(adapter.config, pylora.LoraConfig) and adapter.path == os.fspath(tmp_path)
    q0, v0, o1 = (adapter.modules[f"model.layers.{i}.self_attn.{m}"] for i, m in ((0, "q_proj"), (0, "v_proj"),
                                                                                   (1, "o_proj")))
    assert (q0.kind, q0.r, q0.alpha, q0.scale) == ("linear", 4, 32.0, 32 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert (v0.r, v0.alpha, v0.scale) == (2, 8.0, 8 / 2 ** 0.5)
    assert (o1.r, tuple(o1.lora_A.shape), tuple(o1.lora_B.shape)) == (6, (6, 32), (32, 6))
    assert (v0.in_features, v0.out_features) == (32, 16)
    assert adapter.extra_tensors == {} and adapter.num_params == sum(
        m.lora_A.numel() + m.lora_B.numel() for m in adapter.modules.values())

    kind, fields = CASES["convnet_conv_embedding"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path / "net")
    net = pio.read_adapter(tmp_path / "net")
    assert {n: (m.kind, tuple(m.lora_A.shape), tuple(m.lora_B.shape)) for n, m in net.modules.items()} == {
        "conv": ("conv2d", (2, 3, 3, 3), (8, 2, 1, 1)), "emb": ("embedding", (2, 10), (8, 2))}
    assert net.extra_kinds == {"head.weight": "modules_to_save", "head.bias": "modules_to_save"}

    kind, fields = CASES["bert_bias_all"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path / "bert")
    bert = pio.read_adapter(tmp_path / "bert")
    assert bert.extra_kinds["bert.encoder.layer.0.attention.self.query.bias"] == "bias"
    assert bert.extra_kinds["classifier.bias"] == "modules_to_save"
    assert set(bert.ignored) == {"base_model.model.classifier.original_module.bias",
                                 "base_model.model.classifier.modules_to_save.bias"}


def test_load_from_an_adapter_file_and_into_eval_mode(tmp_path):
    kind, fields = CASES["llama_q_v"]
    pylora.save_adapter(pylora_model(kind, {**fields, "lora_dropout": 0.5}), tmp_path)
    model = pylora.load_adapter(BUILDERS[kind](), pio.read_adapter(tmp_path))
    # The model was in eval mode: the new layers follow, so dropout does not act.
    assert all(not layer.training for _, layer in pylora.lora_layers(model))
    assert torch.equal(output(model, kind), output(model, kind))


def test_keys_without_prefix_as_transformers_writes_them(tmp_path):
    from safetensors.torch import load_file, save_file

    kind, fields = CASES["gpt2_conv1d"]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k.removeprefix(pio.PREFIX): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    adapter = pio.read_adapter(tmp_path)
    assert adapter.key_prefix == "" and "transformer.h.1.attn.c_attn" in adapter.modules
    assert torch.equal(output(pylora.load_adapter(BUILDERS[kind](), adapter), kind), output(model, kind))


def test_module_inject_refuses_leaves_the_model_untouched(tmp_path):
    kind, fields = CASES["convnet_conv_lora_bias"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path)
    model = BUILDERS[kind]()
    model.conv.dilation = (2, 2)  # same weight shape; LoraConv2d supports dilation 1 only
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=r"conv\.dilation=\(2, 2\) is not supported"):
        pylora.load_adapter(model, tmp_path)
    assert_untouched(model, snap)


def test_value_beyond_the_model_dtype_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    kind, fields = CASES["bert_bias_all"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    t = load_file(path)
    t["base_model.model.bert.pooler.dense.bias"][3] = 1e6  # finite in float32, inf in float16
    save_file(t, path, metadata={"format": "pt"})
    pylora.load_adapter(BUILDERS[kind](), tmp_path)  # a float32 model holds it
    model = BUILDERS[kind]().half()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=r"bias tensor 'bert\.pooler\.dense\.bias': values beyond the "
                                                   r"range of float16"):
        pylora.load_adapter(model, tmp_path)
    assert_untouched(model, snap)


def test_save_looks_through_a_wrapper(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    pylora.save_adapter(Wrapper(model), tmp_path / "wrapped")
    pylora.save_adapter(model, tmp_path / "plain")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "wrapped" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_pickle_written_by_peft_loads_only_when_allowed(tmp_path):
    kind, fields = CASES["gpt2_conv1d"]
    pm = peft_model(kind, fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path, safe_serialization=False)
    assert os.listdir(tmp_path).count("adapter_model.bin") == 1
    model = BUILDERS[kind]()
    with pytest.raises(pylora.AdapterError, match=r"adapter_model\.bin: a pickle file is refused"):
        pylora.load_adapter(model, tmp_path)
    pylora.load_adapter(model, tmp_path, allow_pickle=True)
    assert rel_err(output(model, kind), output(pm, kind)) < 1e-5


def test_init_variants_that_leave_the_base_alone_are_accepted(tmp_path):
    kind, fields = CASES["llama_q_v"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    for init, extra in (("eva", {"eva_config": {"rho": 2.0}}), ("orthogonal", {}), ("gaussian", {})):
        path.write_text(json.dumps({**raw, "init_lora_weights": init, **extra, "new_off_option": None}))
        assert pio.read_adapter(tmp_path).config.init_lora_weights in (True, "gaussian")


def test_every_peft_lora_field_is_classified():
    """A PEFT field pylora has not classified must not pass by default: this fails when PEFT adds one."""
    own = set(pylora.LoraConfig.__dataclass_fields__)
    known = own | set(adapter_config.HARMLESS_FIELDS) | set(adapter_config.REFUSED_UNLESS_DEFAULT) | {"peft_type"}
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert sorted(set(fields) - known) == []
    for name, (accepted, _) in adapter_config.REFUSED_UNLESS_DEFAULT.items():
        if name in fields:  # PEFT's default is accepted, so a file PEFT writes with the option off loads
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert default in accepted, name


# ----------------------------------------------------------------------------------------------
# The broken-adapter corpus: the error it must produce, and the model untouched after it
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    kind, fields = CASES["llama_q_v"]
    pylora.save_adapter(pylora_model(kind, fields), d)
    return d


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()})


def assert_untouched(model, snap):
    structure, tensors = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert pylora.get_config(model) is None
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for key, before in tensors.items():
        assert now[key].dtype == before.dtype and torch.equal(bits(now[key]), bits(before)), key


def test_corpus_is_large_and_distinct():
    ids = [c[0] for c in CORPUS]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_adapter_refused_model_untouched(case, valid_adapter, tmp_path):
    _, mutate, pattern, model_free = case
    d = tmp_path / "adapter"
    shutil.copytree(valid_adapter, d)
    mutate(str(d))
    if model_free:
        with pytest.raises(pylora.AdapterError, match=pattern):
            pio.read_adapter(d)
    else:
        pio.read_adapter(d)  # only the model shows what is wrong
    model = BUILDERS["llama"]()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=pattern) as info:
        pylora.load_adapter(model, d)
    assert_untouched(model, snap)
    assert isinstance(info.value, ValueError) and str(d) in str(info.value)


PEFT_REFUSED = {
    "dora": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), r"use_dora=True is not supported"),
    "pissa": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
              r"init_lora_weights='pissa' is not supported \(PiSSA moves the top singular components out of the base"),
    "trainable_tokens": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
                         r"trainable_token_indices=\[1, 2\] is not supported"),
    "alora": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6],
                                      task_type="CAUSAL_LM"), r"alora_invocation_tokens=\[5, 6\] is not supported"),
    "ia3": (lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            r"peft_type='IA3' is not supported \(expected 'LORA'"),
}


@pytest.mark.parametrize("method", PEFT_REFUSED)
def test_peft_adapters_pylora_does_not_implement_are_refused(method, tmp_path):
    make_config, pattern = PEFT_REFUSED[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(BUILDERS["llama"](), make_config()).save_pretrained(tmp_path)
    model = BUILDERS["llama"]()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=pattern):
        pylora.load_adapter(model, tmp_path)
    assert_untouched(model, snap)


def test_path_that_is_not_an_adapter_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(pylora.AdapterError, match=r"file: not a directory \(an adapter is a directory holding"):
        pio.read_adapter(tmp_path / "file")
    with pytest.raises(pylora.AdapterError, match=r"nowhere: no such directory"):
        pio.read_adapter(tmp_path / "nowhere")


def test_loading_into_a_model_that_holds_an_adapter_is_refused(valid_adapter):
    model = pylora.load_adapter(BUILDERS["llama"](), valid_adapter)
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=r"the model already holds a pylora adapter"):
        pylora.load_adapter(model, valid_adapter)
    structure, tensors = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert all(torch.equal(bits(model.state_dict()[k]), bits(v)) for k, v in tensors.items())


class _Payload:
    """Unpickling this calls os.mkdir(marker): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_hostile_pickle_never_runs(valid_adapter, tmp_path):
    d = tmp_path / "hostile"
    shutil.copytree(valid_adapter, d)
    os.remove(d / "adapter_model.safetensors")
    marker = tmp_path / "payload_ran"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
                "payload": _Payload(str(marker))}, d / "adapter_model.bin")
    torch.load(d / "adapter_model.bin", weights_only=False)  # a full unpickle runs the payload...
    assert marker.is_dir()
    marker.rmdir()

    model = BUILDERS["llama"]()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=r"a pickle file is refused \(unpickling can run code\)"):
        pylora.load_adapter(model, d)
    with pytest.raises(pylora.AdapterError, match=r"refused: torch\.load\(weights_only=True\) found more than "
                                                   r"tensors .*mkdir.*pylora never unpickles an adapter fully"):
        pylora.load_adapter(model, d, allow_pickle=True)
    assert not marker.exists()  # ...pylora's never does
    assert_untouched(model, snap)


def test_pickle_holding_other_objects_refused(valid_adapter, tmp_path):
    d = tmp_path / "lists"
    shutil.copytree(valid_adapter, d)
    os.remove(d / "adapter_model.safetensors")
    torch.save({"base_model.model.x.lora_A.weight": [1.0, 2.0]}, d / "adapter_model.bin")
    with pytest.raises(pylora.AdapterError, match=r"entry 'base_model\.model\.x\.lora_A\.weight' holds a list, "
                                                   r"expected a tensor"):
        pio.read_adapter(d, allow_pickle=True)


def test_every_problem_is_listed(valid_adapter, tmp_path):
    d = tmp_path / "many"
    shutil.copytree(valid_adapter, d)
    for mutate in (dict((c[0], c[1]) for c in CORPUS)[k] for k in ("use_dora", "nan_in_B", "inf_in_A")):
        mutate(str(d))
    with pytest.raises(pylora.AdapterError) as info:
        pio.read_adapter(d)
    assert len(info.value.problems) == 3 and str(info.value).startswith(f"{d}: 3 problems:")


# ----------------------------------------------------------------------------------------------
# strict=False: warnings, never silence
# ----------------------------------------------------------------------------------------------

def test_non_strict_warns_and_loads_the_rest(valid_adapter, tmp_path):
    cases = {c[0]: c[1] for c in CORPUS}
    d = tmp_path / "loose"
    shutil.copytree(valid_adapter, d)
    for name in ("module_the_model_lacks", "targeted_module_without_tensors", "bias_without_bias_mode"):
        cases[name](str(d))
    model = BUILDERS["llama"]()
    with pytest.warns(pio.AdapterWarning) as record:
        pylora.load_adapter(model, d, strict=False)
    messages = "\n".join(str(w.message) for w in record)
    assert "model.norm.bias" in messages and "layers.7" in messages and "v_proj.lora_A.weight is missing" in messages
    layers = dict(pylora.lora_layers(model))
    assert torch.count_nonzero(layers["model.layers.1.self_attn.v_proj"].lora_B) == 0  # identity, not random
    loaded = pio.read_adapter(valid_adapter).modules["model.layers.0.self_attn.q_proj"]
    assert torch.equal(layers["model.layers.0.self_attn.q_proj"].lora_B, loaded.lora_B)


def test_non_strict_never_allocates_an_unbounded_rank(valid_adapter, tmp_path):
    d = tmp_path / "huge_rank"
    shutil.copytree(valid_adapter, d)
    cases = {c[0]: c[1] for c in CORPUS}
    cases["targeted_module_without_tensors"](str(d))
    raw = json.loads((d / "adapter_config.json").read_text())
    raw["rank_pattern"] = {"layers.1.self_attn.v_proj": 10**12}  # only the module without tensors
    (d / "adapter_config.json").write_text(json.dumps(raw))
    model = BUILDERS["llama"]()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=r"config rank r=1000000000000 exceeds the module's largest "
                                                   r"dimension 32"):
        pylora.load_adapter(model, d, strict=False)
    assert_untouched(model, snap)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def test_named_adapter_goes_in_a_subfolder(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    assert pylora.save_adapter(model, tmp_path, adapter_name="second") == os.path.join(tmp_path, "second")
    assert sorted(os.listdir(tmp_path / "second")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert pio.read_adapter(tmp_path, adapter_name="second").modules.keys() == dict(pylora.lora_layers(model)).keys()
    with pytest.raises(pylora.AdapterError, match=r"adapters lie in subfolders \(second\): pass adapter_name"):
        pio.read_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(BUILDERS[kind](), str(tmp_path), subfolder="second").eval()
    assert rel_err(output(pm, kind), output(model, kind)) < 1e-5
    for bad in ("../escape", "", "a/b", ".."):
        with pytest.raises(pylora.AdapterError, match=r"adapter_name=.* must be a plain folder name"):
            pylora.save_adapter(model, tmp_path, adapter_name=bad)
    assert sorted(os.listdir(tmp_path)) == ["second"]  # nothing else written, no temporary files left


def test_save_refusals(tmp_path):
    with pytest.raises(pylora.AdapterError, match=r"LlamaForCausalLM holds no pylora adapter"):
        pylora.save_adapter(BUILDERS["llama"](), tmp_path)
    kind, fields = CASES["bert_lora_only_lora_bias"]
    model = pylora_model(kind, fields)
    pylora.merge(model)
    with pytest.raises(pylora.AdapterError, match=r"query\.base_layer\.bias would be written while layer "
                                                   r"'bert\.encoder\.layer\.0\.attention\.self\.query' is merged"):
        pylora.save_adapter(model, tmp_path)
    pylora.unmerge(model)
    with torch.no_grad():
        dict(model.named_parameters())["bert.encoder.layer.1.attention.self.value.lora_A"][2, 3] = float("nan")
    with pytest.raises(pylora.AdapterError, match=r"value\.lora_A\.weight holds non-finite values"):
        pylora.save_adapter(model, tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind, targets", [("llama", ["q_proj"]), ("gpt2", ["c_attn", "wte"])])
def test_save_embedding_layers_as_peft(kind, targets, tmp_path):
    """save_embedding_layers=True writes the whole input/output embeddings, as PEFT does; they load back."""
    fields = dict(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=kind == "gpt2")
    model = pylora_model(kind, fields)
    embedding = model.get_input_embeddings()
    with torch.no_grad():  # a resized or retrained embedding, what the option is for
        getattr(embedding, "base_layer", embedding).weight.mul_(1.5)
    pylora.save_adapter(model, tmp_path / "pylora", save_embedding_layers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(init_lora_weights=False, **fields)) \
            .save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    assert file_layout(tmp_path / "pylora") == file_layout(tmp_path / "peft")
    adapter = pio.read_adapter(tmp_path / "pylora")
    assert set(adapter.extra_kinds.values()) == {"embedding"}
    loaded = pylora.load_adapter(BUILDERS[kind](), tmp_path / "pylora")
    assert torch.equal(output(loaded, kind), output(model, kind))


def test_merged_model_saves_its_unmerged_factors(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path / "a")
    pylora.merge(model)
    pylora.save_adapter(model, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_public_names():
    assert pylora.AdapterError is pio.AdapterError and issubclass(pylora.AdapterError, ValueError)
    assert pylora.save_adapter is pio.save_adapter and pylora.load_adapter is pio.load_adapter
    assert {"save_adapter", "load_adapter", "AdapterError"} <= set(pylora.__all__)


# ----------------------------------------------------------------------------------------------
# Many adapters: progress and errors
# ----------------------------------------------------------------------------------------------

class _Terminal:
    def isatty(self):
        return True

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def test_progress_follows_the_terminal_and_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert pio.progress_enabled() is True
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert pio.progress_enabled() is False
    assert pio.progress_enabled(True) is True
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert pio.progress_enabled() is False


def test_read_adapters_progress_and_errors(valid_adapter, tmp_path, capsys):
    dirs = []
    for i in range(3):
        dirs.append(tmp_path / f"a{i}")
        shutil.copytree(valid_adapter, dirs[-1])
    (dirs[1] / "adapter_config.json").write_text("{")
    with pytest.raises(pylora.AdapterError, match=r"a1/adapter_config\.json: malformed JSON"):
        pio.read_adapters(dirs, progress=False)
    with pytest.warns(pio.AdapterWarning, match=r"adapter 'y' left out: .*a1/adapter_config\.json: malformed JSON"):
        got = pio.read_adapters({"x": dirs[0], "y": dirs[1], "z": dirs[2]}, on_error="warn", progress=True)
    assert list(got) == ["x", "z"] and got["z"].modules.keys() == got["x"].modules.keys()
    err = capsys.readouterr().err
    assert "reading adapters" in err and "3/3" in err
    pio.read_adapters([dirs[0]])  # stderr is not a terminal under pytest: no bar
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------
# pylora info --adapter, through a real subprocess
# ----------------------------------------------------------------------------------------------

def test_cli_info_adapter(valid_adapter, tmp_path, python_env):
    run = lambda d: subprocess.run([PYTHON, "-m", "pylora", "info", "--adapter", str(d)], env=python_env,  # noqa
                                   capture_output=True, text=True, timeout=300)
    out = run(valid_adapter)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "LoRA modules: 4 (linear 4); ranks 4" in text and "problems: none" in text
    assert "model.layers.1.self_attn.v_proj  linear  4  8      2      [4, 32]  [16, 4]  float32" in text
    assert "dtype float32" in text and "weights: " in text

    d = tmp_path / "broken"
    shutil.copytree(valid_adapter, d)
    dict((c[0], c[1]) for c in CORPUS)["nan_in_B"](str(d))
    out = run(d)
    assert out.returncode == 1
    assert "problems: 1" in out.stdout and "values are not finite" in out.stdout
    assert "LoRA modules: 3" in out.stdout  # what could be read is still described
