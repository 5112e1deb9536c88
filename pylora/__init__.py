"""pylora: LoRA with compiled CPU and CUDA kernels.

Train adapters on any PyTorch model, merge and unmerge them exactly, serve many adapters in one
batch, and read and write PEFT's adapter format.

The package, bottom to top (imports go downward only): util (shared helpers), _ext (the compiled
kernels), ops (the functional API and its pure-torch twin), nn (config, LoRA layers, injection,
model-level merge), adapters (PEFT's format: one validated path for every source), serve (MultiLoRA
and its adapter pool), checkpoint (merging into a checkpoint on disk), cli (the command line).
"""
from pylora import _ext, ops  # noqa: F401
from pylora.adapters import AdapterError, load_adapter, save_adapter
from pylora.nn.config import LoraConfig
from pylora.nn.inject import (ModulesToSave, get_config, inject, lora_layers, lora_state_dict,
                              mark_only_lora_trainable)
from pylora.nn.layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from pylora.nn.merge import merge, merge_and_unload, unload, unmerge
from pylora.serve import MultiLoRA, PoolFullError, per_adapter_loss

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "mark_only_lora_trainable", "lora_state_dict", "merge", "unmerge", "merge_and_unload",
    "unload", "get_config", "lora_layers", "ModulesToSave", "LoraLayer", "LoraLinear", "LoraEmbedding",
    "LoraConv2d", "ops", "save_adapter", "load_adapter", "AdapterError", "MultiLoRA", "PoolFullError",
    "per_adapter_loss",
]
