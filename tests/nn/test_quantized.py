"""LoRA over a quantized base (torchao int8 / int4 weight-only, bitsandbytes 8-bit / 4-bit), against PEFT
on the same quantized model: outputs, gradients, training steps, adapter files; merge refusal and the
explicit dequantize-merge-requantize. Each library is optional: its cases skip with the reason."""
import copy
import warnings

import pytest
import torch
from torch import nn

import pylora
from pylora.nn import quantized as quant
from pylora.nn.kinds import factor_dtype, factor_shapes, features, module_kind, quantization
from tests.helpers import tol
from tests.models import copy_lora_into_peft, ids, quantized_llama, randomize_lora

pytestmark = pytest.mark.filterwarnings("ignore")  # the libraries' own chatter (casts, deprecations)

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEME_OF = {"torchao-int8": "torchao", "torchao-int4": "torchao", "bnb-8bit": "bnb_int8", "bnb-4bit": "bnb_4bit"}
WEIGHT_CLASS = {"torchao-int8": "Int8Tensor", "torchao-int4": "IntxUnpackedToInt8Tensor", "bnb-8bit": "Int8Params",
                "bnb-4bit": "Params4bit"}


def cfg(**kw):
    return pylora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def pylora_and_peft(scheme, llama_dir, train=False):
    """The same quantized model twice, one with pylora, one with PEFT, with the same non-zero factors."""
    import peft

    model = pylora.inject(quantized_llama(scheme, llama_dir), cfg())
    pylora.mark_only_lora_trainable(model)
    randomize_lora(model)
    ref = peft.get_peft_model(quantized_llama(scheme, llama_dir), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                   target_modules=TARGETS))
    copy_lora_into_peft(model, ref)
    model.train(train)
    ref.train(train)
    return model, ref


def peft_factor(ref, name, which):
    return getattr(ref.base_model.model.get_submodule(name), which)["default"].weight


def dequantized(module):
    return quant.dequantize(module)


# ------------------------------------------------------------------------------------------------
# Recognising a quantized base
# ------------------------------------------------------------------------------------------------

def test_detection_kind_and_logical_shape(scheme, llama_dir):
    model = quantized_llama(scheme, llama_dir)
    q = model.model.layers[0].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj
    found = quantization(q)
    assert found is not None and found.scheme == SCHEME_OF[scheme]
    assert WEIGHT_CLASS[scheme] in found.description
    assert module_kind(q) == "linear"
    # From the module's attributes: a packed 4-bit weight is stored as [O*I/2, 1].
    assert features(q) == (64, 64) and features(down) == (128, 64)
    assert factor_shapes(down, 4)["A"] == (4, 128) and factor_shapes(down, 4)["B"] == (64, 4)
    assert factor_dtype(q) == torch.float32
    assert quantization(model.model.embed_tokens) is None and quantization(nn.Linear(4, 4)) is None


def test_detection_by_module_type_alone():
    """bitsandbytes' layers are recognised by their types before their weights are quantized, too."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    assert quantization(bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)).scheme == "bnb_int8"
    four = bnb.nn.Linear4bit(16, 8, quant_type="nf4")
    assert quantization(four).scheme == "bnb_4bit" and "nf4" in quantization(four).description
    layer = pylora.LoraLinear(four, r=2, lora_alpha=2)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.shape == (2, 16) and layer.lora_B.shape == (8, 2)


def test_inject_over_quantized_base(scheme, llama_dir):
    model = pylora.inject(quantized_llama(scheme, llama_dir), cfg())
    layers = dict(pylora.lora_layers(model))
    assert len(layers) == 3 * 2
    for name, layer in layers.items():
        assert layer.quantization.scheme == SCHEME_OF[scheme], name
        assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
        assert (layer.in_features, layer.out_features) == features(layer.base_layer)


# ------------------------------------------------------------------------------------------------
# Against PEFT on the same quantized base
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_and_gradients_match_peft(scheme, llama_dir, train):
    model, ref = pylora_and_peft(scheme, llama_dir, train)
    x = ids()
    out, expected = model(input_ids=x).logits, ref(input_ids=x).logits
    torch.testing.assert_close(out, expected, **tol(torch.float32))
    out.square().mean().backward()
    expected.square().mean().backward()
    for name, layer in pylora.lora_layers(model):
        for which in ("lora_A", "lora_B"):
            g, g_ref = getattr(layer, which).grad, peft_factor(ref, name, which).grad
            assert g is not None and g.abs().max() > 0, (name, which)
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7, msg=f"{name}.{which}")


def test_training_steps_match_peft(scheme, llama_dir):
    model, ref = pylora_and_peft(scheme, llama_dir, train=True)
    ours = [p for p in model.parameters() if p.requires_grad]
    theirs = [p for p in ref.parameters() if p.requires_grad]
    assert len(ours) == len(theirs) == 12
    opt, opt_ref = torch.optim.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    x = ids(batch=2, seq=10)
    losses = []
    for _ in range(3):
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            loss = m(input_ids=x, labels=x).loss
            loss.backward()
            o.step()
            if m is model:
                losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, layer in pylora.lora_layers(model):
        for which in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, which), peft_factor(ref, name, which), rtol=1e-4, atol=1e-6)


def test_dropout_masks_are_lora_linears(llama_dir):
    """The quantized path's dropout is the dense path's: over the dequantized weight, with the generator
    in the same state, the two layers add the same LoRA update."""
    base = quantized_llama("torchao-int8", llama_dir).model.layers[0].self_attn.q_proj
    dense = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        dense.weight.copy_(dequantized(base))
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    q_layer, d_layer = pylora.LoraLinear(base, **kw).train(), pylora.LoraLinear(dense, **kw).train()
    with torch.no_grad():
        d_layer.lora_A.copy_(q_layer.lora_A)
        d_layer.lora_B.copy_(q_layer.lora_B)
    x = torch.randn(3, 5, 64)
    torch.manual_seed(11)
    q_delta = q_layer(x) - base(x)
    torch.manual_seed(11)
    d_delta = d_layer(x) - dense(x)
    q_layer.eval()
    no_dropout = q_layer(x) - base(x)
    assert (q_delta - no_dropout).abs().max() > 1e-3  # dropout did act
    torch.testing.assert_close(q_delta, d_delta, rtol=1e-4, atol=1e-5)


def test_compute_dtype_follows_input_and_autocast(llama_dir):
    """Factors stay float32; the r-wide part runs in the input's dtype, or the autocast dtype."""
    base = quantized_llama("torchao-int8", llama_dir).model.layers[0].self_attn.q_proj
    layer = pylora.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(6, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_base = base(x)
    h = (x.bfloat16() @ layer.lora_A.bfloat16().t()) @ layer.lora_B.bfloat16().t() * layer.scaling
    assert layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(y.float(), (y_base.float() + h.float()).to(y.dtype).float(), **tol(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# Adapter files
# ------------------------------------------------------------------------------------------------

def test_save_load_roundtrip_and_peft_files(scheme, llama_dir, tmp_path):
    import peft
    from safetensors.torch import load_file

    model, ref = pylora_and_peft(scheme, llama_dir)
    x = ids()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    pylora.save_adapter(model, tmp_path / "ours")
    ref.save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for k in ours:
        assert ours[k].dtype == torch.float32
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    # Into a fresh quantized model, by pylora and by PEFT.
    loaded = pylora.load_adapter(quantized_llama(scheme, llama_dir), tmp_path / "ours")
    peft_loaded = peft.PeftModel.from_pretrained(quantized_llama(scheme, llama_dir), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(peft_loaded(input_ids=x).logits, expected, **tol(torch.float32))


def test_fit_reports_logical_shapes(llama_dir, tmp_path):
    """An adapter for another model size is refused against a 4-bit base, the message giving the module's
    [O, I], not the packed storage shape."""
    from tests.models import llama

    other = pylora.inject(llama(hidden=32), cfg())
    pylora.save_adapter(randomize_lora(other), tmp_path / "small")
    model = quantized_llama("bnb-4bit", llama_dir)
    with pytest.raises(pylora.AdapterError) as info:
        pylora.load_adapter(model, tmp_path / "small")
    message = str(info.value)
    assert "bitsandbytes 4-bit nf4 (Linear4bit, Params4bit), weight [64, 64]" in message
    assert "expected [4, 64]" in message
    assert not any(True for _ in pylora.lora_layers(model))


# ------------------------------------------------------------------------------------------------
# Merging into a quantized weight
# ------------------------------------------------------------------------------------------------

def weights_of(model):
    """Each quantized base's weight object and its dequantized values (identity and values must hold)."""
    out = {}
    for name, layer in pylora.lora_layers(model):
        if layer.quantization is not None:
            out[name] = (layer.base_layer.weight, dequantized(layer.base_layer))
    return out


def assert_weights(model, before):
    for name, layer in pylora.lora_layers(model):
        if name in before:
            W, values = before[name]
            assert layer.base_layer.weight is W, name
            assert torch.equal(dequantized(layer.base_layer), values), name


def test_merge_is_refused_before_anything_is_written(scheme, llama_dir):
    model = pylora.inject(quantized_llama(scheme, llama_dir), pylora.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS + ["lm_head"]))
    randomize_lora(model)
    lm_head = model.lm_head.base_layer.weight
    assert quantization(model.lm_head.base_layer) is None or scheme.startswith("torchao")
    head_before = lm_head.detach().clone() if quantization(model.lm_head.base_layer) is None else None
    x = ids()
    with torch.no_grad():
        out = model(input_ids=x).logits
    # After a forward: on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place on its first
    # inference forward (absmax rounded to bfloat16), its own doing.
    before = weights_of(model)
    for call in (pylora.merge, pylora.merge_and_unload):
        with pytest.raises(ValueError) as info:
            call(model)
        message = str(info.value)
        assert message.startswith("model.layers.0.self_attn.q_proj: LoraLinear.merge: the base weight is quantized")
        assert WEIGHT_CLASS[scheme] in message and "dequantize=True" in message
    layer = model.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    assert not any(layer.merged for _, layer in pylora.lora_layers(model))
    assert len(list(pylora.lora_layers(model))) == 7  # merge_and_unload unloaded nothing
    assert_weights(model, before)
    if head_before is not None:  # a dense layer beside them was not merged either (checked first)
        assert torch.equal(model.lm_head.base_layer.weight, head_before)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, out, rtol=0, atol=0)


def requantized_oracle(scheme, base, target):
    """`target` quantized by the library itself, with the scheme the model was built with, dequantized."""
    if scheme.startswith("torchao"):
        from torchao.quantization import quantize_

        from tests.models import quant_config

        lin = nn.Linear(target.shape[1], target.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(target)
        quantize_(lin, quant_config(scheme).quant_type)
        return lin.weight.dequantize().float()
    import bitsandbytes as bnb

    if scheme == "bnb-8bit":
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(target.half())
        return bnb.functional.int8_vectorwise_dequant(CB, SCB).float()
    W = base.weight
    q, state = bnb.functional.quantize_4bit(target, blocksize=W.blocksize, quant_type=W.quant_type,
                                            compress_statistics=W.compress_statistics)
    return bnb.functional.dequantize_4bit(q, state).float()


def test_dequantize_merge_requantize(scheme, llama_dir):
    model = pylora.inject(quantized_llama(scheme, llama_dir), cfg())
    randomize_lora(model, std=0.05)
    x = ids()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits
    before = weights_of(model)
    expected = {}
    for name, layer in pylora.lora_layers(model):
        target = before[name][1].clone()
        pylora.ops.merge_(target, layer.lora_A, layer.lora_B, layer.scaling)  # float32 merge arithmetic
        exact = before[name][1].double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
        torch.testing.assert_close(target.double(), exact, rtol=1e-6, atol=1e-6)
        expected[name] = requantized_oracle(scheme, layer.base_layer, target)
    pylora.merge(model, dequantize=True)
    for name, layer in pylora.lora_layers(model):
        assert layer.merged and type(layer.base_layer.weight).__name__ == WEIGHT_CLASS[scheme]
        assert layer.base_layer.weight is not before[name][0]
        # The same scheme as the library's own quantization of the merged float weight.
        torch.testing.assert_close(dequantized(layer.base_layer), expected[name], rtol=0, atol=1e-6)
    with torch.no_grad():
        merged = model(input_ids=x).logits
    assert (merged - unmerged).abs().max() < 0.25 * unmerged.abs().max()  # near, within quantization error
    # unmerge puts the original quantized weights back, and the outputs with them.
    pylora.unmerge(model)
    assert_weights(model, before)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, unmerged, rtol=0, atol=0)


def test_merge_and_unload_dequantize_keeps_the_scheme(scheme, llama_dir):
    model = pylora.inject(quantized_llama(scheme, llama_dir), cfg())
    randomize_lora(model, std=0.05)
    x = ids()
    with torch.no_grad():
        pylora.merge(model, dequantize=True)
        merged = model(input_ids=x).logits
    pylora.unmerge(model)
    plain = pylora.merge_and_unload(model, dequantize=True)
    assert not any(True for _ in pylora.lora_layers(plain))
    q = plain.model.layers[0].self_attn.q_proj
    assert quantization(q).scheme == SCHEME_OF[scheme] and type(q.weight).__name__ == WEIGHT_CLASS[scheme]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, merged, rtol=0, atol=0)


def test_unmerge_refuses_a_replaced_weight(llama_dir):
    model = pylora.inject(quantized_llama("torchao-int8", llama_dir), cfg())
    layer = model.model.layers[0].self_attn.q_proj
    layer.merge(dequantize=True)
    layer.base_layer.weight = copy.deepcopy(layer.base_layer.weight)
    with pytest.raises(RuntimeError, match="modified after merge"):
        layer.unmerge()


def test_merge_dequantize_of_an_unknown_torchao_tensor_is_refused(llama_dir, monkeypatch):
    model = pylora.inject(quantized_llama("torchao-int8", llama_dir), cfg())
    monkeypatch.setattr(quant, "TORCHAO_REQUANTIZABLE", ("IntxUnpackedToInt8Tensor",))
    before = weights_of(model)
    with pytest.raises(ValueError, match="does not know the scheme of a torchao Int8Tensor"):
        pylora.merge(model, dequantize=True)
    assert_weights(model, before)


def test_torchao_int4_weight_only_config(llama_dir):
    """torchao's Int4WeightOnlyConfig (Int4Tensor): its kernels need the mslk package or a GPU. Where it
    quantizes, the LoRA layer adds its update to the base's own forward; elsewhere the reason is shown."""
    pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    base = nn.Linear(64, 64, dtype=torch.bfloat16)
    try:
        quantize_(base, Int4WeightOnlyConfig(group_size=32))
        x = torch.randn(4, 64, dtype=torch.bfloat16)
        base(x)
    except (ImportError, RuntimeError, NotImplementedError, AssertionError) as exc:
        pytest.skip(f"torchao Int4WeightOnlyConfig cannot run here: {type(exc).__name__}: {exc}")
    layer = pylora.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert layer.quantization.scheme == "torchao" and layer.lora_A.dtype == torch.float32
    h = (x @ layer.lora_A.bfloat16().t()) @ layer.lora_B.bfloat16().t() * layer.scaling
    torch.testing.assert_close(layer(x), base(x) + h, **tol(torch.bfloat16))
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()


def test_dense_layers_ignore_dequantize(llama_dir):
    from tests.models import tiny_llama

    model = pylora.inject(tiny_llama(), cfg())
    randomize_lora(model)
    W = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pylora.merge(model, dequantize=True)
    pylora.unmerge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, W)


def test_lora_bias_over_a_quantized_base_matches_peft(llama_dir):
    """lora_bias (PEFT's option; PEFT supports it over bitsandbytes layers): s·lora_B.bias joins the update."""
    import peft

    targets = ["q_proj", "v_proj"]
    model = pylora.inject(quantized_llama("bnb-4bit", llama_dir),
                          pylora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True))
    randomize_lora(model)
    ref = peft.get_peft_model(quantized_llama("bnb-4bit", llama_dir),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_bias=True))
    copy_lora_into_peft(model, ref)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, **tol(torch.float32))
