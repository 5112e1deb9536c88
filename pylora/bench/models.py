"""The Llama the model-level suites build from a config (random weights: no model hub is reachable), its
sizes as command-line options, and the floor of its linear layers' work."""
from __future__ import annotations

import torch

from pylora.bench import harness as h


def add_size_arguments(p, *, quick: dict, full: dict):
    """--hidden, --layers, --heads, --kv-heads, --intermediate, --vocab: the Llama's sizes. Defaults come
    from `quick` or `full` (dicts with those keys) after parsing; see sizes()."""
    p.add_argument("--hidden", type=int, default=None,
                   help=f"hidden size (default: {quick['hidden']} quick, {full['hidden']} full)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"decoder layers (default: {quick['layers']} quick, {full['layers']} full)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden / 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="MLP size (default: 2.75 x hidden rounded to a multiple of 64)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.set_defaults(_sizes=(quick, full))


def sizes(args) -> dict:
    quick, full = args._sizes
    d = quick if args.quick else full
    hidden = args.hidden or d["hidden"]
    heads = args.heads or max(1, hidden // 64)
    if hidden % heads:
        raise SystemExit(f"--hidden {hidden} must be a multiple of --heads {heads}")
    kv = args.kv_heads or heads
    if heads % kv:
        raise SystemExit(f"--heads {heads} must be a multiple of --kv-heads {kv}")
    return {"hidden": hidden, "layers": args.layers or d["layers"], "heads": heads, "kv_heads": kv,
            "intermediate": args.intermediate or max(64, round(hidden * 2.75 / 64) * 64), "vocab": args.vocab}


def build_llama(s: dict, device, dtype, *, suite: str, max_positions: int = 2048, seed: int = 0):
    """A LlamaForCausalLM with random weights of sizes s (see sizes()), in eval mode."""
    transformers = h.require("transformers", suite, "the Llama model it times")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   num_key_value_heads=s["kv_heads"], max_position_embeddings=max_positions)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def linear_work(model, tokens: int, *, backward_from: int | None = None) -> tuple[float, float]:
    """(flops, bytes) of the model's nn.Linear layers for `tokens` tokens: the forward (2 I O per token,
    each weight read once) and, with backward_from=L, the input gradient of the linears in decoder layers
    L and above and of everything outside the decoder layers (the LM head). Attention's own products and
    the elementwise work are left out: this is a lower bound, for floors."""
    flops = nbytes = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight
        I, O = w.shape[1], w.shape[0]
        flops += 2.0 * I * O * tokens
        nbytes += w.numel() * w.element_size()
        if backward_from is not None:
            layer = _layer_index(name)
            if layer is None or layer >= backward_from:
                flops += 2.0 * I * O * tokens
                nbytes += w.numel() * w.element_size()
    return flops, nbytes


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
