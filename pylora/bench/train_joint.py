"""Training many adapters in one batch: a joint MultiLoRA step (N adapters of rank r on all-linear, each
row training its own adapter) against N sequential PEFT steps over the same rows (one PeftModel holding
the N adapters, set_adapter before each adapter's step) and against one single-adapter pylora step over
the same combined batch; the frozen base's forward and backward over that batch as the check.

    python -m pylora.bench.train_joint [--quick] [--device cpu|cuda] [--threads N] [--hidden 1024]
        [--layers 4] [--adapters 4,16,64] [--rows 1] [--seq 128] [--rank 16] [--dtype float32]

Every method does the same optimizer work per adapter (AdamW over that adapter's parameters; one step per
adapter). A joint step faster than the frozen base over the same tokens is a benchmark bug. Memory: the
joint run in a process of its own (the whole resident high-water mark: one base model, N adapters, the
activations of the combined batch) against N separate single-adapter jobs, each a process holding its own
copy of the base (one such process measured, times N). Needs transformers; PEFT is optional.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

from pylora.bench import harness as h
from pylora.bench import models
from pylora.bench.train_model import _detach_output

SUITE = "train-joint"
STEM = "train_joint"
QUICK = {"hidden": 256, "layers": 2, "seq": 32, "adapters": "4,16"}
FULL = {"hidden": 1024, "layers": 4, "seq": 128, "adapters": "4,16,64"}


def _config(rank: int):
    import pylora

    return pylora.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")


def rows_of(n_adapters: int, rows: int, seq: int, vocab: int, seed: int, device):
    """The combined batch: each adapter's rows (rows x seq tokens), adapter by adapter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_adapters * rows, seq), generator=g).to(device)
    names = [f"a{k}" for k in range(n_adapters) for _ in range(rows)]
    return ids, names


def build_methods(base, n: int, rank: int, ids, names, peft):
    """{method: step(k)} over the same rows; each built on its own copy of base (base itself for "base")."""
    import pylora

    fns = {}
    server = pylora.MultiLoRA(copy.deepcopy(base))
    for k in range(n):
        server.add_adapter(f"a{k}", _config(rank))
    opt = torch.optim.AdamW([{"params": server.adapter_parameters(f"a{k}")} for k in range(n)], lr=1e-4)
    server.train()

    def joint(k=0):
        logits = server(input_ids=ids, adapter_names=names).logits
        loss, _ = pylora.per_adapter_loss(logits, ids, names)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    fns["joint"] = joint

    single = pylora.inject(copy.deepcopy(base), _config(rank))
    pylora.mark_only_lora_trainable(single)
    single.train()
    opt_single = torch.optim.AdamW([q for q in single.parameters() if q.requires_grad], lr=1e-4)

    def one_adapter(k=0):
        loss = single(input_ids=ids, labels=ids).loss
        opt_single.zero_grad(set_to_none=True)
        loss.backward()
        opt_single.step()
    fns["single"] = one_adapter

    if peft is not None:
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                      target_modules="all-linear"), adapter_name="a0")
        for k in range(1, n):
            pm.add_adapter(f"a{k}", peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        pm.train()
        row_sets, opts = [], []
        for k in range(n):
            pm.set_adapter(f"a{k}")
            params = [q for nm, q in pm.named_parameters() if f".a{k}." in nm]
            opts.append(torch.optim.AdamW(params, lr=1e-4))
            row_sets.append(ids[[i for i, nm in enumerate(names) if nm == f"a{k}"]])

        def peft_sequential(k=0):
            for j in range(n):
                pm.set_adapter(f"a{j}")
                loss = pm(input_ids=row_sets[j], labels=row_sets[j]).loss
                opts[j].zero_grad(set_to_none=True)
                loss.backward()
                opts[j].step()
        fns["peft_seq"] = peft_sequential

    base.requires_grad_(False)
    base.train()
    base.model.layers[0].register_forward_hook(_detach_output)

    def frozen(k=0):
        base(input_ids=ids, labels=ids).loss.backward()
    fns["base"] = frozen
    return fns


def memory_child(cfg: dict) -> dict:
    """In a fresh process: the resident high-water mark of 3 steps of one job, model loading included."""
    import pylora

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    start = h.reset_peak_rss()
    base = models.build_llama(cfg["sizes"], device, h.DTYPES[cfg["dtype"]], suite=SUITE, seed=cfg["seed"])
    n = cfg["adapters"]
    ids, names = rows_of(n, cfg["rows"], cfg["seq"], cfg["sizes"]["vocab"], cfg["seed"] + 1, device)
    if cfg["method"] == "joint":
        server = pylora.MultiLoRA(base)
        for k in range(n):
            server.add_adapter(f"a{k}", _config(cfg["rank"]))
        opt = torch.optim.AdamW([q for k in range(n) for q in server.adapter_parameters(f"a{k}")], lr=1e-4)
        server.train()

        def step():
            loss, _ = pylora.per_adapter_loss(server(input_ids=ids, adapter_names=names).logits, ids, names)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:  # one job of the N: its own process, its own base, its own rows
        model = pylora.inject(base, _config(cfg["rank"]))
        pylora.mark_only_lora_trainable(model)
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        own = ids[:cfg["rows"]]

        def step():
            loss = model(input_ids=own, labels=own).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for _ in range(3):
        step()
    return {"method": cfg["method"], "peak_MB": (h.proc_status_bytes("VmHWM") - start) / 2**20}


def measure_memory(cfg: dict) -> dict:
    return h.run_child(["pylora.bench.train_joint", "--memory-child", json.dumps(cfg)],
                       f"{SUITE}: the memory run of {cfg['method']}")


COLUMNS = [("adapters", "N", "d"), ("tokens", "tokens", "d"), ("base_ms", "frozen base ms", ".0f"),
           ("joint_ms", "joint step ms", ".0f"), ("single_ms", "one-adapter step ms", ".0f"),
           ("peft_seq_ms", "N PEFT steps ms", ".0f"), ("vs_peft", "PEFT / joint", ".2f"),
           ("vs_single", "joint / one-adapter", ".2f"), ("spread", "± spread", ".0%"), ("n", "n", "d"),
           ("joint_MB", "joint peak MB", ".0f"), ("separate_MB", "N jobs MB", ".0f")]


def run(argv=None, out_dir=None) -> int:
    p = h.parser(__doc__, "python -m pylora.bench.train_joint")
    h.add_arguments(p, quick=f"hidden {QUICK['hidden']}, {QUICK['layers']} layers, N {QUICK['adapters']}, "
                             f"seq {QUICK['seq']}",
                    full=f"hidden {FULL['hidden']}, {FULL['layers']} layers, N {FULL['adapters']}, seq {FULL['seq']}",
                    budget=(3.0, 120.0), out_dir=out_dir)
    models.add_size_arguments(p, quick=QUICK, full=FULL)
    p.add_argument("--adapters", default=None, help="comma-separated adapter counts N")
    p.add_argument("--rows", type=int, default=1, help="sequences per adapter")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on all-linear")
    p.add_argument("--dtype", default="float32", choices=sorted(h.DTYPES), help="model dtype")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs (a process each)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    timer = h.timer_from_args(args)
    device, dtype = torch.device(args.device), h.DTYPES[args.dtype]
    s = models.sizes(args)
    d = QUICK if args.quick else FULL
    seq = args.seq or d["seq"]
    counts = [int(v) for v in (args.adapters or d["adapters"]).split(",")]
    h.require("transformers", SUITE, "the Llama model it times")
    peft = h.optional("peft")
    limits = h.measure_limits(timer, [dtype], matmul_n=1024 if args.quick else None, budget_s=min(timer.budget_s, 10))
    print(limits.describe(), flush=True)
    report = h.Report(SUITE, device, timer=timer, limits=limits, quick=args.quick,
                      config={**s, "seq": seq, "rows_per_adapter": args.rows, "rank": args.rank, "dtype": args.dtype,
                              "target_modules": "all-linear", "optimizer": "AdamW, one param group per adapter"})
    if peft is None:
        report.note("peft is not installed: the PEFT baseline is left out (pip install peft)")
    for n in counts:
        base = models.build_llama(s, device, dtype, suite=SUITE, seed=args.seed)
        ids, names = rows_of(n, args.rows, seq, s["vocab"], args.seed + 1, device)
        fns = build_methods(base, n, args.rank, ids, names, peft)
        m = timer.measure(fns)
        limits.refresh(timer)
        case = f"{n} adapters x {args.rows} x {seq} tokens, r={args.rank}"
        t = {k: m.median(k) for k in fns}
        row = {"adapters": n, "tokens": n * args.rows * seq, "base_ms": t["base"] * 1e3, "joint_ms": t["joint"] * 1e3,
               "single_ms": t["single"] * 1e3, "peft_seq_ms": t["peft_seq"] * 1e3 if "peft_seq" in t else None,
               "vs_peft": t["peft_seq"] / t["joint"] if "peft_seq" in t else None,
               "vs_single": t["joint"] / t["single"], "spread": h.spread(m, "joint"), "n": m["joint"].n,
               "stats": m.as_dict("ms"), "timing": m.describe()}
        for k in fns:
            report.checks.positive(case, f"{k} step", t[k])
            if k != "base":
                report.checks.not_faster_than_base(case, f"the {k} step", t[k], "the frozen base's forward + backward",
                                                   t["base"], ratio=m.ratio(k, "base"))
        del fns, base
        if not args.no_memory:
            cfg = {"device": args.device, "dtype": args.dtype, "sizes": s, "rank": args.rank, "seq": seq,
                   "rows": args.rows, "adapters": n, "seed": args.seed, "threads": args.threads}
            joint = measure_memory({**cfg, "method": "joint"})
            one = measure_memory({**cfg, "method": "separate"})
            row["joint_MB"], row["one_job_MB"], row["separate_MB"] = joint["peak_MB"], one["peak_MB"], n * one["peak_MB"]
        report.add(row)
        print(f"  N={n}: joint {row['joint_ms']:.0f} ms, one adapter {row['single_ms']:.0f} ms"
              + (f", {n} PEFT steps {row['peft_seq_ms']:.0f} ms" if row["peft_seq_ms"] else "")
              + f" ({row['timing']['rounds']} rounds, {row['timing']['stopped']})", flush=True)
    path = args.out or h.default_out(STEM, args, out_dir)
    report.finish(path, COLUMNS, title=(
        f"Llama hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, {args.dtype}; each adapter r={args.rank} "
        f"on all-linear with {args.rows} x {seq} tokens; AdamW per adapter; N jobs MB = N x one job's process (its "
        "own base)"))
    return 0


def main(argv=None, out_dir=None) -> int:
    return h.entry(lambda a: run(a, out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
