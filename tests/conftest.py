"""Shared fixtures: devices (cuda added when present), backends, seeding and the tolerance table."""
import os
import sys

import pytest
import torch

from pylora import _ext

HAS_CUDA = torch.cuda.is_available()

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


def pytest_collection_modifyitems(config, items):
    # A test parametrised with device="cuda" is a GPU test: mark it, and skip it (with the reason)
    # on machines without a GPU.
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
            if not HAS_CUDA:
                item.add_marker(skip)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    return request.param


@pytest.fixture(params=["kernel", "reference"])
def backend(request, device):
    """Runs the test body once on the compiled kernels for `device` and once on the pure-torch twins.

    The kernel run needs the ops a test module names in KERNEL_OPS (every op when it names none).
    """
    from pylora import ops

    if request.param == "kernel":
        needed = getattr(request.module, "KERNEL_OPS", ops.OPS)
        missing = [op for op in needed if not _ext.has_kernel(op, device)]
        if missing:
            pytest.skip(f"no compiled {device} kernel for {', '.join(missing)} ({_ext.load_error or 'not built'})")
        yield "kernel"
    else:
        with ops.reference_mode():
            yield "reference"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared cores: a thread pool adds only synchronisation, and each parallel region
    waits for a descheduled thread (a tiny forward measured 2 ms on one thread, 140 ms on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def python_env():
    """Environment for subprocesses running this interpreter on this checkout."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
