"""Builds pylora._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

PYLORA_BUILD_CUDA=auto (default) builds CUDA kernels when torch is a CUDA build and a CUDA toolkit is
found; =1 requires them (the build fails loudly otherwise); =0 builds the CPU-only extension.
The decision never looks at torch.cuda.is_available(): build machines often have no GPU.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured; an unset arch list means "8.0;9.0+PTX".

The CPU kernels are portable by default: on x86-64, csrc/cpu/{merge,lora_apply,lora_linear}.cpp are
compiled once per ISA level (plain x86-64, AVX2+FMA+F16C, AVX-512 with BF16), each copy in its own
namespace (csrc/common/isa.h), and csrc/cpu/dispatch.cpp registers the best level the CPU runs when the
library loads (PYLORA_CPU_ISA=avx2|default at run time forces a lower one). Everything else is compiled
for plain x86-64, so a wheel runs on any x86-64 CPU. PYLORA_CPU_ARCH=native (or any -march value) builds
everything once with that -march instead: one level, for the machine that builds it.

A wheel (bdist_wheel) requires the torch release it was built against (torch==X): the extension links
against that torch's C++ ABI. Other builds (editable, sdist) require torch>=2.4. The build records its
torch in pylora/_build_facts.py, which pylora/_ext.py checks before loading the extension.
"""
import glob
import os
import platform
import shutil
import sys

import setuptools

# pyproject.toml's SPDX `license` string needs setuptools 77; an older one fails on it with a schema
# error (a build without isolation uses whatever setuptools is installed).
if int(setuptools.__version__.split(".")[0]) < 77:
    sys.exit(f"setup.py: setuptools {setuptools.__version__} is too old to build pylora: "
             "pip install 'setuptools>=77'")

from setuptools import find_packages, setup  # noqa: E402
from setuptools.command.bdist_wheel import bdist_wheel  # noqa: E402

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


# A native build: everything with -march=$PYLORA_CPU_ARCH, one ISA level. A portable one: see the docstring.
cpu_arch = os.environ.get("PYLORA_CPU_ARCH", "").strip()
# -fopenmp: at::parallel_for is a header template over `#pragma omp parallel`; without the flag the
# extension's loops would run on one thread.
# -g0: Python's own CFLAGS carry -g; debug info for these template-heavy files made the CPU-only
# extension 29 MB instead of 1.4 MB and took a third of its compile time.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DNDEBUG", "-g0"]
link_flags = ["-fopenmp"]
macros = [("PYLORA_TORCH_VERSION", f'"{torch.__version__}"')]  # a string literal
if cpu_arch:
    cxx_flags.append(f"-march={cpu_arch}")
    macros.append(("PYLORA_CPU_ARCH", f'"{cpu_arch}"'))
nvcc_flags = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr"]

# The ISA levels compiled besides the main sources' own (plain x86-64), lowest first, with the macro that
# tells csrc/cpu/dispatch.cpp they are there and the flags of each. These flags and the cpuid checks in
# dispatch.cpp (cpu_runs) must name the same features.
ISA_LEVELS = {
    "avx2": ("PYLORA_CPU_WITH_AVX2", ["-mavx2", "-mfma", "-mf16c"]),
    "avx512": ("PYLORA_CPU_WITH_AVX512", ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                          "-mavx512dq", "-mavx512bf16"]),
}
x86 = platform.machine().lower() in ("x86_64", "amd64")
isa_levels = [] if cpu_arch or not x86 or sys.platform == "win32" else list(ISA_LEVELS)
macros += [(ISA_LEVELS[name][0], "1") for name in isa_levels]
print("pylora: CPU kernels for " + (f"-march={cpu_arch} (a native build)" if cpu_arch else
                                    ", ".join(isa_levels[::-1] + ["default"]) + ", chosen at run time"))


def source_files(*patterns):
    """The files under csrc/ matching the patterns, as paths relative to ROOT (what setuptools wants)."""
    paths = (glob.glob(os.path.join("csrc", pattern), root_dir=ROOT) for pattern in patterns)
    return sorted(path for found in paths for path in found)


sources = source_files("*.cpp", "common/*.cpp", "cpu/*.cpp")
if os.path.join("csrc", "ops.cpp") not in sources:
    sys.exit(f"setup.py: {ROOT}/csrc/ops.cpp not found: the extension would hold no ops")
# The CPU kernel files, compiled once more per level in isa_levels; dispatch.cpp is the one file in
# csrc/cpu/ compiled once (it registers the kernels of one level).
isa_sources = [path for path in source_files("cpu/*.cpp") if os.path.basename(path) != "dispatch.cpp"]
# Headers and this file: a change to any of them relinks the extension (ninja recompiles what includes them).
depends = source_files("*.h", "*/*.h", "*/*.cuh") + ["setup.py"]
if with_cuda:
    sources += source_files("cuda/*.cu")
    macros += [("PYLORA_WITH_CUDA", "1"), ("PYLORA_CUDA_ARCHES", arch_tag(os.environ["TORCH_CUDA_ARCH_LIST"]))]
    ext = cpp_extension.CUDAExtension(
        "pylora._C", sources, define_macros=macros, depends=depends,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)
else:
    ext = cpp_extension.CppExtension("pylora._C", sources, define_macros=macros, depends=depends,
                                     extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


def build_facts():
    """pylora/_build_facts.py: what pylora/_ext.py checks before loading the extension."""
    return (
        '"""What pylora._C was built against. Written by setup.py with the extension; not in git."""\n'
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}  # torch.version.cuda of that torch (None: a CPU-only torch)\n"
        f"CUDA_KERNELS = {with_cuda!r}\n"
        f"CPU_ISAS = {tuple(isa_levels[::-1] + ['default']) if not cpu_arch else ()!r}  # () in a native build\n"
        f"CPU_ARCH = {cpu_arch or None!r}  # the -march of a native build\n"
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the CPU kernel files compiled once per ISA level and the build facts."""

    def build_extension(self, ext):
        # torch's build_extensions has added its flags to ext.extra_compile_args and made
        # self.compiler.compile a ninja build by now. One ninja build per level: one set of flags each.
        level_objects = []
        for name in isa_levels:
            args = dict(ext.extra_compile_args) if isinstance(ext.extra_compile_args, dict) else \
                {"cxx": list(ext.extra_compile_args)}
            args["cxx"] = list(args["cxx"]) + ISA_LEVELS[name][1]
            level_objects += self.compiler.compile(
                isa_sources, output_dir=os.path.join(self.build_temp, "isa", name), macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args, depends=ext.depends)
        # Link order matters: the main objects (plain x86-64) first, then the levels lowest first. Inline
        # functions and templates outside pylora's namespaces (std::, c10::) are compiled into every object
        # that calls them, and the linker keeps the first copy it meets; this order makes that the copy
        # of the lowest level that calls it, which every CPU that reaches a call to it runs.
        ext.extra_objects = [obj for obj in ext.extra_objects if obj not in level_objects] + level_objects
        output = self.get_ext_fullpath(ext.name)
        if os.path.exists(output) and any(os.path.getmtime(obj) > os.path.getmtime(output) for obj in level_objects):
            self.force = True  # a level's object is newer than the extension: relink
        super().build_extension(ext)
        self._write_facts(os.path.dirname(self.get_ext_fullpath(ext.name)))

    def copy_extensions_to_source(self):
        # --inplace and editable installs: the extension goes beside the sources, and its facts with it.
        super().copy_extensions_to_source()
        self._write_facts(os.path.join(ROOT, "pylora"))

    @staticmethod
    def _write_facts(folder):
        with open(os.path.join(folder, "_build_facts.py"), "w") as f:
            f.write(build_facts())


# A wheel holds an extension linked against the C++ ABI of the torch it was built with: it requires that
# release (pylora/_ext.py also checks the exact build at import). Everything else (editable installs,
# sdists) requires a torch pylora builds against.
building_wheel = "bdist_wheel" in sys.argv[1:]
torch_requirement = f"torch=={str(torch.__version__).split('+')[0]}" if building_wheel else "torch>=2.4"
install_requires = [torch_requirement, "numpy", "safetensors>=0.4", "tqdm", "regex>=2022.1.18"]


class BdistWheel(bdist_wheel):
    """bdist_wheel writing the wheel's own metadata (the torch pin) rather than reusing what pip prepared
    before the build (`--dist-info-dir`): that metadata is shared with editable installs, so it names
    torch>=2.4. pip checks only the name and version of the two against each other."""

    def finalize_options(self):
        self.dist_info_dir = None
        super().finalize_options()


setup(
    install_requires=install_requires,
    packages=find_packages(include=["pylora", "pylora.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "bdist_wheel": BdistWheel},
)
