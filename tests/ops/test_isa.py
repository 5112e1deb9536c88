"""The CPU kernels' ISA levels (csrc/cpu/dispatch.cpp): the best level the CPU runs is chosen and reported;
every level this build holds and this CPU runs (forced in a subprocess by PYLORA_CPU_ISA) passes the
kernel tests' core cases and gives the bits it must; requests that cannot be followed are reported; and
code compiled for a level is reachable only from that level (what keeps a wheel off SIGILL)."""
import collections
import json
import os
import platform
import re
import shutil
import subprocess

import pytest

from tests.helpers import PYTHON
from pylora import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded, reason=f"pylora._C not loaded ({_ext.load_error})")

INFO = _ext.build_info()
LEVELS = list(INFO["cpu_isas_supported"])  # the levels compiled that this CPU runs, best first
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Kernel results that do not depend on the level: merge_/unmerge_ are defined element by element with
# single-rounding fmas (common/merge_math.h), and lora_linear/lora_multi's own arithmetic is exact
# conversions, the dropout hash and one multiply (their GEMMs are ATen's, which chooses its own ISA).
# lora_apply_'s fp32 sums over I run in vec.h's lanes, 16 with AVX-512 and 8 otherwise, and the default
# level multiplies then adds where the AVX levels fuse: its bits depend on the level (each level is
# held to the float64 truth, and to its own batch and thread invariance, by the core cases).
LEVEL_FREE = ("merge ", "lora_linear ", "lora_multi ")

# The core cases of the kernel tests: numbers, layouts, invariances, round trips (not argument errors,
# opcheck or the reference backend, which the level does not touch).
CORE_FILES = ["tests/ops/test_merge.py", "tests/ops/test_lora_apply.py", "tests/ops/test_lora_linear.py",
              "tests/ops/test_lora_multi.py"]
CORE_DESELECT = ("disabled", "opcheck", "failed_load", "record_small", "bad_arguments", "named", "errors",
                 "mismatch", "gradcheck", "reference_op", "100_cycles", "records_portable", "reference-cpu")
# lora_multi is lora_linear's arithmetic per adapter (and the same bits on every level: the probes);
# its float64-truth grid is the longest of the core cases, so lora_linear's stands for both.
CORE_SKIP = ["tests/ops/test_lora_multi.py::test_matches_float64_truth"]


def at_level(level, python_env):
    env = dict(python_env)
    if level is None:
        env.pop("PYLORA_CPU_ISA", None)
    else:
        env["PYLORA_CPU_ISA"] = level
    return env


def run(args, env, timeout=600):
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_best_level_runs_by_default(python_env):
    assert INFO["cpu_isas"], "a build holds at least one level"
    assert set(LEVELS) <= set(INFO["cpu_isas"])
    if INFO["cpu_arch"] is None:  # a portable build holds every level, down to the one every CPU runs
        assert INFO["cpu_isas"][-1] == "default" and LEVELS[-1] == "default"
    code = "from pylora import _ext; import json; print(json.dumps(_ext.build_info()))"
    info = json.loads(run([PYTHON, "-c", code], at_level(None, python_env)).stdout)
    assert info["cpu_isa"] == LEVELS[0] and info["cpu_isa_request"] is None and info["cpu_isa_note"] is None


@pytest.fixture(scope="module")
def probes():
    """tests/ops/isa_probe.py's digests at every level, each run in a subprocess forced to it."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return {level: json.loads(run([PYTHON, "-m", "tests.ops.isa_probe"], at_level(level, env)).stdout)
            for level in LEVELS}


@pytest.mark.parametrize("level", ["avx512", "avx2", "default"])
def test_forced_level_runs_and_is_reported(level, probes, python_env):
    if level not in LEVELS:
        pytest.skip(f"this build or CPU has no {level} level (compiled {INFO['cpu_isas']}, this CPU runs {LEVELS})")
    assert probes[level]["isa"] == level
    info = run([PYTHON, "-m", "pylora", "info"], at_level(level, python_env)).stdout
    assert f"CPU kernels: {level} running" in info and f"PYLORA_CPU_ISA={level} followed" in info, info


def test_level_free_results_are_the_same_bits_on_every_level(probes):
    if len(probes) < 2:
        pytest.skip(f"one level only: {LEVELS}")
    first = probes[LEVELS[0]]["digests"]
    cases = [case for case in first if case.startswith(LEVEL_FREE)]
    assert len(cases) == 14
    for level in LEVELS[1:]:
        differ = [case for case in cases if probes[level]["digests"][case] != first[case]]
        assert not differ, f"{level} differs from {LEVELS[0]} in {differ}"


def test_default_level_rounds_lora_apply_its_own_way(probes):
    # The documented difference (see LEVEL_FREE), and proof that forcing the level changed the code that
    # ran: the plain level's separate multiply and add give other fp32 bits than the AVX levels' fmas.
    if "default" not in probes or len(probes) < 2:
        pytest.skip(f"needs the default level and another: {LEVELS}")
    case = "lora_apply torch.float32 prefill"
    assert probes["default"]["digests"][case] != probes[LEVELS[0]]["digests"][case]


@pytest.mark.parametrize("level", ["avx512", "avx2", "default"])
def test_core_kernel_cases_pass_at_each_level(level, python_env):
    if level not in LEVELS:
        pytest.skip(f"this build or CPU has no {level} level (compiled {INFO['cpu_isas']}, this CPU runs {LEVELS})")
    if level == LEVELS[0] and not os.environ.get("PYLORA_CPU_ISA"):
        pytest.skip(f"{level} runs in this process: the whole suite tests it")
    out = run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_FILES, "-m", "not cuda and not slow",
               "-k", " and ".join(f"not {name}" for name in CORE_DESELECT),
               *(f"--deselect={node}" for node in CORE_SKIP)], at_level(level, python_env), timeout=900)
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) > 100, out.stdout[-2000:]


@pytest.mark.parametrize("request_, note", [
    ("bogus", "PYLORA_CPU_ISA=bogus is not one of avx512, avx2, default (or auto): ignored"),
    ("auto", None),
])
def test_requests_that_cannot_be_followed_are_reported(request_, note, python_env):
    code = ("import warnings, json\nwith warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n    from pylora import _ext\n"
            "print(json.dumps([_ext.build_info(), [str(x.message) for x in w if 'pylora' in str(x.message)]]))")
    info, warned = json.loads(run([PYTHON, "-c", code], at_level(request_, python_env)).stdout)
    assert info["cpu_isa"] == LEVELS[0] and info["cpu_isa_note"] == note
    assert warned == ([f"pylora: {note}; the CPU kernels run {LEVELS[0]}"] if note else []), warned


def test_a_level_the_cpu_does_not_run_is_refused(python_env):
    higher = [level for level in INFO["cpu_isas"] if level not in LEVELS]
    if not higher:
        pytest.skip(f"this CPU runs every level compiled ({LEVELS})")
    code = "from pylora import _ext; import json; print(json.dumps(_ext.build_info()))"
    info = json.loads(run([PYTHON, "-W", "ignore", "-c", code], at_level(higher[0], python_env)).stdout)
    assert info["cpu_isa"] == LEVELS[0] and "this CPU does not run it" in info["cpu_isa_note"]


# Older CPUs, emulated: QEMU's user mode runs this interpreter as the named CPU model would (it has no
# AVX-512 at all), and an instruction that CPU lacks kills the process with SIGILL. torch itself needs
# AVX, so the oldest model is Sandy Bridge (AVX, no AVX2 or FMA).
QEMU_CPUS = [("avx2", "Haswell"), ("default", "SandyBridge")]


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs qemu-user (qemu-x86_64) to emulate older CPUs")
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates x86-64 CPUs")
@pytest.mark.parametrize("level, cpu", QEMU_CPUS, ids=[cpu for _, cpu in QEMU_CPUS])
def test_an_older_cpu_chooses_its_level_and_gets_its_bits(level, cpu, probes):
    if INFO["cpu_arch"] is not None or level not in probes:
        pytest.skip(f"needs a portable build holding {level}, which this CPU runs (holds {INFO['cpu_isas']})")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYLORA_CPU_ISA", None)
    out = subprocess.run(["qemu-x86_64", "-cpu", cpu, PYTHON, "-m", "tests.ops.isa_probe"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"rc={out.returncode} under -cpu {cpu}\n{out.stderr[-3000:]}"
    got = json.loads(out.stdout)
    assert got["isa"] == level
    # The kernels of a level give the same bits on any CPU that runs it (lora_linear's and lora_multi's
    # GEMMs are ATen's, which picks its own kernels by CPU: they are not compared here).
    cases = [case for case in got["digests"] if case.startswith(("merge ", "lora_apply "))]
    differ = [case for case in cases if got["digests"][case] != probes[level]["digests"][case]]
    assert not differ, f"{level} on an emulated {cpu} differs from {level} here in {differ}"


# ------------------------------------------------------------------------------------------------------
# What keeps a portable wheel from SIGILL: code compiled for a level is reachable only from that level.
# ------------------------------------------------------------------------------------------------------

# AVX-512 (EVEX) operands; any other VEX-encoded instruction (a mnemonic starting with v) is AVX/AVX2/FMA.
_EVEX = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to")
# The levels' namespaces as they appear in mangled names (pylora::cpu::avx512, pylora::mm::avx2, ...).
_MANGLED = {2: "6avx512", 1: "4avx2"}


def namespace_level(mangled):
    return max([k for k, tag in _MANGLED.items() if tag in mangled] or [0])


def isa_of_functions(path):
    """{mangled function name: (binding letter from nm, highest ISA level its instructions use)}."""
    binding = {}
    for line in subprocess.run(["nm", "--defined-only", path], capture_output=True, text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            binding[parts[2]] = parts[1]
    level = collections.defaultdict(int)
    func = None
    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    for line in dump.stdout.splitlines():
        if line.endswith(">:") and " <" in line:
            func = line[line.index(" <") + 2:-2]
        elif func is not None and "\t" in line:
            ins = line.split("\t", 1)[1].strip()
            if _EVEX.search(ins):
                level[func] = 2
            elif ins.startswith("v") or "%ymm" in ins:
                level[func] = max(level[func], 1)
    return {f: (binding.get(f, "?"), lvl) for f, lvl in level.items()}


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="needs binutils")
def test_level_code_is_reachable_only_from_its_level():
    # Inline functions and templates (std::, c10::, pylora's own headers) are compiled into every object
    # that calls them and the linker keeps one copy: setup.py links the levels lowest first so that it
    # keeps the lowest caller's. A function linked for everyone (not local) with AVX or AVX-512
    # instructions outside its level's namespace is code a CPU without them may run.
    if INFO["cpu_arch"] is not None:
        pytest.skip(f"a native build (-march={INFO['cpu_arch']}): one level, for this machine")
    if "avx2" not in INFO["cpu_isas"]:
        pytest.skip(f"no AVX levels compiled: {INFO['cpu_isas']}")
    found = isa_of_functions(_ext._C.__file__)
    assert any(lvl == 2 and _MANGLED[2] in f for f, (_, lvl) in found.items()), "no AVX-512 code in the avx512 level?"
    # Local symbols (lower-case in nm: GCC's .constprop/.isra/.cold clones, OpenMP bodies) belong to the
    # one object that made them and are called from it alone.
    stray = sorted(f"{f} ({b}, level {lvl})" for f, (b, lvl) in found.items()
                   if b not in "tbdr" and namespace_level(f) < lvl)
    assert not stray, "functions with instructions above their level, linked for everyone:\n" + "\n".join(stray)
