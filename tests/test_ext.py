"""pylora/_ext.py: an extension built for another torch is not loaded, and the warning says which torch it
was built for, which one was found, and the fix; the build facts it reads."""
import json
import subprocess

import pytest
import torch

from tests.helpers import PYTHON
from pylora import _ext

CUDA_BUILD = {"TORCH_VERSION": "2.14.1+cu130", "TORCH_CUDA": "13.0", "CUDA_KERNELS": True, "CPU_ISAS": (),
              "CPU_ARCH": None}
CPU_BUILD = dict(CUDA_BUILD, CUDA_KERNELS=False)


@pytest.mark.parametrize("facts, version, cuda, loads", [
    (CUDA_BUILD, "2.14.1+cu130", "13.0", True),
    (CUDA_BUILD, "2.14.1", "13.0", True),          # PyPI's build of the same release and CUDA
    (CUDA_BUILD, "2.14.1+cu132", "13.2", True),    # the same CUDA major: the same libcudart
    (CUDA_BUILD, "2.14.1+cu128", "12.8", False),   # another libcudart
    (CUDA_BUILD, "2.14.1+cpu", None, False),       # no libc10_cuda.so
    (CUDA_BUILD, "2.13.0+cu130", "13.0", False),   # another release: another C++ ABI
    (CPU_BUILD, "2.14.1+cpu", None, True),         # CPU kernels need only the release
    (CPU_BUILD, "2.13.0+cpu", None, False),
    (None, "2.13.0", None, True),                  # no facts (a checkout built before they existed): try
])
def test_torch_mismatch(facts, version, cuda, loads):
    message = _ext.torch_mismatch(facts, version, cuda)
    assert (message is None) == loads, message
    if message is not None:
        assert f"built for torch {facts['TORCH_VERSION']}" in message and f"but torch {version}" in message
        assert "pip install torch==2.14.1" in message and "--no-build-isolation" in message


def test_build_facts_match_the_extension():
    if not _ext.loaded:
        pytest.skip(f"pylora._C not loaded ({_ext.load_error})")
    info = _ext.build_info()
    assert info["torch_version"] == str(torch.__version__)
    assert _ext.facts is not None and _ext.facts["TORCH_VERSION"] == info["torch_version"]
    assert _ext.facts["CUDA_KERNELS"] == info["cuda"]
    assert tuple(_ext.facts["CPU_ISAS"]) == (info["cpu_isas"] if info["cpu_arch"] is None else ())


# A fake record of the build (what a wheel built against torch 2.0.0 for CUDA 11.8 would carry) stands in
# for a second torch.
FAKE_FACTS = (
    "import sys, types\n"
    "sys.modules['pylora._build_facts'] = types.SimpleNamespace(TORCH_VERSION='2.0.0+cu118', TORCH_CUDA='11.8',\n"
    "    CUDA_KERNELS=True, CPU_ISAS=('avx512', 'avx2', 'default'), CPU_ARCH=None)\n"
)


def test_a_build_for_another_torch_is_not_loaded_and_says_why(python_env):
    # The extension must not be loaded, the warning must name both torches and the fix, every op must
    # run its reference, and `pylora info` must say the same.
    code = FAKE_FACTS + (
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pylora, pylora.ops\n"
        "    import torch\n"
        "    W = torch.randn(8, 8); A = torch.randn(2, 8); B = torch.randn(8, 2); W0 = W.clone()\n"
        "    rec = pylora.ops.merge_(W, A, B, 1.0); pylora.ops.unmerge_(W, A, B, 1.0, rec)\n"
        "assert torch.equal(W, W0)\n"
        "print(json.dumps({'msgs': [str(x.message) for x in w if 'pylora' in str(x.message)],\n"
        "                  'loaded': pylora._ext.loaded, 'C': 'pylora._C' in sys.modules,\n"
        "                  'backend': pylora.ops.backend('merge_', 'cpu')}))\n"
    )
    out = subprocess.run([PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert not got["loaded"] and not got["C"] and got["backend"] == "reference", got
    (msg,) = got["msgs"]
    assert "built for torch 2.0.0+cu118 (CUDA 11.8) with CUDA kernels" in msg, msg
    assert f"but torch {torch.__version__}" in msg and "pip install torch==2.0.0" in msg, msg
    assert "pure-torch reference" in msg and "--no-build-isolation" in msg, msg

    code = FAKE_FACTS + "from pylora.cli import main\nsys.exit(main(['info']))\n"
    out = subprocess.run([PYTHON, "-W", "ignore", "-c", code], env=python_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "extension: not loaded (the compiled kernels were built for torch 2.0.0+cu118" in out.stdout, out.stdout
