"""load_adapter: an adapter from any source, checked against a model (fit), then injected and loaded.

Every check runs before the model changes (pylora.inject itself validates before it replaces a
module), so a failed load leaves the model's structure, parameters and buffers as they were.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from pylora.adapters.errors import AdapterError, AdapterWarning
from pylora.adapters.fit import Fit, fit
from pylora.adapters.source import Source, as_adapter
from pylora.nn.inject import get_config, inject, lora_layers
from pylora.nn.merge import unload


def _live_name(f: Fit, name: str) -> str:
    """Where plain tensor `name` lives once the adapter is injected."""
    for s in f.saved_modules:
        if name.startswith(s + "."):
            return f"{s}.trained_module.{name[len(s) + 1:]}"
    module, _, param = name.rpartition(".")
    return f"{module}.base_layer.{param}" if module in f.targets else name


def load_adapter(model: nn.Module, path: Source, adapter_name: Optional[str] = None, *, allow_pickle: bool = False,
                 strict: bool = True) -> nn.Module:
    """Inject the adapter in `path` into `model` and load its tensors; returns the model.

    `path` is a PEFT-format directory (its subfolder `adapter_name` for a named adapter), a pylora model in
    memory, or an Adapter (pylora.adapters.as_adapter). Semantics: the adapter is checked against the model
    (pylora.adapters.fit: every file module is a module the config targets, every targeted module has its
    tensors, shapes fit the modules, extra tensors fit the model's parameters) before the model changes;
    then inject(model, config), A, B (and lora_B bias) copied into each LoRA layer, extra tensors into the
    trained modules_to_save copies and the base parameters (biases, embedding weights), as PEFT loads them.
    On any AdapterError the model's structure, parameters and buffers are as they were. strict=False turns
    unexpected and missing keys into AdapterWarnings (a targeted module without tensors gets B = 0).
    """
    af = as_adapter(path, adapter_name, allow_pickle=allow_pickle, strict=strict)
    if get_config(model) is not None or any(True for _ in lora_layers(model)):
        raise AdapterError(f"load_adapter: the model already holds a pylora adapter; unload() or "
                           f"merge_and_unload() it before loading {af.path}", af.path)
    f = fit(af, model, strict=strict)
    for message in f.notes:
        warnings.warn(message, AdapterWarning, stacklevel=2)
    try:
        inject(model, f.config)
    except ValueError as exc:  # inject validates before it changes anything
        raise AdapterError(f"{af.path}: {exc}", af.path) from None
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    originals = []
    try:
        with torch.no_grad():
            for name in f.without_tensors:
                model.get_submodule(name).lora_B.zero_()
            for name, mw in f.modules.items():
                layer = model.get_submodule(name)
                for target, t in ((layer.lora_A, mw.lora_A), (layer.lora_B, mw.lora_B),
                                  (getattr(layer, "lora_B_bias", None), mw.lora_B_bias)):
                    if t is not None:
                        target.copy_(t.to(device=target.device, dtype=target.dtype))
            # Tensors the model had before: their old values are kept so that a failure puts them back.
            for name, (t, _) in f.extras.items():
                target = live[_live_name(f, name)]
                originals.append((target, target.detach().clone()))
                target.copy_(t.to(device=target.device, dtype=target.dtype))
    except BaseException:
        with torch.no_grad():
            for target, old in originals:
                target.copy_(old)
        unload(model)
        raise
    return model
