"""`pylora merge` through real subprocesses: PEFT adapters merged into safetensors checkpoints, compared
tensor by tensor with PEFT's merge_and_unload() saved with save_pretrained and loaded back by
transformers with the same logits; every error on stderr (its first line "pylora merge: error: ...", then
one line per problem) with a non-zero status and no output left behind; the inputs unchanged (checksums)."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from pylora import cli
from tests.checkpoint.workspace import (SHARD, assert_inputs_unchanged, assert_logits_close, assert_matches,
                                        assert_one_line_error, load_causal_lm, logits, run_merge, save_peft_merge,
                                        tensors)
from tests.cli.errors import assert_merge_error

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sharded_llama_matches_peft_and_loads_in_transformers(merge_inputs, tmp_path):
    out = tmp_path / "out"
    proc = run_merge("--base", merge_inputs.llama, "--adapter", merge_inputs.a1, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "merged 1 adapter" in proc.stdout
    assert "7 safetensors files and the index" in proc.stdout

    # Same layout: the same shards holding the same tensors, the index with the same map.
    assert sorted(os.listdir(out)) == sorted(os.listdir(merge_inputs.llama))
    with open(merge_inputs.llama / "model.safetensors.index.json") as f:
        index_in = json.load(f)
    with open(out / "model.safetensors.index.json") as f:
        index_out = json.load(f)
    assert index_out == index_in  # fp32 in and out: total_size unchanged
    assert index_out["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    for shard in set(index_in["weight_map"].values()):
        assert load_file(out / shard).keys() == load_file(merge_inputs.llama / shard).keys()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "extra/notes.txt"):
        assert (out / name).read_bytes() == (merge_inputs.llama / name).read_bytes()

    peft_dir = tmp_path / "peft"
    merged = save_peft_merge(load_causal_lm(merge_inputs.llama), [(merge_inputs.a1, 1.0)], peft_dir, max_shard_size=SHARD)
    ours, base = tensors(out), tensors(merge_inputs.llama)
    assert_matches(ours, tensors(peft_dir), base, changed_at_least=12)
    # lm_head is a1's saved copy, bit for bit; o_proj's bias is a1's trained bias plus s * lora_B.bias.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = load_file(os.path.join(merge_inputs.a1, "adapter_model.safetensors"))
    assert torch.equal(ours["lm_head.weight"], saved["base_model.model.lm_head.weight"])
    assert not torch.equal(ours["model.layers.1.self_attn.o_proj.bias"], base["model.layers.1.self_attn.o_proj.bias"])

    reloaded = load_causal_lm(out)
    assert_logits_close(logits(reloaded), logits(merged))
    assert (logits(reloaded) - logits(load_causal_lm(merge_inputs.llama))).abs().max() > 1e-2
    assert_inputs_unchanged(merge_inputs)

def test_two_adapters_with_weights(merge_inputs, tmp_path):
    out = tmp_path / "out"
    proc = run_merge("--base", merge_inputs.llama, "--adapter", merge_inputs.a1, "--weight", "0.5", "--adapter", merge_inputs.a2, "--weight", "-1.25",
                     "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "weight 0.5" in proc.stdout and "weight -1.25" in proc.stdout
    peft_dir = tmp_path / "peft"
    merged = save_peft_merge(load_causal_lm(merge_inputs.llama), [(merge_inputs.a1, 0.5), (merge_inputs.a2, -1.25)], peft_dir, max_shard_size=SHARD)
    assert_matches(tensors(out), tensors(peft_dir), tensors(merge_inputs.llama), changed_at_least=18)
    assert_logits_close(logits(load_causal_lm(out)), logits(merged))
    # The weights matter: weight 1 each gives another model.
    other = save_peft_merge(load_causal_lm(merge_inputs.llama), [(merge_inputs.a1, 1.0), (merge_inputs.a2, 1.0)], tmp_path / "ones")
    assert (logits(other) - logits(merged)).abs().max() > 1e-2
    assert_inputs_unchanged(merge_inputs)

def test_gpt2_conv1d_tied_unsharded(merge_inputs, tmp_path):
    # PEFT saves fan_in_fan_out from the last module it wrapped (lm_head, a Linear): false, although
    # every other target is a Conv1D; the square attn.c_proj must still be merged as [I, O].
    with open(os.path.join(merge_inputs.g, "adapter_config.json")) as f:
        assert json.load(f)["fan_in_fan_out"] is False
    out = tmp_path / "out"
    proc = run_merge("--base", merge_inputs.gpt2, "--adapter", merge_inputs.g, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "tied: lm_head.weight is stored as transformer.wte.weight" in proc.stdout
    assert proc.stderr.startswith("pylora merge: warning: 'lm_head.weight' is tied to 'transformer.wte.weight'")
    assert "not copied" in proc.stdout and "pytorch_model.bin" in proc.stdout
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]

    peft_dir = tmp_path / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_model = transformers.AutoModelForCausalLM.from_pretrained(str(merge_inputs.gpt2)).eval()
    merged = save_peft_merge(base_model, [(merge_inputs.g, 1.0)], peft_dir)
    ours = tensors(out)
    assert "lm_head.weight" not in ours
    assert_matches(ours, tensors(peft_dir), tensors(merge_inputs.gpt2), changed_at_least=20)
    assert_logits_close(logits(load_causal_lm(out)), logits(merged))
    assert_inputs_unchanged(merge_inputs)

def test_error_missing_base(merge_inputs, tmp_path):
    proc = run_merge("--base", tmp_path / "nowhere", "--adapter", merge_inputs.a1, "--out", tmp_path / "out")
    assert_one_line_error(proc, "pylora merge: error:", str(tmp_path / "nowhere"), "no such directory")
    assert not (tmp_path / "out").exists()

def test_error_broken_adapter(merge_inputs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((merge_inputs.root / "a1" / "adapter_config.json").read_text())
    config["r"] = 8  # the file's factors have rank 4 (and 2 for v_proj, by rank_pattern)
    (broken / "adapter_config.json").write_text(json.dumps(config))
    (broken / "adapter_model.safetensors").write_bytes((merge_inputs.root / "a1" / "adapter_model.safetensors").read_bytes())
    proc = run_merge("--base", merge_inputs.llama, "--adapter", broken, "--out", tmp_path / "out")
    # Every problem AdapterError found (rank 4 in the file, r=8 in the config, for each of the four modules
    # that rank_pattern leaves at r), one per line, after the headline naming the adapter.
    lines = assert_merge_error(proc, "adapter_config.json gives module", "r=8", problems=4)
    assert lines[0] == f"pylora merge: error: {broken}: 4 problems:"
    assert all(str(broken) in line and "has rank 4" in line and "r=8" in line for line in lines[1:])
    assert not (tmp_path / "out").exists()

def test_error_adapter_targets_a_module_the_checkpoint_lacks(merge_inputs, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter_config.json").write_bytes((merge_inputs.root / "a2" / "adapter_config.json").read_bytes())
    sd = load_file(merge_inputs.root / "a2" / "adapter_model.safetensors")
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in sd.items()}, moved / "adapter_model.safetensors",
              metadata={"format": "pt"})
    proc = run_merge("--base", merge_inputs.llama, "--adapter", moved, "--out", tmp_path / "out")
    lines = assert_merge_error(proc, str(moved), "'model.layers.7.self_attn.k_proj'",
                               "the checkpoint has no tensor 'model.layers.7.self_attn.k_proj.weight'",
                               # and what the config targets in layer 1 now has no factors
                               "is missing: the config targets module 'model.layers.1.self_attn.k_proj'", problems=4)
    assert lines[0] == "pylora merge: error: 4 problems:"
    assert sum("the checkpoint has no tensor 'model.layers.7." in line for line in lines) == 2
    assert sum("is missing: the config targets module 'model.layers.1." in line for line in lines) == 2
    assert not (tmp_path / "out").exists()

def test_error_existing_output_without_overwrite(merge_inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_merge("--base", merge_inputs.llama, "--adapter", merge_inputs.a1, "--out", out)
    assert_one_line_error(proc, str(out), "exists and is not empty", "--overwrite")
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

def test_error_non_finite_result_leaves_no_output(merge_inputs, tmp_path):
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_bytes((merge_inputs.root / "a1" / "adapter_config.json").read_bytes())
    sd = load_file(merge_inputs.root / "a1" / "adapter_model.safetensors")
    save_file({k: v * 1e7 if "lora_B.weight" in k else v for k, v in sd.items()}, huge / "adapter_model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = run_merge("--base", merge_inputs.llama16, "--adapter", huge, "--out", out)
    assert_one_line_error(proc, "tensor 'model.layers.", "would not be finite at weight[", str(huge))
    assert not out.exists()
    assert os.listdir(tmp_path) == ["huge"]  # no temporary directory left beside it
    assert_inputs_unchanged(merge_inputs)

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
