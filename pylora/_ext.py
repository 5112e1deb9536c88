"""Loads pylora._C once and says what it holds, and why it could not load.

When the extension cannot be loaded, `import pylora` still works: it warns once with the reason and
every op runs its pure-torch reference. PYLORA_DISABLE_EXT=1 forces that path.

The build records the torch it was compiled against in pylora/_build_facts.py (setup.py writes it with
the extension). An extension links against one torch's C++ ABI, so when the torch found is another,
it is not loaded at all: the warning names both torches and the fix, instead of an undefined symbol.
The CPU kernels' ISA level is chosen when the extension loads (csrc/cpu/dispatch.cpp);
PYLORA_CPU_ISA=avx2|default forces a lower one.
"""
from __future__ import annotations

import os
import warnings

import torch

_C = None
load_error: str | None = None


def _read_facts() -> dict | None:
    """pylora/_build_facts.py as a dict; None for a checkout that was never built (or built before it existed)."""
    try:
        from pylora import _build_facts
    except ImportError:
        return None
    return {name: getattr(_build_facts, name, None)
            for name in ("TORCH_VERSION", "TORCH_CUDA", "CUDA_KERNELS", "CPU_ISAS", "CPU_ARCH")}


def _release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the torch release, what a wheel's requirement pins."""
    return str(version).split("+")[0]


def _describe(version: str, cuda: str | None) -> str:
    return f"torch {version} ({'CUDA ' + cuda if cuda else 'CPU-only'})"


def torch_mismatch(facts: dict | None, version: str, cuda: str | None) -> str | None:
    """Why an extension built as `facts` says cannot load beside torch `version` (torch.version.cuda
    `cuda`), as the message to show; None when it can. Another release has another C++ ABI; CUDA kernels
    need a CUDA build of torch with the same CUDA major version (its libcudart and libc10_cuda)."""
    if not facts or not facts.get("TORCH_VERSION"):
        return None
    built, built_cuda = str(facts["TORCH_VERSION"]), facts.get("TORCH_CUDA")
    same = _release(built) == _release(version)
    if same and facts.get("CUDA_KERNELS"):
        same = cuda is not None and built_cuda is not None and cuda.split(".")[0] == str(built_cuda).split(".")[0]
    if same:
        return None
    return (f"the compiled kernels were built for {_describe(built, built_cuda)}"
            f"{' with CUDA kernels' if facts.get('CUDA_KERNELS') else ''}, but {_describe(version, cuda)} is "
            f"installed, so they were not loaded and every op runs its pure-torch reference (slower). Fix: "
            f"install the torch they were built for, `pip install torch=={_release(built)}`"
            f"{' (a CUDA ' + str(built_cuda) + ' build)' if facts.get('CUDA_KERNELS') else ''}, or rebuild "
            f"pylora against this torch: `pip install --no-build-isolation --no-deps --force-reinstall "
            f"<pylora sdist or source checkout>`")


facts = _read_facts()

if os.environ.get("PYLORA_DISABLE_EXT", "").strip() not in ("", "0"):
    load_error = "disabled by PYLORA_DISABLE_EXT=1"
elif (mismatch := torch_mismatch(facts, torch.__version__, torch.version.cuda)) is not None:
    load_error = mismatch
    warnings.warn(f"pylora: {mismatch}", RuntimeWarning, stacklevel=2)
else:
    try:
        from pylora import _C  # noqa: F811  (registers torch.ops.pylora.* as it loads)
    except Exception as exc:  # ImportError, or OSError for an undefined symbol after a torch upgrade
        load_error = f"{type(exc).__name__}: {exc}"
        built = f"built for {_describe(facts['TORCH_VERSION'], facts['TORCH_CUDA'])}, " if facts else ""
        warnings.warn(
            f"pylora: the compiled kernels could not be loaded ({load_error}); {built}found "
            f"{_describe(torch.__version__, torch.version.cuda)}; every op runs its pure-torch reference. Rebuild "
            "against this torch: `pip install --no-build-isolation -e .` in a source checkout, or `pip install "
            "--no-build-isolation --no-deps --force-reinstall <pylora sdist>`",
            RuntimeWarning,
            stacklevel=2,
        )

loaded = _C is not None

if loaded and (_note := _C.build_info().get("cpu_isa_note")):
    # PYLORA_CPU_ISA asked for a level this build or this CPU does not have: say which one runs instead.
    warnings.warn(f"pylora: {_note}; the CPU kernels run {_C.build_info()['cpu_isa']}", RuntimeWarning,
                  stacklevel=2)

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def build_info() -> dict:
    """What the compiled extension holds: {"cuda": bool, "cuda_version", "cuda_arches", "torch_version" (the
    torch it was built against), "cpu_arch" (the -march of a native build, else None), "cpu_isa" (the CPU
    kernels' ISA level running: "avx512", "avx2" or "default"), "cpu_isas" (the levels compiled, best
    first), "cpu_isas_supported" (those this CPU runs), "cpu_isa_request" (PYLORA_CPU_ISA), "cpu_isa_note"
    (why that request was not followed)}. Without the extension, what pylora/_build_facts.py recorded
    and None for the rest."""
    if _C is None:
        f = facts or {}
        return {"cuda": bool(f.get("CUDA_KERNELS")), "cuda_version": None, "cuda_arches": None,
                "torch_version": f.get("TORCH_VERSION"), "cpu_arch": f.get("CPU_ARCH"), "cpu_isa": None,
                "cpu_isas": tuple(f.get("CPU_ISAS") or ()), "cpu_isas_supported": (),
                "cpu_isa_request": os.environ.get("PYLORA_CPU_ISA") or None, "cpu_isa_note": None}
    return dict(_C.build_info())


def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.pylora.<op> has a compiled kernel for tensors on `device_type`."""
    key = _DISPATCH_KEYS.get(device_type)
    if _C is None or key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"pylora::{op}", key)
