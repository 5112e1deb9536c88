"""Shared fixtures: devices (cuda added when present), backends, seeding, one thread, subprocess
environments, and the inputs the checkpoint-merge tests share. Shared code lives in tests.helpers
and tests.models."""
import os

import pytest
import torch

from pylora import _ext
from tests.helpers import HAS_CUDA
from tests.models import QUANT_SCHEMES


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


@pytest.fixture(scope="session")
def merge_inputs(tmp_path_factory):
    """Checkpoints and PEFT adapters on disk, built once, for the `pylora merge` tests."""
    from tests.checkpoint.workspace import build

    return build(tmp_path_factory.mktemp("merge"))


@pytest.fixture(scope="session")
def valid_adapter(tmp_path_factory):
    """A valid adapter directory: tiny Llama (tests.models.llama), q_proj/v_proj, r=4, saved by pylora."""
    import pylora
    from tests.adapters.common import CASES, pylora_model

    d = tmp_path_factory.mktemp("valid")
    kind, fields = CASES["llama_q_v"]
    pylora.save_adapter(pylora_model(kind, fields), d)
    return d


# The quantized-base tests (tests/nn/test_quantized.py, tests/serve/test_quantized_serving.py): a folder
# per module for the tiny Llama they save, and every quantization scheme.
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-llama")


@pytest.fixture(params=QUANT_SCHEMES)
def scheme(request):
    return request.param
