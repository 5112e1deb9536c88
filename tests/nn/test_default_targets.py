"""LoraConfig without target_modules: inject takes PEFT's default for the model's type (the same modules
PEFT wraps), says what it chose, leaves the caller's config as it was, and refuses a model of unknown type
naming the argument. pylora's table is PEFT's (compared with the installed PEFT's)."""
import json
import logging
import re
import types

import pytest
import torch
from torch import nn

import pylora
from pylora.nn.targets import DEFAULT_TARGET_MODULES
from tests.helpers import assert_same, snapshot
from tests.models import bert, convnet, gpt2, llama

transformers = pytest.importorskip("transformers")


def mistral():
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


def qwen2():
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert, "mistral": mistral, "qwen2": qwen2}


def wrapped(model):
    return sorted(n for n, _ in pylora.lora_layers(model))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_default_targets_by_model_type(kind, caplog):
    cfg = pylora.LoraConfig(r=4)
    with caplog.at_level(logging.WARNING, logger="pylora"):
        model = pylora.inject(MODELS[kind](), cfg)
    want = DEFAULT_TARGET_MODULES[kind]
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped(model)}
    assert leaves == set(want) and len(wrapped(model)) == 2 * len(want)  # two layers each
    # What was chosen is said, once: the model type and the targets.
    said = [r.getMessage() for r in caplog.records if r.name == "pylora"]
    assert len(said) == 1 and f"model_type {kind!r}" in said[0] and repr(list(want)) in said[0], said
    # The model's config holds the choice; the caller's config is untouched, so it serves other types too.
    assert pylora.get_config(model).target_modules == list(want)
    assert cfg.target_modules is None
    other = pylora.inject(llama(), cfg)
    assert {n.rsplit(".", 1)[-1] for n in wrapped(other)} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_default_targets_are_the_modules_peft_wraps(kind):
    peft = pytest.importorskip("peft")
    ours = pylora.inject(MODELS[kind](), pylora.LoraConfig(r=4))
    theirs = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(r=4))
    want = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))
    assert wrapped(ours) == want


def test_the_table_is_peft_s():
    """The reference: PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING. A difference means the
    installed PEFT changed its table: update pylora/nn/targets.py to match."""
    pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs

    norm = lambda v: v if isinstance(v, str) else sorted(v)
    ours = {k: norm(v) for k, v in DEFAULT_TARGET_MODULES.items()}
    theirs = {k: norm(v) for k, v in theirs.items()}
    assert ours == theirs, {"only pylora": sorted(ours.keys() - theirs.keys()),
                            "only PEFT": sorted(theirs.keys() - ours.keys()),
                            "differ": sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])}


def test_saved_adapter_lists_the_chosen_targets(tmp_path):
    model = pylora.inject(llama(), pylora.LoraConfig(r=4))
    with torch.no_grad():
        for _, layer in pylora.lora_layers(model):
            layer.lora_B.normal_()
    pylora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    back = pylora.load_adapter(llama(), tmp_path)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="mystery")
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("build, says", [
    (Mystery, r"Mystery has model_type 'mystery', for which pylora \(like PEFT\) has no default"),
    (convnet, r"ConvEmbNet has no transformers config\.model_type"),
])
def test_unknown_model_type_is_refused_naming_the_argument(build, says):
    model = build()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"LoraConfig\(target_modules=None\)") as info:
        pylora.inject(model, pylora.LoraConfig(r=4))
    assert re.search(says, str(info.value)) and "pass target_modules" in str(info.value)
    assert_same(model, snap)
    assert pylora.get_config(model) is None


def test_a_file_must_name_its_targets(tmp_path):
    """An adapter file records the choice made; one without targets is refused, naming the field."""
    model = pylora.inject(llama(), pylora.LoraConfig(r=4, target_modules=["q_proj"]))
    pylora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = None
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(pylora.AdapterError, match=r"target_modules=None names no module"):
        pylora.load_adapter(llama(), tmp_path)


def test_unresolved_config_cannot_match():
    with pytest.raises(ValueError, match="target_modules=None selects no module by itself"):
        pylora.LoraConfig().matches("model.layers.0.self_attn.q_proj")
