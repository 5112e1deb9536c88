"""PEFT's adapter format, and Adapter: one adapter validated without a model, whatever its source.

On disk, what PEFT writes for LoRA, in DIR (a named adapter other than "default": DIR/<name>/):
  adapter_config.json          PEFT's LoraConfig fields (see pylora.adapters.config_json)
  adapter_model.safetensors    metadata {"format": "pt"}; every key is "base_model.model." + a name in
                               the model PEFT wrapped (keys without that prefix, as transformers'
                               own PEFT integration writes them, are read too):
    Linear / Conv1D   <module>.lora_A.weight [r, I]      <module>.lora_B.weight [O, r]
    Embedding         <module>.lora_embedding_A [r, V]   <module>.lora_embedding_B [D, r]
    Conv2d            <module>.lora_A.weight [r, C_in, kh, kw]   <module>.lora_B.weight [C_out, r, 1, 1]
    lora_bias=True    <module>.lora_B.bias [O]  (Linear, Conv1D, Conv2d)
    modules_to_save   <module>.<name> for every entry of the trained copy's state_dict
    bias="all"        every state_dict key ending in ".bias": a LoRA module's as <module>.base_layer.bias,
                      others under their own name; for a modules_to_save module PEFT's selector also
                      picks up <module>.original_module.bias and <module>.modules_to_save.bias, copies
                      that are written and read (checked) but not used: <module>.bias is the trained one
    bias="lora_only"  <module>.base_layer.bias of every LoRA module with a bias
    embeddings        PEFT's save_embedding_layers: the base tensors of a targeted input/output
                      embedding (<module>.base_layer.weight), or of an untargeted one (<module>.weight)
  adapter_model.bin            the same dict pickled by torch.save; read only with allow_pickle=True,
                               through torch.load(weights_only=True)

Names in an Adapter are the plain model's: module names without "base_model.model.", extra tensors
under the parameter names of the model before injection ("classifier.weight", "...q_proj.bias").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from pylora.adapters.errors import AdapterError
from pylora.nn.config import LoraConfig

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
MAX_CONFIG_BYTES = 16 * 2**20
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# PEFT's names for the embedding layers it saves whole (save_embedding_layers="auto").
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# The heads PEFT adds to modules_to_save for a task type; a model has one of them, so the others
# match nothing, which PEFT (and so pylora) accepts.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}
# File key suffix -> (family, role).
SUFFIXES = {
    "lora_A.weight": ("lora", "A"), "lora_B.weight": ("lora", "B"), "lora_B.bias": ("lora", "B_bias"),
    "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B"),
}
ROLE_SUFFIX = {("lora", "A"): "lora_A.weight", ("lora", "B"): "lora_B.weight", ("lora", "B_bias"): "lora_B.bias",
               ("embedding", "A"): "lora_embedding_A", ("embedding", "B"): "lora_embedding_B"}


@dataclass(frozen=True)
class ModuleWeights:
    """One LoRA module of an adapter, in PEFT's shapes.

    Semantics: kind "linear" (nn.Linear, GPT-2's Conv1D): A [r, I], B [O, r]; "embedding": A [r, V],
    B [D, r]; "conv2d": A [r, C_in, kh, kw], B [C_out, r, 1, 1]. lora_B_bias [O] with lora_bias, else
    None. alpha and r are the config's for this module (rank_pattern / alpha_pattern applied), scale
    is alpha / r (alpha / sqrt(r) with use_rslora).
    """

    kind: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    lora_B_bias: Optional[torch.Tensor]
    r: int
    alpha: float
    scale: float

    @property
    def in_features(self) -> int:
        return int(self.lora_A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])


@dataclass
class Adapter:
    """A validated adapter, read without a model (pylora.adapters.as_adapter makes one from any source).

    path: the adapter directory (for a model in memory, a description of it); weights_file: the file the
    tensors came from (None for a model in memory); config: its LoraConfig;
    raw_config: adapter_config.json as read; modules: module name -> ModuleWeights; extra_tensors: the
    other tensors it applies (modules_to_save copies, trained biases, embedding weights) under the plain
    model's parameter names, with extra_kinds[name] in "modules_to_save" | "bias" | "embedding";
    ignored: file key -> why it is not used (PEFT's redundant copies; unexpected keys with strict=False);
    key_prefix: "base_model.model." as PEFT writes keys, or "" for files without it.
    """

    path: str
    weights_file: Optional[str]
    config: LoraConfig
    raw_config: dict
    modules: dict[str, ModuleWeights]
    extra_tensors: dict[str, torch.Tensor]
    extra_kinds: dict[str, str]
    ignored: dict[str, str]
    key_prefix: str = PREFIX

    def _tensors(self) -> Iterable[torch.Tensor]:
        for m in self.modules.values():
            yield from (t for t in (m.lora_A, m.lora_B, m.lora_B_bias) if t is not None)
        yield from self.extra_tensors.values()

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self._tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def dtypes(self) -> list[torch.dtype]:
        return sorted({t.dtype for t in self._tensors()}, key=str)


@dataclass
class AdapterInspection:
    """What inspect_adapter found: everything it could read, and every problem. `adapter()` is the
    Adapter when there is no problem (AdapterError otherwise)."""

    path: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config_file: Optional[str] = None
    weights_file: Optional[str] = None
    raw_config: Optional[dict] = None
    config: Optional[LoraConfig] = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, ModuleWeights] = field(default_factory=dict)
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_kinds: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    key_prefix: str = PREFIX

    @property
    def ok(self) -> bool:
        return not self.problems

    def adapter(self) -> Adapter:
        if self.problems:
            raise AdapterError(self.problems, self.path)
        return Adapter(path=self.path, weights_file=self.weights_file, config=self.config,
                           raw_config=self.raw_config, modules=self.modules, extra_tensors=self.extra_tensors,
                           extra_kinds=self.extra_kinds, ignored=self.ignored, key_prefix=self.key_prefix)


