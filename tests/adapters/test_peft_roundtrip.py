"""PEFT <-> pylora round trips with identical outputs on tiny Llama, GPT-2, BERT and a Conv2d net: the
files pylora writes are PEFT's (keys, shapes, metadata, config), PEFT's load into pylora bit for bit."""
import os
import warnings

import pytest
import torch

import pylora
from pylora import adapters as pa
from pylora.adapters.format import PREFIX
from tests.adapters.common import CASES, file_layout, peft, peft_model, peft_view_of_config, pylora_model
from tests.helpers import bits, rel_err
from tests.models import BUILDERS, output

pytestmark = pytest.mark.usefixtures("one_thread")


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
    adapter = pa.read_adapter(tmp_path)
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

def test_keys_without_prefix_as_transformers_writes_them(tmp_path):
    from safetensors.torch import load_file, save_file

    kind, fields = CASES["gpt2_conv1d"]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k.removeprefix(PREFIX): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    adapter = pa.read_adapter(tmp_path)
    assert adapter.key_prefix == "" and "transformer.h.1.attn.c_attn" in adapter.modules
    assert torch.equal(output(pylora.load_adapter(BUILDERS[kind](), adapter), kind), output(model, kind))

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
    adapter = pa.read_adapter(tmp_path / "pylora")
    assert set(adapter.extra_kinds.values()) == {"embedding"}
    loaded = pylora.load_adapter(BUILDERS[kind](), tmp_path / "pylora")
    assert torch.equal(output(loaded, kind), output(model, kind))
