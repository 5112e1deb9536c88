"""The suites on the harness: they ship inside the package (importable and runnable with no source tree),
the command line knows every one of them, and a suite whose result beats its floor fails loudly."""
import importlib
import json
import os
import shutil
import subprocess

import pytest
import torch

import pylora
from pylora.bench import GROUPS, SUITES
from pylora.bench import harness as h
from tests.helpers import PYTHON

PACKAGE = os.path.dirname(os.path.abspath(pylora.__file__))
ROOT = os.path.dirname(PACKAGE)


def test_every_suite_is_a_module_of_the_package():
    for name, (module, stem, what) in SUITES.items():
        mod = importlib.import_module(f"pylora.bench.{module}")
        assert os.path.dirname(os.path.abspath(mod.__file__)) == os.path.join(PACKAGE, "bench"), name
        assert callable(mod.main) and mod.__doc__ and stem and what
    assert set(GROUPS["all"]) == set(SUITES)
    assert all(set(members) <= set(SUITES) for members in GROUPS.values())


def test_the_command_line_knows_every_suite_and_group():
    from pylora.cli import BENCH_SUITES

    assert set(BENCH_SUITES) == set(SUITES) | set(GROUPS)


def test_setup_ships_the_benchmarks():
    from setuptools import find_packages

    assert "pylora.bench" in find_packages(ROOT, include=["pylora", "pylora.*"])


@pytest.mark.slow
def test_runs_from_an_installed_package_without_a_source_tree(tmp_path):
    """The package's Python files alone, as a wheel installs them (no bench/ folder, no checkout): the
    suite runs, writes its JSON, and pylora bench finds it."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "pylora", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(site), PYLORA_DISABLE_EXT="1", TQDM_DISABLE="1")
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([PYTHON, "-c", "import pylora.bench.merge as m; print(m.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.strip().startswith(str(site / "pylora" / "bench"))
    out = subprocess.run([PYTHON, "-m", "pylora", "bench", "merge", "--quick", "--device", "cpu", "--threads", "1",
                          "--out", str(work / "res"), "--suite-args",
                          "--shapes 64x128 --ranks 4 --rels 0.01 --dtypes float32 --budget 0.2 --min-reps 3"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    data = json.loads((work / "res" / "merge_cpu_1t_quick.json").read_text())
    assert data["rows"][0]["shape"] == "64x128" and data["machine"]["extension"]["loaded"] is False
    assert any("pure-torch reference" in n for n in data["notes"])


def test_a_suite_whose_result_beats_its_floor_exits_4_and_writes_failed_json(tmp_path, monkeypatch, capsys):
    """The merge suite with limits that claim a 1 kB/s machine: every merge 'beats' its floor."""
    from pylora.bench import merge

    real = h.measure_limits

    def slow_machine(timer, dtypes=(), **kw):
        lim = real(timer, dtypes, copy_bytes=1 << 20, matmul_n=64, budget_s=0.05)
        lim.copy_Bps = lim.read_Bps = 1e3
        lim.probes = {}  # nothing to refresh from: the machine stays as slow as claimed
        return lim

    monkeypatch.setattr(h, "measure_limits", slow_machine)
    path = tmp_path / "merge.json"
    rc = merge.main(["--device", "cpu", "--shapes", "128x256", "--ranks", "4", "--rels", "0.01", "--dtypes", "float32",
                     "--budget", "0.05", "--min-reps", "3", "--warmup", "0", "--out", str(path)])
    assert rc == h.EXIT_SANITY
    assert not path.exists()
    data = json.loads((tmp_path / "merge.failed.json").read_text())
    failures = data["sanity"]["failures"]
    assert len(failures) == 6  # every method below its floor: merge_ with and without a record, unmerge_, addmm_, PEFT, careful
    assert all(f.startswith("merge: 128x256 float32 r=4 rel=0.01: ") and "below its floor" in f for f in failures)
    assert "6 of" in capsys.readouterr().err


def test_cli_reports_failed_and_skipped_suites(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from pylora.cli import bench, build_parser

    codes = {"pylora.bench.train_layer": h.EXIT_SANITY, "pylora.bench.train_model": h.EXIT_MISSING,
             "pylora.bench.train_joint": h.EXIT_MISSING}
    calls = []

    def fake_run(cmd, env, check):
        calls.append(cmd)
        assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT  # the suite imports this pylora
        return SimpleNamespace(returncode=codes[cmd[2]])

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = build_parser().parse_args(["bench", "train", "--device", "cpu", "--threads", "1", "--out", str(tmp_path),
                                      "--suite-args", "--ranks 8"])
    assert bench.run(args) == 1
    err = capsys.readouterr().err
    assert "failed: train-layer (sanity checks failed)" in err and "skipped train-model, train-joint" in err
    assert calls[0][1:3] == ["-m", "pylora.bench.train_layer"] and calls[0][-2:] == ["--ranks", "8"]
    assert "--quick" in calls[0] and ["--threads", "1"] == calls[0][calls[0].index("--threads"):][:2]
    assert calls[0][calls[0].index("--out") + 1] == str(tmp_path / "train_layer_cpu_1t_quick.json")

    codes["pylora.bench.train_layer"] = h.EXIT_MISSING
    assert bench.run(args) == h.EXIT_MISSING  # nothing ran: say so with the status too


def test_model_floor_counts_the_linear_layers():
    transformers = pytest.importorskip("transformers")
    from pylora.bench import models

    s = {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 2, "intermediate": 128, "vocab": 100}
    model = models.build_llama(s, "cpu", torch.float32, suite="test")
    assert isinstance(model, transformers.LlamaForCausalLM)
    per_layer = 4 * 64 * 64 + 3 * 64 * 128
    head = 64 * 100
    fwd, nbytes = models.linear_work(model, 10)
    assert fwd == 2 * 10 * (2 * per_layer + head) and nbytes == 4 * (2 * per_layer + head)
    both, _ = models.linear_work(model, 10, backward_from=1)  # input gradients of layer 1 and the LM head
    assert both == fwd + 2 * 10 * (per_layer + head)
