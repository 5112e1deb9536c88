"""`pylora demo`: the whole of pylora on this machine, end to end, in a few minutes.

Builds a small causal language model from a config (or takes --model DIR), trains one adapter per
synthetic task, all of them jointly in one MultiLoRA (every row of a batch training its own task's
adapter; the per-step time against training them one after another is printed), saves them in PEFT's
format, loads all of them into one MultiLoRA server, serves one mixed batch in which every row uses a
different adapter (and some none), checks merge/unmerge exactness, and prints a table: each task's
accuracy with the base model and with its adapter, the mixed batch's throughput against PEFT's
per-adapter loop and the base model alone. Writes the adapters, results.json and a figure (when matplotlib is installed) to --out.
Nothing is downloaded.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch

import pylora

# Each task maps a row of L symbols (0..25) to L symbols; the model sees  x SEP y.
TASKS = {
    "caesar": lambda x: (x + 3) % 26,          # a shift cipher
    "atbash": lambda x: 25 - x,                # the reversed alphabet
    "rotate": lambda x: x.roll(-2, dims=-1),   # rotate the row left by two (a positional task)
    "times3": lambda x: (3 * x) % 26,          # an affine cipher
}
L = 8  # symbols per row


class Vocab:
    """Token ids of the task symbols inside the model's vocabulary."""

    def __init__(self, vocab_size: int):
        if vocab_size < 28:
            raise SystemExit(f"pylora demo: the model's vocabulary ({vocab_size}) needs at least 28 tokens")
        self.sep, self.offset = 1, 2

    def rows(self, task: str, n: int, g: torch.Generator):
        x = torch.randint(0, 26, (n, L), generator=g)
        y = TASKS[task](x)
        seq = torch.cat([x + self.offset, torch.full((n, 1), self.sep), y + self.offset], 1)
        labels = seq.clone()
        labels[:, : L + 1] = -100  # learn the answer, not the question
        return seq, labels


def build_model(args):
    try:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("pylora demo needs transformers for its model: pip install transformers") from None
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


ROWS_PER_TASK = 32  # rows of each task in every training step


def config():
    return pylora.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05)


def task_batch(tasks, vocab, gens, device):
    """One step's rows: ROWS_PER_TASK of each task, and each row's adapter name."""
    seqs, labels, names = [], [], []
    for task in tasks:
        seq, lab = vocab.rows(task, ROWS_PER_TASK, gens[task])
        seqs.append(seq)
        labels.append(lab)
        names += [task] * ROWS_PER_TASK
    return torch.cat(seqs).to(device), torch.cat(labels).to(device), names


def train_jointly(base, vocab, args, device, progress):
    """Every task's adapter trained in one MultiLoRA over one copy of the base: each step one batch with
    every task's rows, each row training its own task's adapter (the sum of each adapter's mean loss)."""
    from tqdm.auto import tqdm

    server = pylora.MultiLoRA(copy.deepcopy(base))
    for task in TASKS:
        server.add_adapter(task, config())
    opt = torch.optim.AdamW([{"params": server.adapter_parameters(t)} for t in TASKS], lr=3e-3)
    server.train()
    gens = {t: torch.Generator().manual_seed(i) for i, t in enumerate(TASKS)}
    curves = {t: [] for t in TASKS}
    for _ in tqdm(range(args.steps), desc="train jointly", disable=not progress, leave=False):
        per_task = joint_step(server, opt, task_batch(TASKS, vocab, gens, device))
        for t, v in per_task.items():
            curves[t].append(v.item())
    return server.eval(), curves


def joint_step(server, opt, batch):
    """One optimizer step of every adapter over a batch (rows, labels, each row's adapter): the sum over
    adapters of each one's mean token loss. Returns each adapter's loss."""
    seq, labels, names = batch
    loss, per_task = pylora.per_adapter_loss(server(input_ids=seq, adapter_names=names).logits, labels, names)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return per_task


def joint_vs_sequential(base, vocab, device, steps):
    """Seconds per training step of all tasks: one joint MultiLoRA step against one step of each task's
    own single-adapter model, one after another (the same rows, the same work per adapter)."""
    server = pylora.MultiLoRA(copy.deepcopy(base))
    singles = {}
    for task in TASKS:
        server.add_adapter(task, config())
        model = pylora.inject(copy.deepcopy(base), config())
        pylora.mark_only_lora_trainable(model)
        singles[task] = (model.train(), torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    opt = torch.optim.AdamW([{"params": server.adapter_parameters(t)} for t in TASKS])
    server.train()
    gens = {t: torch.Generator().manual_seed(100 + i) for i, t in enumerate(TASKS)}
    batches = [task_batch(TASKS, vocab, gens, device) for _ in range(steps + 1)]

    def joint(b):
        joint_step(server, opt, b)

    def sequential(b):
        seq, labels, names = b
        for i, task in enumerate(TASKS):
            model, o = singles[task]
            rows = slice(i * ROWS_PER_TASK, (i + 1) * ROWS_PER_TASK)
            loss = model(input_ids=seq[rows], labels=labels[rows]).loss
            o.zero_grad()
            loss.backward()
            o.step()

    times = {"joint": 0.0, "sequential": 0.0}
    for k, b in enumerate(batches):  # alternating, the first step of each a warm-up
        for name, fn in (("joint", joint), ("sequential", sequential)) if k % 2 else \
                (("sequential", sequential), ("joint", joint)):
            t0 = time.perf_counter()
            fn(b)
            if k:
                times[name] += time.perf_counter() - t0
    return {k: v / steps for k, v in times.items()}


def answers(out: torch.Tensor) -> torch.Tensor:
    return out[:, L + 1: 2 * L + 1]


def exactness(adapter_model):
    """merge then unmerge on a copy: every base weight back bit for bit; the record's size; and how
    large the update is next to the weight (the record grows with it)."""
    model = copy.deepcopy(adapter_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    ratios = []
    for _, layer in pylora.lora_layers(model):
        delta = layer.scaling * (layer.lora_B @ layer.lora_A)
        w = layer.base_layer.weight
        ratios.append((delta.norm() / w.norm()).item())
    pylora.merge(model)
    record = sum(layer.record_nbytes for _, layer in pylora.lora_layers(model))
    weights = sum(layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
                  for _, layer in pylora.lora_layers(model))
    pylora.unmerge(model)
    exact = all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    return exact, record, weights, sum(ratios) / len(ratios)


def peft_mixed(base, adapter_dirs):
    """PEFT's own mixed batch (a Python loop over the adapters in every layer), if peft is installed."""
    try:
        import peft
    except ImportError:
        return None
    names = list(adapter_dirs)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(adapter_dirs[n], adapter_name=n)
    return pm.eval()


def timed(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def figure(path, curves, throughput):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for task, losses in curves.items():
        a.plot(losses, label=task)
    a.set(title="training loss per adapter (trained jointly)", xlabel="step", ylabel="loss", yscale="log")
    a.legend()
    labels = list(throughput)
    b.bar(labels, [throughput[k] for k in labels], color=["#4c72b0", "#dd8452", "#55a868"][: len(labels)])
    b.set(title="mixed batch, tokens/s (higher is better)", ylabel="tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    base = build_model(args).to(device).eval()
    vocab = Vocab(base.config.vocab_size)
    print(f"pylora demo on {device}: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M-parameter model, "
          f"{len(TASKS)} tasks, {args.steps} steps each (kernels: {pylora.ops.backend('lora_linear', device)})")

    t0 = time.perf_counter()
    trainer, curves = train_jointly(base, vocab, args, device, progress)
    dirs, trained = {}, {}
    for task in TASKS:
        dirs[task] = trainer.save_adapter(task, os.path.join(out, "adapters", task))
        trained[task] = pylora.load_adapter(copy.deepcopy(base), dirs[task])
    print(f"  trained {len(TASKS)} adapters jointly (one batch, every row its own task's adapter) in "
          f"{time.perf_counter() - t0:5.1f} s; saved to {os.path.relpath(os.path.join(out, 'adapters'), out)}/")
    for task in TASKS:
        print(f"    {task:7s} loss {curves[task][0]:.2f} -> {curves[task][-1]:.3f}")
    per_step = joint_vs_sequential(base, vocab, device, steps=max(4, min(20, args.steps // 10)))
    speedup = per_step["sequential"] / per_step["joint"]
    print(f"  one joint step of all {len(TASKS)} tasks: {per_step['joint'] * 1e3:.0f} ms; a step of each task's own "
          f"model, one after another: {per_step['sequential'] * 1e3:.0f} ms ({speedup:.2f}x)")
    del trainer

    server = pylora.MultiLoRA(copy.deepcopy(base))
    server.load_adapters(dirs, progress=progress)

    # One mixed batch: every task's prompts twice, once with its adapter and once with none.
    g = torch.Generator().manual_seed(7)
    per_task = args.rows
    rows, names, tasks_of = [], [], []
    for task in TASKS:
        seq, _ = vocab.rows(task, per_task, g)
        for use in (task, None):
            rows.append(seq)
            names += [use] * per_task
            tasks_of += [task] * per_task
    batch = torch.cat(rows).to(device)
    prompts = batch[:, : L + 1]
    # min_new_tokens: exactly L answer tokens, whatever the model's end-of-sequence token is.
    generated = server.generate(input_ids=prompts, adapter_names=names, max_new_tokens=L, min_new_tokens=L,
                                do_sample=False, pad_token_id=0)
    correct = (answers(generated) == answers(batch)).float().mean(1).cpu()
    table = []
    for task in TASKS:
        sel = [i for i, t in enumerate(tasks_of) if t == task]
        with_adapter = correct[[i for i in sel if names[i] is not None]].mean().item()
        with_base = correct[[i for i in sel if names[i] is None]].mean().item()
        exact, record, weights, ratio = exactness(trained[task])
        table.append({"task": task, "base": with_base, "adapter": with_adapter, "exact_unmerge": exact,
                      "record_pct": 100 * record / weights, "update_to_weight": ratio})

    # Throughput of the same mixed batch (prefill of every row), pylora vs PEFT's loop vs base alone.
    tokens = batch.numel()
    with torch.no_grad():
        t_pylora = timed(lambda: server(input_ids=batch, adapter_names=names), args.reps)
        t_base = timed(lambda: base(input_ids=batch), args.reps)
        pm = peft_mixed(base, dirs)
        t_peft = timed(lambda: pm(input_ids=batch, adapter_names=[n or "__base__" for n in names]), args.reps) \
            if pm is not None else None
    throughput = {"pylora MultiLoRA": tokens / t_pylora, "base model alone": tokens / t_base}
    if t_peft is not None:
        throughput = {"pylora MultiLoRA": tokens / t_pylora, "PEFT mixed batch": tokens / t_peft,
                      "base model alone": tokens / t_base}

    print(f"\nMixed batch: {len(names)} rows, {len(TASKS)} adapters and no adapter, greedy decoding of {L} tokens\n")
    print("| task | accuracy, base model | accuracy, its adapter | merge+unmerge bit-exact | record % of W "
          "| ‖s·B·A‖ / ‖W‖ |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['task']} | {r['base']:.1%} | {r['adapter']:.1%} | {'yes' if r['exact_unmerge'] else 'NO'} "
              f"| {r['record_pct']:.2f} | {r['update_to_weight']:.2f} |")
    print("(The record grows with the update: these adapters rewrite a random base, an update comparable to the "
          "weight itself. Trained adapters change W by 0.3% to 16% of its spread, and their records take 0.5% to 12% "
          "of W's bytes.)")
    print(f"\nThroughput of the mixed batch ({tokens} tokens, prefill):")
    for k, v in throughput.items():
        print(f"  {k:18s} {v:10.0f} tokens/s")
    if t_peft is not None:
        print(f"  pylora is {t_peft / t_pylora:.1f}x PEFT's mixed batch and takes {t_pylora / t_base:.2f}x the "
              "time of the base model alone")
    else:
        print("  (install peft to compare with PEFT's mixed batch)")

    results = {"device": str(device), "tasks": table, "throughput_tokens_per_s": throughput,
               "training_step_s": per_step, "joint_training_speedup": speedup,
               "losses": curves, "seconds": time.perf_counter() - t_start}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    png = os.path.join(out, "demo.png")
    drew = figure(png, curves, throughput)
    print(f"\nWrote {os.path.join(out, 'adapters')}/, results.json" + (", demo.png" if drew else
                                                                     " (install matplotlib for demo.png)")
          + f" to {out} in {time.perf_counter() - t_start:.0f} s")
    ok = all(r["exact_unmerge"] for r in table)
    return 0 if ok else 1
