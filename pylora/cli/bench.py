"""`pylora bench [suite]`: run benchmark suites, print their tables, write their JSON and one PNG chart
(when matplotlib is installed).

The suites ship with the package (pylora.bench, one module per suite, all on pylora.bench.harness), so an
installed wheel runs them; no source checkout is needed. Each suite runs in a process of its own,
`python -m pylora.bench.<module>`, so thread settings and memory never carry from one to the next. Quick by
default (seconds to a minute per suite on a small CPU); --full runs the complete sweeps. A suite whose
sanity checks fail (a result below its floor, a model faster than its own base) writes
<name>.failed.json instead of its JSON and makes the command exit with status 1; a suite that needs a
package that is not installed (transformers for the model-level suites) is skipped with a message
saying which.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from pylora.bench import GROUPS, SUITES, harness

EXIT_SANITY, EXIT_MISSING = harness.EXIT_SANITY, harness.EXIT_MISSING


def selection(name: str) -> list[str]:
    """The suites a command-line name stands for (a group or one suite)."""
    return list(GROUPS[name]) if name in GROUPS else [name]


def json_path(out: str, suite: str, device: str, threads: int | None, quick: bool) -> str:
    stem = SUITES[suite][1]
    t = f"_{threads}t" if threads and device == "cpu" else ""
    return os.path.join(out, f"{stem}_{device}{t}{'_quick' if quick else ''}.json")


def _speedups(suite: str, data: dict) -> tuple[list[str], list[float], str]:
    """(labels, values, what the values are) for the chart: how much faster pylora is than the baseline
    users would otherwise use, per case."""
    rows = data.get("rows") or []
    if suite == "merge":
        return ([f"{r['shape']} {harness.SHORT.get(r['dtype'], r['dtype'])} r{r['r']} u{r['rel']:g}" for r in rows],
                [r["vs_careful"] for r in rows], "merge: careful fp32 time / pylora time")
    if suite == "train-layer":
        rows = [r for r in rows if r.get("peft_extra_ms") and r.get("pylora_extra_ms")]
        return ([f"{harness.SHORT.get(r['dtype'], r['dtype'])} r{r['r']} p{r['dropout_p']:g}" for r in rows],
                [r["peft_extra_ms"] / max(r["pylora_extra_ms"], 1e-9) for r in rows],
                "train (layer): PEFT's LoRA cost / pylora's")
    if suite == "train-model":
        rows = [r for r in rows if r.get("speedup")]
        return [f"step p{r['dropout_p']:g}" for r in rows], [r["speedup"] for r in rows], "train (model): PEFT / pylora step"
    if suite == "multi-kernel":
        if not rows:
            return [], [], suite
        most = max(r["adapters"] for r in rows)
        rows = [r for r in rows if r["adapters"] == most]
        return ([f"T{r['T']} {r['O']} r{r['r']} {r['popularity'][:4]}" for r in rows], [r["vs_peft"] for r in rows],
                "multi (kernel): PEFT loop / pylora")
    if suite == "multi-model":
        rows = [r for r in rows if r.get("vs_peft")]
        return [r["phase"] for r in rows], [r["vs_peft"] for r in rows], "multi (model): pylora / PEFT tokens/s"
    if suite == "merge-checkpoint":
        by = {r["key"]: r for r in rows}
        if "pylora" in by and "load_all" in by and by["pylora"]["growth_MiB"] > 0:
            return (["peak memory growth"], [by["load_all"]["growth_MiB"] / by["pylora"]["growth_MiB"]],
                    "merge checkpoint: load-everything's memory growth / pylora merge's")
    return [], [], suite


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
    plt.close(fig)
    return True


def run(args) -> int:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = args.device or ("cuda" if _cuda() else "cpu")
    quick = not args.full
    extra = shlex.split(args.suite_args or "")
    results, failed, skipped = {}, [], []
    suites = selection(args.suite)
    for suite in suites:
        module = SUITES[suite][0]
        dev = "cpu" if suite == "merge-checkpoint" else device  # a merge of files on disk: a CPU measurement
        if suite == "merge-checkpoint":
            path = os.path.join(out, f"merge_checkpoint_cpu{'_quick' if quick else ''}.json")
        else:
            path = json_path(out, suite, dev, args.threads, quick)
        cmd = [sys.executable, "-m", f"pylora.bench.{module}", "--device", dev, "--out", path,
               "--quick" if quick else "--full", "--clock", args.clock]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        cmd += extra
        print(f"\n=== {suite} ({'quick' if quick else 'full'}, {dev}): {' '.join(shlex.quote(c) for c in cmd[1:])}",
              flush=True)
        if os.path.exists(path):
            os.remove(path)  # a stale file from an earlier run must not pass for this one's
        rc = subprocess.run(cmd, env=harness.child_env(), check=False).returncode
        if rc == EXIT_MISSING:
            skipped.append(suite)
            continue
        if rc != 0 or not os.path.exists(path):
            failed.append(f"{suite} ({'sanity checks failed' if rc == EXIT_SANITY else f'exit status {rc}'})")
            continue
        with open(path) as f:
            results[suite] = json.load(f)
    png = os.path.join(out, f"bench_{device}.png")
    drew = chart(results, png)
    print(f"\nJSON in {out}" + (f"; chart {png}" if drew else " (no chart: install matplotlib)" if results else ""))
    if skipped:
        print(f"pylora bench: skipped {', '.join(skipped)} (a package it needs is missing; see above)", file=sys.stderr)
    if failed:
        print(f"pylora bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if skipped and len(skipped) == len(suites):
        return EXIT_MISSING
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
