"""Tiny models with random weights, built from configs (no model hub), and inputs for them: the
bases of the adapter-file tests. Each builder is seeded, so two calls give the same weights."""
import torch
from torch import nn

VOCAB = 96


def _seeded(fn):
    def build(seed: int = 1234):
        torch.manual_seed(seed)
        return fn().eval()
    build.__name__ = fn.__name__
    return build


@_seeded
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@_seeded
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


@_seeded
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3))


class ConvNet(nn.Module):
    """A Conv2d, an Embedding and a Linear head: the layer kinds transformers models here lack."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x, idx):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)) + self.emb(idx))


@_seeded
def convnet():
    return ConvNet()


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
