"""Loads pylora._C once and says what it holds.

When the extension cannot be loaded, `import pylora` still works: it warns once with the original
error and every op runs its pure-torch reference. PYLORA_DISABLE_EXT=1 forces that path.
"""
from __future__ import annotations

import os
import warnings

import torch

_C = None
load_error: str | None = None

if os.environ.get("PYLORA_DISABLE_EXT", "").strip() not in ("", "0"):
    load_error = "disabled by PYLORA_DISABLE_EXT=1"
else:
    try:
        from pylora import _C  # noqa: F811  (registers torch.ops.pylora.* as it loads)
    except Exception as exc:  # ImportError, or OSError for an undefined symbol after a torch upgrade
        load_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"pylora: the compiled kernels could not be loaded ({load_error}); every op runs its pure-torch "
            "reference. Rebuild with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=2,
        )

loaded = _C is not None

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def build_info() -> dict:
    """What the compiled extension holds: {"cuda": bool, "cuda_version", "cuda_arches", "cpu_arch"}."""
    if _C is None:
        return {"cuda": False, "cuda_version": None, "cuda_arches": None, "cpu_arch": None}
    return dict(_C.build_info())


def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.pylora.<op> has a compiled kernel for tensors on `device_type`."""
    key = _DISPATCH_KEYS.get(device_type)
    if _C is None or key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pylora::{op}", key)
