"""What LoRA can wrap, in one place: the module kinds (nn.Linear and transformers' GPT-2 Conv1D as
"linear", nn.Embedding as "embedding", nn.Conv2d as "conv2d"), their in/out sizes, the shapes of
their factors in PEFT's layout and their dtype, and whether the base weight is quantized.

A quantized base is still its kind: torchao quantizes an nn.Linear in place (its weight becomes a
torchao tensor subclass), bitsandbytes' Linear8bitLt / Linear4bit are nn.Linear subclasses with
Int8Params / Params4bit weights. Both are recognised by class names and modules, so neither library is
imported (they are optional dependencies). Sizes come from the module's attributes, never from the
weight's shape: a packed 4-bit weight has another shape.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

KINDS = ("linear", "embedding", "conv2d")
SUPPORTED = "nn.Linear, Conv1D, nn.Embedding, nn.Conv2d"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (weight [I, O]), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


class Quantization(NamedTuple):
    """How a base module's weight is quantized: scheme "torchao" | "bnb_int8" | "bnb_4bit", and a
    description for messages, e.g. "bitsandbytes 4-bit nf4 (Linear4bit, Params4bit)"."""

    scheme: str
    description: str


def _bnb_class(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear8bitLt", "Linear4bit"):
            return cls.__name__
    return None


def quantization(module: nn.Module) -> Optional[Quantization]:
    """The quantization of `module`'s weight (torchao tensor subclass, bitsandbytes Int8Params /
    Params4bit or their Linear8bitLt / Linear4bit modules), or None for a dense weight."""
    W = getattr(module, "weight", None)
    if W is None:
        return None
    wcls = type(W).__name__
    bnb = _bnb_class(module)
    if wcls == "Int8Params" or bnb == "Linear8bitLt":
        return Quantization("bnb_int8", f"bitsandbytes 8-bit ({type(module).__name__}, {wcls})")
    if wcls == "Params4bit" or bnb == "Linear4bit":
        qtype = getattr(W, "quant_type", None) or getattr(module, "quant_type", None)
        return Quantization("bnb_4bit", f"bitsandbytes 4-bit{' ' + qtype if qtype else ''} "
                                        f"({type(module).__name__}, {wcls})")
    if type(W).__module__.startswith("torchao."):  # PEFT's test, again without importing torchao
        return Quantization("torchao", f"torchao {wcls}")
    return None


def factor_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of LoRA factors over `module`: float32 over a half-precision or quantized base (as PEFT
    keeps them), else the base weight's dtype."""
    if quantization(module) is not None:
        return torch.float32
    dtype = module.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def module_kind(module: nn.Module) -> Optional[str]:
    """"linear" | "embedding" | "conv2d" for a module LoRA supports, else None."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """(I, O): Linear [O, I] and Conv1D [I, O] weights give in and out features, Embedding [V, D] gives
    (V, D), Conv2d (C_in, C_out). ValueError for another module."""
    W = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(W.shape[0]), int(W.shape[1])
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    raise ValueError(f"{type(module).__name__} is not supported by LoRA (supported: {SUPPORTED})")


def factor_shapes(module: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
    """The shapes of A, B (and lora_B's bias where the kind has one) for rank r, in PEFT's layout:
    linear A [r, I], B [O, r]; embedding A [r, V], B [D, r]; conv2d A [r, C_in, kh, kw], B [C_out, r, 1, 1]."""
    kind = module_kind(module)
    I, O = features(module)
    if kind == "linear":
        return {"A": (r, I), "B": (O, r), "B_bias": (O,)}
    if kind == "embedding":
        return {"A": (r, I), "B": (O, r)}
    _, _, kh, kw = module.weight.shape
    return {"A": (r, I, kh, kw), "B": (O, r, 1, 1), "B_bias": (O,)}
