"""Merging a lora_bias adapter (PEFT's lora_bias=True: lora_B has a bias, folded into the base bias): as
PEFT merges it where the base has a bias, refused before anything is written where it has none or where
the result would not be finite, and undone bit for bit by unmerge."""
import copy
import warnings

import pytest
import torch

import pylora
from tests.helpers import assert_same, bits, snapshot
from tests.models import llama, randomize_lora

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


def lora_bias_model(base, **fields):
    model = pylora.inject(base, pylora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_bias=True, **fields))
    return randomize_lora(model, seed=5, std=0.2)


def test_without_a_base_bias_merge_is_refused_before_anything_is_written():
    with pytest.warns(UserWarning, match=r"lora_bias=True, but the base Linear has no bias: merging it will be "
                                         r"refused"):
        model = lora_bias_model(llama())
    before = model(input_ids=IDS).logits
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: LoraLinear\.merge: the adapter has "
                                         r"lora_bias=True, but the base Linear has no bias to merge lora_B's bias "
                                         r"into"):
        pylora.merge(model)
    assert_same(model, snap)  # not even the first layer's weight
    assert not any(layer.merged for _, layer in pylora.lora_layers(model))
    assert torch.equal(model(input_ids=IDS).logits, before)
    with pytest.raises(ValueError, match=r"no bias to merge"):
        pylora.merge_and_unload(model)
    assert_same(model, snap)
    pylora.unload(model)  # and the adapter comes out cleanly
    assert not list(pylora.lora_layers(model))
    # PEFT refuses this merge too.
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        pm.merge_and_unload()


def test_merged_bias_is_peft_s_and_unmerge_restores_it_bit_for_bit():
    model = lora_bias_model(llama(attention_bias=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(llama(attention_bias=True),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True))
    from tests.models import copy_lora_into_peft

    copy_lora_into_peft(model, pm)
    expected = pm.merge_and_unload()
    before = snapshot(model)
    pylora.merge(model)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    peft_bias = expected.get_submodule("model.layers.1.self_attn.v_proj").bias
    assert torch.equal(bits(layer.base_layer.bias), bits(peft_bias))  # PEFT's fp32 sum, the same bits
    assert not torch.equal(layer.base_layer.bias, before[1]["model.layers.1.self_attn.v_proj.base_layer.bias"])
    pylora.unmerge(model)
    assert_same(model, before)


def test_half_precision_bias_comes_back_exactly_and_overflow_is_refused():
    model = lora_bias_model(llama(attention_bias=True).half())
    before = snapshot(model)
    for _ in range(3):  # b + s*lb - s*lb is not b after an fp16 rounding; the saved original is
        pylora.merge(model)
        pylora.unmerge(model)
    assert_same(model, before)

    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.base_layer.bias[3] = 65504.0  # float16's largest
        layer.lora_B_bias[3] = 40.0 / layer.scaling  # + 40 rounds to inf
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: merge_bias: the merged bias at \[3\] "
                                         r"is inf, not finite \(bias 65504 \+ scale 2 \* lora_B\.bias 20"):
        pylora.merge(model)
    assert_same(model, snap)
    assert not any(layer.merged for _, layer in pylora.lora_layers(model))


def test_a_bias_changed_while_merged_is_not_unmerged():
    model = lora_bias_model(llama(attention_bias=True))
    pylora.merge(model)
    layer = model.get_submodule("model.layers.0.self_attn.v_proj")
    with torch.no_grad():
        layer.base_layer.bias.add_(1.0)
    with pytest.raises(RuntimeError, match=r"the merged bias was modified after merge\(\)"):
        layer.unmerge()
    assert layer.merged


def test_merge_and_unload_builds_no_record_and_stays_all_or_nothing():
    """merge_and_unload merges the layers that cannot fail without a record (the same bits as with one),
    after every layer that might fail has merged with one: a late refusal still leaves the model as it was."""
    model = pylora.inject(llama(attention_bias=True).half(), pylora.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True))
    randomize_lora(model, seed=7, std=0.05)
    reference = copy.deepcopy(model)
    pylora.merge(reference)  # with records
    expected = {n: p.detach().clone() for n, p in reference.named_parameters() if ".base_layer." in n}
    plain = pylora.merge_and_unload(copy.deepcopy(model))
    for n, p in plain.named_parameters():
        key = n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if key in expected:
            assert torch.equal(bits(p), bits(expected[key])), n

    late = model.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        late.base_layer.weight[0, 0] = 65000.0
        late.lora_B[0] = 1.0
        late.lora_A[:, 0] = 500.0  # the last layer's merge overflows
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: merge_: the merged weight would not "
                                         r"be finite"):
        pylora.merge_and_unload(model)
    assert_same(model, snap)
    assert not any(layer.merged for _, layer in pylora.lora_layers(model))


def test_a_layer_merged_without_record_cannot_be_unmerged():
    model = lora_bias_model(llama(attention_bias=True))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    layer.merge(record=False)
    with pytest.raises(RuntimeError, match=r"merged without a record .* cannot be unmerged, only dropped"):
        layer.unmerge()
