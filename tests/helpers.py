"""What the tests share besides models and fixtures: the tolerance table, dtypes, the interpreter for
subprocesses, and comparisons that must be able to fail (bits, relative error, untouched models)."""
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
PYTHON = sys.executable

# One tolerance table for the suite: (rtol, atol) per dtype for comparisons that are not bit-exact.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (5e-3, 5e-4),
    torch.bfloat16: (3e-2, 3e-3),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype):
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def bits(t):
    """A tensor's bytes, for bit-exact comparisons (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def snapshot(model):
    """A model's structure (names and module types) and a copy of every tensor."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()})


def assert_same(model, snap):
    """The model has the structure and every tensor bit for bit that snapshot() saw."""
    structure, tensors = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for key, before in tensors.items():
        assert now[key].dtype == before.dtype and torch.equal(bits(now[key]), bits(before)), key
