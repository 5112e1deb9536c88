"""The command line through real subprocesses: info, demo (a small run), bench (one quick suite)."""
import json
import os
import subprocess

import pytest

from conftest import PYTHON


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
    out = run(["bench", "merge", "--device", "cpu", "--out", str(tmp_path)], python_env, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "merge_cpu_quick.json").read_text())
    assert data["rows"] and all(r["pylora_ms"] > 0 and r["record_pct"] >= 0 for r in data["rows"])
    assert "| W | dtype | r |" in out.stdout
