"""Merging a LoRA update into one weight: pylora's merge_ (with the exact-unmerge record, and without one:
record=False, the same result for merges never undone; and its exact unmerge_) against torch's addmm_,
PEFT's way (W += B @ A * s) and the careful fp32 way ((W.float() + s * B.float() @ A.float()).to(W.dtype)),
across update sizes, next to the roofline floor from the limits measured in the same run, with the size
of the exact-unmerge record.

    python -m pylora.bench.merge [--quick] [--device cpu|cuda] [--threads N] [--shapes 4096x11008]
                                 [--ranks 8,16,64] [--rels 0.003,0.03,0.16] [--dtypes float32,bfloat16]

Each case: W [O, I] ~ N(0, 0.02) in dtype, A [r, I] and B [O, r] scaled so that std(s B A) = rel x std(W)
(s = 2; rel: the update size, 0.003 to 0.16 across trained adapters). The six methods alternate within
rounds; before every call W is restored from a pristine copy and the caches are flushed (untimed), so
every call merges into the same cold weight. roofline_ms = max(bytes / bandwidth, 2 r O I / matmul rate
of the dtype): bytes = W read and written once, A and B read once; bandwidth = the faster of copy and
read. Every method is checked against it; the record is checked against the most its format can hold;
unmerge_ must give W back bit for bit, and record=False the same W as with a record.
"""
from __future__ import annotations

import math
import sys

import torch

from pylora.bench import harness as h

SUITE = "merge"
FULL = dict(shapes=((4096, 4096), (4096, 11008)), ranks=(8, 16, 64), rels=(0.003, 0.03, 0.16),
            dtypes=("float32", "bfloat16"))
QUICK = dict(shapes=((4096, 4096),), ranks=(16,), rels=(0.003, 0.16), dtypes=("float32", "bfloat16"))
SCALE = 2.0
METHODS = ("pylora", "norecord", "unmerge", "addmm", "peft", "careful")


def factors(O, I, r, dtype, device, rel, gen):
    """W ~ N(0, 0.02) and an adapter whose std(SCALE * B @ A) is `rel` of std(W)."""
    W = (torch.randn(O, I, generator=gen) * 0.02).to(dtype).to(device)
    A = ((torch.rand(r, I, generator=gen) * 2 - 1) * math.sqrt(3.0 / I)).to(dtype).to(device)
    # std(B A) = sqrt(r) std(B) std(A) with std(A) = 1/sqrt(I); times SCALE it is rel * 0.02.
    B = (torch.randn(O, r, generator=gen) * (0.02 * rel / SCALE * math.sqrt(I / r))).to(dtype).to(device)
    return W, A, B


def record_bound_pct(O, I, elt) -> float:
    """The largest record merge_'s format allows, in % of W's bytes: an int16 count per 4096-element chunk
    of a row, and each element at most once, as a 2-byte entry or an escape (int64 index + value)."""
    counts = 2 * O * math.ceil(I / 4096)
    return 100 * (counts + O * I * (8 + elt)) / (O * I * elt)


def bench_case(timer, limits, checks, O, I, r, dtype, rel, device, gen) -> dict:
    from pylora import ops

    W0, A, B = factors(O, I, r, dtype, device, rel, gen)
    W = W0.clone()
    s = SCALE
    state = {}
    case = f"{O}x{I} {h.dtype_name(dtype)} r={r} rel={rel:g}"

    def restore(k):
        W.copy_(W0)

    def before_unmerge(k):
        W.copy_(W0)
        state["for_unmerge"] = ops.merge_(W, A, B, s)

    fns = {
        "pylora": lambda k: state.__setitem__("record", ops.merge_(W, A, B, s)),
        "norecord": lambda k: ops.merge_(W, A, B, s, record=False),
        "unmerge": lambda k: ops.unmerge_(W, A, B, s, state["for_unmerge"]),
        "addmm": lambda k: W.addmm_(B, A, alpha=s),
        "peft": lambda k: W.add_(B @ A * s),
        "careful": lambda k: W.copy_((W.float() + s * (B.float() @ A.float())).to(dtype)),
    }
    setup = {name: restore for name in fns}
    setup["unmerge"] = before_unmerge
    m = timer.measure(fns, setup=setup, flush=True)
    limits.refresh(timer)  # the floors below include probes taken under this case's load

    # Correctness of what was timed: merge then unmerge gives W back bit for bit.
    W.copy_(W0)
    record = ops.merge_(W, A, B, s)
    merged = W.clone()
    W.copy_(W0)
    ops.merge_(W, A, B, s, record=False)
    same_without_record = bool(torch.equal(W, merged))
    W.copy_(merged)
    update_rel = float((W.double() - W0.double()).std() / W0.double().std())
    ops.unmerge_(W, A, B, s, record)
    exact = bool(torch.equal(W, W0))

    elt = W.element_size()
    wbytes = W.numel() * elt
    traffic = 2 * wbytes + (A.numel() + B.numel()) * elt
    flops = 2 * r * O * I
    roofline = limits.floor_s(traffic, flops, dtype)
    t = {name: m.median(name) for name in fns}
    row = {"shape": f"{O}x{I}", "dtype": h.dtype_name(dtype), "r": r, "rel": rel, "update_rel": update_rel,
           "pylora_ms": t["pylora"] * 1e3, "norecord_ms": t["norecord"] * 1e3, "unmerge_ms": t["unmerge"] * 1e3, "addmm_ms": t["addmm"] * 1e3,
           "peft_ms": t["peft"] * 1e3, "careful_ms": t["careful"] * 1e3,
           "vs_addmm": t["addmm"] / t["pylora"], "time_vs_addmm": t["pylora"] / t["addmm"],
           "norecord_vs_addmm": t["norecord"] / t["addmm"],
           "vs_careful": t["careful"] / t["pylora"], "roofline_ms": roofline * 1e3,
           "of_roofline": roofline / t["pylora"], "of_copy_bw": (traffic / t["pylora"]) / limits.copy_Bps,
           "record_pct": 100 * record.nbytes / wbytes, "record_corrections": record.corrections,
           "unmerge_exact": exact, "spread": h.spread(m, "pylora"), "n": m["pylora"].n,
           "stats": m.as_dict("ms"), "timing": m.describe()}

    basis = (f"{traffic / 1e6:.1f} MB at {limits.bandwidth() / 1e9:.1f} GB/s, {flops / 1e9:.2f} GFLOP at "
             f"{limits.rate(dtype) / 1e12:.3f} TFLOP/s")
    for name in fns:
        checks.positive(case, f"{name} time", t[name])
        checks.floor(case, name, t[name], roofline, basis)
    bound = record_bound_pct(O, I, elt)
    checks.within(case, "record % of W", row["record_pct"], 0.0, bound, "merge_'s record format allows")
    checks.within(case, "unmerge_ bit-exact (1 = yes)", float(exact), 1.0, 1.0, "unmerge_'s definition requires")
    checks.within(case, "record=False gives the same W (1 = yes)", float(same_without_record), 1.0, 1.0,
                  "merge_'s definition requires")
    return row


COLUMNS = [("shape", "W", "s"), ("dtype", "dtype", "s"), ("r", "r", "d"), ("rel", "update", "g"),
           ("pylora_ms", "pylora merge ms", ".2f"), ("spread", "± spread", ".0%"),
           ("norecord_ms", "merge, no record ms", ".2f"), ("unmerge_ms", "exact unmerge ms", ".2f"),
           ("addmm_ms", "torch addmm_ ms", ".2f"), ("peft_ms", "PEFT way ms", ".2f"), ("careful_ms", "careful fp32 ms", ".2f"),
           ("time_vs_addmm", "pylora/addmm time", ".2f"), ("norecord_vs_addmm", "no record/addmm time", ".2f"), ("vs_careful", "careful/pylora", ".1f"),
           ("of_roofline", "of roofline", ".0%"), ("of_copy_bw", "of copy BW", ".0%"),
           ("record_pct", "record % of W", ".2f"), ("n", "n", "d")]


def parse_shapes(text: str):
    try:
        return tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item)
    except ValueError as exc:
        raise SystemExit(f"--shapes {text!r}: expected OxI[,OxI...], e.g. 4096x11008") from exc


def run(argv=None, out_dir=None) -> int:
    p = h.parser(__doc__, "python -m pylora.bench.merge")
    h.add_arguments(p, quick="one shape, one rank, two update sizes", full="two shapes, three ranks, three update sizes",
                    budget=(1.5, 8.0), out_dir=out_dir)
    p.add_argument("--shapes", default=None, help="OxI,... (default: 4096x4096 quick; 4096x4096,4096x11008 full)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks (default: 16 quick; 8,16,64 full)")
    p.add_argument("--rels", default=None, help="update sizes std(s B A)/std(W) (default: 0.003,0.16 quick; "
                                                "0.003,0.03,0.16 full)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, comma-separated")
    args = p.parse_args(argv)
    timer = h.timer_from_args(args)
    sweep = dict(QUICK if args.quick else FULL)
    if args.shapes:
        sweep["shapes"] = parse_shapes(args.shapes)
    if args.ranks:
        sweep["ranks"] = tuple(int(v) for v in args.ranks.split(","))
    if args.rels:
        sweep["rels"] = tuple(float(v) for v in args.rels.split(","))
    sweep["dtypes"] = tuple(args.dtypes.split(","))
    for name in sweep["dtypes"]:
        if name not in h.DTYPES:
            raise SystemExit(f"--dtypes: {name!r} must be one of {', '.join(h.DTYPES)}")
    device = torch.device(args.device)
    dtypes = [h.DTYPES[d] for d in sweep["dtypes"]]
    limits = h.measure_limits(timer, dtypes, matmul_n=1024 if args.quick else None, budget_s=timer.budget_s)
    print(limits.describe(), flush=True)
    report = h.Report(SUITE, device, timer=timer, limits=limits, quick=args.quick,
                      config={"sweep": {k: [list(x) if isinstance(x, tuple) else x for x in v] for k, v in sweep.items()},
                              "scale": SCALE})
    from pylora import ops

    if ops.backend("merge_", device) != "kernel":
        report.note(f"no compiled {device.type} merge_ kernel: timing the pure-torch reference")
    gen = torch.Generator().manual_seed(args.seed)
    for (O, I) in sweep["shapes"]:
        for dtype in dtypes:
            for r in sweep["ranks"]:
                for rel in sweep["rels"]:
                    row = report.add(bench_case(timer, limits, report.checks, O, I, r, dtype, rel, device, gen))
                    print(f"  {row['shape']} {row['dtype']} r={r} rel={rel:g}: merge {row['pylora_ms']:.2f} ms, "
                          f"without a record {row['norecord_ms']:.2f} ms (addmm_ {row['addmm_ms']:.2f}, record {row['record_pct']:.2f}% of W, "
                          f"{row['timing']['rounds']} rounds, {row['timing']['stopped']})", flush=True)
    path = args.out or h.default_out(SUITE, args, out_dir)
    report.finish(path, COLUMNS, title=f"Merge W += s B A (ms; s = {SCALE}; update = std(s B A) / std(W))")
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
