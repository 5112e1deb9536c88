"""MultiLoRA's adapter dtype over a bfloat16 model: the default keeps adapters in the model's dtype (as
vLLM does); dtype=torch.float32 keeps them in float32 and computes every update in fp32, as PEFT does,
rounding once into the bf16 activation. Tested against PEFT over the same bf16 base with the same fp32
factors: the fp32 server is the closer."""
import warnings

import pytest
import torch

import pylora
from tests.models import copy_lora_into_peft, ids, randomize_lora, tiny_llama

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128


@pytest.fixture(scope="module")
def adapters():
    out = {}
    for i in range(4):
        m = pylora.inject(tiny_llama(), pylora.LoraConfig(r=4 + 2 * i, lora_alpha=16, target_modules="all-linear"))
        out[f"a{i}"] = randomize_lora(m, seed=i, std=0.05)
    return out


def peft_way(adapter, x):
    """PEFT over a bf16 base: its factors stay float32, each update computed in fp32 and added once."""
    cfg = pylora.get_config(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama().to(torch.bfloat16),
                                 peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules="all-linear"))
    copy_lora_into_peft(adapter, pm)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        return pm.eval()(input_ids=x).logits.float()


def served(adapters, x, dtype):
    """Row i of x through adapter i of a MultiLoRA over a bf16 model whose pool holds dtype (bf16 logits)."""
    server = pylora.MultiLoRA(tiny_llama().to(torch.bfloat16), dtype=dtype)
    for n, m in adapters.items():
        server.load_adapter(n, m)
    assert server.pool.modules["model.layers.0.self_attn.q_proj"].A_rows.dtype == dtype
    out = server(input_ids=x, adapter_names=list(adapters)).logits
    assert out.dtype == torch.bfloat16
    return out.float()


def test_fp32_adapters_over_bf16_are_closer_to_the_fp32_updates(adapters):
    x = ids(batch=4, seq=10, vocab=VOCAB, seed=3)
    names = list(adapters)
    expected = torch.stack([peft_way(adapters[n], x[i:i + 1])[0] for i, n in enumerate(names)])
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        out = served(adapters, x, dtype)
        errors[dtype] = float((out - expected).abs().max() / expected.abs().max())
    assert errors[torch.float32] < errors[torch.bfloat16]
    assert errors[torch.float32] < 2e-2  # bf16 activations between layers; the updates themselves in fp32


def test_the_errors_are_what_each_choice_promises(adapters):
    """Greedy tokens: the fp32 pool agrees with PEFT at least as often as the bf16 pool (whose factors and
    updates are rounded to bf16), and in nine tokens of ten or more here."""
    x = ids(batch=4, seq=10, vocab=VOCAB, seed=5)
    names = list(adapters)
    expected = torch.stack([peft_way(adapters[n], x[i:i + 1])[0] for i, n in enumerate(names)])
    agree = {}
    for dtype in (torch.bfloat16, torch.float32):
        out = served(adapters, x, dtype)
        agree[dtype] = float((out.argmax(-1) == expected.argmax(-1)).float().mean())
    assert agree[torch.float32] >= agree[torch.bfloat16] and agree[torch.float32] >= 0.9
