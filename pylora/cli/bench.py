"""`pylora bench [merge|train|multi|all]`: run the benchmark suites of bench/ at sizes that fit the
machine, print their tables, write their JSON and one PNG chart (when matplotlib is installed).

Quick by default (a minute or two per suite on a small CPU); --full runs the complete sweeps.
The suites live in the source tree's bench/ folder (a checkout or an editable install).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

SUITES = {
    "merge": ["bench_merge.py"],
    "train": ["bench_train.py", "bench_train_model.py"],
    "multi": ["bench_multi.py", "bench_multi_model.py"],
}


def bench_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "bench")
    if not os.path.isfile(os.path.join(path, "bench_merge.py")):
        raise SystemExit("pylora bench: the benchmark scripts are not here (they live in a source checkout's bench/ "
                         "folder; install with `pip install --no-build-isolation -e .` from a clone)")
    return path


_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _speedups(name: str, data: dict) -> tuple[list[str], list[float], str]:
    """(labels, values, what the values are) for the chart: how much faster pylora is than the baseline
    users would otherwise use, per case."""
    if name == "bench_merge":
        rows = data["rows"]
        return [f"{r['shape']} {_SHORT[r['dtype']]} r{r['r']}" for r in rows], [r["vs_careful"] for r in rows], \
            "merge: careful fp32 time / pylora time"
    if name == "bench_train":
        rows = data["layer"]
        return [f"{_SHORT[r['dtype']]} r{r['r']} p{r['dropout_p']:g}" for r in rows], \
            [r["peft_extra_ms"] / max(r["pylora_extra_ms"], 1e-9) for r in rows], "train (layer): PEFT's LoRA cost / pylora's"
    if name == "bench_train_model":
        rows = data["rows"]
        return [f"step p{r['dropout_p']:g}" for r in rows], [r["speedup"] for r in rows], "train (model): PEFT / pylora step"
    if name == "bench_multi":
        rows = [r for r in data["results"] if r["adapters"] == max(x["adapters"] for x in data["results"])]
        return [f"T{r['T']} {r['O']} r{r['r']} {r['popularity'][:4]}" for r in rows], [r["vs_peft"] for r in rows], \
            "multi (kernel): PEFT loop / pylora"
    if name == "bench_multi_model":
        rows = data["rows"]
        return [r["phase"] for r in rows], [r["vs_peft"] for r in rows], "multi (model): pylora / PEFT tokens/s"
    return [], [], name


def chart(results: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(n, *_speedups(n, d)) for n, d in results.items()]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), squeeze=False)
    for ax, (name, labels, values, title) in zip(axes[:, 0], panels):
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(title + " (above 1: pylora faster)", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=6)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(args) -> int:
    folder = bench_dir()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = args.device or ("cuda" if _cuda() else "cpu")
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(folder) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results, failed = {}, []
    for suite in suites:
        for script in SUITES[suite]:
            name = script[:-3]
            path = os.path.join(out, f"{name[len('bench_'):]}_{device}{'' if args.full else '_quick'}.json")
            cmd = [sys.executable, os.path.join(folder, script), "--device", device, "--out", path]
            if not args.full:
                cmd.append("--quick")
            print(f"\n=== {script} ({'full' if args.full else 'quick'}, {device})", flush=True)
            if subprocess.run(cmd, env=env).returncode != 0 or not os.path.exists(path):
                failed.append(script)
                continue
            with open(path) as f:
                results[name] = json.load(f)
    png = os.path.join(out, f"bench_{device}.png")
    drew = chart(results, png)
    print(f"\nJSON in {out}" + (f"; chart {png}" if drew else " (install matplotlib for the chart)"))
    if failed:
        print(f"pylora bench: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
