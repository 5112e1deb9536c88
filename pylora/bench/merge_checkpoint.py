"""Peak memory and time of `pylora merge` (pylora.checkpoint.merge_checkpoint) on a checkpoint many times
larger than one tensor, against the load-everything way (safetensors load_file, merge, save_file: the
least any in-memory merge, PEFT's included, holds).

    python -m pylora.bench.merge_checkpoint [--quick] [--tensors 8] [--rows 4096] [--cols 4096]
        [--dtype float32] [--out-dtype bfloat16] [--rank 16] [--shard-tensors 2]

Each way runs in a fresh process that reports its resident set after its imports and its peak resident
set during the merge (Linux VmHWM, reset after the imports; it counts file pages mapped in and touched
as well as allocations, so a reader that maps the file cannot hide) and its own time for the merge; the
growth is what the merge needed. The two ways alternate, in rounds, like every suite's methods; growth is
the largest of the runs, time the median. The checkpoint is written once, in shards of --shard-tensors
tensors, with an adapter of rank --rank on every weight. CPU only. Floor: the checkpoint read and the
output written once at the bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import torch

from pylora.bench import harness as h

SUITE = "merge-checkpoint"
QUICK = {"tensors": 4, "rows": 2048, "cols": 2048}
FULL = {"tensors": 8, "rows": 4096, "cols": 4096}


def child(way: str, base: str, adapter: str, out: str, dtype: str) -> dict:
    """In a fresh process (imports done): reset the high-water mark, merge one way, report."""
    from pylora import adapters, checkpoint, ops  # noqa: F401  (imported before the mark is reset)
    from safetensors.torch import load_file, save_file

    before = h.reset_peak_rss()  # the imports' peak cannot hide ours
    t0 = time.perf_counter()
    if way == "pylora":
        checkpoint.merge_checkpoint(base, [adapter], out, dtype=dtype or None, progress=False)
    elif way == "load_all":  # everything in memory at once: what merge_and_unload on a loaded model needs at least
        with open(os.path.join(base, "model.safetensors.index.json")) as f:
            index = json.load(f)
        state = {}
        for name in sorted(set(index["weight_map"].values())):
            state.update(load_file(os.path.join(base, name)))
        adapter_ = adapters.read_adapter(adapter)
        for module, m in adapter_.modules.items():
            ops.merge_(state[module + ".weight"], m.lora_A, m.lora_B, m.scale)
        if dtype:
            state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
        os.makedirs(out)
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(way)
    seconds = time.perf_counter() - t0
    return {"rss_before": before, "rss_peak": h.proc_status_bytes("VmHWM"), "seconds": seconds}


def build(d: str, n: int, rows: int, cols: int, dtype: torch.dtype, rank: int, per_shard: int, seed: int) -> None:
    from safetensors.torch import save_file

    base, adapter = os.path.join(d, "base"), os.path.join(d, "adapter")
    os.makedirs(base)
    os.makedirs(adapter)
    g = torch.Generator().manual_seed(seed)
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
        json.dump({"model_type": "bench", "dtype": h.dtype_name(dtype)}, f)
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["proj"]}, f)
    save_file({f"base_model.model.model.layers.{i}.proj.lora_{ab}.weight": torch.randn(shape, generator=g) * 0.01
               for i in range(n) for ab, shape in (("A", (rank, cols)), ("B", (rows, rank)))},
              os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})


def run_way(way: str, d: str, out_dtype: str, k: int, threads: int | None) -> dict:
    out = os.path.join(d, f"out_{way}_{k}")
    args = ["pylora.bench.merge_checkpoint", "--child", way, os.path.join(d, "base"), os.path.join(d, "adapter"), out,
            out_dtype]
    try:
        return h.run_child(args, f"{SUITE}: the {way} merge", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    finally:
        shutil.rmtree(out, ignore_errors=True)


WAYS = {"pylora": "pylora merge (tensor by tensor)", "load_all": "load all, merge, save_file"}
COLUMNS = [("way", "way", "s"), ("rss_before_MiB", "RSS before MiB", ".0f"), ("rss_peak_MiB", "peak RSS MiB", ".0f"),
           ("growth_MiB", "growth MiB", ".0f"), ("growth_per_largest", "growth / largest tensor", ".2f"),
           ("seconds", "time s", ".2f"), ("MiBps", "MiB/s", ".0f"), ("spread", "± spread", ".0%"), ("n", "runs", "d")]


def run(argv=None, out_dir=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--child":
        way, base, adapter, out, dtype = argv[1:6]
        print(json.dumps(child(way, base, adapter, out, dtype)))
        return 0
    p = h.parser(__doc__, "python -m pylora.bench.merge_checkpoint")
    h.add_arguments(p, quick=f"{QUICK['tensors']} weights of {QUICK['rows']}x{QUICK['cols']}",
                    full=f"{FULL['tensors']} weights of {FULL['rows']}x{FULL['cols']}", budget=(10.0, 60.0), out_dir=out_dir)
    p.add_argument("--tensors", type=int, default=None, help="weights in the checkpoint (default: 4 quick, 8 full)")
    p.add_argument("--rows", type=int, default=None, help="rows of each weight (default: 2048 quick, 4096 full)")
    p.add_argument("--cols", type=int, default=None, help="columns of each weight (default: 2048 quick, 4096 full)")
    p.add_argument("--dtype", default="float32", choices=sorted(h.DTYPES), help="the checkpoint's dtype")
    p.add_argument("--out-dtype", default="", choices=["", *sorted(h.DTYPES)], help="write in this dtype ('': as read)")
    p.add_argument("--rank", type=int, default=16, help="the adapter's rank")
    p.add_argument("--shard-tensors", type=int, default=2, help="weights per shard")
    p.add_argument("--dir", help="where to build the checkpoint (default: a temporary directory)")
    p.add_argument("--skip-load-all", action="store_true", help="time pylora merge only")
    args = p.parse_args(argv)
    if args.device == "cuda":
        raise SystemExit(f"pylora bench {SUITE}: measures the CPU merge of a checkpoint on disk; use --device cpu")
    args.device = "cpu"
    timer = h.timer_from_args(args)
    if timer.clock == "thread":  # the children's own perf_counter times them; the parent's clock is not used
        timer.clock = "wall"
    d0 = QUICK if args.quick else FULL
    n, rows, cols = args.tensors or d0["tensors"], args.rows or d0["rows"], args.cols or d0["cols"]
    dtype = h.DTYPES[args.dtype]
    limits = h.measure_limits(timer, (), matmul_n=512, budget_s=min(timer.budget_s, 5))
    print(limits.describe(), flush=True)
    report = h.Report(SUITE, "cpu", timer=timer, limits=limits, quick=args.quick,
                      config={"tensors": n, "rows": rows, "cols": cols, "dtype": args.dtype, "out_dtype": args.out_dtype,
                              "rank": args.rank, "shard_tensors": args.shard_tensors})
    out_itemsize = h.DTYPES[args.out_dtype].itemsize if args.out_dtype else dtype.itemsize
    largest = rows * cols * max(dtype.itemsize, out_itemsize)  # the weight as read or as written
    total_in = n * (rows + 1) * cols * dtype.itemsize
    total_out = n * (rows + 1) * cols * out_itemsize
    d = tempfile.mkdtemp(prefix="bench_merge_checkpoint.", dir=args.dir)
    try:
        t0 = time.perf_counter()
        build(d, n, rows, cols, dtype, args.rank, args.shard_tensors, args.seed)
        print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
        runs: dict[str, list[dict]] = {w: [] for w in WAYS}
        ways = ["pylora"] + ([] if args.skip_load_all else ["load_all"])

        def way_fn(w):
            def fn(k):
                r = run_way(w, d, args.out_dtype, k, args.threads)
                runs[w].append(r)
                return r["seconds"]
            return fn

        m = timer.measure({w: way_fn(w) for w in ways}, self_timed=True, min_reps=args.min_reps or 3)
        limits.refresh(timer)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    mib = 2**20
    floor = (total_in + total_out) / limits.bandwidth()
    case = f"{n} weights of {rows}x{cols} {args.dtype} -> {args.out_dtype or args.dtype}"
    for w in ways:
        rs = runs[w]
        growth = [r["rss_peak"] - r["rss_before"] for r in rs]
        row = {"way": WAYS[w], "key": w, "rss_before_MiB": max(r["rss_before"] for r in rs) / mib,
               "rss_peak_MiB": max(r["rss_peak"] for r in rs) / mib, "growth_MiB": max(growth) / mib,
               "growth_MiB_median": sorted(growth)[len(growth) // 2] / mib, "growth_per_largest": max(growth) / largest,
               "seconds": m.median(w), "MiBps": total_in / mib / m.median(w), "floor_s": floor,
               "spread": h.spread(m, w), "n": m[w].n, "stats": m.as_dict("s"),
               # the fields the README's figures were read from (bytes)
               "rss_before": max(r["rss_before"] for r in rs), "rss_peak": max(r["rss_peak"] for r in rs),
               "growth": max(growth)}
        report.add(row)
        report.checks.within(case, f"{w} peak RSS growth (bytes)", min(growth), 0, float("inf"),
                             "a high-water mark reset to the resident set allows")
        report.checks.floor(case, w, m.median(w), floor, f"{(total_in + total_out) / 1e6:.0f} MB read and written at "
                                                         f"{limits.bandwidth() / 1e9:.1f} GB/s")
    name = f"merge_checkpoint_cpu_{n}x{rows}x{cols}_{args.dtype}" + (f"_to_{args.out_dtype}" if args.out_dtype else "")
    path = args.out or os.path.join(out_dir or os.path.join(os.getcwd(), "bench-results"),
                                    name + ("_quick" if args.quick else "") + ".json")
    report.finish(path, COLUMNS, title=(
        f"checkpoint: {n} weights of {rows * cols * dtype.itemsize / mib:.0f} MiB ({args.dtype}; largest tensor in or out "
        f"{largest / mib:.0f} MiB), {total_in / mib:.0f} MiB in {-(-n // args.shard_tensors)} shards; adapter rank "
        f"{args.rank}; output dtype {args.out_dtype or 'as input'}"),
        extra={"largest_tensor_bytes": largest, "checkpoint_bytes": total_in,
               "results": {WAYS[r["key"]]: {k: r[k] for k in ("rss_before", "rss_peak", "growth", "seconds")}
                           for r in report.rows}})
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
