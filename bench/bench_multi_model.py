"""Serving many adapters at model level: a Llama built from a config with N adapters of rank 16 on
all-linear, one batch of 64 rows, each row its own adapter. pylora's MultiLoRA against PEFT's mixed
batch (adapter_names=) and the base model alone, prefill and decode tokens per second.

    python bench/bench_multi_model.py [--device cpu|cuda] [--quick] [--adapters N] [--out PATH]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Timer, machine, print_table, write_results  # noqa: E402

import pylora  # noqa: E402


def build(hidden, layers, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def write_adapters(hidden, layers, n, folder):
    """n PEFT-format adapters of rank 16 on all-linear with random non-zero factors."""
    model = build(hidden, layers, "cpu", torch.float32)
    pylora.inject(model, pylora.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    dirs = {}
    for i in range(n):
        with torch.no_grad():
            for _, layer in pylora.lora_layers(model):
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.02)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        dirs[f"a{i}"] = pylora.save_adapter(model, os.path.join(folder, f"a{i}"))
    return dirs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 16 adapters")
    ap.add_argument("--adapters", type=int, default=None, help="distinct adapters (default 64)")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32, help="prefill tokens per row")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/multi_model_<device>.json)")
    args = ap.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden, layers = (256, 2) if args.quick else (512, 4)
    n = args.adapters or (16 if args.quick else 64)
    rows, L = args.rows, args.prompt
    timer = Timer(device, warmup=1, reps=5)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_adapters(hidden, layers, n, tmp)
        base = build(hidden, layers, device, dtype)
        server = pylora.MultiLoRA(copy.deepcopy(base), capacity_rows=16 * n, max_adapters=n)
        server.load_adapters(dirs, progress=False)
        import peft

        names = list(dirs)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(dirs[name], adapter_name=name)
        pm.eval()
    row_names = [names[i % n] for i in range(rows)]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32000, (rows, L), generator=g).to(device)
    nxt = torch.randint(0, 32000, (rows, 1), generator=g).to(device)

    def prefill(fn):
        return fn(ids)

    with torch.no_grad():
        methods = {
            "pylora": lambda x, **kw: server(input_ids=x, adapter_names=row_names, **kw),
            "peft": lambda x, **kw: pm(input_ids=x, adapter_names=row_names, **kw),
            "base": lambda x, **kw: base(input_ids=x, **kw),
        }
        result = {}
        for name, fn in methods.items():
            t_prefill = timer(lambda: fn(ids))
            cache = fn(ids, use_cache=True).past_key_values
            state = {}

            def fresh():  # every decode step starts from the same prompt cache
                state["c"] = copy.deepcopy(cache)

            t_decode = timer(lambda: fn(nxt, past_key_values=state["c"], use_cache=True), setup=fresh)
            result[name] = (rows * L / t_prefill, rows / t_decode)
            print(f"  {name}: prefill {result[name][0]:.0f} tok/s, decode {result[name][1]:.0f} tok/s", flush=True)
    rows_out = []
    for phase, k in (("prefill", 0), ("decode", 1)):
        rows_out.append({"phase": phase, "pylora": result["pylora"][k], "peft": result["peft"][k],
                         "base": result["base"][k], "vs_peft": result["pylora"][k] / result["peft"][k],
                         "of_base": result["base"][k] / result["pylora"][k]})
    info = machine(device)
    print(f"\n{info}\nLlama hidden {hidden}, {layers} layers, vocab 32000, {str(dtype)[6:]}; {n} adapters of rank 16 on "
          f"all-linear; {rows} rows, each its own adapter; prefill {L} tokens per row, decode 1 token per row "
          f"over a {L}-token cache\n")
    table = print_table(rows_out, [("phase", "phase", "s"), ("pylora", "pylora tok/s", ".0f"),
                                   ("peft", "PEFT mixed batch tok/s", ".0f"), ("base", "base alone tok/s", ".0f"),
                                   ("vs_peft", "pylora/PEFT", ".1f"), ("of_base", "time vs base", ".2f")])
    path = write_results(f"multi_model_{device}" + ("_quick" if args.quick else ""),
                         {"machine": info, "config": {"hidden": hidden, "layers": layers, "adapters": n, "rows": rows,
                                                      "prompt": L}, "rows": rows_out, "table": table}, path=args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
