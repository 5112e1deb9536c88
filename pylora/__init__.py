"""pylora: LoRA with compiled CPU and CUDA kernels.

Train adapters on any PyTorch model, merge and unmerge them exactly, serve many adapters in one
batch, and read and write PEFT's adapter format.
"""
from pylora import _ext, ops  # noqa: F401
from pylora.config import LoraConfig
from pylora.io import AdapterError, load_adapter, save_adapter  # noqa: F401
from pylora.inject import (ModulesToSave, get_config, inject, lora_layers, lora_state_dict,
                           mark_only_lora_trainable, merge, merge_and_unload, unload, unmerge)
from pylora.layers import LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear
from pylora.multi import MultiLoRA
from pylora.pool import PoolFullError

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "mark_only_lora_trainable", "lora_state_dict", "merge", "unmerge", "merge_and_unload",
    "unload", "get_config", "lora_layers", "ModulesToSave", "LoraLayer", "LoraLinear", "LoraEmbedding",
    "LoraConv2d", "ops", "save_adapter", "load_adapter", "AdapterError", "MultiLoRA", "PoolFullError",
]
