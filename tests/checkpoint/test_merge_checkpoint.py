"""pylora.checkpoint.merge_checkpoint through the Python API: dtypes against PEFT, replacements, Conv2d,
embeddings and lora_bias, names with and without the model prefix, overwrite and the checks before
writing, leftovers of killed merges, and the peak memory of a merge near one tensor."""
import json
import os
import subprocess
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from pylora import checkpoint as ckpt
from tests.checkpoint.workspace import (ROOT, SHARD, assert_inputs_unchanged, assert_logits_close, assert_matches,
                                        checksums, load_causal_lm, logits, make_adapter, peft_merge, save_peft_merge,
                                        tensors)
from tests.helpers import PYTHON
from tests.models import ConvEmbNet, gpt2, tiny_llama

pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("base_name,dtype", [("llama", "bfloat16"), ("llama", "float16"), ("llama16", None),
                                             ("llama16", "float32")])
def test_dtypes_match_peft_within_the_dtype(merge_inputs, tmp_path, base_name, dtype):
    base = getattr(merge_inputs, base_name)
    summary = ckpt.merge_checkpoint(base, [(merge_inputs.a2, 1.0)], tmp_path / "out", dtype=dtype, progress=False)
    target = ckpt.OUT_DTYPES[dtype] if dtype else torch.float16
    # PEFT: the model loaded in its stored dtype merged, then cast (fp16 -> fp32: loaded as fp32,
    # which is the same as merging in fp32 after an exact widening).
    load_as = torch.float32 if dtype == "float32" else None
    merged = peft_merge(load_causal_lm(base, dtype=load_as), [(merge_inputs.a2, 1.0)]).to(target)
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

def test_a_later_replacement_discards_earlier_updates_as_peft_does(merge_inputs, tmp_path, capsys):
    # a2 updates lm_head by LoRA, then a1 replaces it with its saved copy (modules_to_save).
    summary = ckpt.merge_checkpoint(merge_inputs.llama, [merge_inputs.a2, merge_inputs.a1], tmp_path / "out", progress=True)
    # a2's two changes: its saved copy of lm_head, then its LoRA update.
    assert summary["warnings"] == [f"tensor 'lm_head.weight': adapter {merge_inputs.a1} replaces it with 'lm_head.weight', "
                                   "discarding what 2 change(s) of earlier adapters did to it"]
    assert "pylora merge: 100%" in capsys.readouterr().err  # the progress bar, asked for
    save_peft_merge(load_causal_lm(merge_inputs.llama), [(merge_inputs.a2, 1.0), (merge_inputs.a1, 1.0)], tmp_path / "peft", max_shard_size=SHARD)
    assert_matches(tensors(tmp_path / "out"), tensors(tmp_path / "peft"), tensors(merge_inputs.llama), changed_at_least=18)

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

def test_adapter_names_with_and_without_the_model_prefix(merge_inputs, tmp_path):
    from transformers import LlamaModel

    # An adapter made on the bare model ("layers.0...") into the task model's checkpoint ("model.layers.0...").
    bare = make_adapter(load_causal_lm(merge_inputs.llama).model, tmp_path / "bare", 6, r=2, lora_alpha=4,
                        target_modules=["q_proj", "down_proj"])
    ckpt.merge_checkpoint(merge_inputs.llama, [bare], tmp_path / "out1", progress=False)
    merged = peft_merge(load_causal_lm(merge_inputs.llama).model, [(bare, 1.0)])
    expected = {f"model.{k}": v for k, v in merged.state_dict().items()}
    ours = tensors(tmp_path / "out1")
    assert_matches({k: ours[k] for k in expected}, expected, tensors(merge_inputs.llama), changed_at_least=4)

    # An adapter made on the task model into a bare model's checkpoint (keys without "model.").
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LlamaModel.from_pretrained(str(merge_inputs.llama)).save_pretrained(str(tmp_path / "bare_ckpt"))
    task = make_adapter(load_causal_lm(merge_inputs.llama), tmp_path / "task", 7, r=2, lora_alpha=4, target_modules=["v_proj"])
    ckpt.merge_checkpoint(tmp_path / "bare_ckpt", [task], tmp_path / "out2", progress=False)
    merged = peft_merge(load_causal_lm(merge_inputs.llama), [(task, 1.0)])
    expected = {k.removeprefix("model."): v for k, v in merged.state_dict().items() if k.startswith("model.")}
    assert_matches(tensors(tmp_path / "out2"), expected, tensors(tmp_path / "bare_ckpt"), changed_at_least=2)

def test_overwrite_empty_output_and_checks_before_writing(merge_inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is no obstacle
    ckpt.merge_checkpoint(merge_inputs.gpt2, [merge_inputs.g], out, progress=False)
    first = checksums(out)
    (out / "stale.txt").write_text("old")
    with pytest.raises(ckpt.CheckpointError, match="exists and is not empty"):
        ckpt.merge_checkpoint(merge_inputs.gpt2, [(merge_inputs.g, 0.5)], out, progress=False)
    ckpt.merge_checkpoint(merge_inputs.gpt2, [(merge_inputs.g, 0.5)], out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and checksums(out).keys() == first.keys() and checksums(out) != first
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # The inputs are never an output.
    for bad in (merge_inputs.gpt2, merge_inputs.gpt2 / "sub", tmp_path.parent):
        with pytest.raises(ckpt.CheckpointError, match="overlaps the base checkpoint"):
            ckpt.merge_checkpoint(merge_inputs.gpt2, [merge_inputs.g], bad, overwrite=True, progress=False)
    # An adapter for a wider model: shapes checked, every problem named on one line, nothing written.
    wide = make_adapter(tiny_llama(hidden=64), tmp_path / "wide", 8, r=2, lora_alpha=4, target_modules=["k_proj"])
    with pytest.raises(ckpt.CheckpointError) as exc:
        ckpt.merge_checkpoint(merge_inputs.llama, [wide], tmp_path / "x", progress=False)
    message = str(exc.value)
    assert message.startswith("2 problems: ") and "\n" not in message
    assert "checkpoint tensor 'model.layers.1.self_attn.k_proj.weight' has shape [16, 32]; expected [32, 64] " \
           "(Linear [O, I]) or [64, 32] (Conv1D [I, O])" in message
    # A saved copy of a tied lm_head has nowhere to go.
    saved_head = make_adapter(gpt2(), tmp_path / "saved_head", 9, r=2, lora_alpha=4, target_modules=["c_attn"],
                              modules_to_save=["lm_head"])
    with pytest.raises(ckpt.CheckpointError, match="'lm_head.weight' is tied to 'transformer.wte.weight' by "
                                                   "tie_word_embeddings: the merged checkpoint cannot hold"):
        ckpt.merge_checkpoint(merge_inputs.gpt2, [saved_head], tmp_path / "x", progress=False)
    with pytest.raises(ckpt.CheckpointError, match="dtype 'float64' is not supported"):
        ckpt.merge_checkpoint(merge_inputs.llama, [merge_inputs.a1], tmp_path / "x", dtype="float64")
    assert sorted(os.listdir(tmp_path)) == ["out", "saved_head", "wide"]
    assert_inputs_unchanged(merge_inputs)

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


def _dead_pid():
    """A process id that no process has: a child that has exited and been reaped."""
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_merges_are_cleaned(merge_inputs, tmp_path):
    """A merge killed with SIGKILL leaves its hidden temporary output; the next merge beside the same
    output removes those of dead processes of this host, keeps a live one's, and puts back an output a
    killed merge had moved aside."""
    from pylora.checkpoint.merge import _host_tag

    host, dead = _host_tag(), _dead_pid()
    stale = tmp_path / f".out.tmp-{host}-{dead}-0123abcd"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-89abcdef"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead}-0123abcd"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    ckpt.merge_checkpoint(merge_inputs.gpt2, [merge_inputs.g], tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, "out"])

    # Killed between moving the previous output aside and renaming the new one into place: the previous
    # output is put back, and then protected like any existing output.
    sums = checksums(tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / f".out.old-{host}-{dead}-00000000")
    with pytest.raises(ckpt.CheckpointError, match="exists and is not empty"):
        ckpt.merge_checkpoint(merge_inputs.gpt2, [(merge_inputs.g, 0.5)], tmp_path / "out", progress=False)
    assert checksums(tmp_path / "out") == sums
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, "out"])
