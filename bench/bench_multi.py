"""Multi-adapter serving, kernel level: pylora's lora_apply_ against PEFT's per-adapter loop and a
gather-then-bmm einsum, and against the bandwidth floor measured in the same run.

Each case: T tokens, one adapter per token (its popularity over A loaded adapters: distinct = round
robin, uniform, zipf (s=1), identical = all tokens one adapter), rank r, I -> O. y += scale * B_a A_a x.
  pylora      ops.lora_apply_ over a paged pool (rows of every adapter scattered in A_rows/B_rows),
              plan built once outside the timing (a server builds it once per forward).
  peft_loop   PEFT's LoRA Linear _mixed_batch_forward: per adapter present, gather its rows of x,
              lora_B(lora_A(dropout(x_sub))) * scaling with nn.Linear modules, index-add into y.
  gather_bmm  gather each token's A and B (stacked [A, r, I] / [A, O, r]), two einsums, add into y.
  floor       bytes / copy bandwidth: every used adapter's A and B read once, x read, y read and
              written; the copy bandwidth is a large tensor copy measured in the same run.
  compute     2 T r (I + O) flops / the matmul rate measured in the same run (the other limit).
Timing: warm-up, then the median of repeats, each repeat on other x / y buffers and other adapters
of a pool sized past the caches (on CUDA: events, and an L2 flush between repeats).

Functions (make_case, time_fn, copy_bandwidth, matmul_rate, bench_kernel_case, run_kernel_sweep) are
for reuse; main prints a table and writes bench/results/multi_kernel_<device>.json.
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
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pylora import _ext, ops  # noqa: E402
from pylora.serve import batch as plan  # noqa: E402

ROTATE_BYTES = 96 << 20  # ~3x a 32 MiB L3: what one rotation cycle must exceed
POOL_BUDGET = 1 << 30  # bytes of adapter weights (pool + stacked copies) a case may allocate
GATHER_BUDGET = 1 << 30  # gather_bmm's per-token copies of A and B; above it the baseline is skipped


# ----------------------------------------------------------------------------------------------
# Timing and machine limits
# ----------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Seconds on the CPU: the wall clock, or (--clock thread, single-threaded runs) the calling thread's CPU
# time, which does not advance while other processes of a shared machine hold the cores.
CLOCK = time.perf_counter


def _time_once(fn, k, device, flush):
    if flush is not None:
        flush()
    if device.type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(k)
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3
    t0 = CLOCK()
    fn(k)
    return CLOCK() - t0


def time_fns(fns: dict, device, repeats=15, warmup=3, min_time=0.3, max_repeats=60, flush=None,
             max_seconds=None) -> dict:
    """Median seconds per call of each fn(k) (k counts its calls, for rotating inputs), after warm-up.

    The functions take turns, one call each per round, so a stretch of load from other processes on a
    shared machine falls on all of them alike and the ratios between them hold. A function stops after
    `repeats` calls once it has run `min_time` seconds, or at max_repeats, or (max_seconds: a slow
    baseline) after max_seconds of its own time with at least 3 calls.
    """
    calls = {name: 0 for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn(calls[name])
            calls[name] += 1
    _sync(device)
    times = {name: [] for name in fns}

    def active(name):
        ts = times[name]
        if max_seconds is not None and len(ts) >= 3 and sum(ts) > max_seconds:
            return False
        return len(ts) < repeats or (sum(ts) < min_time and len(ts) < max_repeats)

    while any(active(n) for n in fns):
        for name, fn in fns.items():
            if active(name):
                times[name].append(_time_once(fn, calls[name], device, flush))
                calls[name] += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_fn(fn, device, **kw) -> float:
    """Median seconds per call of fn(k) (see time_fns)."""
    return time_fns({"fn": fn}, device, **kw)["fn"]


def copy_bandwidth(device, nbytes=512 << 20) -> float:
    """Bytes per second of a large tensor copy, counting the read and the write."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda k: dst.copy_(src), device, repeats=7, warmup=2, min_time=0.0)
    del src, dst
    return 2 * nbytes / t


def matmul_rate(device, dtype, n=None) -> float:
    """Flops per second of a square matmul in `dtype` (the compute limit next to the bandwidth one)."""
    n = n or (4096 if device.type == "cuda" else 1536)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda k: torch.mm(a, b), device, repeats=5, warmup=2, min_time=0.0)
    return 2 * n ** 3 / t


def l2_flusher(device):
    if device.type != "cuda":
        return None
    buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    return lambda: buf.zero_()


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def token_adapters(T, n_adapters, popularity, gen) -> torch.Tensor:
    """Logical adapter (0 .. n_adapters-1) of each of T tokens."""
    if popularity == "identical" or n_adapters == 1:
        return torch.zeros(T, dtype=torch.int64)
    if popularity == "distinct":
        return torch.arange(T) % n_adapters
    if popularity == "uniform":
        return torch.randint(0, n_adapters, (T,), generator=gen)
    if popularity == "zipf":
        w = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64)
        return torch.multinomial(w, T, replacement=True, generator=gen)
    raise ValueError(f"popularity={popularity!r} must be distinct, uniform, zipf or identical")


@dataclass
class Pool:
    """M adapters of rank r (M >= the adapters a case names, so that rotating over them passes the
    caches), as pylora's pool and as PEFT's per-adapter modules."""

    A_rows: torch.Tensor  # [P, I]
    B_rows: torch.Tensor  # [P, O]
    row_ptr: torch.Tensor
    row_idx: torch.Tensor
    scales: torch.Tensor
    A_stack: torch.Tensor  # [M, r, I]: PEFT's lora_A weights (views), gather_bmm's stack
    B_stack: torch.Tensor  # [M, O, r]
    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    dropout: nn.ModuleDict
    scaling: dict
    M: int


def make_pool(I, O, r, n_adapters, dtype, device, gen) -> Pool:
    adapter_bytes = r * (I + O) * torch.tensor([], dtype=dtype).element_size()
    M = max(n_adapters, math.ceil(ROTATE_BYTES / adapter_bytes))
    M = max(n_adapters, min(M, POOL_BUDGET // (2 * adapter_bytes)))
    A_stack = ((torch.rand(M, r, I, generator=gen) * 2 - 1) / math.sqrt(I)).to(dtype).to(device)
    B_stack = (torch.randn(M, O, r, generator=gen) / math.sqrt(r)).to(dtype).to(device)
    # The pool: adapter a's r rows scattered over P = M r rows in a random order.
    P = M * r
    perm = torch.randperm(P, generator=gen)
    A_rows = torch.empty(P, I, dtype=dtype, device=device)
    B_rows = torch.empty(P, O, dtype=dtype, device=device)
    A_rows[perm.to(device)] = A_stack.reshape(P, I)
    B_rows[perm.to(device)] = B_stack.transpose(1, 2).reshape(P, O)
    row_ptr = (torch.arange(M + 1) * r).to(torch.int32).to(device)
    row_idx = perm.to(torch.int32).to(device)
    scales = (0.5 + torch.rand(M, generator=gen)).to(device)
    lora_A, lora_B, dropout, scaling = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict(), {}
    for a in range(M):
        la = nn.Linear(I, r, bias=False, device="meta")
        la.weight = nn.Parameter(A_stack[a], requires_grad=False)
        lb = nn.Linear(r, O, bias=False, device="meta")
        lb.weight = nn.Parameter(B_stack[a], requires_grad=False)
        lora_A[str(a)], lora_B[str(a)], dropout[str(a)] = la, lb, nn.Identity()
        scaling[str(a)] = float(scales[a])
    return Pool(A_rows, B_rows, row_ptr, row_idx, scales, A_stack, B_stack, lora_A, lora_B, dropout, scaling, M)


def peft_mixed_batch(result, x, adapter_names, pool: Pool):
    """PEFT's LoRA Linear._mixed_batch_forward after base_layer: the same loop, line for line."""
    torch_result_dtype = result.dtype
    unique_adapters = set(adapter_names)
    sub_batch_indices_list = []
    for adapter in unique_adapters:
        sub_batch_indices_list.append([index for index, item in enumerate(adapter_names) if item == adapter])
    for i, active_adapter in enumerate(unique_adapters):
        if active_adapter == "__base__":
            continue
        if active_adapter not in pool.lora_A.keys():
            continue
        lora_A = pool.lora_A[active_adapter]
        lora_B = pool.lora_B[active_adapter]
        dropout = pool.dropout[active_adapter]
        scaling = pool.scaling[active_adapter]
        sub_batch = x[sub_batch_indices_list[i]].to(lora_A.weight.dtype)
        lora_output = lora_B(lora_A(dropout(sub_batch))) * scaling
        result[sub_batch_indices_list[i]] += lora_output.to(torch_result_dtype)
    return result


def gather_bmm(y, x, slot, pool: Pool):
    A_t = pool.A_stack[slot]  # [T, r, I]
    B_t = pool.B_stack[slot]  # [T, O, r]
    h = torch.einsum("ti,tri->tr", x, A_t)
    y += (torch.einsum("tr,tor->to", h, B_t) * pool.scales[slot, None]).to(y.dtype)


@dataclass
class Result:
    device: str
    dtype: str
    T: int
    I: int
    O: int
    r: int
    adapters: int
    popularity: str
    used: int  # distinct adapters the batch touches
    floor_us: float
    compute_us: float
    pylora_us: float
    peft_loop_us: float
    gather_bmm_us: float | None
    vs_peft: float  # peft_loop / pylora
    vs_floor: float  # pylora / floor


def bench_kernel_case(pool: Pool, T, I, O, r, n_adapters, popularity, dtype, device, bw, flops, gen,
                      methods=("pylora", "peft_loop", "gather_bmm")) -> Result:
    logical = token_adapters(T, n_adapters, popularity, gen)
    used_ids, rank = torch.unique(logical, return_inverse=True)
    used = int(used_ids.numel())
    # Rotation: repeat k maps the u adapters the batch uses onto the k-th block of u pool adapters
    # (the same tokens share an adapter in every repeat) and uses other x / y buffers, so a cycle
    # touches the whole pool (>= ROTATE_BYTES) and nothing a repeat reads is cached from the last one.
    elt = torch.tensor([], dtype=dtype).element_size()
    io_bytes = T * (I + 2 * O) * elt
    n_io = max(1, min(16, math.ceil(ROTATE_BYTES / io_bytes), (256 << 20) // io_bytes))
    xs = [torch.randn(T, I, generator=gen).to(dtype).to(device) for _ in range(n_io)]
    ys = [torch.randn(T, O, generator=gen).to(dtype).to(device) for _ in range(n_io)]
    n_rot = max(1, pool.M // used)
    slots, plans, names = [], [], []
    for k in range(n_rot):
        phys = rank + k * used
        slots.append(phys.to(device))
        seg_ptr, seg_slot = plan.segments(phys, num_slots=pool.M)
        plans.append((seg_ptr.to(device), seg_slot.to(device)))
        names.append([str(int(a)) for a in phys])
    flush = l2_flusher(device)

    def run_pylora(k):
        ops.lora_apply_(ys[k % n_io], xs[k % n_io], pool.A_rows, pool.B_rows, pool.row_ptr, pool.row_idx,
                        pool.scales, *plans[k % n_rot], check=False)

    def run_peft(k):
        peft_mixed_batch(ys[k % n_io], xs[k % n_io], names[k % n_rot], pool)

    def run_bmm(k):
        gather_bmm(ys[k % n_io], xs[k % n_io], slots[k % n_rot], pool)

    gather_bytes = T * r * (I + O) * elt
    fns = {"pylora": run_pylora, "peft_loop": run_peft, "gather_bmm": run_bmm}
    fns = {m: f for m, f in fns.items() if m in methods and (m != "gather_bmm" or gather_bytes <= GATHER_BUDGET)}
    with torch.inference_mode():
        t = time_fns(fns, device, flush=flush, max_seconds=2.0)
    t_py, t_peft, t_bmm = t.get("pylora", math.nan), t.get("peft_loop", math.nan), t.get("gather_bmm")
    floor = (used * r * (I + O) * elt + io_bytes) / bw
    compute = 2 * T * r * (I + O) / flops
    return Result(device.type, str(dtype).replace("torch.", ""), T, I, O, r, n_adapters, popularity, used,
                  floor * 1e6, compute * 1e6, t_py * 1e6, t_peft * 1e6, None if t_bmm is None else t_bmm * 1e6,
                  t_peft / t_py, t_py / floor)


# ----------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------

FULL = dict(T=(1, 16, 64, 256), shapes=((4096, 4096), (4096, 11008)), r=(8, 16, 64), adapters=(1, 8, 64),
            popularity=("distinct", "uniform", "zipf", "identical"))
# The representative subset for a CPU run of about ten minutes on two cores.
REPRESENTATIVE = dict(T=(1, 16, 64, 256), shapes=((4096, 4096), (4096, 11008)), r=(16, 64), adapters=(1, 8, 64),
                      popularity=("distinct", "uniform", "zipf"))
# A smoke run of a minute or two (`pylora bench` without --full).
QUICK = dict(T=(1, 64), shapes=((4096, 4096),), r=(16,), adapters=(8, 64), popularity=("distinct", "zipf"))
SWEEPS = {"full": FULL, "representative": REPRESENTATIVE, "quick": QUICK}


def cases(sweep):
    for (I, O) in sweep["shapes"]:
        for r in sweep["r"]:
            for n in sweep["adapters"]:
                pops = ("identical",) if n == 1 else sweep["popularity"]
                for T in sweep["T"]:
                    for pop in pops:
                        yield I, O, r, n, T, pop


def run_kernel_sweep(sweep, dtype, device, log=print) -> dict:
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth(device)
    flops = matmul_rate(device, dtype)
    load = f" | load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    log(f"# {machine(device)}{load} | copy {bw / 1e9:.1f} GB/s | {str(dtype).replace('torch.', '')} matmul "
        f"{flops / 1e9:.0f} GFLOP/s | threads {torch.get_num_threads()}")
    log(HEADER)
    results, pool, key = [], None, None
    for I, O, r, n, T, pop in cases(sweep):
        if key != (I, O, r, n):
            pool, key = None, (I, O, r, n)
            pool = make_pool(I, O, r, n, dtype, device, gen)
        res = bench_kernel_case(pool, T, I, O, r, n, pop, dtype, device, bw, flops, gen)
        results.append(res)
        log(row(res))
    return {"machine": machine(device), "copy_GBps": bw / 1e9, "matmul_GFLOPs": flops / 1e9,
            "threads": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
            "results": [asdict(r) for r in results]}


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


HEADER = (f"{'T':>4} {'I->O':>10} {'r':>3} {'A':>3} {'popularity':>10} {'used':>4} | {'pylora':>9} {'peft_loop':>10} "
          f"{'gather_bmm':>10} | {'floor':>8} {'compute':>8} | {'x peft':>6} {'x floor':>7}")


def row(r: Result) -> str:
    bmm = f"{r.gather_bmm_us:10.1f}" if r.gather_bmm_us is not None else f"{'(mem)':>10}"
    return (f"{r.T:>4} {f'{r.I}->{r.O}':>10} {r.r:>3} {r.adapters:>3} {r.popularity:>10} {r.used:>4} | "
            f"{r.pylora_us:9.1f} {r.peft_loop_us:10.1f} {bmm} | {r.floor_us:8.1f} {r.compute_us:8.1f} | "
            f"{r.vs_peft:6.2f} {r.vs_floor:7.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--quick", action="store_true", help="a smoke sweep of a minute or two (same as --sweep quick)")
    ap.add_argument("--sweep", default="full", choices=sorted(SWEEPS),
                    help="full; representative (about ten minutes on two CPU cores); quick")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/multi_kernel_<device>.json)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--clock", default="wall", choices=("wall", "thread"),
                    help="CPU timing: wall clock, or the thread's CPU time (needs --threads 1; robust to other "
                         "processes on a shared machine)")
    args = ap.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            ap.error("--clock thread measures one thread's CPU time: pass --threads 1")
        CLOCK = time.thread_time
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if ops.backend("lora_apply_", device) != "kernel":
        print(f"warning: no compiled {device.type} kernel ({_ext.load_error or 'not built'}): timing the reference",
              file=sys.stderr)
    t0 = time.perf_counter()
    sweep = "quick" if args.quick else args.sweep
    report = run_kernel_sweep(SWEEPS[sweep], dtype, device)
    report["sweep"] = sweep
    report["clock"] = args.clock if device.type == "cpu" else "cuda events"
    report["seconds"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        report["loadavg_after"] = os.getloadavg()  # other processes on a shared machine skew timings
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"multi_kernel_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"# {len(report['results'])} cases in {report['seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
