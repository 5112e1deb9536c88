"""Builds pylora._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

PYLORA_BUILD_CUDA=auto (default) builds CUDA kernels when torch is a CUDA build and a CUDA toolkit is
found; =1 requires them (the build fails loudly otherwise); =0 builds the CPU-only extension.
The decision never looks at torch.cuda.is_available(): build machines often have no GPU.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured; an unset arch list means "8.0;9.0+PTX".
PYLORA_CPU_ARCH (default "native") is passed to -march for the CPU kernels; set it to "" for a
portable build (the extension is compiled on the machine that runs it, so native is the default).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# setuptools resolves sources, packages, pyproject.toml and --inplace against the working directory
# and wants sources relative to this file's folder (an absolute one fails `pip wheel` and `pip install
# -e`). pip runs this file from ROOT; `python path/to/setup.py ...` from elsewhere must do the same.
os.chdir(ROOT)


def _cuda_home_candidates():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var]
    yield "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home():
    """The first candidate that holds bin/nvcc and include/cuda_runtime.h (a real toolkit root)."""
    for home in _cuda_home_candidates():
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


mode = os.environ.get("PYLORA_BUILD_CUDA", "auto").strip().lower()
if mode not in ("auto", "0", "1"):
    sys.exit(f"setup.py: PYLORA_BUILD_CUDA={mode!r} must be one of auto, 0, 1")
cuda_home = find_cuda_home() if mode != "0" else None
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import: set it before importing.
    os.environ["CUDA_HOME"] = cuda_home
if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

why_not = None
if mode == "0":
    why_not = "PYLORA_BUILD_CUDA=0"
elif torch.version.cuda is None:
    why_not = f"torch {torch.__version__} is not a CUDA build"
elif cuda_home is None:
    why_not = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
with_cuda = why_not is None
if mode == "1" and not with_cuda:
    sys.exit(f"setup.py: PYLORA_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
print(f"pylora: building {'CPU and CUDA' if with_cuda else 'CPU-only'} kernels"
      + (f" (CUDA_HOME={cuda_home}, arches {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda
         else f" ({why_not})"))


def arch_tag(arch_list):
    """'8.0;9.0+PTX' -> 'sm_80+sm_90+compute_90': a macro-safe record of what was compiled."""
    tags = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.replace("+PTX", "").replace(".", "")
        tags.append(f"sm_{num}")
        if ptx:
            tags.append(f"compute_{num}")
    return "+".join(tags)


cpu_arch = os.environ.get("PYLORA_CPU_ARCH", "native")
# -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; without the flag the
# extension's loops would run on one thread.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG"]
link_flags = ["-fopenmp"]
if cpu_arch:
    cxx_flags.append(f"-march={cpu_arch}")
cxx_flags.append("-DPYLORA_CPU_ARCH=" + (cpu_arch or "default").replace("-", "_").replace(".", "_"))
nvcc_flags = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr"]


def source_files(*patterns):
    """The files under csrc/ matching the patterns, as paths relative to ROOT (what setuptools wants)."""
    paths = (glob.glob(os.path.join("csrc", pattern), root_dir=ROOT) for pattern in patterns)
    return sorted(path for found in paths for path in found)


sources = source_files("*.cpp", "common/*.cpp", "cpu/*.cpp")
if os.path.join("csrc", "ops.cpp") not in sources:
    sys.exit(f"setup.py: {ROOT}/csrc/ops.cpp not found: the extension would hold no ops")
if with_cuda:
    sources += source_files("cuda/*.cu")
    macros = [("PYLORA_WITH_CUDA", "1"), ("PYLORA_CUDA_ARCHES", arch_tag(os.environ["TORCH_CUDA_ARCH_LIST"]))]
    ext = cpp_extension.CUDAExtension(
        "pylora._C", sources, define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
else:
    ext = cpp_extension.CppExtension("pylora._C", sources, extra_compile_args={"cxx": cxx_flags},
                                     extra_link_args=link_flags)

setup(
    packages=find_packages(include=["pylora", "pylora.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
