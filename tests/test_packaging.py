"""The sdist and the wheel, as a user gets them: from a clean checkout (the files git tracks), build the
sdist; from the unpacked sdist alone, build a wheel (CPU-only, every ISA level); install the wheel into a
fresh virtual environment; run `pylora info` and a smoke test there (merge/unmerge round trip, a LoRA
forward on the kernels). A few minutes on two cores: the wheel compiles the extension from scratch."""
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch

from tests.helpers import PYTHON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = str(torch.__version__).split("+")[0]

SMOKE = r"""
import json, os, sys
import torch
import pylora
from pylora import _ext, ops

assert os.path.realpath(pylora.__file__).startswith(os.path.realpath(sys.prefix)), pylora.__file__
assert _ext.loaded, _ext.load_error
assert ops.backend("merge_", "cpu") == "kernel" and ops.backend("lora_linear", "cpu") == "kernel"
g = torch.Generator().manual_seed(0)
W = torch.randn(48, 40, generator=g).to(torch.bfloat16)
A, B = torch.randn(4, 40, generator=g), torch.randn(48, 4, generator=g) * 0.1
W0 = W.clone()
rec = ops.merge_(W, A, B, 2.0)
assert not torch.equal(W, W0)
ops.unmerge_(W, A, B, 2.0, rec)
assert torch.equal(W.view(torch.int16), W0.view(torch.int16)), "unmerge_ must give the weight back bit for bit"

model = torch.nn.Sequential()
model.add_module("q_proj", torch.nn.Linear(40, 24))
model.add_module("act", torch.nn.ReLU())
model.add_module("v_proj", torch.nn.Linear(24, 8))
x = torch.randn(5, 40, generator=g)
base = model(x)
model = pylora.inject(model, pylora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
for _, layer in pylora.lora_layers(model):
    torch.nn.init.normal_(layer.lora_B, std=0.1)
y = model(x)
with torch.no_grad():
    q, v = model.q_proj, model.v_proj
    h = torch.relu(x @ q.base_layer.weight.T + q.base_layer.bias + 2.0 * (x @ q.lora_A.T) @ q.lora_B.T)
    want = h @ v.base_layer.weight.T + v.base_layer.bias + 2.0 * (h @ v.lora_A.T) @ v.lora_B.T
torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
assert not torch.allclose(y, base)
print(json.dumps(_ext.build_info()))
"""


def clean_env():
    """This interpreter's environment without what points imports at this checkout or forces a level."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PYLORA_")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def check(args, cwd, env, timeout):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def tracked_files():
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return [path for path in out.stdout.split("\0") if path and os.path.lexists(os.path.join(ROOT, path))]


def build_env():
    """CPU-only build with this interpreter's torch (no isolation: the wheel is built against it)."""
    env = clean_env()
    env["PYLORA_BUILD_CUDA"] = "0"
    env.setdefault("MAX_JOBS", "2")
    # ccache, when this machine has it and nothing chose a compiler: a rebuild of unchanged sources is
    # then a few seconds. The folder it builds in differs each time, so paths are hashed relative to it.
    if "CXX" not in env and os.access("/usr/lib/ccache/g++", os.X_OK):
        env.update(CXX="/usr/lib/ccache/g++", CCACHE_NOHASHDIR="1")
    return env


def host_view(folder):
    """This interpreter's site-packages without pylora: what the fresh environment sees of it (torch and
    the rest of pylora's dependencies, installed once), the way --system-site-packages would."""
    site = sysconfig.get_paths()["purelib"]
    os.makedirs(folder)
    for name in os.listdir(site):
        if "pylora" in name.lower() or name.endswith(".pth"):
            continue
        os.symlink(os.path.join(site, name), os.path.join(folder, name))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_sdist_and_wheel_from_a_clean_checkout_install_and_run(tmp_path):
    files = tracked_files()
    if files is None:
        pytest.skip(f"{ROOT} is not a git checkout")
    src = tmp_path / "checkout"
    for path in files:
        os.makedirs(src / os.path.dirname(path), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), src / path, follow_symlinks=False)
    env = build_env()
    if "CCACHE_NOHASHDIR" in env:
        env["CCACHE_BASEDIR"] = str(tmp_path)

    # The sdist, by the PEP 517 hook that `python -m build --sdist` calls.
    out = check([PYTHON, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"],
                src, env, 300)
    sdist = src / "dist" / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        tar.extractall(tmp_path / "unpacked", filter="data") if sys.version_info >= (3, 12) else \
            tar.extractall(tmp_path / "unpacked")
    csrc = {path for path in files if path.startswith("csrc/")}
    assert csrc and csrc <= names, f"the sdist lacks {sorted(csrc - names)}"
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "pylora/__init__.py"} <= names
    assert not any(name.endswith((".so", ".o")) or name.endswith("_build_facts.py") for name in names), names

    # The wheel, from the unpacked sdist alone.
    unpacked = tmp_path / "unpacked" / sdist.name[: -len(".tar.gz")]
    out = check([PYTHON, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "wheels"),
                 str(unpacked)], tmp_path, env, 1800)
    log = out.stdout + out.stderr
    assert "CPU kernels for avx512, avx2, default" in log or "x86" not in sysconfig.get_platform(), log[-3000:]
    assert "deprecated" not in log.lower().replace("deprecated-", ""), [
        line for line in log.splitlines() if "deprecated" in line.lower()]
    (wheel,) = (tmp_path / "wheels").glob("pylora-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        facts = zf.read("pylora/_build_facts.py").decode()
    assert any(n.startswith("pylora/_C") and n.endswith(".so") for n in names), names
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert f"torch=={RELEASE}" in requires, requires
    assert not any(r.split()[0].startswith(("ninja", "pybind11")) for r in requires), requires
    assert "License-Expression: Apache-2.0" in meta
    assert f"TORCH_VERSION = {str(torch.__version__)!r}" in facts and "CUDA_KERNELS = False" in facts

    # A fresh environment: the wheel installed with pip, its dependencies found among this interpreter's
    # packages (no index: nothing is downloaded), then `pylora info` and the smoke test from outside the
    # checkout. Without its own pip and setuptools (this interpreter's pip installs into it), so that
    # the packages it sees are this interpreter's.
    venv = tmp_path / "venv"
    check([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, clean_env(), 300)
    vpy = str(venv / "bin" / "python")
    site = check([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, clean_env(), 60)
    view = host_view(str(tmp_path / "host-site-packages"))
    with open(os.path.join(site.stdout.strip(), "host_packages.pth"), "w") as f:
        f.write(view + "\n")
    check([PYTHON, "-m", "pip", "--python", vpy, "install", "--no-index", str(wheel)], tmp_path, clean_env(), 600)
    info = check([str(venv / "bin" / "pylora"), "info"], tmp_path, clean_env(), 300).stdout
    assert "extension: loaded" in info and f"built for torch {torch.__version__}" in info, info
    assert "CPU kernels:" in info and "running" in info, info
    smoke = check([vpy, "-c", SMOKE], tmp_path, clean_env(), 300).stdout
    assert '"cpu_isa"' in smoke
