"""MultiLoRA.load_adapter goes through the same ingestion as pylora.load_adapter (the corpus in
tests/adapters/test_refusals.py runs through both), plus the server's own checks; a refused load
changes nothing: no wrapper, no pool, no adapter, the same outputs."""
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import pylora
from tests.helpers import assert_same, bits, snapshot
from tests.models import ids, randomize_lora, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128


def adapter_dir(path, targets=("q_proj", "v_proj"), r=4, seed=1, rank_pattern=None):
    model = pylora.inject(tiny_llama(), pylora.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                          rank_pattern=rank_pattern or {}))
    randomize_lora(model, seed=seed, std=0.1)
    pylora.save_adapter(model, path)
    return path


def state(server):
    return snapshot(server.model), server.adapters, server.resident_adapters(), sorted(server.pool.modules)


def assert_unchanged(server, before, x=None, names=None, logits=None):
    snap, adapters, resident, modules = before
    assert_same(server.model, snap)
    assert (server.adapters, server.resident_adapters(), sorted(server.pool.modules)) == (adapters, resident, modules)
    if x is not None:
        assert torch.equal(bits(server(input_ids=x, adapter_names=names).logits), bits(logits))


def test_factors_beyond_the_server_dtype_are_refused(tmp_path):
    d = adapter_dir(tmp_path / "a")
    path = d / "adapter_model.safetensors"
    t = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    t[key][2, 1] = 1e6  # finite in float32; inf in float16
    save_file(t, path, metadata={"format": "pt"})
    pylora.MultiLoRA(tiny_llama()).load_adapter("a", d)  # an fp32 server holds it
    server = pylora.MultiLoRA(tiny_llama().half())
    before = state(server)
    with pytest.raises(pylora.AdapterError, match=r"v_proj\.lora_B\.weight: values beyond the range of float16, "
                                                   r"the dtype of model\.layers\.0\.self_attn\.v_proj's LoRA factors"):
        server.load_adapter("a", d)
    assert_unchanged(server, before)


def test_pickle_files_need_allow_pickle(tmp_path):
    d = adapter_dir(tmp_path / "a")
    torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
    os.remove(d / "adapter_model.safetensors")
    server = pylora.MultiLoRA(tiny_llama())
    with pytest.raises(pylora.AdapterError, match=r"a pickle file is refused .* pass allow_pickle=True"):
        server.load_adapter("a", d)
    assert server.adapters == []
    server.load_adapter("a", d, allow_pickle=True)
    assert server.adapters == ["a"]


def test_named_adapter_subfolder(tmp_path):
    model = pylora.inject(tiny_llama(), pylora.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_lora(model)
    pylora.save_adapter(model, tmp_path, adapter_name="second")
    server = pylora.MultiLoRA(tiny_llama())
    server.load_adapter("s", tmp_path, adapter_name="second")
    assert server.adapters == ["s"]


def test_rank_above_the_pool_refused_before_anything_changes(tmp_path):
    small = adapter_dir(tmp_path / "small", r=2)
    big = adapter_dir(tmp_path / "big", targets=("q_proj", "o_proj"), r=4, rank_pattern={"o_proj": 16})
    x = ids(batch=2, seq=6, vocab=VOCAB)

    # A first adapter that does not fit: no module wrapped, no pool allocated.
    server = pylora.MultiLoRA(tiny_llama(), capacity_rows=8)
    before = state(server)
    with pytest.raises(pylora.AdapterError, match=r"module 'model\.layers\.0\.self_attn\.o_proj' has rank 16, above "
                                                   r"the 8 rows its pool holds"):
        server.load_adapter("big", big)
    assert_unchanged(server, before)

    # With adapters already serving: they and their outputs are as they were.
    server.load_adapter("small", small)
    names = ["small", None]
    logits = server(input_ids=x, adapter_names=names).logits
    before = state(server)
    with pytest.raises(pylora.AdapterError, match=r"has rank 16, above the 8 rows its pool holds"):
        server.load_adapter("big", big)
    assert_unchanged(server, before, x, names, logits)


def test_duplicate_name_refused_before_anything_changes(tmp_path):
    first = adapter_dir(tmp_path / "first")
    other = adapter_dir(tmp_path / "other", targets=("k_proj", "down_proj"), seed=2)
    server = pylora.MultiLoRA(tiny_llama())
    server.load_adapter("a", first)
    x = ids(batch=2, seq=6, vocab=VOCAB)
    logits = server(input_ids=x, adapter_names=["a", None]).logits
    before = state(server)
    with pytest.raises(ValueError, match=r"an adapter named 'a' is already loaded; unload it first"):
        server.load_adapter("a", other)  # other targets: new modules would have been wrapped
    assert_unchanged(server, before, x, ["a", None], logits)


def test_strict_false_warns_and_serves_what_the_file_holds(tmp_path):
    d = adapter_dir(tmp_path / "a")
    shutil.copytree(d, tmp_path / "partial")
    path = tmp_path / "partial" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "layers.1.self_attn.v_proj" not in k}, path,
              metadata={"format": "pt"})
    server = pylora.MultiLoRA(tiny_llama())
    with pytest.raises(pylora.AdapterError, match=r"v_proj\.lora_A\.weight is missing: the config targets module"):
        server.load_adapter("p", tmp_path / "partial")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        server.load_adapter("p", tmp_path / "partial", strict=False)
    assert any("left without effect" in str(w.message) for w in record)
    # The module without factors has no rows: its output is the base model's, as PEFT's B = 0 gives.
    reference = pylora.load_adapter(tiny_llama(), tmp_path / "partial", strict=False)
    x = ids(batch=2, seq=6, vocab=VOCAB)
    with torch.no_grad():
        expected = reference(input_ids=x).logits
    torch.testing.assert_close(server(input_ids=x, adapter_names=["p", "p"]).logits, expected, rtol=1e-5, atol=1e-6)
