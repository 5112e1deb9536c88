"""Multi-adapter serving, kernel level: pylora's lora_apply_ against PEFT's per-adapter loop and a
gather-then-bmm einsum, and against the roofline floor from the limits measured in the same run.

    python -m pylora.bench.multi_kernel [--quick | --sweep full|representative|quick] [--device cpu|cuda]
                                        [--threads N] [--dtype bfloat16]

Each case: T tokens, one adapter per token (its popularity over the adapters loaded: distinct = round
robin, uniform, zipf (s=1), identical = all tokens one adapter), rank r, I -> O. y += scale * B_a A_a x.
  pylora      ops.lora_apply_ over a paged pool (rows of every adapter scattered in A_rows/B_rows),
              plan built once outside the timing (a server builds it once per forward).
  peft_loop   PEFT's LoRA Linear _mixed_batch_forward: per adapter present, gather its rows of x,
              lora_B(lora_A(dropout(x_sub))) * scaling with nn.Linear modules, index-add into y
              (reimplemented line for line here: peft itself is not needed).
  gather_bmm  gather each token's A and B (stacked [A, r, I] / [A, O, r]), two einsums, add into y
              (left out where its per-token copies would pass 1 GiB).
  floor_us    bytes / bandwidth: every used adapter's A and B read once, x read, y read and written;
              bandwidth = the faster of copy and read measured in the same run.
  compute_us  2 T r (I + O) flops / the dtype's matmul rate measured in the same run.
Every method must take at least max(floor_us, compute_us) (x FLOOR_SLACK). The three alternate within
rounds; each call uses other x / y buffers and another block of adapters of a pool sized past the
caches (three times the largest cache), so nothing a call reads is cached from the one before. On CUDA:
events, the L2 flushed before each call, and T <= 16 timed as CUDA graphs of 8 calls (launch-bound).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from pylora.bench import harness as h

SUITE = "multi-kernel"
STEM = "multi_kernel"
POOL_BUDGET = 1 << 30  # bytes of adapter weights (pool + stacked copies) a case may allocate
GATHER_BUDGET = 1 << 30  # gather_bmm's per-token copies of A and B; above it the baseline is left out
GRAPH_MAX_T = 16  # CUDA: cases up to this many tokens are launch-bound: timed as graphs


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


def make_pool(I, O, r, n_adapters, dtype, device, gen, rotate_bytes) -> Pool:
    adapter_bytes = r * (I + O) * torch.tensor([], dtype=dtype).element_size()
    M = max(n_adapters, math.ceil(rotate_bytes / adapter_bytes))
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
    hid = torch.einsum("ti,tri->tr", x, A_t)
    y += (torch.einsum("tr,tor->to", hid, B_t) * pool.scales[slot, None]).to(y.dtype)


def bench_case(timer, limits, checks, pool: Pool, T, I, O, r, n_adapters, popularity, dtype, device, gen,
               rotate_bytes) -> dict:
    from pylora import ops
    from pylora.serve import batch as plan

    logical = token_adapters(T, n_adapters, popularity, gen)
    used_ids, rank = torch.unique(logical, return_inverse=True)
    used = int(used_ids.numel())
    # Rotation: call k maps the u adapters the batch uses onto the k-th block of u pool adapters (the same
    # tokens share an adapter in every call) and uses other x / y buffers, so a cycle touches the whole pool
    # (>= rotate_bytes) and nothing a call reads is cached from the last one.
    elt = torch.tensor([], dtype=dtype).element_size()
    io_bytes = T * (I + 2 * O) * elt
    n_io = max(1, min(16, math.ceil(rotate_bytes / io_bytes), (256 << 20) // io_bytes))
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

    def run_pylora(k):
        ops.lora_apply_(ys[k % n_io], xs[k % n_io], pool.A_rows, pool.B_rows, pool.row_ptr, pool.row_idx,
                        pool.scales, *plans[k % n_rot], check=False)

    def run_peft(k):
        peft_mixed_batch(ys[k % n_io], xs[k % n_io], names[k % n_rot], pool)

    def run_bmm(k):
        gather_bmm(ys[k % n_io], xs[k % n_io], slots[k % n_rot], pool)

    fns = {"pylora": run_pylora, "peft_loop": run_peft}
    if T * r * (I + O) * elt <= GATHER_BUDGET:
        fns["gather_bmm"] = run_bmm
    graph = ("pylora", "gather_bmm") if (device.type == "cuda" and T <= GRAPH_MAX_T) else ()
    with torch.inference_mode():
        m = timer.measure(fns, graph=graph)
    limits.refresh(timer)  # the floors below include probes taken under this case's load
    floor = (used * r * (I + O) * elt + io_bytes) / limits.bandwidth()
    compute = 2 * T * r * (I + O) / limits.rate(dtype)
    roofline = max(floor, compute)
    t = {k: m.median(k) for k in fns}
    case = f"T={T} {I}->{O} r={r} adapters={n_adapters} {popularity}"
    row = {"device": device.type, "dtype": h.dtype_name(dtype), "T": T, "I": I, "O": O, "r": r,
           "adapters": n_adapters, "popularity": popularity, "used": used, "floor_us": floor * 1e6,
           "compute_us": compute * 1e6, "roofline_us": roofline * 1e6, "pylora_us": t["pylora"] * 1e6,
           "peft_loop_us": t["peft_loop"] * 1e6,
           "gather_bmm_us": t["gather_bmm"] * 1e6 if "gather_bmm" in t else None,
           "vs_peft": t["peft_loop"] / t["pylora"], "vs_floor": t["pylora"] / floor,
           "vs_roofline": t["pylora"] / roofline, "spread": h.spread(m, "pylora"), "n": m["pylora"].n,
           "stats": m.as_dict("us"), "timing": m.describe()}
    checks.within(case, "adapters used", used, 1, min(T, n_adapters), "one adapter per token allows")
    basis = (f"{(used * r * (I + O) * elt + io_bytes) / 1e6:.2f} MB at {limits.bandwidth() / 1e9:.1f} GB/s, "
             f"{2 * T * r * (I + O) / 1e6:.1f} MFLOP at {limits.rate(dtype) / 1e12:.3f} TFLOP/s")
    for k in fns:
        checks.positive(case, k, t[k])
        checks.floor(case, k, t[k], roofline, basis)
    return row


FULL = dict(T=(1, 16, 64, 256), shapes=((4096, 4096), (4096, 11008)), r=(8, 16, 64), adapters=(1, 8, 64),
            popularity=("distinct", "uniform", "zipf", "identical"))
# The representative subset for a CPU run of about ten minutes on two cores.
REPRESENTATIVE = dict(T=(1, 16, 64, 256), shapes=((4096, 4096), (4096, 11008)), r=(16, 64), adapters=(1, 8, 64),
                      popularity=("distinct", "uniform", "zipf"))
# A smoke run of a minute or so (`pylora bench` without --full).
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


COLUMNS = [("T", "T", "d"), ("I", "I", "d"), ("O", "O", "d"), ("r", "r", "d"), ("adapters", "adapters", "d"),
           ("popularity", "popularity", "s"), ("used", "used", "d"), ("pylora_us", "pylora us", ".1f"),
           ("spread", "± spread", ".0%"), ("peft_loop_us", "PEFT loop us", ".1f"), ("gather_bmm_us", "gather+bmm us", ".1f"),
           ("floor_us", "floor us", ".1f"), ("compute_us", "compute us", ".1f"), ("vs_floor", "pylora/floor", ".2f"),
           ("vs_peft", "PEFT/pylora", ".1f"), ("n", "n", "d")]


def run(argv=None, out_dir=None) -> int:
    p = h.parser(__doc__, "python -m pylora.bench.multi_kernel")
    h.add_arguments(p, quick="the quick sweep (same as --sweep quick)", full="the --sweep chosen", budget=(0.5, 2.0), out_dir=out_dir)
    p.add_argument("--sweep", default="full", choices=sorted(SWEEPS),
                   help="full; representative (about ten minutes on two CPU cores); quick")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(h.DTYPES))
    args = p.parse_args(argv)
    timer = h.timer_from_args(args)
    device = torch.device(args.device)
    dtype = h.DTYPES[args.dtype]
    sweep = "quick" if args.quick else args.sweep
    if sweep == "quick":
        args.quick = True
    rotate_bytes = 3 * h.cache_bytes(device)
    limits = h.measure_limits(timer, [dtype], matmul_n=1024 if args.quick else None, budget_s=max(timer.budget_s, 3.0))
    print(limits.describe(), flush=True)
    from pylora import _ext, ops

    report = h.Report(SUITE, device, timer=timer, limits=limits, quick=args.quick,
                      config={"sweep": sweep, "dtype": args.dtype, "rotate_bytes": rotate_bytes,
                              **{k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in SWEEPS[sweep].items()}})
    if ops.backend("lora_apply_", device) != "kernel":
        report.note(f"no compiled {device.type} kernel ({_ext.load_error or 'not built'}): timing the reference")
    gen = torch.Generator().manual_seed(args.seed)
    pool, key = None, None
    for I, O, r, n, T, pop in cases(SWEEPS[sweep]):
        if key != (I, O, r, n):
            pool, key = None, (I, O, r, n)
            pool = make_pool(I, O, r, n, dtype, device, gen, rotate_bytes)
        row = report.add(bench_case(timer, limits, report.checks, pool, T, I, O, r, n, pop, dtype, device, gen,
                                    rotate_bytes))
        bmm = f"{row['gather_bmm_us']:.1f}" if row["gather_bmm_us"] is not None else "-"
        print(f"  T={T:>3} {I}->{O} r={r} A={n:>2} {pop:>9} used={row['used']:>2}: pylora {row['pylora_us']:.1f} us, "
              f"PEFT loop {row['peft_loop_us']:.1f}, gather+bmm {bmm}, floor {row['floor_us']:.1f} "
              f"({row['timing']['rounds']} rounds, {row['timing']['stopped']})", flush=True)
    path = args.out or h.default_out(STEM, args, out_dir)
    report.finish(path, COLUMNS, title=f"lora_apply_ ({args.dtype}, us; floor = bytes / bandwidth, compute = flops / "
                                       f"matmul rate, both from the limits measured in this run)")
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
