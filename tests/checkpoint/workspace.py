"""What the `pylora merge` tests share: the inputs (checkpoints saved by transformers, PEFT adapters,
their checksums) built once by build(), PEFT's own merge to compare with, and the comparisons.

How close to PEFT: within the stored dtype's rounding (see assert_matches), not bit for bit. PEFT
rounds B @ A (a BLAS sum in its own order) to fp32, multiplies by the scale, adds to W and rounds
again; pylora's merge_ adds its fp32 fma chain to W with a single rounding. Both round nearly the same
real number: in fp32 about a quarter of the merged elements differ, by one unit in the last place of the
larger of W and the update. Tensors no adapter touches, and replaced ones, are compared bit for bit.
"""
import hashlib
import json
import os
import subprocess
import warnings

import torch
from safetensors.torch import load_file

from tests.helpers import PYTHON, TOL
from tests.models import gpt2, inputs, llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD = "20KB"  # the tiny Llama then takes 7 shards


def run_merge(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), TQDM_DISABLE="1")
    env.pop("PYLORA_TRACEBACK", None)
    return subprocess.run([PYTHON, "-m", "pylora", "merge", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)

def assert_one_line_error(proc, *fragments, code=1):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]

def checksums(d) -> dict:
    """sha256 of every file under d, by relative path (a new or removed file shows too)."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = hashlib.sha256(f.read()).hexdigest()
    return out

def tensors(d) -> dict:
    """Every tensor of the safetensors checkpoint in d, by name."""
    d = str(d)
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return load_file(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(load_file(os.path.join(d, name)))
    return out

def assert_matches(ours: dict, theirs: dict, base: dict, changed_at_least: int):
    """ours equals theirs (PEFT's) within the dtype's rounding, bit for bit where the base tensor was
    not changed: |ours - theirs| <= eps * (|theirs| + max |theirs|) elementwise, eps the dtype's machine
    epsilon. The first term is one rounding of the element; the second, one rounding of the fp32 sums
    relative to the tensor's scale, matters only where w and the update nearly cancel."""
    assert ours.keys() == theirs.keys()
    changed = 0
    for key in ours:
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if key in base and base[key].dtype == a.dtype and torch.equal(theirs[key], base[key]):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key
        else:
            changed += 1
            a64, b64 = a.double(), b.double()
            bound = torch.finfo(a.dtype).eps * (b64.abs() + b64.abs().max())
            excess = ((a64 - b64).abs() - bound).max().item()
            assert excess <= 0, (key, (a64 - b64).abs().max().item(), b64.abs().max().item())
    assert changed >= changed_at_least  # the adapters did change the model

@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(**inputs("llama")).logits

def assert_logits_close(ours, theirs, dtype=torch.float32):
    # Relative to the largest logit: a merged tied lm_head makes some logits large (PEFT's merge puts its
    # update into the input embedding too), and the others then carry that scale's rounding.
    rtol, _ = TOL[dtype]
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())

def load_causal_lm(d, dtype=None):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()

@torch.no_grad()
def perturb(model, seed):
    """Random values in everything the adapter trains (LoRA factors, biases, saved modules): a merge
    must not match PEFT's by accident (a zero B is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)

def make_adapter(model, path, seed, **fields):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **fields))
        perturb(pm, seed)
        pm.save_pretrained(str(path))
    return str(path)

def peft_merge(model, adapters):
    """PEFT's result: each adapter loaded onto the model merged so far, its scaling multiplied by its
    weight, then merge_and_unload()."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path, weight in adapters:
            pm = peft.PeftModel.from_pretrained(model, str(path))
            for module in pm.modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    module.scaling["default"] *= weight
            model = pm.merge_and_unload().eval()
    return model

def save_peft_merge(model, adapters, d, **save):
    merged = peft_merge(model, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged.save_pretrained(str(d), **save)
    return merged


def build(root):
    """The inputs, written under root: checkpoints llama (sharded, with extra files), llama16, gpt2 (with a
    stale weight file of another format), adapters a1, a2 (Llama) and g (GPT-2), and their checksums."""
    ns = type("Inputs", (), {})()
    ns.root = root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns.llama = root / "llama"
        llama(attention_bias=True).save_pretrained(str(ns.llama), max_shard_size=SHARD)
        (ns.llama / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
        (ns.llama / "extra").mkdir()
        (ns.llama / "extra" / "notes.txt").write_text("copied as is\n")
        ns.llama16 = root / "llama16"
        llama(attention_bias=True).half().save_pretrained(str(ns.llama16))
        ns.gpt2 = root / "gpt2"
        gpt2().save_pretrained(str(ns.gpt2))
        (ns.gpt2 / "pytorch_model.bin").write_bytes(b"stale weights in another format")
    base = lambda: load_causal_lm(ns.llama)  # noqa: E731
    # a1: linear targets with lora_bias, rank_pattern, trained biases and a saved lm_head.
    ns.a1 = make_adapter(base(), root / "a1", 1, r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj"],
                         rank_pattern={"v_proj": 2}, lora_bias=True, bias="lora_only", modules_to_save=["lm_head"])
    # a2: an embedding, rsLoRA, and lm_head again (a LoRA target now, over a1's saved copy).
    ns.a2 = make_adapter(base(), root / "a2", 2, r=2, lora_alpha=3, use_rslora=True,
                         target_modules=["embed_tokens", "k_proj", "up_proj", "lm_head"])
    # g: GPT-2 Conv1D (c_proj is square in attention), the tied lm_head, the embedding, bias="all".
    ns.g = make_adapter(gpt2(), root / "g", 3, r=4, lora_alpha=10, bias="all",
                        target_modules=["c_attn", "c_proj", "c_fc", "lm_head", "wte"])
    ns.sums = {d: checksums(d) for d in (ns.llama, ns.llama16, ns.gpt2, ns.a1, ns.a2, ns.g)}
    return ns


def assert_inputs_unchanged(w):
    for d, sums in w.sums.items():
        assert checksums(d) == sums, d
