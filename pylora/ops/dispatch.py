"""Which implementation an op runs: the compiled kernel for the tensors' device when there is one,
otherwise its pure-torch twin in pylora.ops.reference (also forced by reference_mode, for tests)."""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from pylora import _ext
from pylora.ops import reference as ref

OPS = ("merge_", "unmerge_", "lora_linear", "lora_linear_backward", "lora_apply_", "lora_multi",
       "lora_multi_backward")

_force_reference = contextvars.ContextVar("pylora_force_reference", default=False)


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    """Within the block, every op runs its pure-torch reference (tests compare the two paths)."""
    token = _force_reference.set(enabled)
    try:
        yield
    finally:
        _force_reference.reset(token)


def reference_forced() -> bool:
    return _force_reference.get()


def backend(op: str, device: torch.device | str) -> str:
    """"kernel" when `op` runs compiled code for tensors on `device`, else "reference"."""
    dev = torch.device(device)
    if not _force_reference.get() and _ext.has_kernel(op, dev.type):
        return "kernel"
    return "reference"


@functools.lru_cache(maxsize=None)
def compiled(op: str, device_type: str):
    """torch.ops.pylora.<op> when it has a kernel for `device_type`, else None; looked up once, since the
    per-layer serving path calls lora_apply_ once per wrapped module per forward."""
    return getattr(torch.ops.pylora, op) if _ext.has_kernel(op, device_type) else None


def impl(op: str, device: torch.device):
    """The callable that runs `op` for tensors on `device`: the compiled op or its reference twin."""
    if backend(op, device) == "kernel":
        return getattr(torch.ops.pylora, op)
    return getattr(ref, op)
