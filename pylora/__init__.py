"""pylora: LoRA with compiled CPU and CUDA kernels.

Train adapters on any PyTorch model, merge and unmerge them exactly, serve many adapters in one
batch, and read and write PEFT's adapter format.

The package, bottom to top (imports go downward only): util (shared helpers), _ext (the compiled
kernels), ops (the functional API and its pure-torch twin), nn (config, LoRA layers, injection,
model-level merge), adapters (PEFT's format: one validated path for every adapter source), serve (MultiLoRA
and its adapter pool), checkpoint (merging into a checkpoint on disk), cli (the command line).

`import pylora` itself imports nothing heavy (the command line parses its arguments without torch);
the first use of any public name imports the whole API at once, extension and ops included, exactly
what an eager import did.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Every module here is imported on the first use of any
# name, in this order (the layers bottom to top), so that using one name gives the same package state
# as `from pylora import *` always did (torch.ops.pylora.* registered, every layer's hooks in place).
_NAMES = {
    "LoraConfig": "pylora.nn.config",
    "inject": "pylora.nn.inject", "mark_only_lora_trainable": "pylora.nn.inject",
    "lora_state_dict": "pylora.nn.inject", "get_config": "pylora.nn.inject", "lora_layers": "pylora.nn.inject",
    "ModulesToSave": "pylora.nn.inject",
    "LoraLayer": "pylora.nn.layers", "LoraLinear": "pylora.nn.layers", "LoraEmbedding": "pylora.nn.layers",
    "LoraConv2d": "pylora.nn.layers",
    "merge": "pylora.nn.merge", "unmerge": "pylora.nn.merge", "merge_and_unload": "pylora.nn.merge",
    "unload": "pylora.nn.merge",
    "AdapterError": "pylora.adapters", "load_adapter": "pylora.adapters", "save_adapter": "pylora.adapters",
    "MultiLoRA": "pylora.serve", "PoolFullError": "pylora.serve", "per_adapter_loss": "pylora.serve",
}
# Submodules that are public names: imported alone (the import system sets them here), so that
# `from pylora import ops` inside the package never starts the whole import half way through.
_SUBMODULES = ("_ext", "ops")
_MODULES = ("pylora._ext", "pylora.ops", "pylora.nn.config", "pylora.nn.inject", "pylora.nn.layers",
            "pylora.nn.merge", "pylora.adapters", "pylora.serve")

__all__ = [
    "LoraConfig", "inject", "mark_only_lora_trainable", "lora_state_dict", "merge", "unmerge", "merge_and_unload",
    "unload", "get_config", "lora_layers", "ModulesToSave", "LoraLayer", "LoraLinear", "LoraEmbedding",
    "LoraConv2d", "ops", "save_adapter", "load_adapter", "AdapterError", "MultiLoRA", "PoolFullError",
    "per_adapter_loss",
]


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(module)
    for name, module in _NAMES.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name: str):
    # Called only for names not yet in the module's namespace: after _load_all() every public name is.
    if name in _SUBMODULES:
        return importlib.import_module(f"pylora.{name}")
    if name in _NAMES:
        _load_all()
        return globals()[name]
    raise AttributeError(f"module 'pylora' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES))
