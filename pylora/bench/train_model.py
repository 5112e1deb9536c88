"""A whole LoRA training step (forward, backward, AdamW) of a Llama built from a config: pylora (the fused
LoRA linear op) against PEFT and the frozen base model, time in the same rounds, peak memory each in a
process of its own.

    python -m pylora.bench.train_model [--quick] [--device cpu|cuda] [--threads N] [--hidden 1024]
        [--layers 4] [--seq 128] [--batch 8] [--rank 16] [--dropouts 0,0.05] [--dtype float32]
        [--compile no|yes|both]

Methods, per lora_dropout: pylora (pylora.inject, r on all-linear, mark_only_lora_trainable, AdamW over
the LoRA parameters), PEFT (get_peft_model with the same LoraConfig and AdamW), and the frozen base: the
same model without LoRA, its forward and the backward from the loss down to the first decoder layer's
output (a hook makes that output the leaf that needs a gradient). Every LoRA step does that much and more
(the first layer's own LoRA gradients need none of its input gradients), so a LoRA step faster than the
base step is a benchmark bug; so is a step below the floor of its linear layers' work at the measured
matmul rate. Memory: each method in a fresh process, the peak over 3 steps above the loaded model and
optimizer (the resident high-water mark on the CPU, torch.cuda.max_memory_allocated on a GPU).
With --compile yes (or both: eager rows, then compiled ones) every method, the base included, runs as
torch.compile(model) (the default inductor backend), compiled by three untimed steps first; the compiled
rows skip the memory runs.
Needs transformers; PEFT is optional (its column is empty without it).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from pylora.bench import harness as h
from pylora.bench import models

SUITE = "train-model"
STEM = "train_model"
QUICK = {"hidden": 256, "layers": 2, "seq": 64, "batch": 4}
FULL = {"hidden": 1024, "layers": 4, "seq": 128, "batch": 8}


def _detach_output(module, inputs, output):
    """Forward hook: the output becomes a fresh leaf that needs a gradient, so backward stops there."""
    if isinstance(output, tuple):
        return (output[0].detach().requires_grad_(True), *output[1:])
    return output.detach().requires_grad_(True)


def make_method(name, base, rank, p, peft, suite=SUITE):
    """(model, step) for one method; the model is a deep copy of `base` (base itself for "base")."""
    if name == "base":
        model = base
        model.requires_grad_(False)
        model.train()
        model.model.layers[0].register_forward_hook(_detach_output)
        opt = None
    elif name == "pylora":
        import pylora

        model = copy.deepcopy(base)
        pylora.inject(model, pylora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=p))
        pylora.mark_only_lora_trainable(model)
        model.train()
    elif name == "peft":
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                        target_modules="all-linear", lora_dropout=p))
        model.train()
    else:
        raise ValueError(name)
    if name != "base":
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    return model, opt


def step_fn(model, opt, ids, compiled=False):
    fwd = torch.compile(model) if compiled else model

    def step(k=0):
        loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss  # training: no KV cache to build
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt is not None:
            opt.step()
    return step


def memory_child(cfg: dict) -> dict:
    """In a fresh process: the peak memory of 3 training steps of one method above the loaded model."""
    device = torch.device(cfg["device"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    base = models.build_llama(cfg["sizes"], device, h.DTYPES[cfg["dtype"]], suite=SUITE, seed=cfg["seed"])
    peft = h.optional("peft") if cfg["method"] == "peft" else None
    model, opt = make_method(cfg["method"], base, cfg["rank"], cfg["dropout_p"], peft)
    if cfg["method"] != "base":
        del base
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    ids = torch.randint(0, cfg["sizes"]["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(device)
    step = step_fn(model, opt, ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = h.reset_peak_rss()
    for _ in range(3):  # the first steps allocate (optimizer state, saved tensors): they count
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = h.proc_status_bytes("VmHWM") - before
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    return {"method": cfg["method"], "peak_MB": peak / 2**20, "trainable": trainable}


def measure_memory(cfg: dict) -> dict:
    return h.run_child(["pylora.bench.train_model", "--memory-child", json.dumps(cfg)],
                       f"{SUITE}: the memory run of {cfg['method']}")


COLUMNS = [("compiled", "compiled", "s"), ("dropout_p", "lora_dropout", "g"), ("base_ms", "frozen base ms", ".0f"), ("pylora_ms", "pylora step ms", ".0f"),
           ("peft_ms", "PEFT step ms", ".0f"), ("speedup", "PEFT/pylora", ".2f"), ("pylora_vs_base", "pylora/base", ".2f"),
           ("floor_ms", "floor ms", ".0f"), ("spread", "± spread", ".0%"), ("n", "n", "d"),
           ("pylora_MB", "pylora peak MB", ".0f"), ("peft_MB", "PEFT peak MB", ".0f")]


def run(argv=None, out_dir=None) -> int:
    p = h.parser(__doc__, "python -m pylora.bench.train_model")
    h.add_arguments(p, quick=f"hidden {QUICK['hidden']}, {QUICK['layers']} layers, batch {QUICK['batch']} x seq {QUICK['seq']}",
                    full=f"hidden {FULL['hidden']}, {FULL['layers']} layers, batch {FULL['batch']} x seq {FULL['seq']}",
                    budget=(3.0, 60.0), out_dir=out_dir)
    models.add_size_arguments(p, quick=QUICK, full=FULL)
    p.add_argument("--seq", type=int, default=None, help=f"tokens per row (default: {QUICK['seq']} quick, {FULL['seq']} full)")
    p.add_argument("--batch", type=int, default=None, help=f"rows (default: {QUICK['batch']} quick, {FULL['batch']} full)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on all-linear")
    p.add_argument("--dropouts", default="0,0.05", help="comma-separated lora_dropout values")
    p.add_argument("--dtype", default="float32", choices=sorted(h.DTYPES), help="model dtype")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (a process per method)")
    p.add_argument("--compile", default="no", choices=("no", "yes", "both"),
                   help="time the steps eager (no), under torch.compile (yes), or both (default: no)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    timer = h.timer_from_args(args)
    device = torch.device(args.device)
    dtype = h.DTYPES[args.dtype]
    s = models.sizes(args)
    seq = args.seq or (QUICK if args.quick else FULL)["seq"]
    batch = args.batch or (QUICK if args.quick else FULL)["batch"]
    dropouts = [float(v) for v in args.dropouts.split(",")]
    h.require("transformers", SUITE, "the Llama model it times")
    peft = h.optional("peft")
    limits = h.measure_limits(timer, [dtype], matmul_n=1024 if args.quick else None, budget_s=min(timer.budget_s, 10))
    print(limits.describe(), flush=True)
    report = h.Report(SUITE, device, timer=timer, limits=limits, quick=args.quick,
                      config={**s, "seq": seq, "batch": batch, "rank": args.rank, "dtype": args.dtype,
                              "target_modules": "all-linear", "optimizer": "AdamW"})
    if peft is None:
        report.note("peft is not installed: the PEFT baseline is left out (pip install peft)")
    methods = ["base", "pylora"] + (["peft"] if peft is not None else [])
    tokens = batch * seq
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for compiled, dp in [(c, d) for c in modes for d in dropouts]:
        base = models.build_llama(s, device, dtype, suite=SUITE, seed=args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = torch.randint(0, s["vocab"], (batch, seq), generator=g).to(device)
        built = {m: make_method(m, base, args.rank, dp, peft) for m in reversed(methods)}  # base last: it is hooked
        fns = {m: step_fn(model, opt, ids, compiled) for m, (model, opt) in built.items()}
        fns = {m: fns[m] for m in methods}
        flops, nbytes = models.linear_work(built["base"][0], tokens, backward_from=1)
        floor = limits.floor_s(nbytes, flops, dtype)
        if compiled:  # compilation (forward, backward, recompiles) before any timed or warm-up round
            for f in fns.values():
                for _ in range(3):
                    f()
        m = timer.measure(fns)
        limits.refresh(timer)  # the floors below include probes taken under this case's load
        case = (f"Llama hidden {s['hidden']} x {s['layers']} layers, {batch}x{seq} tokens, r={args.rank}, p={dp:g}"
                + (", compiled" if compiled else ""))
        t = {k: m.median(k) for k in methods}
        row = {"compiled": "yes" if compiled else "no", "dropout_p": dp, "base_ms": t["base"] * 1e3, "pylora_ms": t["pylora"] * 1e3,
               "peft_ms": t["peft"] * 1e3 if "peft" in t else None,
               "speedup": t["peft"] / t["pylora"] if "peft" in t else None,
               "pylora_vs_base": t["pylora"] / t["base"], "floor_ms": floor * 1e3,
               "trainable": sum(q.numel() for q in built["pylora"][0].parameters() if q.requires_grad),
               "spread": h.spread(m, "pylora"), "n": m["pylora"].n, "stats": m.as_dict("ms"), "timing": m.describe()}
        for k in methods:
            report.checks.positive(case, f"{k} step", t[k])
            report.checks.floor(case, f"{k} step", t[k], floor,
                                f"the linear layers' forward and input gradients, {flops / 1e9:.1f} GFLOP at "
                                f"{limits.rate(dtype) / 1e12:.3f} TFLOP/s")
            if k != "base":
                report.checks.not_faster_than_base(case, f"the {k} training step", t[k],
                                                   "the frozen base's forward + backward", t["base"],
                                                   ratio=m.ratio(k, "base"))
        del built, fns, base
        if not args.no_memory and not compiled:
            for k in methods[1:]:
                mem = measure_memory({"method": k, "device": args.device, "dtype": args.dtype, "sizes": s,
                                      "rank": args.rank, "dropout_p": dp, "seq": seq, "batch": batch,
                                      "seed": args.seed, "threads": args.threads})
                row[f"{k}_MB"] = mem["peak_MB"]
                report.checks.within(case, f"{k} peak memory MB", mem["peak_MB"], 0.0, float("inf"),
                                     "a high-water mark above the resident set it was reset to allows")
        report.add(row)
        print(f"  {'compiled' if compiled else 'eager'} p={dp:g}: base {row['base_ms']:.0f} ms, pylora {row['pylora_ms']:.0f} ms"
              + (f", PEFT {row['peft_ms']:.0f} ms" if row["peft_ms"] else "")
              + f" ({row['timing']['rounds']} rounds, {row['timing']['stopped']})", flush=True)
    path = args.out or h.default_out(STEM, args, out_dir)
    report.finish(path, COLUMNS, title=(
        f"Llama hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, MLP {s['intermediate']}, vocab {s['vocab']}, "
        f"{args.dtype}; batch {batch} x seq {seq}; r={args.rank} on all-linear, AdamW; frozen base = forward + backward "
        f"to the first layer's output; peak = memory above the loaded model over 3 steps"))
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
