"""The command line through real subprocesses: info (also --adapter), demo (a small run), bench (one quick
suite)."""
import json
import shutil
import subprocess

import pytest

from pylora.bench import harness as h
from tests.adapters.corpus import CASES as CORPUS
from tests.helpers import PYTHON


def run(args, env, cwd, timeout=900):
    return subprocess.run([PYTHON, "-m", "pylora", *args], env=dict(env, TQDM_DISABLE="1"), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_info_lists_every_op(python_env, tmp_path):
    from pylora import ops

    out = run(["info"], python_env, tmp_path)
    assert out.returncode == 0, out.stderr
    for op in ops.OPS:
        assert op in out.stdout
    assert "pylora " in out.stdout and "torch " in out.stdout and "extension:" in out.stdout


@pytest.mark.slow
def test_demo_small_run(python_env, tmp_path):
    pytest.importorskip("transformers")
    out = run(["demo", "--out", str(tmp_path / "demo"), "--steps", "30", "--hidden", "64", "--rows", "2",
               "--reps", "1"], python_env, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "| caesar |" in out.stdout and "merge+unmerge bit-exact" in out.stdout
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {t["task"] for t in res["tasks"]} == {"caesar", "atbash", "rotate", "times3"}
    assert all(t["exact_unmerge"] for t in res["tasks"])
    for task in ("caesar", "atbash", "rotate", "times3"):  # PEFT-format adapters
        folder = tmp_path / "demo" / "adapters" / task
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_bench_merge_quick(python_env, tmp_path):
    """pylora bench merge --quick in a real process: the suite ships with the package, runs on the one
    harness (one thread, its CPU time), passes its sanity checks and writes its JSON."""
    out = run(["bench", "merge", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)], python_env,
              tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "merge_cpu_1t_quick.json").read_text())
    assert data["suite"] == "merge" and data["quick"] and data["sanity"]["failures"] == [] and data["sanity"]["checks"]
    assert data["harness"]["clock"] == "thread" and data["machine"]["threads"] == 1
    assert data["limits"]["copy_GBps"] > 0 and data["limits"]["bf16_matmul_TFLOPs"] > 0
    rows = data["rows"]
    assert rows and all(r["pylora_ms"] > 0 and r["record_pct"] >= 0 and r["unmerge_exact"] for r in rows)
    assert all(r["pylora_ms"] >= h.FLOOR_SLACK * r["roofline_ms"] for r in rows)
    for r in rows:  # every method timed in the same rounds, with its spread
        assert set(r["stats"]) == {"pylora", "norecord", "unmerge", "addmm", "peft", "careful"}
        assert all(st["n"] >= 3 and st["q1_ms"] <= st["median_ms"] <= st["q3_ms"] for st in r["stats"].values())
    assert "| W | dtype | r |" in out.stdout and "sanity checks passed" in out.stdout


def test_cli_info_adapter(valid_adapter, tmp_path, python_env):
    run = lambda d: subprocess.run([PYTHON, "-m", "pylora", "info", "--adapter", str(d)], env=python_env,  # noqa
                                   capture_output=True, text=True, timeout=300)
    out = run(valid_adapter)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "LoRA modules: 4 (linear 4); ranks 4" in text and "problems: none" in text
    assert "model.layers.1.self_attn.v_proj  linear  4  8      2      [4, 32]  [16, 4]  float32" in text
    assert "dtype float32" in text and "weights: " in text

    d = tmp_path / "broken"
    shutil.copytree(valid_adapter, d)
    dict((c[0], c[1]) for c in CORPUS)["nan_in_B"](str(d))
    out = run(d)
    assert out.returncode == 1
    assert "problems: 1" in out.stdout and "values are not finite" in out.stdout
    assert "LoRA modules: 3" in out.stdout  # what could be read is still described
