"""Peak memory and speed of `pylora merge` (pylora.checkpoint.merge_checkpoint) on a checkpoint many times
larger than one tensor, against the load-everything way (safetensors load_file, merge, save_file: the
least any in-memory merge, PEFT's included, holds).

Each way runs in a fresh process that reports its resident set after its imports and its peak resident
set during the merge (Linux VmHWM, reset after the imports; it counts file pages mapped in and touched as
well as allocations, so a reader that maps the file cannot hide); the growth is what the merge needed.
The checkpoint is written once, in shards of --shard-tensors tensors, with an adapter of rank --rank on
every weight.

    python bench/bench_merge_checkpoint.py                      # 8 weights of 64 MiB: a 512 MiB checkpoint
    python bench/bench_merge_checkpoint.py --tensors 16 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Peak RSS of what follows: the current RSS, then the high-water mark reset (Linux: clear_refs 5) so that
# the imports' own peak cannot hide the merge's; VmHWM counts mapped file pages touched as well.
_RSS = """
import sys
def _status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024
def rss_start():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")
def rss_peak():
    return _status("VmHWM")
"""

_PYLORA = _RSS + """
import time
from pylora import checkpoint
before = rss_start()
t0 = time.perf_counter()
checkpoint.merge_checkpoint(sys.argv[1], [sys.argv[2]], sys.argv[3], dtype=sys.argv[4] or None, progress=False)
print(before, rss_peak(), time.perf_counter() - t0)
"""

# Everything in memory at once: what merge_and_unload on a loaded model needs at least.
_LOAD_ALL = _RSS + """
import json, os, time
import torch
from safetensors.torch import load_file, save_file
from pylora import adapters, ops
before = rss_start()
t0 = time.perf_counter()
base, adapter_dir, out, dtype = sys.argv[1:5]
with open(os.path.join(base, "model.safetensors.index.json")) as f:
    index = json.load(f)
state = {}
for name in sorted(set(index["weight_map"].values())):
    state.update(load_file(os.path.join(base, name)))
adapter = adapters.read_adapter(adapter_dir)
for module, m in adapter.modules.items():
    ops.merge_(state[module + ".weight"], m.lora_A, m.lora_B, m.scale)
if dtype:
    state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
os.makedirs(out)
save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
print(before, rss_peak(), time.perf_counter() - t0)
"""


def build(d: str, n: int, rows: int, cols: int, dtype: torch.dtype, rank: int, per_shard: int) -> None:
    from safetensors.torch import save_file

    base, adapter = os.path.join(d, "base"), os.path.join(d, "adapter")
    os.makedirs(base)
    os.makedirs(adapter)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    shards = [list(range(i, min(i + per_shard, n))) for i in range(0, n, per_shard)]
    for s, layers in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {f"model.layers.{i}.proj.weight": torch.randn(rows, cols, generator=g).to(dtype) for i in layers}
        tensors.update({f"model.layers.{i}.norm.weight": torch.ones(cols, dtype=dtype) for i in layers})
        save_file(tensors, os.path.join(base, name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({"model_type": "bench", "dtype": str(dtype).removeprefix("torch.")}, f)
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["proj"]}, f)
    save_file({f"base_model.model.model.layers.{i}.proj.lora_{ab}.weight": torch.randn(shape, generator=g) * 0.01
               for i in range(n) for ab, shape in (("A", (rank, cols)), ("B", (rows, rank)))},
              os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})


def measure(script: str, d: str, out: str, out_dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script, os.path.join(d, "base"), os.path.join(d, "adapter"),
                           os.path.join(d, out), out_dtype], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{out}: failed: {proc.stderr.strip().splitlines()[-1]}")
    before, peak, seconds = proc.stdout.split()
    shutil.rmtree(os.path.join(d, out))
    return {"rss_before": int(before), "rss_peak": int(peak), "growth": int(peak) - int(before),
            "seconds": float(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, default=8, help="weights in the checkpoint")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out-dtype", default="", choices=["", "float32", "float16", "bfloat16"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shard-tensors", type=int, default=2, help="weights per shard")
    p.add_argument("--dir", help="where to build the checkpoint (default: a temporary directory)")
    p.add_argument("--skip-load-all", action="store_true")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    d = tempfile.mkdtemp(prefix="bench_merge_checkpoint.", dir=args.dir)
    try:
        t0 = time.perf_counter()
        build(d, args.tensors, args.rows, args.cols, dtype, args.rank, args.shard_tensors)
        print(f"built in {time.perf_counter() - t0:.1f} s")
        out_itemsize = getattr(torch, args.out_dtype).itemsize if args.out_dtype else dtype.itemsize
        # The largest tensor a tensor-by-tensor merge must hold: the weight as read or as written.
        tensor = args.rows * args.cols * max(dtype.itemsize, out_itemsize)
        total = args.tensors * (args.rows + 1) * args.cols * dtype.itemsize  # the checkpoint as read
        rows = {"pylora merge (tensor by tensor)": measure(_PYLORA, d, "out_pylora", args.out_dtype)}
        if not args.skip_load_all:
            rows["load all, merge, save_file"] = measure(_LOAD_ALL, d, "out_all", args.out_dtype)
    finally:
        shutil.rmtree(d, ignore_errors=True)

    mib = 2**20
    print(f"checkpoint: {args.tensors} weights of {args.rows * args.cols * dtype.itemsize / mib:.0f} MiB "
          f"({args.dtype}; largest tensor in or out {tensor / mib:.0f} MiB), {total / mib:.0f} MiB in "
          f"{-(-args.tensors // args.shard_tensors)} shards; adapter rank {args.rank}; output dtype "
          f"{args.out_dtype or 'as input'}")
    print(f"{'way':34} {'RSS before':>11} {'peak RSS':>10} {'growth':>10} {'growth/largest':>15} {'time':>8} "
          f"{'MiB/s':>7}")
    for name, r in rows.items():
        print(f"{name:34} {r['rss_before'] / mib:9.0f} M {r['rss_peak'] / mib:8.0f} M {r['growth'] / mib:8.0f} M "
              f"{r['growth'] / tensor:15.2f} {r['seconds']:7.2f}s {total / mib / r['seconds']:7.0f}")
    result = {"machine": machine("cpu"), "args": vars(args), "largest_tensor_bytes": tensor, "checkpoint_bytes": total,
              "results": rows}
    os.makedirs(RESULTS, exist_ok=True)
    to = f"_to_{args.out_dtype}" if args.out_dtype else ""
    path = os.path.join(RESULTS, f"merge_checkpoint_cpu_{args.tensors}x{args.rows}x{args.cols}_{args.dtype}{to}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
