"""MultiLoRA over a quantized base model (torchao int8 / int4 weight-only, bitsandbytes 8-bit / 4-bit):
served rows equal the single-adapter model's outputs, and joint training over the quantized base trains
as a pylora-injected model does. Each library is optional: its cases skip with the reason."""
import pytest
import torch

import pylora
from tests.helpers import rel_err, tol
from tests.models import ids, quantized_llama, randomize_lora

pytestmark = pytest.mark.filterwarnings("ignore")  # the libraries' own chatter (casts, deprecations)


# Served rows add the LoRA update with lora_apply_ rather than the layer's lora_multi: the same sums, summed
# in another order (~1e-7 apart). bitsandbytes' 4-bit CPU kernel (AVX512-BF16, inference) rounds its
# input to bfloat16, where so small a difference can move a value by one bfloat16 step.
ROW_TOL = {"torchao-int8": 1e-5, "torchao-int4": 1e-5, "bnb-8bit": 1e-5, "bnb-4bit": 1e-3}


def trained(scheme, llama_dir, targets, seed, directory):
    """A pylora adapter over the quantized model (random non-zero factors), saved to `directory`."""
    model = pylora.inject(quantized_llama(scheme, llama_dir),
                          pylora.LoraConfig(r=4 + seed, lora_alpha=8, target_modules=targets))
    randomize_lora(model, seed=seed)
    pylora.save_adapter(model, directory)
    return model


def test_served_rows_equal_single_adapter_models(scheme, llama_dir, tmp_path):
    alice = trained(scheme, llama_dir, ["q_proj", "v_proj"], 0, tmp_path / "alice")
    bob = trained(scheme, llama_dir, ["v_proj", "o_proj", "down_proj"], 1, tmp_path / "bob")
    base = quantized_llama(scheme, llama_dir)
    server = pylora.MultiLoRA(quantized_llama(scheme, llama_dir)).eval()
    assert server.dtype == torch.float32
    server.load_adapter("alice", tmp_path / "alice")
    server.load_adapter("bob", tmp_path / "bob")
    x = ids(batch=3)
    out = server(input_ids=x, adapter_names=["alice", None, "bob"]).logits
    with torch.no_grad():
        expected = [alice(input_ids=x[:1]).logits, base(input_ids=x[1:2]).logits, bob(input_ids=x[2:]).logits]
    for row, want in enumerate(expected):
        assert rel_err(out[row:row + 1], want) < ROW_TOL[scheme], row
    # The adapters do act: each served row differs from the base model's.
    with torch.no_grad():
        plain = base(input_ids=x).logits
    assert (out[0] - plain[0]).abs().max() > 1e-3 and (out[2] - plain[2]).abs().max() > 1e-3


def test_joint_training_over_a_quantized_base(scheme, llama_dir, tmp_path):
    """A trainable adapter over the quantized base: its rows' outputs, gradients and an optimizer step equal
    those of the same adapter injected with pylora; saved, it loads back into a fresh quantized model."""
    single = trained(scheme, llama_dir, ["q_proj", "v_proj"], 0, tmp_path / "carol")
    pylora.mark_only_lora_trainable(single)
    server = pylora.MultiLoRA(quantized_llama(scheme, llama_dir))
    server.load_adapter("carol", tmp_path / "carol", trainable=True)
    server.add_adapter("dave", pylora.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    server.train()
    single.train()
    x = ids(batch=3)
    names = ["carol", None, "dave"]
    logits = server(input_ids=x, adapter_names=names).logits
    loss, losses = pylora.per_adapter_loss(logits, x, names)
    loss.backward()
    ref_loss, _ = pylora.per_adapter_loss(single(input_ids=x[:1]).logits, x[:1], ["carol"])
    ref_loss.backward()
    torch.testing.assert_close(losses["carol"], ref_loss, **tol(torch.float32))
    for name, layer in pylora.lora_layers(single):
        factors = server.trainable_adapters["carol"].of(name)
        for which in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(factors, which).grad, getattr(layer, which).grad, rtol=1e-4, atol=1e-7,
                                       msg=f"{name}.{which}")
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in server.adapter_parameters("dave")
               if p.shape[1] == 2)  # dave's B (zero at init) receives a gradient
    opt = torch.optim.SGD(server.adapter_parameters("carol"), lr=0.1)
    opt_ref = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    opt_ref.step()
    server.eval()
    single.eval()
    out = server(input_ids=x, adapter_names=["carol"] * 3).logits
    with torch.no_grad():
        torch.testing.assert_close(out, single(input_ids=x).logits, **tol(torch.float32))
    server.save_adapter("carol", tmp_path / "carol-trained")
    loaded = pylora.load_adapter(quantized_llama(scheme, llama_dir), tmp_path / "carol-trained")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, out, **tol(torch.float32))
