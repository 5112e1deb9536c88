"""Which implementation an op runs: the compiled kernel for the tensors' device when there is one,
otherwise its pure-torch twin in pylora.ops.reference (also forced by reference_mode, for tests). The
dispatcher decides, per call, from the tensors' device: the reference is registered as each op's
fallback kernel."""
from __future__ import annotations

import contextlib
import contextvars

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


def backend(op: str, device: torch.device | str) -> str:
    """"kernel" when `op` runs compiled code for tensors on `device`, else "reference" (what `pylora info`
    reports; the calls themselves go through the dispatcher, see impl)."""
    dev = torch.device(device)
    if not _force_reference.get() and _ext.has_kernel(op, dev.type):
        return "kernel"
    return "reference"


def impl(op: str):
    """The callable that runs `op`: torch.ops.pylora.<op>, whose dispatcher picks the compiled kernel for
    the tensors' device or, on a device without one, the reference (registered as the op's fallback
    below); the reference itself when the extension is not loaded or reference_mode() is on.
    No per-call question to the dispatcher, so torch.compile traces the op (via its fake) with no
    graph break."""
    if not _ext.loaded or (not torch.compiler.is_compiling() and _force_reference.get()):
        return getattr(ref, op)
    return getattr(torch.ops.pylora, op)


# The reference twin as every op's fallback kernel: a device with no compiled kernel (MPS, XPU, a build
# without CUDA) runs it through the dispatcher, below the op's own autograd.
if _ext.loaded:
    for _op in OPS:
        torch.library.impl(f"pylora::{_op}", "CompositeExplicitAutograd")(getattr(ref, _op))
