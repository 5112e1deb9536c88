"""save_adapter: a model's adapter written as PEFT writes it (keys, shapes, config; see
pylora.adapters.format); adapter_tensors and adapter_config_json, what it writes, also serve to read
a model in memory as an adapter (pylora.adapters.source)."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Union

import torch
from torch import nn

from pylora.adapters import config_json
from pylora.adapters.errors import AdapterError
from pylora.adapters.format import CONFIG_NAME, EMBEDDING_LAYER_NAMES, PREFIX, WEIGHTS_NAME
from pylora.adapters.read import check_adapter_name
from pylora.nn.config import LoraConfig, names_module
from pylora.nn.inject import ModulesToSave, get_config, lora_layers, unwrap_model
from pylora.nn.layers import LoraLayer
from pylora.util import patterns


def _embedding_is_targeted(model: nn.Module, cfg: LoraConfig) -> bool:
    # PEFT's rule for save_embedding_layers="auto".
    targets = cfg.target_modules
    if isinstance(targets, str):
        if cfg.is_all_linear():
            return False
        return any(patterns.fullmatch("target_modules", targets, n) for n, _ in model.named_modules()
                   if any(names_module(e, n) for e in EMBEDDING_LAYER_NAMES))
    return any(e in targets for e in EMBEDDING_LAYER_NAMES)


def _embedding_tensors(model, cfg, save_embedding_layers, state) -> dict[str, torch.Tensor]:
    """The embedding layers PEFT saves whole: with save_embedding_layers="auto", when target_modules
    names embed_tokens or lm_head, the base tensors of the targeted input/output embeddings."""
    targeted = _embedding_is_targeted(model, cfg)
    save = targeted if save_embedding_layers == "auto" else save_embedding_layers
    if not save:
        return {}
    if not hasattr(model, "get_input_embeddings"):
        warnings.warn("save_adapter: save_embedding_layers is set but the model has no get_input_embeddings(); "
                      "no embedding layer saved", stacklevel=3)
        return {}
    out = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if layer is None:
            continue
        lora_wrapped = isinstance(layer, LoraLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding))
        if targeted and not lora_wrapped:
            continue
        # A LoRA layer contributes its base layer's tensors; its factors are written under PEFT's names.
        module = layer.base_layer if targeted or isinstance(layer, LoraLayer) else layer
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name:
            out.update({k: v for k, v in state.items() if k.startswith(name + ".")})
    return out


def adapter_tensors(model: nn.Module, save_embedding_layers: Union[bool, str] = "auto", *,
                    check_finite: bool = True, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The tensors save_adapter writes, under PEFT's file keys (see pylora.adapters.format).

    Semantics: {"base_model.model." + key: CPU copy}: each LoRA layer's A [r, I] and B [O, r] (and
    lora_B bias), each modules_to_save copy's state_dict, the biases of cfg.bias, and the embedding
    layers PEFT's save_embedding_layers rule picks. With `state_dict` (the model's own keys, e.g. one
    gathered from FSDP or DeepSpeed shards), each tensor is taken from it where it has the key. AdapterError
    for a model without an adapter, a non-finite tensor (unless check_finite=False: the reader checks them
    then), or base tensors of a merged layer (they hold the adapter then)."""
    model = unwrap_model(model)
    cfg = get_config(model)
    if cfg is None:
        raise AdapterError(f"save_adapter: {type(model).__name__} holds no pylora adapter (inject() or "
                           "load_adapter() first)")
    if save_embedding_layers not in ("auto", True, False):
        raise AdapterError(f"save_adapter: save_embedding_layers={save_embedding_layers!r} must be 'auto', True or "
                           "False")
    state = model.state_dict(keep_vars=True)
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        key_a, key_b = layer.peft_keys
        out[f"{name}.{key_a}"] = layer.lora_A
        out[f"{name}.{key_b}"] = layer.lora_B
        if getattr(layer, "lora_B_bias", None) is not None:
            out[f"{name}.lora_B.bias"] = layer.lora_B_bias
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            out.update({f"{name}.{k}": v for k, v in module.trained_module.state_dict(keep_vars=True).items()})
    if cfg.bias == "all":
        for k, v in state.items():
            if k == "bias" or k.endswith(".bias"):
                out.setdefault(k.replace(".trained_module.", ".modules_to_save."), v)
    elif cfg.bias == "lora_only":
        for name, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                out[f"{name}.base_layer.bias"] = layer.base_layer.bias
    out.update(_embedding_tensors(model, cfg, save_embedding_layers, state))

    merged = [n for n, layer in lora_layers(model) if layer.merged]
    for key in out:
        owner = key.partition(".base_layer.")[0]
        if ".base_layer." in key and owner in merged:
            raise AdapterError(f"save_adapter: {key} would be written while layer {owner!r} is merged (its base "
                               "tensors hold the adapter); unmerge() first")
    if state_dict is not None:
        live_name = {id(t): k for k, t in state.items()}
        out = {key: state_dict.get(live_name.get(id(t)), t) for key, t in out.items()}
    tensors = {}
    for key, t in out.items():
        t = t.detach()
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"save_adapter: {key} holds non-finite values; an adapter file must be finite")
        # A copy of each: safetensors refuses tensors that share memory (tied or viewed parameters).
        tensors[PREFIX + key] = t.to("cpu", copy=True).contiguous()
    return tensors


def adapter_config_json(model: nn.Module) -> dict:
    """The adapter_config.json save_adapter writes for `model` (injected, possibly wrapped)."""
    inner = unwrap_model(model)
    cfg = get_config(inner)
    if cfg is None:
        raise AdapterError(f"save_adapter: {type(inner).__name__} holds no pylora adapter (inject() or "
                           "load_adapter() first)")
    target_modules = sorted(n for n, _ in lora_layers(inner)) if cfg.is_all_linear() else None
    auto_mapping = {"base_model_class": type(inner).__name__, "parent_library": type(inner).__module__}
    return config_json.config_to_json(cfg, target_modules=target_modules, auto_mapping=auto_mapping,
                                      base_model_name_or_path=inner.__dict__.get("name_or_path") or None)


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default", *,
                 save_embedding_layers: Union[bool, str] = "auto") -> str:
    """Write the model's adapter as PEFT does: adapter_model.safetensors (metadata {"format": "pt"})
    and adapter_config.json in `path`, or in path/adapter_name for a name other than "default".
    Returns the directory written.

    Semantics: the tensors of adapter_tensors(model) and config_to_json(get_config(model)); an
    "all-linear" target is written as the list of modules it selected, as PEFT writes it; the files
    are written by write_adapter.
    """
    check_adapter_name(adapter_name)
    inner = unwrap_model(model)
    tensors = adapter_tensors(inner, save_embedding_layers)
    config = adapter_config_json(inner)
    directory = os.fspath(path) if adapter_name == "default" else os.path.join(os.fspath(path), adapter_name)
    write_adapter(directory, config, tensors)
    return directory


def write_adapter(directory: Union[str, os.PathLike], config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write adapter_config.json (`config`) and adapter_model.safetensors (`tensors`, PEFT's keys, metadata
    {"format": "pt"}) in `directory`, creating it. Each file is written to a temporary name and renamed,
    so a reader never sees half a file."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, WEIGHTS_NAME),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True)
    write_atomic(os.path.join(directory, CONFIG_NAME), lambda tmp: _write_text(tmp, text))


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_atomic(path: str, write) -> None:
    """Call write(tmp) for a temporary name beside `path`, then rename it to `path`: a reader never sees
    half a file, and a failure leaves no temporary file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
