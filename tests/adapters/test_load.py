"""load_adapter: into eval mode, refusals that leave the model untouched (inject's own checks, values
beyond the model's dtype, a model that already holds an adapter), strict=False."""
import json
import shutil

import pytest
import torch

import pylora
from pylora import adapters as pa
from tests.adapters.common import CASES, assert_untouched, pylora_model
from tests.adapters.corpus import CASES as CORPUS
from tests.helpers import bits, snapshot
from tests.models import BUILDERS, output

pytestmark = pytest.mark.usefixtures("one_thread")


def test_load_from_an_adapter_file_and_into_eval_mode(tmp_path):
    kind, fields = CASES["llama_q_v"]
    pylora.save_adapter(pylora_model(kind, {**fields, "lora_dropout": 0.5}), tmp_path)
    model = pylora.load_adapter(BUILDERS[kind](), pa.read_adapter(tmp_path))
    # The model was in eval mode: the new layers follow, so dropout does not act.
    assert all(not layer.training for _, layer in pylora.lora_layers(model))
    assert torch.equal(output(model, kind), output(model, kind))

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

def test_loading_into_a_model_that_holds_an_adapter_is_refused(valid_adapter):
    model = pylora.load_adapter(BUILDERS["llama"](), valid_adapter)
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=r"the model already holds a pylora adapter"):
        pylora.load_adapter(model, valid_adapter)
    structure, tensors = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert all(torch.equal(bits(model.state_dict()[k]), bits(v)) for k, v in tensors.items())

def test_non_strict_warns_and_loads_the_rest(valid_adapter, tmp_path):
    cases = {c[0]: c[1] for c in CORPUS}
    d = tmp_path / "loose"
    shutil.copytree(valid_adapter, d)
    for name in ("module_the_model_lacks", "targeted_module_without_tensors", "bias_without_bias_mode"):
        cases[name](str(d))
    model = BUILDERS["llama"]()
    with pytest.warns(pa.AdapterWarning) as record:
        pylora.load_adapter(model, d, strict=False)
    messages = "\n".join(str(w.message) for w in record)
    assert "model.norm.bias" in messages and "layers.7" in messages and "v_proj.lora_A.weight is missing" in messages
    layers = dict(pylora.lora_layers(model))
    assert torch.count_nonzero(layers["model.layers.1.self_attn.v_proj"].lora_B) == 0  # identity, not random
    loaded = pa.read_adapter(valid_adapter).modules["model.layers.0.self_attn.q_proj"]
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
