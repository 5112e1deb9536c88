"""The tests' models, one builder per architecture: tiny transformers models built from configs with
random weights (no model hub is reachable), seeded, in eval mode, and two small conv nets. llama /
gpt2 / bert take their sizes as arguments (the adapter-file tests' defaults: VOCAB, hidden 32);
tiny_* are the wider presets of the layer and serving tests. BUILDERS, inputs and output serve the
tests that run one case per architecture."""
import torch
from torch import nn

VOCAB = 96


class ConvNet(nn.Module):
    """A small image classifier with Conv2d layers to target."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


def ids(batch=2, seq=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def randomize_lora(model, seed=0, std=0.1):
    """Non-zero A and B everywhere (a zero B would make every parity test pass)."""
    import pylora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pylora.lora_layers(model):
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if getattr(layer, "lora_B_bias", None) is not None:
                layer.lora_B_bias.copy_(torch.randn(layer.lora_B_bias.shape, generator=g) * std)
    return model


def copy_lora_into_peft(model, peft_model, adapter="default"):
    """Give a PEFT model the same adapter weights as a pylora model (same module names)."""
    import pylora

    root = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in pylora.lora_layers(model):
            target = root.get_submodule(name)
            if isinstance(layer, pylora.LoraEmbedding):
                target.lora_embedding_A[adapter].copy_(layer.lora_A)
                target.lora_embedding_B[adapter].copy_(layer.lora_B)
            else:
                target.lora_A[adapter].weight.copy_(layer.lora_A)
                target.lora_B[adapter].weight.copy_(layer.lora_B)
                if getattr(layer, "lora_B_bias", None) is not None:
                    target.lora_B[adapter].bias.copy_(layer.lora_B_bias)


def llama(seed=1234, vocab=VOCAB, hidden=32, layers=2, positions=64, attention_bias=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=positions, attention_bias=attention_bias)).eval()


def gpt2(seed=1234, vocab=VOCAB, hidden=32, layers=2, positions=64, special_tokens=True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    ids = {"bos_token_id": 0, "eos_token_id": 0} if special_tokens else {}
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)).eval()


def bert(seed=1234, vocab=VOCAB, hidden=32, layers=2, positions=64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                                    num_attention_heads=4, intermediate_size=2 * hidden,
                                                    max_position_embeddings=positions, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, num_labels=3)).eval()


# The layer and serving tests' sizes (seed 0, a wider model).
def tiny_llama(seed=0, vocab=128, hidden=64, layers=2):
    return llama(seed, vocab, hidden, layers, positions=256)


def tiny_gpt2(seed=0, vocab=128, hidden=64, layers=2):
    return gpt2(seed, vocab, hidden, layers, positions=128, special_tokens=False)


def tiny_bert(seed=0, vocab=128, hidden=64, layers=2):
    return bert(seed, vocab, hidden, layers, positions=128)


class ConvEmbNet(nn.Module):
    """A Conv2d, an Embedding and a Linear head: the layer kinds transformers models here lack."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x, idx):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)) + self.emb(idx))


def convnet(seed=1234):
    torch.manual_seed(seed)
    return ConvEmbNet().eval()


def inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(7)
    if kind == "convnet":
        return {"x": torch.randn(2, 3, 9, 9, generator=g), "idx": torch.tensor([3, 7])}
    return {"input_ids": torch.randint(0, VOCAB, (2, 11), generator=g)}


def output(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(kind))
    return out if isinstance(out, torch.Tensor) else out.logits


BUILDERS = {"llama": llama, "gpt2": gpt2, "bert": bert, "convnet": convnet}


# Quantized bases: tiny_llama loaded through transformers' quantization configs, on the CPU. Each
# library is optional: quantized_llama skips the test, with the reason, when it is missing or cannot
# quantize on this machine.
QUANT_SCHEMES = ("torchao-int8", "torchao-int4", "bnb-8bit", "bnb-4bit")


def quant_config(scheme: str):
    """The transformers quantization config of a scheme (pytest.skip when its library is missing).
    torchao-int4 is IntxWeightOnlyConfig(int4, groups of 32), torchao's int4 weight-only path on a CPU
    (Int4WeightOnlyConfig needs the mslk kernels or a GPU)."""
    import pytest

    if scheme.startswith("torchao"):
        pytest.importorskip("torchao", reason="torchao is not installed (pip install 'pylora[quant]')")
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig

        quant = Int8WeightOnlyConfig() if scheme == "torchao-int8" else \
            IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        return TorchAoConfig(quant_type=quant)
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'pylora[quant]')")
    from transformers import BitsAndBytesConfig

    if scheme == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def quantized_llama(scheme: str, directory) -> nn.Module:
    """tiny_llama() quantized with `scheme`, loaded as a user would (from_pretrained with a quantization
    config) from `directory`, where it is saved first if it is not there yet."""
    import os
    import warnings

    import pytest
    from transformers import LlamaForCausalLM

    directory = str(directory)
    if not os.path.exists(os.path.join(directory, "config.json")):
        tiny_llama().save_pretrained(directory)
    config = quant_config(scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = LlamaForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu")
        except (ImportError, RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"{scheme} cannot quantize on this machine: {type(exc).__name__}: {exc}")
    return model.eval()
