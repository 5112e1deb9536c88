"""Names as Python users write them, for messages: "float32" (not "torch.float32"), shapes as [4, 32]."""
from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape(t: torch.Tensor) -> list[int]:
    """t's shape as a list, which prints as [4, 32]."""
    return list(t.shape)
