"""An injected transformers model's save_pretrained (PEFT's adapter files, as PeftModel writes them; in a
Trainer checkpoint folder also the resume copy) and its load_state_dict of an adapter state dict (the
base not reported missing): what is installed where, what is written, what is refused."""
import copy
import os
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import pylora
from pylora.adapters import AdapterError
from pylora.nn.inject import adapter_keys
from tests.models import bert, convnet, llama, randomize_lora

pytest.importorskip("transformers")

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def model(**fields):
    m = randomize_lora(pylora.inject(llama(), pylora.LoraConfig(**{**CFG, **fields})), seed=3)
    return pylora.mark_only_lora_trainable(m)


def read_dir(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def test_save_pretrained_writes_what_save_adapter_writes(tmp_path):
    m = model()
    m.save_pretrained(tmp_path / "a")
    pylora.save_adapter(m, tmp_path / "b")
    assert list(read_dir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert read_dir(tmp_path / "a") == read_dir(tmp_path / "b")  # byte for byte


def test_resume_copy_in_checkpoint_folders_only(tmp_path):
    m = model()
    m.save_pretrained(tmp_path / "checkpoint-7")
    resume = load_file(tmp_path / "checkpoint-7" / "model.safetensors")
    assert list(resume) == adapter_keys(m) and len(resume) == 8
    assert all(torch.equal(resume[k], v) for k, v in m.state_dict().items() if k in resume)
    m.save_pretrained(tmp_path / "checkpoint-x")  # not Trainer's name
    m.save_pretrained(tmp_path / "forced", resume_state=True)
    m.save_pretrained(tmp_path / "checkpoint-8", resume_state=False)
    assert not (tmp_path / "checkpoint-x" / "model.safetensors").exists()
    assert (tmp_path / "forced" / "model.safetensors").exists()
    assert not (tmp_path / "checkpoint-8" / "model.safetensors").exists()
    for d in ("checkpoint-7", "checkpoint-x", "forced", "checkpoint-8"):
        assert not (tmp_path / d / "config.json").exists()


def test_state_dict_argument_is_used(tmp_path):
    """Trainer passes a state dict gathered from FSDP / DeepSpeed shards: its tensors are the ones written."""
    m = model()
    key = "model.layers.1.self_attn.v_proj.lora_B"
    gathered = {key: torch.full_like(m.state_dict()[key], 0.25)}
    m.save_pretrained(tmp_path / "checkpoint-1", state_dict=gathered)
    peft_file = load_file(tmp_path / "checkpoint-1" / "adapter_model.safetensors")
    assert torch.equal(peft_file[f"base_model.model.{key}.weight"], gathered[key])
    assert torch.equal(load_file(tmp_path / "checkpoint-1" / "model.safetensors")[key], gathered[key])
    other = "model.layers.0.self_attn.q_proj.lora_A"
    assert torch.equal(peft_file[f"base_model.model.{other}.weight"], m.state_dict()[other])


def test_arguments(tmp_path):
    m = model()
    m.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    m.save_pretrained(tmp_path / "harmless", max_shard_size="1GB", token=None, save_peft_format=True)
    assert (tmp_path / "harmless" / "adapter_model.safetensors").exists()
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        m.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(AdapterError, match="safe_serialization=False"):
        m.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(AdapterError, match="variant='fp16'"):
        m.save_pretrained(tmp_path / "v", variant="fp16")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        m.save_pretrained(tmp_path / "file")


def test_warns_when_training_outside_the_adapter(tmp_path):
    m = randomize_lora(pylora.inject(llama(), pylora.LoraConfig(**CFG)))  # no mark_only_lora_trainable
    with pytest.warns(UserWarning, match=r"parameters outside it require grad \(model\.embed_tokens\.weight"):
        m.save_pretrained(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pylora.mark_only_lora_trainable(m).save_pretrained(tmp_path / "b")


def test_installed_on_transformers_models_only_and_removed_by_unload(tmp_path):
    net = pylora.inject(convnet(), pylora.LoraConfig(r=2, target_modules=["head"]))
    assert not hasattr(net, "save_pretrained")
    m = model()
    assert "save_pretrained" in vars(m)
    plain = pylora.unload(copy.deepcopy(m))
    assert "save_pretrained" not in vars(plain)
    plain.save_pretrained(tmp_path / "plain")  # transformers' own: the whole model
    assert (tmp_path / "plain" / "config.json").exists() and not (tmp_path / "plain" / "adapter_config.json").exists()
    # A model pylora.load_adapter built saves its adapter the same way.
    m.save_pretrained(tmp_path / "a")
    loaded = pylora.load_adapter(llama(), tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    assert read_dir(tmp_path / "a") == read_dir(tmp_path / "b")
    # Another architecture, other targets.
    b = pylora.inject(bert(), pylora.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    b.save_pretrained(tmp_path / "bert")
    assert any(".classifier." in k for k in load_file(tmp_path / "bert" / "adapter_model.safetensors"))


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_saves_its_own_adapter(duplicate, tmp_path):
    m = model()
    twin = duplicate(m)
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.lora_B.fill_(0.5)
    twin.save_pretrained(tmp_path / "twin")
    m.save_pretrained(tmp_path / "orig")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.all(load_file(tmp_path / "twin" / "adapter_model.safetensors")[key] == 0.5)
    assert torch.equal(load_file(tmp_path / "orig" / "adapter_model.safetensors")[key],
                       m.model.layers[0].self_attn.q_proj.lora_B.detach())


# ----------------------------------------------------------------------------------------------
# load_state_dict of an adapter state dict
# ----------------------------------------------------------------------------------------------

def test_adapter_state_dict_loads_strictly():
    source = model()
    target = model()
    pylora.unmerge(target)
    adapter = {k: v for k, v in source.state_dict().items() if k in set(adapter_keys(source))}
    result = target.load_state_dict(adapter)  # strict: the base is not missing
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(target.state_dict()[k], v) for k, v in adapter.items())
    # lora_state_dict, the public name for it, loads the same way.
    assert target.load_state_dict(pylora.lora_state_dict(source)).missing_keys == []


def test_adapter_keys_it_lacks_are_still_missing():
    m = model()
    adapter = {k: v for k, v in m.state_dict().items() if k in set(adapter_keys(m))}
    gone = adapter.pop("model.layers.1.self_attn.q_proj.lora_A")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"model\.layers\.1\.self_attn\.q_proj\.lora_A\""):
        m.load_state_dict(adapter)
    result = m.load_state_dict(adapter, strict=False)
    assert result.missing_keys == ["model.layers.1.self_attn.q_proj.lora_A"]
    assert gone is not None


def test_other_state_dicts_load_as_torch_loads_them():
    m = model()
    full = m.state_dict()
    assert m.load_state_dict(full).missing_keys == []
    # Some base tensors with the adapter: not an adapter state dict, so the rest of the base is missing.
    some = {k: v for k, v in full.items() if k in set(adapter_keys(m)) or k == "model.norm.weight"}
    result = m.load_state_dict(some, strict=False)
    assert "model.embed_tokens.weight" in result.missing_keys and "model.norm.weight" not in result.missing_keys
    # Nothing of the adapter: everything is missing.
    result = m.load_state_dict({}, strict=False)
    assert set(result.missing_keys) == set(full)
    # After unload the model is plain: an adapter state dict is all unexpected keys.
    adapter = {k: v for k, v in full.items() if k in set(adapter_keys(m))}
    plain = pylora.unload(m)
    result = plain.load_state_dict(adapter, strict=False)
    assert set(result.unexpected_keys) == set(adapter) and "model.embed_tokens.weight" in result.missing_keys


def test_adapter_state_dict_of_a_nested_model():
    """The injected model inside another module, loaded from the outside (keys with a prefix)."""
    outer = nn.ModuleDict({"lm": model(), "head": nn.Linear(2, 2)})
    adapter = {f"lm.{k}": v for k, v in outer["lm"].state_dict().items() if k in set(adapter_keys(outer["lm"]))}
    result = outer.load_state_dict(adapter, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]


def test_adapter_keys_follow_the_config():
    m = model(bias="lora_only")
    assert {k for k in adapter_keys(m) if k.endswith("bias")} == set()  # Llama's q/v have no bias
    b = pylora.inject(bert(), pylora.LoraConfig(r=2, target_modules=["query"], bias="all",
                                                 modules_to_save=["classifier"]))
    keys = set(adapter_keys(b))
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in keys
    assert "bert.embeddings.LayerNorm.bias" in keys  # bias="all" trains every bias
    assert {"classifier.trained_module.weight", "classifier.trained_module.bias"} <= keys
    assert not any(k.endswith((".weight", ".running_mean")) and ".trained_module." not in k and "lora_" not in k
                   for k in keys)  # no base weight

