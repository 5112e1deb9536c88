"""LoRA layers and injection on real (tiny) transformers models: configuration, target matching,
outputs and gradients equal to PEFT's, training, exact merge/unmerge, modules_to_save."""
import copy
import math

import pytest
import torch
from torch import nn

import pylora
from tests.models import ConvNet, copy_lora_into_peft, ids, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def weights_bits(model):
    return {n: p.detach().clone().view(torch.uint8) if p.dtype != torch.bool else p.clone()
            for n, p in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# LoraConfig
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, pattern", [
    ({"r": 0}, r"r=0 must be an integer >= 1"),
    ({"r": 2.5}, r"r=2\.5 must be an integer >= 1"),
    ({"lora_alpha": float("inf")}, r"lora_alpha=inf must be a finite number > 0"),
    ({"lora_alpha": 0}, r"lora_alpha=0 must be a finite number > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1\.0 must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, r"lora_dropout=-0\.1 must be in \[0, 1\)"),
    ({"bias": "some"}, r"bias='some' must be one of 'none', 'all', 'lora_only'"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported"),
    ({"use_dora": True}, r"use_dora=True is not supported"),
    ({"target_modules": "q_proj("}, r"target_modules='q_proj\(' is not a valid regular expression"),
    ({"target_modules": []}, r"target_modules=\[\] must be a non-empty list"),
    ({"rank_pattern": {"v_proj": 0}}, r"rank_pattern\['v_proj'\]=0 must be an integer >= 1"),
    ({"alpha_pattern": {"v_proj": -2}}, r"alpha_pattern\['v_proj'\]=-2 must be a finite number > 0"),
    ({"layers_to_transform": [0, -1]}, r"layers_to_transform=\[0, -1\] must be layer indices >= 0"),
])
def test_config_rejects_bad_values(kwargs, pattern):
    base = {"target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=pattern):
        pylora.LoraConfig(**{**base, **kwargs})


def test_target_matching_follows_peft():
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    cases = [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": r".*\.layers\.1\..*_proj"},
        {"target_modules": "all-linear"},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": ["mlp.up_proj", "self_attn.q_proj"]},
    ]
    for kwargs in cases:
        ours = pylora.inject(tiny_llama(), pylora.LoraConfig(r=2, **kwargs))
        theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, **kwargs))
        want = sorted(n[len("base_model.model."):] for n, m in theirs.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer))
        got = sorted(n for n, _ in pylora.lora_layers(ours))
        assert got == want, kwargs
        assert "lm_head" not in got and set(got) <= set(names)


def test_rank_and_alpha_patterns():
    cfg = pylora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"v_proj": 16, r"layers\.1\.self_attn\.q_proj": 2},
                            alpha_pattern={"q_proj": 3}, use_rslora=True)
    model = pylora.inject(tiny_llama(), cfg)
    layers = dict(pylora.lora_layers(model))
    assert layers["model.layers.0.self_attn.v_proj"].r == 16
    assert layers["model.layers.1.self_attn.q_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].r == 4
    assert layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(3 / math.sqrt(4))
    assert layers["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(8 / math.sqrt(16))


def test_injection_errors_leave_model_untouched():
    model = tiny_llama()
    before = weights_bits(model)
    structure = [type(m).__name__ for m in model.modules()]
    bad = [
        (pylora.LoraConfig(target_modules=["nope"]), r"target_modules=\['nope'\] matched no module of "
                                                     r"LlamaForCausalLM; its modules include: .*q_proj"),
        (pylora.LoraConfig(target_modules=["q_proj"], rank_pattern={"k_proj": 4}),
         r"rank_pattern key 'k_proj' matches none of the targeted modules"),
        (pylora.LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]),
         r"modules_to_save entry 'classifier' matches no module"),
        (pylora.LoraConfig(target_modules=["input_layernorm"]), r"LlamaRMSNorm is not supported by LoRA"),
    ]
    for cfg, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            pylora.inject(model, cfg)
        assert [type(m).__name__ for m in model.modules()] == structure
        after = weights_bits(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    pylora.inject(model, pylora.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds pylora LoRA layers"):
        pylora.inject(model, pylora.LoraConfig(target_modules=["v_proj"]))


# ----------------------------------------------------------------------------------------------
# Outputs and gradients equal PEFT's
# ----------------------------------------------------------------------------------------------

def _peft_pair(make, cfg_kwargs, seed=0):
    ours = pylora.inject(make(), pylora.LoraConfig(**cfg_kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**cfg_kwargs))
    randomize_lora(ours, seed)
    copy_lora_into_peft(ours, theirs)
    return ours, theirs


def _compare_with_peft(ours, theirs, inputs, out_fn):
    ours.train()
    theirs.train()  # dropout 0: train mode only enables gradients' paths
    y1, y2 = out_fn(ours(**inputs)), out_fn(theirs(**inputs))
    assert rel_err(y1, y2) < 1e-5
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    root = theirs.base_model.model
    checked = 0
    for name, layer in pylora.lora_layers(ours):
        t = root.get_submodule(name)
        if isinstance(layer, pylora.LoraEmbedding):
            pa, pb = t.lora_embedding_A["default"], t.lora_embedding_B["default"]
        else:
            pa, pb = t.lora_A["default"].weight, t.lora_B["default"].weight
        assert rel_err(layer.lora_A.grad, pa.grad) < 1e-5, name
        assert rel_err(layer.lora_B.grad, pb.grad) < 1e-5, name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_llama_matches_peft(targets):
    ours, theirs = _peft_pair(tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": targets})
    _compare_with_peft(ours, theirs, {"input_ids": ids()}, lambda o: o.logits)


def test_llama_rank_alpha_patterns_rslora_match_peft():
    kw = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True,
          "rank_pattern": {"v_proj": 8, "down_proj": 2}, "alpha_pattern": {"o_proj": 3}}
    ours, theirs = _peft_pair(tiny_llama, kw)
    _compare_with_peft(ours, theirs, {"input_ids": ids()}, lambda o: o.logits)


def test_gpt2_conv1d_matches_peft():
    with pytest.warns(UserWarning, match="Conv1D stores its weight as \\[in, out\\]"):
        ours = pylora.inject(tiny_gpt2(), pylora.LoraConfig(r=4, target_modules=["c_attn"]))
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    layer = dict(pylora.lora_layers(ours))["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out and layer.in_features == 64 and layer.out_features == 192
    randomize_lora(ours)
    copy_lora_into_peft(ours, theirs)
    _compare_with_peft(ours, theirs, {"input_ids": ids()}, lambda o: o.logits)


def test_bert_query_value_with_bias_matches_peft():
    kw = {"r": 4, "target_modules": ["query", "value"], "lora_bias": True}
    ours, theirs = _peft_pair(tiny_bert, kw)
    _compare_with_peft(ours, theirs, {"input_ids": ids()}, lambda o: o.logits)


def test_embedding_target_matches_peft():
    ours, theirs = _peft_pair(tiny_llama, {"r": 4, "target_modules": ["embed_tokens", "q_proj"]})
    assert isinstance(dict(pylora.lora_layers(ours))["model.embed_tokens"], pylora.LoraEmbedding)
    _compare_with_peft(ours, theirs, {"input_ids": ids()}, lambda o: o.logits)


def test_conv2d_matches_peft():
    x = torch.randn(2, 3, 12, 12)
    ours, theirs = _peft_pair(ConvNet, {"r": 3, "lora_alpha": 6, "target_modules": ["conv1", "conv2", "head"]})
    _compare_with_peft(ours, theirs, {"x": x}, lambda o: o)


# ----------------------------------------------------------------------------------------------
# Training, merging
# ----------------------------------------------------------------------------------------------

def test_training_loss_falls_and_only_adapter_changes():
    torch.manual_seed(0)
    model = tiny_llama()
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    pylora.inject(model, pylora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05,
                                           modules_to_save=["lm_head"]))
    pylora.mark_only_lora_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or n == "lm_head.trained_module.weight"
                             for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    # A synthetic task: predict the next token of a fixed cyclic sequence.
    seq = torch.arange(16).repeat(4, 3) % 128
    model.train()
    losses = []
    for _ in range(40):
        out = model(input_ids=seq, labels=seq)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n.replace("base_layer.", "").replace("original_module.", "")])


@pytest.mark.parametrize("make, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_fc"]),
                                           (tiny_llama, ["embed_tokens", "v_proj"]),
                                           (ConvNet, ["conv1", "conv2", "head"])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_exact_on_models(make, targets, dtype):
    model = make().to(dtype)
    before = weights_bits(model)
    with pytest.warns(UserWarning) if make is tiny_gpt2 else _nullcontext():
        pylora.inject(model, pylora.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model, std=0.05)
    inputs = (torch.randn(2, 3, 12, 12).to(dtype),) if make is ConvNet else (ids(),)
    out = (lambda o: o) if make is ConvNet else (lambda o: o.logits)
    with torch.no_grad():
        y_lora = out(model(*inputs)).float()
        pylora.merge(model)
        y_merged = out(model(*inputs)).float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        assert rel_err(y_merged, y_lora) < tol
        for cycle in range(3):
            pylora.unmerge(model)
            pylora.merge(model)
        pylora.unmerge(model)
    pylora.unload(model)
    after = weights_bits(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_merge_refusals():
    model = pylora.inject(tiny_llama(), pylora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    layer.merge()
    model.train()
    with pytest.raises(RuntimeError, match="merged and the layer is training with lora_dropout=0.1"):
        model(ids())
    model.eval()
    model(ids())
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    # A weight changed while merged cannot be unmerged exactly: refused.
    layer.merge()
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified after merge"):
        layer.unmerge()


def test_nonfinite_merge_names_layer_and_is_all_or_nothing():
    model = pylora.inject(tiny_llama().half(), pylora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    bad = model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        bad.lora_B[3, 0] = 1e4
        bad.lora_A[0, 5] = 1e4
    before = weights_bits(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.v_proj: merge_: the merged weight would "
                                         r"not be finite at weight\[3, 5\]"):
        pylora.merge(model)
    assert not any(layer.merged for _, layer in pylora.lora_layers(model))
    after = weights_bits(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bias_modes_and_state_dict():
    for bias, extra in (("none", set()), ("lora_only", {"bias"}), ("all", {"bias"})):
        model = pylora.inject(tiny_bert(), pylora.LoraConfig(r=2, target_modules=["query", "value"], bias=bias))
        pylora.mark_only_lora_trainable(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = pylora.lora_state_dict(model)
        assert set(sd) == trainable
        kinds = {n.rsplit(".", 1)[-1] for n in trainable}
        assert kinds == {"lora_A", "lora_B"} | extra
        if bias == "lora_only":
            assert all("query.base_layer" in n or "value.base_layer" in n for n in trainable if n.endswith("bias"))
        if bias == "all":
            assert any("LayerNorm.bias" in n for n in trainable)


def test_modules_to_save_and_merge_and_unload():
    model = tiny_bert()
    head_before = model.classifier.weight.clone()
    cfg = pylora.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    pylora.inject(model, cfg)
    pylora.mark_only_lora_trainable(model)
    randomize_lora(model)
    assert isinstance(model.classifier, pylora.ModulesToSave)
    assert model.classifier.trained_module.weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad
    assert "classifier.trained_module.weight" in pylora.lora_state_dict(model)
    with torch.no_grad():
        model.classifier.trained_module.weight.add_(0.5)
        y = model(ids()).logits
    plain = pylora.merge_and_unload(model)
    assert not any(isinstance(m, (pylora.LoraLayer, pylora.ModulesToSave)) for m in plain.modules())
    assert pylora.get_config(plain) is None
    with torch.no_grad():
        assert rel_err(plain(ids()).logits, y) < 1e-5
    assert torch.equal(plain.classifier.weight, head_before + 0.5)


def test_layer_dtype_policy():
    model = pylora.inject(tiny_llama().to(torch.bfloat16), pylora.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.float32  # factors train in fp32 over a half-precision base
    with torch.no_grad():
        y = model(ids()).logits
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_unsupported_conv_options_named():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"0\.groups=2 is not supported"):
        pylora.inject(net, pylora.LoraConfig(target_modules=["0"]))
    assert isinstance(net[0], nn.Conv2d)
    copy.deepcopy(net)


@pytest.mark.cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_on_gpu_matches_cpu(dropout):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    results = {}
    for device in ("cpu", "cuda"):
        model = pylora.inject(tiny_llama(), pylora.LoraConfig(r=8, target_modules="all-linear", lora_dropout=dropout))
        randomize_lora(model)
        pylora.mark_only_lora_trainable(model)
        model.to(device).train()
        torch.manual_seed(3)  # the same dropout seeds on both devices: the mask is a hash of (seed, t, i)
        out = model(input_ids=ids().to(device), labels=ids().to(device))
        out.loss.backward()
        results[device] = (out.logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                                        if p.requires_grad})
        with torch.no_grad():
            before = {n: p.clone() for n, p in model.named_parameters()}
            pylora.merge(model)
            pylora.unmerge(model)
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (y_cpu, g_cpu), (y_gpu, g_gpu) = results["cpu"], results["cuda"]
    assert rel_err(y_gpu, y_cpu) < 1e-4
    for n in g_cpu:
        assert rel_err(g_gpu[n], g_cpu[n]) < 1e-3, n
