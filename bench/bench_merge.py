"""Merging a LoRA update into a weight: pylora's merge_ against torch's addmm_, PEFT's way
(delta = B @ A * s; W += delta) and the careful fp32 way ((W.float() + s * B.float() @ A.float())
.to(W.dtype)), next to the machine's limits measured in the same run (copy bandwidth, matmul peak).
Also the exact unmerge and the size of its correction record.

    python bench/bench_merge.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Timer, copy_bandwidth, machine, matmul_peak, print_table, write_results  # noqa: E402

from pylora import ops  # noqa: E402


def factors(O, I, r, dtype, device, rel=3e-3):
    """A weight ~ N(0, 0.02) and an adapter whose std(scale * B @ A) is `rel` of std(W) (scale 2)."""
    W = (torch.randn(O, I, device=device) * 0.02).to(dtype)
    A = ((torch.rand(r, I, device=device) * 2 - 1) * math.sqrt(3.0 / I)).to(dtype)
    # sum over r terms of std(B) * std(A) = sqrt(r) * std(B) / sqrt(I); times scale 2 equals rel * 0.02.
    B = (torch.randn(O, r, device=device) * (0.01 * rel * math.sqrt(I / r))).to(dtype)
    return W, A, B


def run(device: str, quick: bool) -> dict:
    timer = Timer(device, warmup=1 if quick else 2, reps=3 if quick else 7)
    bw = copy_bandwidth(device, timer, 256 if quick else 1024)
    peak = {dt: matmul_peak(device, timer, dt) for dt in (torch.float32, torch.bfloat16)}
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008)]
    ranks = [8, 64] if quick else [8, 16, 64]
    rows = []
    for (O, I) in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for r in ranks:
                W, A, B = factors(O, I, r, dtype, device)
                s = 2.0
                rec = [None]

                def pylora_merge():
                    rec[0] = ops.merge_(W, A, B, s)

                def restore():  # each timed merge starts from the original weight, exactly
                    if rec[0] is not None:
                        ops.unmerge_(W, A, B, s, rec[0])
                        rec[0] = None

                t_merge = timer(pylora_merge, setup=restore)
                record = rec[0]
                t_unmerge = timer(lambda: ops.unmerge_(W, A, B, s, record),
                                  setup=lambda: ops.merge_(W, A, B, s))
                restore()
                t_addmm = timer(lambda: W.addmm_(B, A, alpha=s))
                t_peft = timer(lambda: W.add_(B @ A * s))
                t_careful = timer(lambda: W.copy_((W.float() + s * (B.float() @ A.float())).to(dtype)))
                wbytes = W.numel() * W.element_size()
                traffic = 2 * wbytes + (A.numel() + B.numel()) * A.element_size()
                roofline = max(traffic / bw, 2 * r * O * I / peak[torch.float32])
                rows.append({
                    "shape": f"{O}x{I}", "dtype": str(dtype).replace("torch.", ""), "r": r,
                    "pylora_ms": t_merge * 1e3, "unmerge_ms": t_unmerge * 1e3, "addmm_ms": t_addmm * 1e3,
                    "peft_ms": t_peft * 1e3, "careful_ms": t_careful * 1e3,
                    "vs_addmm": t_addmm / t_merge, "vs_careful": t_careful / t_merge,
                    "roofline_ms": roofline * 1e3, "of_roofline": roofline / t_merge,
                    "of_copy_bw": (traffic / t_merge) / bw,
                    "record_pct": 100 * record.nbytes / wbytes,
                })
                print(f"  {rows[-1]['shape']} {rows[-1]['dtype']} r={r}: merge {t_merge * 1e3:.2f} ms", flush=True)
                del W, A, B, record
    limits = {"copy_GBps": bw / 1e9, "fp32_matmul_TFLOPs": peak[torch.float32] / 1e12,
              "bf16_matmul_TFLOPs": peak[torch.bfloat16] / 1e12}
    return {"machine": machine(device), "limits": limits, "rows": rows}


COLUMNS = [("shape", "W", "s"), ("dtype", "dtype", "s"), ("r", "r", "d"), ("pylora_ms", "pylora merge ms", ".2f"),
           ("unmerge_ms", "exact unmerge ms", ".2f"), ("addmm_ms", "torch addmm_ ms", ".2f"),
           ("peft_ms", "PEFT way ms", ".2f"), ("careful_ms", "careful fp32 ms", ".2f"),
           ("vs_addmm", "addmm/pylora", ".2f"), ("vs_careful", "careful/pylora", ".1f"),
           ("of_roofline", "of roofline", ".0%"), ("of_copy_bw", "of copy BW", ".0%"),
           ("record_pct", "record % of W", ".2f")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="one shape, two ranks, fewer repeats")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/merge_<device>.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    res = run(args.device, args.quick)
    lim = res["limits"]
    print(f"\n{res['machine']}\ncopy {lim['copy_GBps']:.1f} GB/s (read+write), matmul fp32 "
          f"{lim['fp32_matmul_TFLOPs']:.2f} TFLOP/s, bf16 {lim['bf16_matmul_TFLOPs']:.2f} TFLOP/s\n")
    res["table"] = print_table(res["rows"], COLUMNS)
    path = write_results(f"merge_{args.device}" + ("_quick" if args.quick else ""), res, path=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
