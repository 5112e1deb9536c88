"""A whole LoRA training step (forward, backward, AdamW) of a small Llama built from a config:
pylora (fused LoRA linear op) against PEFT, time and peak memory, in the same run.

    python bench/bench_train_model.py [--device cpu|cuda] [--quick] [--out PATH]

Model: hidden 512, 4 layers, 8 heads, vocab 32000, seq 128, batch 8, r=16 on all-linear. Each
configuration runs in its own process; peak memory is what the steps add to the loaded model and
optimizer (the process's resident high-water mark on the CPU, torch.cuda.max_memory_allocated on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, print_table, write_results  # noqa: E402

CHILD = r'''
import json, sys, time, statistics
import torch
method, p, device, steps, hidden, layers, seq, batch = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=seq)
model = LlamaForCausalLM(cfg).to(device)
if method == "pylora":
    import pylora
    pylora.inject(model, pylora.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=p))
    pylora.mark_only_lora_trainable(model)
else:
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=p))
model.train()
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, 32000, (batch, seq), generator=g).to(device)
def step():
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
def sync():
    if device == "cuda":
        torch.cuda.synchronize()
def rss_kb(field):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field)).split()[1])
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = rss_kb("VmRSS:") * 1024
times = []
for i in range(steps + 2):  # the first two steps warm up (and allocate: they count towards the peak)
    sync(); t0 = time.perf_counter(); step(); sync()
    if i >= 2:
        times.append(time.perf_counter() - t0)
peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_kb("VmHWM:") * 1024) - base
print(json.dumps({"method": method, "dropout_p": p, "step_ms": 1e3 * statistics.median(times),
                  "peak_MB": peak / 2**20, "trainable": sum(q.numel() for q in params)}))
'''


def run_one(method, p, device, steps, hidden, layers, seq, batch):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep +
               os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(p), device, str(steps), str(hidden), str(layers),
                          str(seq), str(batch)], capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{method} p={p} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, seq 64: a smoke run")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_model_<device>.json)")
    args = ap.parse_args(argv)
    hidden, layers, seq, batch = (256, 2, 64, 4) if args.quick else (512, 4, 128, 8)
    rows = []
    for p in (0.0, 0.05):
        res = {m: run_one(m, p, args.device, args.steps, hidden, layers, seq, batch) for m in ("pylora", "peft")}
        rows.append({"dropout_p": p, "pylora_ms": res["pylora"]["step_ms"], "peft_ms": res["peft"]["step_ms"],
                     "speedup": res["peft"]["step_ms"] / res["pylora"]["step_ms"],
                     "pylora_MB": res["pylora"]["peak_MB"], "peft_MB": res["peft"]["peak_MB"],
                     "trainable": res["pylora"]["trainable"]})
        print(f"  p={p}: pylora {rows[-1]['pylora_ms']:.0f} ms, PEFT {rows[-1]['peft_ms']:.0f} ms", flush=True)
    info = machine(args.device)
    print(f"\n{info}\nLlama hidden {hidden}, {layers} layers, vocab 32000, batch {batch} x seq {seq}, r=16 all-linear, "
          f"AdamW; median of {args.steps} steps after 2; peak = memory above the loaded model over all steps\n")
    table = print_table(rows, [("dropout_p", "lora_dropout", "g"), ("pylora_ms", "pylora step ms", ".0f"),
                               ("peft_ms", "PEFT step ms", ".0f"), ("speedup", "PEFT/pylora", ".2f"),
                               ("pylora_MB", "pylora peak MB", ".0f"), ("peft_MB", "PEFT peak MB", ".0f")])
    path = write_results(f"train_model_{args.device}" + ("_quick" if args.quick else ""),
                         {"machine": info, "config": {"hidden": hidden, "layers": layers, "seq": seq, "batch": batch},
                          "rows": rows, "table": table}, path=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
