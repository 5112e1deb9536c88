"""What LoRA can wrap, in one place: the module kinds (nn.Linear and transformers' GPT-2 Conv1D as
"linear", nn.Embedding as "embedding", nn.Conv2d as "conv2d"), their in/out sizes, and the shapes of
their factors in PEFT's layout."""
from __future__ import annotations

from typing import Optional

from torch import nn

KINDS = ("linear", "embedding", "conv2d")
SUPPORTED = "nn.Linear, Conv1D, nn.Embedding, nn.Conv2d"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (weight [I, O]), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


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
