"""Default target modules by model type, as PEFT chooses them when a LoraConfig names none.

The table is PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft/utils/constants.py, PEFT
0.21), keyed by a transformers config's `model_type`; tests/nn/test_default_targets.py compares it with
the installed PEFT's. A config alone cannot know the model, so inject resolves the targets when the
config meets it, and says what it chose.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Union

from torch import nn

from pylora.nn.config import LoraConfig

logger = logging.getLogger("pylora")

DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


def model_type(model: nn.Module) -> Optional[str]:
    """A transformers model's `config.model_type` (None for a model without one)."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) and value else None


def with_default_targets(model: nn.Module, cfg: LoraConfig, caller: str = "inject") -> LoraConfig:
    """`cfg` itself when it names its targets; otherwise a copy with PEFT's default target_modules for the
    model's type, logged (logger "pylora", level WARNING) with the type and the targets. The caller's
    config is left as it was, so one config can serve models of several types. ValueError, naming the
    argument, for a model whose type has no default."""
    if cfg.target_modules is not None:
        return cfg
    kind = model_type(model)
    targets = DEFAULT_TARGET_MODULES.get(kind) if kind is not None else None
    if targets is None:
        what = (f"has model_type {kind!r}, for which pylora (like PEFT) has no default" if kind is not None
                else "has no transformers config.model_type to choose a default by")
        raise ValueError(f"{caller}: LoraConfig(target_modules=None) asks for the default targets of the model's "
                         f"type, but {type(model).__name__} {what}; pass target_modules: a list of module names "
                         "such as ['q_proj', 'v_proj'], a full-match regex, or 'all-linear'")
    targets = targets if isinstance(targets, str) else list(targets)
    logger.warning("pylora %s: LoraConfig(target_modules=None): using the default for model_type %r, "
                   "target_modules=%r (PEFT's choice)", caller, kind, targets)
    return dataclasses.replace(cfg, target_modules=targets)
