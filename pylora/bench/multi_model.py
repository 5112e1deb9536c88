"""Serving many adapters at model level: a Llama built from a config with N adapters of rank r on
all-linear, one batch of rows, each row its own adapter (round robin). pylora's MultiLoRA against PEFT's
mixed batch (adapter_names=) and the base model alone, prefill and decode, in the same rounds.

    python -m pylora.bench.multi_model [--quick] [--device cpu|cuda] [--threads N] [--hidden 1024]
        [--layers 4] [--adapters 32] [--rows 64] [--prompt 32] [--rank 16] [--dtype bfloat16]

prefill: every row's prompt in one forward (logits for every position, as a plain forward returns them,
or only the last with --prefill-logits last). decode: one token per row over a cache of the prompt; each
call starts from its own copy of the prompt's cache (copied before the call, untimed). MultiLoRA and
PEFT's model contain the base model and do its work and more, so either one faster than the base alone
is a benchmark bug; so is a forward below the floor of its linear layers' work (weights read once,
2 I O flops a token) at the limits measured in the same run. Before timing, the last position's logits
of MultiLoRA and PEFT are compared (the same adapters on the same rows: they must agree to rounding).
Needs transformers; PEFT is optional (its column is empty without it).
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile

import torch

from pylora.bench import harness as h
from pylora.bench import models

SUITE = "multi-model"
STEM = "multi_model"
QUICK = {"hidden": 256, "layers": 2, "adapters": 16}
FULL = {"hidden": 1024, "layers": 4, "adapters": 32}


def write_adapters(s, rank, n, folder, seed):
    """n PEFT-format adapters of rank `rank` on all-linear with random non-zero factors."""
    import pylora

    model = models.build_llama(s, "cpu", torch.float32, suite=SUITE, seed=seed)
    pylora.inject(model, pylora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed + 1)
    dirs = {}
    for i in range(n):
        with torch.no_grad():
            for _, layer in pylora.lora_layers(model):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.02)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        dirs[f"a{i}"] = pylora.save_adapter(model, os.path.join(folder, f"a{i}"))
    return dirs


COLUMNS = [("phase", "phase", "s"), ("pylora", "pylora tok/s", ".0f"), ("peft", "PEFT mixed batch tok/s", ".0f"),
           ("base", "base alone tok/s", ".0f"), ("vs_peft", "pylora/PEFT", ".2f"), ("of_base", "time vs base", ".3f"),
           ("floor_ms", "floor ms", ".2f"), ("spread", "± spread", ".1%"), ("n", "n", "d")]


def run(argv=None, out_dir=None) -> int:
    p = h.parser(__doc__, "python -m pylora.bench.multi_model")
    h.add_arguments(p, quick=f"hidden {QUICK['hidden']}, {QUICK['layers']} layers, {QUICK['adapters']} adapters",
                    full=f"hidden {FULL['hidden']}, {FULL['layers']} layers, {FULL['adapters']} adapters", budget=(3.0, 30.0), out_dir=out_dir)
    models.add_size_arguments(p, quick=QUICK, full=FULL)
    p.add_argument("--adapters", type=int, default=None,
                   help=f"distinct adapters (default: {QUICK['adapters']} quick, {FULL['adapters']} full)")
    p.add_argument("--rows", type=int, default=64, help="rows in the batch, each its adapter (round robin)")
    p.add_argument("--prompt", type=int, default=32, help="prefill tokens per row")
    p.add_argument("--rank", type=int, default=16, help="every adapter's rank")
    p.add_argument("--dtype", default=None, choices=sorted(h.DTYPES),
                   help="the model's and the adapters' dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--adapter-dtype", default=None, choices=sorted(h.DTYPES),
                   help="the dtype of MultiLoRA's adapter pool (default: the model's; float32 over a bfloat16 model "
                        "computes every adapter update in fp32, as PEFT does)")
    p.add_argument("--prefill-logits", default="all", choices=("all", "last"),
                   help="prefill computes logits for every position (a plain forward) or the last only (a server)")
    args = p.parse_args(argv)
    timer = h.timer_from_args(args)
    device = torch.device(args.device)
    dtype = h.DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    s = models.sizes(args)
    n = args.adapters or (QUICK if args.quick else FULL)["adapters"]
    rows, L, rank = args.rows, args.prompt, args.rank
    h.require("transformers", SUITE, "the Llama model it serves")
    peft = h.optional("peft")
    import pylora

    limits = h.measure_limits(timer, [dtype], matmul_n=1024 if args.quick else None, budget_s=min(timer.budget_s, 10))
    print(limits.describe(), flush=True)
    report = h.Report(SUITE, device, timer=timer, limits=limits, quick=args.quick,
                      config={**s, "adapters": n, "rows": rows, "prompt": L, "rank": rank, "dtype": h.dtype_name(dtype),
                              "adapter_dtype": args.adapter_dtype or h.dtype_name(dtype),
                              "target_modules": "all-linear", "prefill_logits": args.prefill_logits})
    if peft is None:
        report.note("peft is not installed: the PEFT baseline is left out (pip install peft)")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(s, rank, n, tmp, args.seed)
        base = models.build_llama(s, device, dtype, suite=SUITE, seed=args.seed)
        adapter_dtype = h.DTYPES[args.adapter_dtype] if args.adapter_dtype else dtype
        server = pylora.MultiLoRA(copy.deepcopy(base), capacity_rows=rank * n, max_adapters=n, dtype=adapter_dtype)
        server.load_adapters(dirs, progress=False)
        names = list(dirs)
        pm = None
        if peft is not None:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
            for name in names[1:]:
                pm.load_adapter(dirs[name], adapter_name=name)
            pm.eval()
    row_names = [names[i % n] for i in range(rows)]
    g = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(0, s["vocab"], (rows, L), generator=g).to(device)
    nxt = torch.randint(0, s["vocab"], (rows, 1), generator=g).to(device)
    keep = {"logits_to_keep": 1} if args.prefill_logits == "last" else {}
    methods = {"pylora": lambda x, **kw: server(input_ids=x, adapter_names=row_names, **kw),
               "base": lambda x, **kw: base(input_ids=x, **kw)}
    if pm is not None:
        methods["peft"] = lambda x, **kw: pm(input_ids=x, adapter_names=row_names, **kw)
    case = (f"Llama hidden {s['hidden']} x {s['layers']} layers, {n} adapters r={rank}, {rows} rows, "
            f"{h.dtype_name(dtype)}")
    out = {}
    with torch.no_grad():
        if pm is not None:  # the two servers compute the same function
            a_all = methods["pylora"](ids).logits.float()
            b_all = methods["peft"](ids).logits.float()
            a, b = a_all[:, -1], b_all[:, -1]
            err = float((a - b).abs().max() / b.abs().max())
            # Greedy tokens at every prompt position: what the adapters' dtype does to outputs.
            agree = float((a_all.argmax(-1) == b_all.argmax(-1)).float().mean())
            report.config["greedy_agreement_with_peft"] = agree
            report.note(f"greedy tokens at the {rows}x{L} prompt positions agree with PEFT's in {agree:.1%} "
                        f"(adapters in {h.dtype_name(adapter_dtype)}; PEFT keeps them in float32)")
            report.checks.within(case, "max |MultiLoRA - PEFT| / max |PEFT| of the last logits", err, 0.0,
                                 1e-3 if dtype == torch.float32 else 5e-2, "the same adapters on the same rows allow")
        caches = {k: fn(ids, use_cache=True).past_key_values for k, fn in methods.items()}
        state = {}

        def fresh(k_method):
            def setup(k):
                state[k_method] = copy.deepcopy(caches[k_method])
            return setup

        prefill = {k: (lambda k_, fn=fn: fn(ids, **keep)) for k, fn in methods.items()}
        decode = {k: (lambda k_, fn=fn, name=k: fn(nxt, past_key_values=state[name], use_cache=True))
                  for k, fn in methods.items()}
        out["prefill"] = (timer.measure(prefill), rows * L)
        limits.refresh(timer)
        out["decode"] = (timer.measure(decode, setup={k: fresh(k) for k in methods}), rows)
        limits.refresh(timer)  # the floors below include probes taken under the phases' load
    rows_out = []
    for phase, (m, tokens) in out.items():
        flops, nbytes = models.linear_work(base, tokens)
        if phase == "prefill" and keep:  # the LM head runs on one position a row
            head = base.lm_head.weight
            flops -= 2.0 * head.shape[0] * head.shape[1] * (tokens - rows)
        floor = limits.floor_s(nbytes, flops, dtype)
        t = {k: m.median(k) for k in methods}
        row = {"phase": phase, "tokens": tokens, "pylora": tokens / t["pylora"],
               "peft": tokens / t["peft"] if "peft" in t else None, "base": tokens / t["base"],
               "vs_peft": t["peft"] / t["pylora"] if "peft" in t else None, "of_base": t["pylora"] / t["base"],
               "pylora_ms": t["pylora"] * 1e3, "peft_ms": t["peft"] * 1e3 if "peft" in t else None,
               "base_ms": t["base"] * 1e3, "floor_ms": floor * 1e3, "spread": h.spread(m, "pylora"),
               "n": m["pylora"].n, "stats": m.as_dict("ms"), "timing": m.describe()}
        if "peft" in t:
            row["peft_of_base"] = t["peft"] / t["base"]
        rows_out.append(report.add(row))
        pcase = f"{case}, {phase}"
        for k in methods:
            report.checks.positive(pcase, k, t[k])
            report.checks.floor(pcase, k, t[k], floor, f"the linear layers: {nbytes / 1e6:.0f} MB of weights at "
                                f"{limits.bandwidth() / 1e9:.1f} GB/s, {flops / 1e9:.1f} GFLOP at "
                                f"{limits.rate(dtype) / 1e12:.3f} TFLOP/s")
            if k != "base":
                report.checks.not_faster_than_base(pcase, "MultiLoRA" if k == "pylora" else "PEFT's mixed batch", t[k],
                                                   "the base model alone", t["base"], ratio=m.ratio(k, "base"))
        print(f"  {phase}: pylora {row['pylora']:.0f} tok/s, base {row['base']:.0f}"
              + (f", PEFT {row['peft']:.0f}" if row["peft"] else "")
              + f" ({row['timing']['rounds']} rounds, {row['timing']['stopped']})", flush=True)
    path = args.out or h.default_out(STEM, args, out_dir)
    report.finish(path, COLUMNS, title=(
        f"Llama hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, MLP {s['intermediate']}, vocab {s['vocab']}, "
        f"{h.dtype_name(dtype)}; {n} adapters of rank {rank} on all-linear; {rows} rows, each its own adapter; prefill "
        f"{L} tokens a row (logits: {args.prefill_logits}), decode 1 token a row over a {L}-token cache (tokens/s; "
        f"time vs base = MultiLoRA's time / the base model's)"))
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
