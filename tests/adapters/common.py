"""What the adapter-file tests share: one case per architecture and option set (CASES), models with a
perturbed adapter made by PEFT or by pylora, and views of what a save wrote."""
import os
import warnings

import pytest
import torch

import pylora
from pylora.adapters.format import TASK_HEADS
from tests.helpers import assert_same
from tests.models import BUILDERS

peft = pytest.importorskip("peft")

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
    c["modules_to_save"] = set(c["modules_to_save"] or []) | set(TASK_HEADS.get(task_type, ()))
    return c


def assert_untouched(model, snap):
    """As snapshot() saw it, and holding no pylora adapter."""
    assert_same(model, snap)
    assert pylora.get_config(model) is None
