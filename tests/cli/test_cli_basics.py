"""The command line's manners, through real subprocesses: `--help` answers without importing torch (and
`import pylora` alone imports none of it), every option's help shows its default, and a reader that goes
away (`pylora info | head`) ends the command quietly, with no traceback."""
import importlib
import os
import subprocess
import sys

import pytest

from pylora import cli
from tests.helpers import PYTHON

# Runs the command line as `python -m pylora ARGS` does, then says on stderr whether torch was imported.
CHILD = """
import runpy, sys
sys.argv = ["pylora"] + sys.argv[1:]
code = 0
try:
    runpy.run_module("pylora", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
sys.stderr.write(f"\\nexit={code} torch_imported={'torch' in sys.modules}\\n")
"""

HELPS = [["--help"], ["info", "--help"], ["demo", "--help"], ["merge", "--help"], ["bench", "--help"]]


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
def test_help_imports_no_torch(args, python_env):
    out = subprocess.run([PYTHON, "-c", CHILD, *args], env=python_env, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == "exit=0 torch_imported=False", out.stderr
    assert out.stdout.startswith("usage: pylora"), out.stdout


def test_console_script_entry_point_imports_no_torch(python_env):
    """The `pylora` script generated from [project.scripts] runs `from pylora.cli import main; main()`."""
    code = ("import sys\nfrom pylora.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint('torch' in sys.modules, 'pylora.nn' in sys.modules)")
    out = subprocess.run([PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False False"


def test_import_pylora_is_light_and_every_public_name_resolves(python_env):
    code = """
import sys
import pylora
light = "torch" not in sys.modules
names = sorted(pylora.__all__)
missing = [n for n in names if getattr(pylora, n, None) is None]
from pylora.nn.inject import inject
from pylora.adapters import load_adapter
from pylora.serve import MultiLoRA
import torch
print(light, missing, pylora.inject is inject, pylora.load_adapter is load_adapter, pylora.MultiLoRA is MultiLoRA,
      set(names) <= set(dir(pylora)), hasattr(torch.ops.pylora, "lora_linear") or not pylora._ext.loaded)
"""
    out = subprocess.run([PYTHON, "-c", code], env=python_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "True [] True True True True True", out.stdout


def test_star_import_and_unknown_names():
    import pylora

    namespace = {}
    exec("from pylora import *", namespace)
    assert set(pylora.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        pylora.nonexistent


def test_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the fragments

    def help_of(*args):
        with pytest.raises(SystemExit) as exc:
            cli.main([*args, "--help"])
        assert exc.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    demo = help_of("demo")
    for fragment in ("(default: pylora-demo)", "training steps per adapter (default: 250)", "(default: 128)",
                     "(default: 8)", "(default: 5)", "(default: cuda when available)"):
        assert fragment in demo, (fragment, demo)
    assert "(default: None)" not in demo and "(default: False)" not in demo
    bench = help_of("bench")
    assert "the suite to run: merge" in bench and "(default: all)" in bench and "(default: bench-results)" in bench
    merge = help_of("merge")
    assert "the weight of the --adapter just before it (default 1)" in merge and "(default: None)" not in merge
    info = help_of("info")
    assert "--adapter DIR" in info and "(default: None)" not in info


def _closed_reader(args, env, cwd=None):
    """Run `python -m pylora ARGS` with its stdout a pipe whose reader has already gone away."""
    proc = subprocess.Popen([PYTHON, "-m", "pylora", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd)
    proc.stdout.close()  # before the child can write: its first write meets a closed pipe
    err = proc.stderr.read().decode()
    return proc.wait(timeout=600), err


@pytest.mark.parametrize("args", [["info"], ["--help"], ["merge", "--help"], ["demo", "--help"]], ids=" ".join)
def test_closed_pipe_ends_quietly(args, python_env, tmp_path):
    code, err = _closed_reader(args, python_env, tmp_path)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    # 128 + SIGPIPE, what a shell reports for `pylora info | head`; argparse itself ignores a failed write of
    # --help and exits 0.
    assert code == (0 if "--help" in args else 141), (code, err)


def test_closed_pipe_adapter_info(python_env, valid_adapter):
    code, err = _closed_reader(["info", "--adapter", str(valid_adapter)], python_env)
    assert code == 141 and "Traceback" not in err and "BrokenPipe" not in err, (code, err)


def test_closed_pipe_after_a_merge_keeps_its_output(python_env, merge_inputs, tmp_path):
    """The summary is printed after the output is complete: a reader gone by then is no merge error."""
    out = tmp_path / "merged"
    code, err = _closed_reader(["merge", "--base", str(merge_inputs.llama), "--adapter", str(merge_inputs.a1),
                                "--out", str(out)], dict(python_env, TQDM_DISABLE="1"))
    assert code == 141 and "error" not in err and "Traceback" not in err, (code, err)
    assert (out / "config.json").exists() and any(f.endswith(".safetensors") for f in os.listdir(out))


def test_broken_pipe_in_process(monkeypatch, valid_adapter):
    """main() itself: a stdout that fails with EPIPE (and has no file descriptor) gives 141, no exception."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no descriptor")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert cli.main(["info", "--adapter", str(valid_adapter)]) == 141
    importlib.import_module("pylora.cli")  # still importable, nothing left half done
