"""`pylora merge` / pylora.checkpoint.merge_checkpoint: PEFT adapters merged into safetensors checkpoints,
compared tensor by tensor with PEFT's merge_and_unload() saved with save_pretrained, and loaded back by
transformers with the same logits; the error cases, each one line on stderr with a non-zero status and
no output left behind; the inputs unchanged (checksums); the peak memory of a merge near one tensor.

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

import pytest
import torch

from conftest import PYTHON, TOL
from models import tiny_llama
from models import ConvEmbNet, gpt2, inputs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from pylora import checkpoint as ckpt  # noqa: E402
from pylora import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = "20KB"  # the tiny Llama then takes 7 shards


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()


@torch.no_grad()
def perturb(model, seed):
    """Random values in everything the adapter trains (LoRA factors, biases, saved modules): a merge
    must not match PEFT's by accident (a zero B is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def make_adapter(model, path, seed, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **fields))
        perturb(pm, seed)
        pm.save_pretrained(str(path))
    return str(path)


def peft_merge(model, adapters):
    """PEFT's result: each adapter loaded onto the model merged so far, its scaling multiplied by its
    weight, then merge_and_unload()."""
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


def llama_with_biases(seed=1234):
    """The tests' tiny Llama with attention biases (for lora_bias and bias="lora_only")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attention_bias=True)).eval()


# ----------------------------------------------------------------------------------------------
# Inputs, built once: checkpoints, adapters, their checksums
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    ns = type("Inputs", (), {})()
    ns.root = root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ns.llama = root / "llama"
        llama_with_biases().save_pretrained(str(ns.llama), max_shard_size=SHARD)
        (ns.llama / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
        (ns.llama / "extra").mkdir()
        (ns.llama / "extra" / "notes.txt").write_text("copied as is\n")
        ns.llama16 = root / "llama16"
        llama_with_biases().half().save_pretrained(str(ns.llama16))
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


# ----------------------------------------------------------------------------------------------
# Through the command line
# ----------------------------------------------------------------------------------------------

def test_sharded_llama_matches_peft_and_loads_in_transformers(w, tmp_path):
    out = tmp_path / "out"
    proc = run_merge("--base", w.llama, "--adapter", w.a1, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "merged 1 adapter" in proc.stdout
    assert "7 safetensors files and the index" in proc.stdout

    # Same layout: the same shards holding the same tensors, the index with the same map.
    assert sorted(os.listdir(out)) == sorted(os.listdir(w.llama))
    with open(w.llama / "model.safetensors.index.json") as f:
        index_in = json.load(f)
    with open(out / "model.safetensors.index.json") as f:
        index_out = json.load(f)
    assert index_out == index_in  # fp32 in and out: total_size unchanged
    assert index_out["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    for shard in set(index_in["weight_map"].values()):
        assert load_file(out / shard).keys() == load_file(w.llama / shard).keys()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "extra/notes.txt"):
        assert (out / name).read_bytes() == (w.llama / name).read_bytes()

    peft_dir = tmp_path / "peft"
    merged = save_peft_merge(load_causal_lm(w.llama), [(w.a1, 1.0)], peft_dir, max_shard_size=SHARD)
    ours, base = tensors(out), tensors(w.llama)
    assert_matches(ours, tensors(peft_dir), base, changed_at_least=12)
    # lm_head is a1's saved copy, bit for bit; o_proj's bias is a1's trained bias plus s * lora_B.bias.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = load_file(os.path.join(w.a1, "adapter_model.safetensors"))
    assert torch.equal(ours["lm_head.weight"], saved["base_model.model.lm_head.weight"])
    assert not torch.equal(ours["model.layers.1.self_attn.o_proj.bias"], base["model.layers.1.self_attn.o_proj.bias"])

    reloaded = load_causal_lm(out)
    assert_logits_close(logits(reloaded), logits(merged))
    assert (logits(reloaded) - logits(load_causal_lm(w.llama))).abs().max() > 1e-2
    assert_inputs_unchanged(w)


def test_two_adapters_with_weights(w, tmp_path):
    out = tmp_path / "out"
    proc = run_merge("--base", w.llama, "--adapter", w.a1, "--weight", "0.5", "--adapter", w.a2, "--weight", "-1.25",
                     "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "weight 0.5" in proc.stdout and "weight -1.25" in proc.stdout
    peft_dir = tmp_path / "peft"
    merged = save_peft_merge(load_causal_lm(w.llama), [(w.a1, 0.5), (w.a2, -1.25)], peft_dir, max_shard_size=SHARD)
    assert_matches(tensors(out), tensors(peft_dir), tensors(w.llama), changed_at_least=18)
    assert_logits_close(logits(load_causal_lm(out)), logits(merged))
    # The weights matter: weight 1 each gives another model.
    other = save_peft_merge(load_causal_lm(w.llama), [(w.a1, 1.0), (w.a2, 1.0)], tmp_path / "ones")
    assert (logits(other) - logits(merged)).abs().max() > 1e-2
    assert_inputs_unchanged(w)


def test_gpt2_conv1d_tied_unsharded(w, tmp_path):
    # PEFT saves fan_in_fan_out from the last module it wrapped (lm_head, a Linear): false, although
    # every other target is a Conv1D; the square attn.c_proj must still be merged as [I, O].
    with open(os.path.join(w.g, "adapter_config.json")) as f:
        assert json.load(f)["fan_in_fan_out"] is False
    out = tmp_path / "out"
    proc = run_merge("--base", w.gpt2, "--adapter", w.g, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "tied: lm_head.weight is stored as transformer.wte.weight" in proc.stdout
    assert proc.stderr.startswith("pylora merge: warning: 'lm_head.weight' is tied to 'transformer.wte.weight'")
    assert "not copied" in proc.stdout and "pytorch_model.bin" in proc.stdout
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]

    peft_dir = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_model = transformers.AutoModelForCausalLM.from_pretrained(str(w.gpt2)).eval()
    merged = save_peft_merge(base_model, [(w.g, 1.0)], peft_dir)
    ours = tensors(out)
    assert "lm_head.weight" not in ours
    assert_matches(ours, tensors(peft_dir), tensors(w.gpt2), changed_at_least=20)
    assert_logits_close(logits(load_causal_lm(out)), logits(merged))
    assert_inputs_unchanged(w)


# Error cases: one line on stderr naming what is wrong, a non-zero status, no output.

def test_error_missing_base(w, tmp_path):
    proc = run_merge("--base", tmp_path / "nowhere", "--adapter", w.a1, "--out", tmp_path / "out")
    assert_one_line_error(proc, "pylora merge: error:", str(tmp_path / "nowhere"), "no such directory")
    assert not (tmp_path / "out").exists()


def test_error_broken_adapter(w, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((w.root / "a1" / "adapter_config.json").read_text())
    config["r"] = 8  # the file's factors have rank 4 (and 2 for v_proj, by rank_pattern)
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes((w.root / "a1" / "adapter_model.safetensors").read_bytes())
    proc = run_merge("--base", w.llama, "--adapter", broken, "--out", tmp_path / "out")
    line = assert_one_line_error(proc, str(broken), "adapter_config.json gives module", "r=8")
    assert "problems:" in line  # every problem AdapterError found, on the one line
    assert not (tmp_path / "out").exists()


def test_error_adapter_targets_a_module_the_checkpoint_lacks(w, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter_config.json").write_bytes((w.root / "a2" / "adapter_config.json").read_bytes())
    sd = load_file(w.root / "a2" / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in sd.items()}, moved / "adapter_model.safetensors",
              metadata={"format": "pt"})
    proc = run_merge("--base", w.llama, "--adapter", moved, "--out", tmp_path / "out")
    assert_one_line_error(proc, str(moved), "'model.layers.7.self_attn.k_proj'",
                          "the checkpoint has no tensor 'model.layers.7.self_attn.k_proj.weight'", "2 problems")
    assert not (tmp_path / "out").exists()


def test_error_existing_output_without_overwrite(w, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_merge("--base", w.llama, "--adapter", w.a1, "--out", out)
    assert_one_line_error(proc, str(out), "exists and is not empty", "--overwrite")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_error_non_finite_result_leaves_no_output(w, tmp_path):
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_bytes((w.root / "a1" / "adapter_config.json").read_bytes())
    sd = load_file(w.root / "a1" / "adapter_model.safetensors")
    save_file({k: v * 1e7 if "lora_B.weight" in k else v for k, v in sd.items()}, huge / "adapter_model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = run_merge("--base", w.llama16, "--adapter", huge, "--out", out)
    assert_one_line_error(proc, "tensor 'model.layers.", "would not be finite at weight[", str(huge))
    assert not out.exists()
    assert os.listdir(tmp_path) == ["huge"]  # no temporary directory left beside it
    assert_inputs_unchanged(w)


def test_argument_errors_are_one_line(capsys):
    for argv, fragment in [(["merge", "--base", "b", "--weight", "2", "--adapter", "a", "--out", "o"],
                            "--weight 2 comes before any --adapter"),
                           (["merge", "--base", "b", "--adapter", "a", "--weight", "1", "--weight", "2", "--out", "o"],
                            "already has --weight 1"),
                           (["merge", "--base", "b", "--adapter", "a", "--weight", "nan", "--out", "o"],
                            "--weight 'nan' is not finite"),
                           (["merge", "--adapter", "a", "--out", "o"], "the following arguments are required: --base")]:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err


# ----------------------------------------------------------------------------------------------
# Through the Python API
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_name,dtype", [("llama", "bfloat16"), ("llama", "float16"), ("llama16", None),
                                             ("llama16", "float32")])
def test_dtypes_match_peft_within_the_dtype(w, tmp_path, base_name, dtype):
    base = getattr(w, base_name)
    summary = ckpt.merge_checkpoint(base, [(w.a2, 1.0)], tmp_path / "out", dtype=dtype, progress=False)
    target = ckpt.OUT_DTYPES[dtype] if dtype else torch.float16
    # PEFT: the model loaded in its stored dtype merged, then cast (fp16 -> fp32: loaded as fp32,
    # which is the same as merging in fp32 after an exact widening).
    load_as = torch.float32 if dtype == "float32" else None
    merged = peft_merge(load_causal_lm(base, dtype=load_as), [(w.a2, 1.0)]).to(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged.save_pretrained(str(tmp_path / "peft"))
    ours = tensors(tmp_path / "out")
    assert {t.dtype for t in ours.values()} == {target}
    cast = {k: v.to(target) for k, v in tensors(base).items()}  # untouched tensors: the same cast, bit for bit
    assert_matches(ours, tensors(tmp_path / "peft"), cast, changed_at_least=6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == str(target).removeprefix("torch.")
    assert summary["bytes"] == sum(t.numel() * t.element_size() for t in ours.values())
    if summary["sharded"]:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == summary["bytes"]
    reloaded = load_causal_lm(tmp_path / "out", dtype=target)
    assert_logits_close(logits(reloaded), logits(merged), target)


def test_a_later_replacement_discards_earlier_updates_as_peft_does(w, tmp_path, capsys):
    # a2 updates lm_head by LoRA, then a1 replaces it with its saved copy (modules_to_save).
    summary = ckpt.merge_checkpoint(w.llama, [w.a2, w.a1], tmp_path / "out", progress=True)
    # a2's two changes: its saved copy of lm_head, then its LoRA update.
    assert summary["warnings"] == [f"tensor 'lm_head.weight': adapter {w.a1} replaces it with 'lm_head.weight', "
                                   "discarding what 2 change(s) of earlier adapters did to it"]
    assert "pylora merge: 100%" in capsys.readouterr().err  # the progress bar, asked for
    save_peft_merge(load_causal_lm(w.llama), [(w.a2, 1.0), (w.a1, 1.0)], tmp_path / "peft", max_shard_size=SHARD)
    assert_matches(tensors(tmp_path / "out"), tensors(tmp_path / "peft"), tensors(w.llama), changed_at_least=18)


def test_conv2d_embedding_saved_module_and_lora_bias(tmp_path):
    base_dir = tmp_path / "convnet"
    base_dir.mkdir()
    torch.manual_seed(5)
    save_file(ConvEmbNet().state_dict(), base_dir / "model.safetensors", metadata={"format": "pt"})

    def base_model():
        model = ConvEmbNet()
        model.load_state_dict(load_file(base_dir / "model.safetensors"))
        return model.eval()
    c1 = make_adapter(base_model(), tmp_path / "c1", 4, r=2, lora_alpha=5, target_modules=["conv", "emb"],
                      modules_to_save=["head"])
    c2 = make_adapter(base_model(), tmp_path / "c2", 5, r=3, lora_alpha=4, target_modules=["conv"], lora_bias=True)
    sums = {d: checksums(d) for d in (base_dir, c1, c2)}
    summary = ckpt.merge_checkpoint(base_dir, [(c1, 0.75), c2], tmp_path / "out", progress=False)
    assert (summary["lora_updates"], summary["bias_updates"], summary["replacements"]) == (3, 1, 2)
    expected = peft_merge(base_model(), [(c1, 0.75), (c2, 1.0)]).state_dict()
    ours = tensors(tmp_path / "out")
    assert_matches(ours, {k: v.contiguous() for k, v in expected.items()}, tensors(base_dir), changed_at_least=5)
    assert {d: checksums(d) for d in sums} == sums


def test_adapter_names_with_and_without_the_model_prefix(w, tmp_path):
    from transformers import LlamaModel

    # An adapter made on the bare model ("layers.0...") into the task model's checkpoint ("model.layers.0...").
    bare = make_adapter(load_causal_lm(w.llama).model, tmp_path / "bare", 6, r=2, lora_alpha=4,
                        target_modules=["q_proj", "down_proj"])
    ckpt.merge_checkpoint(w.llama, [bare], tmp_path / "out1", progress=False)
    merged = peft_merge(load_causal_lm(w.llama).model, [(bare, 1.0)])
    expected = {f"model.{k}": v for k, v in merged.state_dict().items()}
    ours = tensors(tmp_path / "out1")
    assert_matches({k: ours[k] for k in expected}, expected, tensors(w.llama), changed_at_least=4)

    # An adapter made on the task model into a bare model's checkpoint (keys without "model.").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaModel.from_pretrained(str(w.llama)).save_pretrained(str(tmp_path / "bare_ckpt"))
    task = make_adapter(load_causal_lm(w.llama), tmp_path / "task", 7, r=2, lora_alpha=4, target_modules=["v_proj"])
    ckpt.merge_checkpoint(tmp_path / "bare_ckpt", [task], tmp_path / "out2", progress=False)
    merged = peft_merge(load_causal_lm(w.llama), [(task, 1.0)])
    expected = {k.removeprefix("model."): v for k, v in merged.state_dict().items() if k.startswith("model.")}
    assert_matches(tensors(tmp_path / "out2"), expected, tensors(tmp_path / "bare_ckpt"), changed_at_least=2)


def test_overwrite_empty_output_and_checks_before_writing(w, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is no obstacle
    ckpt.merge_checkpoint(w.gpt2, [w.g], out, progress=False)
    first = checksums(out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(ckpt.CheckpointError, match="exists and is not empty"):
        ckpt.merge_checkpoint(w.gpt2, [(w.g, 0.5)], out, progress=False)
    ckpt.merge_checkpoint(w.gpt2, [(w.g, 0.5)], out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and checksums(out).keys() == first.keys() and checksums(out) != first
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # The inputs are never an output.
    for bad in (w.gpt2, w.gpt2 / "sub", tmp_path.parent):
        with pytest.raises(ckpt.CheckpointError, match="overlaps the base checkpoint"):
            ckpt.merge_checkpoint(w.gpt2, [w.g], bad, overwrite=True, progress=False)
    # An adapter for a wider model: shapes checked, every problem named on one line, nothing written.
    wide = make_adapter(tiny_llama(hidden=64), tmp_path / "wide", 8, r=2, lora_alpha=4, target_modules=["k_proj"])
    with pytest.raises(ckpt.CheckpointError) as exc:
        ckpt.merge_checkpoint(w.llama, [wide], tmp_path / "x", progress=False)
    message = str(exc.value)
    assert message.startswith("2 problems: ") and "\n" not in message
    assert "checkpoint tensor 'model.layers.1.self_attn.k_proj.weight' has shape [16, 32]; expected [32, 64] " \
           "(Linear [O, I]) or [64, 32] (Conv1D [I, O])" in message
    # A saved copy of a tied lm_head has nowhere to go.
    saved_head = make_adapter(gpt2(), tmp_path / "saved_head", 9, r=2, lora_alpha=4, target_modules=["c_attn"],
                              modules_to_save=["lm_head"])
    with pytest.raises(ckpt.CheckpointError, match="'lm_head.weight' is tied to 'transformer.wte.weight' by "
                                                   "tie_word_embeddings: the merged checkpoint cannot hold"):
        ckpt.merge_checkpoint(w.gpt2, [saved_head], tmp_path / "x", progress=False)
    with pytest.raises(ckpt.CheckpointError, match="dtype 'float64' is not supported"):
        ckpt.merge_checkpoint(w.llama, [w.a1], tmp_path / "x", dtype="float64")
    assert sorted(os.listdir(tmp_path)) == ["out", "saved_head", "wide"]
    assert_inputs_unchanged(w)


# ----------------------------------------------------------------------------------------------
# Peak memory: near one tensor, not the checkpoint
# ----------------------------------------------------------------------------------------------

# The RSS after the imports, then the peak during the merge: the high-water mark is reset first (Linux
# clear_refs 5), or the imports' own peak could hide the merge's. VmHWM counts touched file pages too.
_MEASURE = """
import sys
from pylora import checkpoint
def status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
checkpoint.merge_checkpoint(sys.argv[1], [sys.argv[2]], sys.argv[3], progress=False)
print(before, status("VmHWM"))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_stays_near_one_tensor(tmp_path):
    n, rows, cols = 6, 2048, 4096  # 6 weights of 32 MiB: a 192 MiB checkpoint
    base = tmp_path / "base"
    base.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.proj.weight": torch.randn(rows, cols, generator=g) for i in range(n)},
              base / "model.safetensors", metadata={"format": "pt"})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                             "target_modules": ["proj"]}))
    save_file({f"base_model.model.layers.{i}.proj.lora_{ab}.weight": torch.randn(shape, generator=g) * 0.01
               for i in range(n) for ab, shape in (("A", (8, cols)), ("B", (rows, 8)))},
              adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([PYTHON, "-c", _MEASURE, str(base), str(adapter), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    before, peak = map(int, proc.stdout.split())
    tensor, total = rows * cols * 4, n * rows * cols * 4
    growth = peak - before
    # One tensor read into the one buffer and merged in place, plus the adapter (1.1 MiB), merge_'s
    # record and the modules imported during the merge (about 10 MiB): under two tensors. Reading the
    # whole file would take six.
    assert growth < 2 * tensor, f"peak grew by {growth / 2**20:.1f} MiB for {tensor / 2**20:.0f} MiB tensors"
    assert os.path.getsize(tmp_path / "out" / "model.safetensors") > total
    from safetensors import safe_open

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as merged, \
            safe_open(base / "model.safetensors", "pt") as original:
        for i in (0, n - 1):  # merged, not copied
            a, b = merged.get_tensor(f"layers.{i}.proj.weight"), original.get_tensor(f"layers.{i}.proj.weight")
            assert 0 < (a - b).abs().max() < 1
