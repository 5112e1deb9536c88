"""save_adapter: through wrappers, named adapters in subfolders, refusals that write nothing, a merged
model saves its unmerged factors; the public names."""
import os
import warnings

import pytest
import torch

import pylora
from pylora import adapters as pa
from tests.adapters.common import CASES, peft, pylora_model
from tests.helpers import rel_err
from tests.models import BUILDERS, output

pytestmark = pytest.mark.usefixtures("one_thread")


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

def test_named_adapter_goes_in_a_subfolder(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    assert pylora.save_adapter(model, tmp_path, adapter_name="second") == os.path.join(tmp_path, "second")
    assert sorted(os.listdir(tmp_path / "second")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert pa.read_adapter(tmp_path, adapter_name="second").modules.keys() == dict(pylora.lora_layers(model)).keys()
    with pytest.raises(pylora.AdapterError, match=r"adapters lie in subfolders \(second\): pass adapter_name"):
        pa.read_adapter(tmp_path)
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

def test_merged_model_saves_its_unmerged_factors(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path / "a")
    pylora.merge(model)
    pylora.save_adapter(model, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

def test_public_names():
    assert pylora.AdapterError is pa.AdapterError and issubclass(pylora.AdapterError, ValueError)
    assert pylora.save_adapter is pa.save_adapter and pylora.load_adapter is pa.load_adapter
    assert {"save_adapter", "load_adapter", "AdapterError"} <= set(pylora.__all__)
