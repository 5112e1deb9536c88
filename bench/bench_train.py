"""Training-step benchmark of one LoRA linear layer: forward + backward, pylora vs PEFT vs the frozen base.

    python bench/bench_train.py [--quick] [--device cpu|cuda] [--repeats N] [--dtypes float32,bfloat16]
                                [--ranks 8,16,64] [--dropouts 0,0.1] [--threads N]

Per (dtype, r, dropout_p): the frozen base nn.Linear alone (dX only), pylora (ops.lora_linear) and PEFT's
LoRA Linear (peft.tuners.lora.layer.Linear wrapping the same frozen nn.Linear, same A, B and scale), each
step computing dX, dA and dB. The three run interleaved, one step each per round, so a change in machine
load hits them alike; times are medians over rounds, and each LoRA layer's extra cost over the base is
the median of its per-round difference to the base; lora_gemm_floor_ms is what the six r-wide LoRA
products alone cost at the measured matmul throughput, the floor for any implementation. Inputs rotate
over enough distinct x / grad_y tensors to exceed the last-level cache. Memory: the bytes of the tensors
autograd saves for backward (unique storages, parameters excluded), and on CUDA the peak allocated during
the step above what was allocated before it. The limits of the machine are measured in the same run
(copy bandwidth, matmul throughput), and the load average is recorded with every row.

A model-level section can be added beside bench_layer(): main() only collects rows and writes them.
Results: a printed table and bench/results/train_layer_<device>.json (train_layer_cpu_<N>t.json with
--threads N).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pylora import _ext, ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Timing and memory primitives
# ----------------------------------------------------------------------------------------------

class Timer:
    """Wall time on CPU; CUDA events on GPU, with the L2 flushed before every timed call."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            self.flush_buf = torch.empty(max(2 * l2, 1 << 26), dtype=torch.uint8, device="cuda")

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def saved_bytes(step, exclude: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the distinct storages autograd saves during step()'s forward, minus those of `exclude`
    (the parameters, which exist whether or not anything is saved)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    return sum(n for ptr, n in storages.items() if ptr not in skip)


def peak_step_bytes(step, device: str) -> int | None:
    """CUDA: the peak allocated during step() above what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def machine_limits(device: str, dtype: torch.dtype, timer: Timer, quick: bool) -> dict:
    """Copy bandwidth of a large tensor and the matmul throughput of this dtype, measured now."""
    n = (1 << 24) if quick else (1 << 26)  # fp32 elements: 64 MiB or 256 MiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_s = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(5))
    m = 1024 if quick else 4096
    a = torch.randn(m, m, device=device).to(dtype)
    b = torch.randn(m, m, device=device).to(dtype)
    a @ b
    mm_s = statistics.median(timer(lambda: a @ b) for _ in range(3))
    return {"copy_GBps": 2 * n * 4 / copy_s / 1e9, "matmul_GFLOPS": 2 * m**3 / mm_s / 1e9}


# ----------------------------------------------------------------------------------------------
# The three layers
# ----------------------------------------------------------------------------------------------

def make_layers(I: int, O: int, r: int, alpha: float, p: float, dtype: torch.dtype, device: str):
    """A frozen nn.Linear, and LoRA factors A [r, I], B [O, r] (B non-zero) shared by pylora and PEFT."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = torch.nn.Linear(I, O, bias=True).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p)
    peft = PeftLinear(base, "default", config, r=r, lora_alpha=alpha)
    peft.to(device=device, dtype=dtype)
    peft.train()
    with torch.no_grad():
        peft.lora_A["default"].weight.copy_((torch.rand(r, I) * 2 - 1) / math.sqrt(I))
        peft.lora_B["default"].weight.copy_(torch.randn(O, r) * 0.02)
    A, B = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    scale = peft.scaling["default"]
    return base, peft, A, B, scale


def steps(base, peft, A, B, scale: float, p: float):
    """Step callables (x, grad_y) -> None for the base, pylora and PEFT; each clears the LoRA grads
    first so that every step does the same work."""

    def base_step(x, g):
        base(x).backward(g)

    def pylora_step(x, g):
        A.grad = B.grad = None
        ops.lora_linear(x, base.weight, base.bias, A, B, scale, dropout_p=p).backward(g)

    def peft_step(x, g):
        A.grad = B.grad = None
        peft(x).backward(g)

    return {"base": base_step, "pylora": pylora_step, "peft": peft_step}


# ----------------------------------------------------------------------------------------------
# One layer configuration
# ----------------------------------------------------------------------------------------------

def bench_layer(device: str, dtype: torch.dtype, r: int, p: float, T: int, I: int, O: int, repeats: int,
                warmup: int, timer: Timer, cache_bytes: int, matmul_gflops: float | None = None) -> dict:
    torch.manual_seed(0)
    base, peft, A, B, scale = make_layers(I, O, r, 2.0 * r, p, dtype, device)
    fns = steps(base, peft, A, B, scale, p)
    per_input = (T * I + T * O) * torch.empty((), dtype=dtype).element_size()
    n_inputs = max(2, min(8, math.ceil(2 * cache_bytes / per_input)))
    xs = [torch.randn(T, I, device=device).to(dtype).requires_grad_(True) for _ in range(n_inputs)]
    gs = [torch.randn(T, O, device=device).to(dtype) for _ in range(n_inputs)]

    # Parity first: a benchmark of a wrong result is worthless (same inputs; checked at p = 0 only,
    # since PEFT's dropout mask is its own).
    if p == 0:
        with torch.no_grad():
            y_ref = peft(xs[0])
            y_py = ops.lora_linear(xs[0], base.weight, base.bias, A, B, scale)
        err = float((y_py - y_ref).abs().max() / y_ref.abs().max())
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), f"pylora and PEFT disagree: {err}"

    times = {k: [] for k in fns}
    order = list(fns)
    for it in range(warmup + repeats):
        for k in order:
            x, g = xs[it % n_inputs], gs[it % n_inputs]
            x.grad = None
            t = timer(lambda: fns[k](x, g))
            if it >= warmup:
                times[k].append(t)
        order = order[1:] + order[:1]  # rotate who goes first, so no method always follows another

    params = (base.weight, base.bias, A, B)
    row = {"device": device, "dtype": str(dtype)[6:], "T": T, "I": I, "O": O, "r": r, "dropout_p": p,
           "repeats": repeats}
    for k in fns:
        row[f"{k}_ms"] = 1e3 * statistics.median(times[k])
    for k in ("pylora", "peft"):
        row[f"{k}_extra_ms"] = 1e3 * statistics.median(a - b for a, b in zip(times[k], times["base"]))
    row["extra_ratio"] = row["pylora_extra_ms"] / row["peft_extra_ms"] if row["peft_extra_ms"] > 0 else None
    # The six r-wide products every LoRA step needs (h, y += s h B^T, u, dB, dA, u A): 2 T r (3 I + 3 O)
    # flops. At the measured matmul throughput this is the floor of any LoRA layer's extra cost.
    if matmul_gflops:
        row["lora_gemm_floor_ms"] = 1e3 * 2 * T * r * (3 * I + 3 * O) / (matmul_gflops * 1e9)
    x, g = xs[0], gs[0]
    for k in fns:
        x.grad = None
        row[f"{k}_saved_MB"] = saved_bytes(lambda: fns[k](x, g), params) / 2**20
        peak = peak_step_bytes(lambda: fns[k](x, g), device)
        if peak is not None:
            row[f"{k}_peak_MB"] = peak / 2**20
    return row


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

COLUMNS = [("dtype", "{}"), ("r", "{}"), ("dropout_p", "{:g}"), ("base_ms", "{:.1f}"), ("pylora_ms", "{:.1f}"),
           ("peft_ms", "{:.1f}"), ("pylora_extra_ms", "{:.1f}"), ("peft_extra_ms", "{:.1f}"),
           ("extra_ratio", "{:.2f}"), ("lora_gemm_floor_ms", "{:.1f}"), ("pylora_saved_MB", "{:.1f}"),
           ("peft_saved_MB", "{:.1f}")]


def format_table(rows: list[dict]) -> str:
    cols = list(COLUMNS)
    if rows and "pylora_peak_MB" in rows[0]:
        cols += [("pylora_peak_MB", "{:.1f}"), ("peft_peak_MB", "{:.1f}")]
    cells = [[name for name, _ in cols]]
    for row in rows:
        cells.append(["-" if row.get(n) is None else f.format(row[n]) for n, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def load_average() -> float | None:
    """The 1-minute load average, recorded with every row: on a shared machine it says how much of a
    time is other people's work."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="T=256, 1024x1024: a smoke run in seconds")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ranks", default="8,16,64")
    ap.add_argument("--dropouts", default="0,0.1")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch.set_num_threads); 1 keeps a shared machine's load from stalling "
                         "every parallel region on its slowest thread")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_layer_<device>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    T, I, O = (256, 1024, 1024) if args.quick else (2048, 4096, 4096)
    repeats = args.repeats or (5 if args.quick else (7 if args.device == "cpu" else 30))
    timer = Timer(args.device)
    cache_bytes = 64 << 20  # past any last-level cache here (32 MiB L3 on the dev CPU, 60 MiB L2 on H200)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    print(f"pylora bench_train (layer): device={args.device} ({machine_description(args.device)}), "
          f"T={T} I={I} O={O}, backend={ops.backend('lora_linear', args.device)}, repeats={repeats}", flush=True)
    limits = {str(dt)[6:]: machine_limits(args.device, dt, timer, args.quick) for dt in dtypes}
    print("limits measured now: " + "; ".join(f"{k}: " + ", ".join(f"{n}={v:.1f}" for n, v in d.items())
                                              for k, d in limits.items()), flush=True)
    rows = []
    for dtype in dtypes:
        for r in (int(v) for v in args.ranks.split(",")):
            for p in (float(v) for v in args.dropouts.split(",")):
                t0, load0 = time.perf_counter(), load_average()
                row = bench_layer(args.device, dtype, r, p, T, I, O, repeats, args.warmup, timer, cache_bytes,
                                  limits[str(dtype)[6:]]["matmul_GFLOPS"])
                row["load_avg_1min"] = [load0, load_average()]
                rows.append(row)
                print(f"  {str(dtype)[6:]} r={r} p={p:g}: {time.perf_counter() - t0:.0f} s, load average "
                      f"{row['load_avg_1min'][0]} -> {row['load_avg_1min'][1]}", flush=True)
    print(format_table(rows))
    suffix = f"_{args.threads}t" if args.threads and args.device == "cpu" else ""
    out = args.out or os.path.join(ROOT, "bench", "results", f"train_layer_{args.device}{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine_description(args.device), "torch": torch.__version__,
                   "build": _ext.build_info(), "quick": args.quick, "limits": limits, "layer": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
