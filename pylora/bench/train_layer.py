"""Training step of one LoRA linear layer, forward + backward: pylora (ops.lora_linear) against PEFT's
LoRA Linear and the frozen base nn.Linear alone, in the same rounds.

    python -m pylora.bench.train_layer [--quick] [--device cpu|cuda] [--threads N] [--tokens T]
        [--in-features I] [--out-features O] [--dtypes float32,bfloat16] [--ranks 8,16,64] [--dropouts 0,0.1]

Per (dtype, r, dropout_p): the frozen nn.Linear alone (dX only), pylora and PEFT's Linear (wrapping the
same frozen layer, with the same A, B and scale), each step computing dX, dA and dB. The three alternate
within rounds; each LoRA layer's extra cost over the base is the median of its per-round difference to
the base (extra_ci_ms: its 95% interval). lora_gemm_floor_ms is what the six r-wide LoRA products cost at
the matmul throughput measured in the same run: no LoRA layer's extra cost can be lower. Inputs rotate
over enough distinct x / grad_y tensors to pass the largest cache. Memory: the bytes of the tensors
autograd saves for backward (distinct storages, parameters excluded), and on CUDA the peak allocated
during a step above what was allocated before it. PEFT is optional: without it the PEFT column is empty.

Sanity checks: every step at least its roofline floor (base: the forward and dX GEMMs; LoRA layers: those
plus the six r-wide products), each LoRA step no faster than the frozen layer it contains, each LoRA
layer's extra cost not confidently below lora_gemm_floor_ms, and pylora's output equal to PEFT's at p=0.
"""
from __future__ import annotations

import math
import sys

import torch

from pylora.bench import harness as h

SUITE = "train-layer"
STEM = "train_layer"


def saved_bytes(step, exclude) -> int:
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


def peak_step_bytes(step, device) -> int | None:
    """CUDA: the peak allocated during step() above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def make_layers(I, O, r, p, dtype, device, gen, peft):
    """A frozen nn.Linear, LoRA factors A [r, I], B [O, r] (B non-zero), and PEFT's Linear over the same
    layer and factors (None without peft)."""
    base = torch.nn.Linear(I, O, bias=True).to(device=device, dtype=dtype)
    base.requires_grad_(False)
    alpha = 2.0 * r
    A_init = (torch.rand(r, I, generator=gen) * 2 - 1) / math.sqrt(I)
    B_init = torch.randn(O, r, generator=gen) * 0.02
    if peft is not None:
        from peft.tuners.lora.layer import Linear as PeftLinear

        layer = PeftLinear(base, "default", peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p), r=r,
                           lora_alpha=alpha)
        layer.to(device=device, dtype=dtype)
        layer.train()
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        scale = layer.scaling["default"]
    else:
        layer = None
        A = torch.nn.Parameter(torch.empty(r, I, device=device, dtype=dtype))
        B = torch.nn.Parameter(torch.empty(O, r, device=device, dtype=dtype))
        scale = alpha / r
    with torch.no_grad():
        A.copy_(A_init)
        B.copy_(B_init)
    return base, layer, A, B, scale


def bench_case(timer, limits, checks, device, dtype, r, p, T, I, O, gen, peft) -> dict:
    from pylora import ops

    base, peft_layer, A, B, scale = make_layers(I, O, r, p, dtype, device, gen, peft)
    elt = torch.empty((), dtype=dtype).element_size()
    per_input = (T * I + T * O) * elt
    n_inputs = max(2, min(8, math.ceil(2 * h.cache_bytes(device) / per_input)))
    xs = [torch.randn(T, I, generator=gen).to(device=device, dtype=dtype).requires_grad_(True) for _ in range(n_inputs)]
    gs = [torch.randn(T, O, generator=gen).to(device=device, dtype=dtype) for _ in range(n_inputs)]
    case = f"{h.dtype_name(dtype)} T={T} {I}->{O} r={r} p={p:g}"

    def base_step(k):
        base(xs[k % n_inputs]).backward(gs[k % n_inputs])

    def pylora_step(k):
        A.grad = B.grad = None
        ops.lora_linear(xs[k % n_inputs], base.weight, base.bias, A, B, scale, dropout_p=p).backward(gs[k % n_inputs])

    def peft_step(k):
        A.grad = B.grad = None
        peft_layer(xs[k % n_inputs]).backward(gs[k % n_inputs])

    fns = {"base": base_step, "pylora": pylora_step}
    if peft_layer is not None:
        fns["peft"] = peft_step

    def clear(k):
        xs[k % n_inputs].grad = None

    parity = None
    if p == 0 and peft_layer is not None:  # a benchmark of a wrong result is worthless (PEFT's dropout mask is its own)
        with torch.no_grad():
            y_ref = peft_layer(xs[0]).float()
            y_py = ops.lora_linear(xs[0], base.weight, base.bias, A, B, scale).float()
        parity = float((y_py - y_ref).abs().max() / y_ref.abs().max())
        checks.within(case, "max |pylora - PEFT| / max |PEFT| at p=0", parity, 0.0,
                      1e-5 if dtype == torch.float32 else 2e-2, "one computation in two ways allows (rounding)")

    m = timer.measure(fns, setup={n: clear for n in fns})
    limits.refresh(timer)  # the floors below include probes taken under this case's load
    params = (base.weight, base.bias, A, B)
    row = {"device": device.type, "dtype": h.dtype_name(dtype), "T": T, "I": I, "O": O, "r": r, "dropout_p": p,
           "inputs_rotated": n_inputs}
    for k in ("base", "pylora", "peft"):
        row[f"{k}_ms"] = m.median(k) * 1e3 if k in m else None
    extras = {}
    for k in ("pylora", "peft"):
        if k in m:
            extras[k] = m.diff(k, "base")
            row[f"{k}_extra_ms"] = extras[k].median * 1e3
            row[f"{k}_extra_ci_ms"] = [extras[k].ci_low * 1e3, extras[k].ci_high * 1e3]
        else:
            row[f"{k}_extra_ms"] = None
    row["extra_ratio"] = (row["pylora_extra_ms"] / row["peft_extra_ms"]
                          if row.get("peft_extra_ms") and row["peft_extra_ms"] > 0 else None)
    # The six r-wide products every LoRA step needs (h = x A^T, y += s h B^T, u = g B, dB, dA, dX += s u A):
    # 2 T r (3 I + 3 O) flops.
    lora_flops = 2 * T * r * (3 * I + 3 * O)
    lora_floor = lora_flops / limits.rate(dtype)
    row["lora_gemm_floor_ms"] = lora_floor * 1e3
    base_flops = 4 * T * I * O  # forward and dX
    base_bytes = (2 * I * O + 2 * T * I + 2 * T * O) * elt  # W twice; x, dX, y, grad_y once
    floors = {"base": limits.floor_s(base_bytes, base_flops, dtype),
              "pylora": limits.floor_s(base_bytes, base_flops + lora_flops, dtype)}
    floors["peft"] = floors["pylora"]
    row["floor_ms"] = {k: v * 1e3 for k, v in floors.items()}
    row["parity_err"] = parity
    for k in fns:
        checks.positive(case, f"{k} step", m.median(k))
        checks.floor(case, f"{k} step", m.median(k), floors[k],
                     f"{(base_flops if k == 'base' else base_flops + lora_flops) / 1e9:.1f} GFLOP at "
                     f"{limits.rate(dtype) / 1e12:.3f} TFLOP/s")
    for k, d in extras.items():
        checks.not_faster_than_base(case, f"{k} step", m.median(k), "the frozen layer's step", m.median("base"),
                                    ratio=m.ratio(k, "base"))
        # The extra cost is a difference of two noisy medians: it fails only when its whole 95% interval
        # lies under the floor.
        checks.floor(case, f"{k} extra cost over the frozen layer (upper end of its 95% interval)", d.ci_high,
                     lora_floor, f"the six r-wide products, {lora_flops / 1e9:.2f} GFLOP")
    for k, fn in fns.items():
        xs[0].grad = None
        row[f"{k}_saved_MB"] = saved_bytes(lambda fn=fn: fn(0), params) / 2**20
        peak = peak_step_bytes(lambda fn=fn: fn(0), device)
        if peak is not None:
            row[f"{k}_peak_MB"] = peak / 2**20
    row.update({"spread": h.spread(m, "pylora"), "n": m["pylora"].n, "stats": m.as_dict("ms"),
                "extra_stats": {k: d.as_dict("ms") for k, d in extras.items()}, "timing": m.describe()})
    return row


COLUMNS = [("dtype", "dtype", "s"), ("r", "r", "d"), ("dropout_p", "dropout", "g"), ("base_ms", "base ms", ".1f"),
           ("pylora_ms", "pylora ms", ".1f"), ("peft_ms", "PEFT ms", ".1f"), ("pylora_extra_ms", "pylora extra ms", ".1f"),
           ("peft_extra_ms", "PEFT extra ms", ".1f"), ("extra_ratio", "pylora/PEFT extra", ".2f"),
           ("lora_gemm_floor_ms", "LoRA GEMM floor ms", ".1f"), ("spread", "± spread", ".0%"), ("n", "n", "d"),
           ("pylora_saved_MB", "pylora saved MB", ".1f"), ("peft_saved_MB", "PEFT saved MB", ".1f")]


def run(argv=None, out_dir=None) -> int:
    p = h.parser(__doc__, "python -m pylora.bench.train_layer")
    h.add_arguments(p, quick="T=256, 1024x1024, r=16: seconds", full="T=2048, 4096x4096, r=8,16,64", budget=(1.5, 15.0), out_dir=out_dir)
    p.add_argument("--tokens", type=int, default=None, help="T (default: 256 quick, 2048 full)")
    p.add_argument("--in-features", type=int, default=None, help="I (default: 1024 quick, 4096 full)")
    p.add_argument("--out-features", type=int, default=None, help="O (default: 1024 quick, 4096 full)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    p.add_argument("--ranks", default=None, help="comma-separated (default: 16 quick, 8,16,64 full)")
    p.add_argument("--dropouts", default="0,0.1", help="comma-separated lora_dropout values")
    args = p.parse_args(argv)
    timer = h.timer_from_args(args)
    device = torch.device(args.device)
    T = args.tokens or (256 if args.quick else 2048)
    I = args.in_features or (1024 if args.quick else 4096)
    O = args.out_features or (1024 if args.quick else 4096)
    ranks = [int(v) for v in (args.ranks or ("16" if args.quick else "8,16,64")).split(",")]
    dropouts = [float(v) for v in args.dropouts.split(",")]
    try:
        dtypes = [h.DTYPES[d] for d in args.dtypes.split(",")]
    except KeyError as exc:
        raise SystemExit(f"--dtypes: {exc} must be one of {', '.join(h.DTYPES)}") from exc
    limits = h.measure_limits(timer, dtypes, matmul_n=1024 if args.quick else None, budget_s=timer.budget_s)
    print(limits.describe(), flush=True)
    from pylora import ops

    report = h.Report(SUITE, device, timer=timer, limits=limits, quick=args.quick,
                      config={"T": T, "I": I, "O": O, "ranks": ranks, "dropouts": dropouts,
                              "dtypes": [h.dtype_name(d) for d in dtypes],
                              "backend": ops.backend("lora_linear", device)})
    peft = h.optional("peft")
    if peft is None:
        report.note("peft is not installed: the PEFT baseline is left out (pip install peft)")
    gen = torch.Generator().manual_seed(args.seed)
    for dtype in dtypes:
        for r in ranks:
            for dp in dropouts:
                row = report.add(bench_case(timer, limits, report.checks, device, dtype, r, dp, T, I, O, gen, peft))
                print(f"  {row['dtype']} r={r} p={dp:g}: base {row['base_ms']:.1f} ms, pylora {row['pylora_ms']:.1f} ms"
                      + (f", PEFT {row['peft_ms']:.1f} ms" if row.get("peft_ms") else "")
                      + f" ({row['timing']['rounds']} rounds, {row['timing']['stopped']})", flush=True)
    path = args.out or h.default_out(STEM, args, out_dir)
    report.finish(path, COLUMNS, title=f"Training one LoRA linear, T={T}, {I}->{O}, forward + backward (ms; extra = "
                                       f"the cost over the frozen layer, paired per round; saved = bytes kept for backward)")
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
