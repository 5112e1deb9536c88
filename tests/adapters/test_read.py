"""Reading adapter directories without a model: shapes, scales and extras; PEFT's fields classified;
pickles never run; every problem listed; many adapters at once."""
import dataclasses
import json
import os
import shutil

import pytest
import torch

import pylora
from pylora import adapters as pa
from pylora.adapters import config_json
from tests.adapters.common import CASES, assert_untouched, peft, pylora_model
from tests.adapters.corpus import CASES as CORPUS
from tests.helpers import snapshot
from tests.models import BUILDERS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reader_shapes_scales_and_extras_without_a_model(tmp_path):
    kind, fields = CASES["llama_patterns_rslora"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path)
    adapter = pa.read_adapter(tmp_path)
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
    net = pa.read_adapter(tmp_path / "net")
    assert {n: (m.kind, tuple(m.lora_A.shape), tuple(m.lora_B.shape)) for n, m in net.modules.items()} == {
        "conv": ("conv2d", (2, 3, 3, 3), (8, 2, 1, 1)), "emb": ("embedding", (2, 10), (8, 2))}
    assert net.extra_kinds == {"head.weight": "modules_to_save", "head.bias": "modules_to_save"}

    kind, fields = CASES["bert_bias_all"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path / "bert")
    bert = pa.read_adapter(tmp_path / "bert")
    assert bert.extra_kinds["bert.encoder.layer.0.attention.self.query.bias"] == "bias"
    assert bert.extra_kinds["classifier.bias"] == "modules_to_save"
    assert set(bert.ignored) == {"base_model.model.classifier.original_module.bias",
                                 "base_model.model.classifier.modules_to_save.bias"}

def test_init_variants_that_leave_the_base_alone_are_accepted(tmp_path):
    kind, fields = CASES["llama_q_v"]
    pylora.save_adapter(pylora_model(kind, fields), tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    for init, extra in (("eva", {"eva_config": {"rho": 2.0}}), ("orthogonal", {}), ("gaussian", {})):
        path.write_text(json.dumps({**raw, "init_lora_weights": init, **extra, "new_off_option": None}))
        assert pa.read_adapter(tmp_path).config.init_lora_weights in (True, "gaussian")

def test_every_peft_lora_field_is_classified():
    """A PEFT field pylora has not classified must not pass by default: this fails when PEFT adds one."""
    own = set(pylora.LoraConfig.__dataclass_fields__)
    known = own | set(config_json.HARMLESS_FIELDS) | set(config_json.REFUSED_UNLESS_DEFAULT) | {"peft_type"}
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    assert sorted(set(fields) - known) == []
    for name, (accepted, _) in config_json.REFUSED_UNLESS_DEFAULT.items():
        if name in fields:  # PEFT's default is accepted, so a file PEFT writes with the option off loads
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert default in accepted, name

def test_path_that_is_not_an_adapter_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(pylora.AdapterError, match=r"file: not a directory \(an adapter is a directory holding"):
        pa.read_adapter(tmp_path / "file")
    with pytest.raises(pylora.AdapterError, match=r"nowhere: no such directory"):
        pa.read_adapter(tmp_path / "nowhere")

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
                                                   r"tensors .*mkdir.*pylora never unpickles a file fully"):
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
        pa.read_adapter(d, allow_pickle=True)

def test_every_problem_is_listed(valid_adapter, tmp_path):
    d = tmp_path / "many"
    shutil.copytree(valid_adapter, d)
    for mutate in (dict((c[0], c[1]) for c in CORPUS)[k] for k in ("use_dora", "nan_in_B", "inf_in_A")):
        mutate(str(d))
    with pytest.raises(pylora.AdapterError) as info:
        pa.read_adapter(d)
    assert len(info.value.problems) == 3 and str(info.value).startswith(f"{d}: 3 problems:")

def test_read_adapters_progress_and_errors(valid_adapter, tmp_path, capsys):
    dirs = []
    for i in range(3):
        dirs.append(tmp_path / f"a{i}")
        shutil.copytree(valid_adapter, dirs[-1])
    (dirs[1] / "adapter_config.json").write_text("{")
    with pytest.raises(pylora.AdapterError, match=r"a1/adapter_config\.json: malformed JSON"):
        pa.read_adapters(dirs, progress=False)
    with pytest.warns(pa.AdapterWarning, match=r"adapter 'y' left out: .*a1/adapter_config\.json: malformed JSON"):
        got = pa.read_adapters({"x": dirs[0], "y": dirs[1], "z": dirs[2]}, on_error="warn", progress=True)
    assert list(got) == ["x", "z"] and got["z"].modules.keys() == got["x"].modules.keys()
    err = capsys.readouterr().err
    assert "reading adapters" in err and "3/3" in err
    pa.read_adapters([dirs[0]])  # stderr is not a terminal under pytest: no bar
    assert capsys.readouterr().err == ""
