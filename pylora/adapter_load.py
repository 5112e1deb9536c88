"""load_adapter: an adapter read by pylora.io, checked against a model, then injected and loaded.

Every check runs before the model changes (pylora.inject itself validates before it replaces a
module), so a failed load leaves the model's structure, parameters and buffers as they were.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from pylora.config import LoraConfig
from pylora.inject import _targets, get_config, inject, lora_layers, unload
from pylora.io import (_ROLE_SUFFIX, CONFIG_NAME, TASK_HEADS, AdapterError, AdapterFile, AdapterWarning, _dtype_name,
                       _shape, read_adapter)
from pylora.layers import is_conv1d


def _module_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def _expected_shapes(module: nn.Module, kind: str, r: int) -> dict[str, tuple]:
    W = module.weight
    if kind == "linear":
        I, O = (W.shape[0], W.shape[1]) if is_conv1d(module) else (W.shape[1], W.shape[0])
        return {"A": (r, I), "B": (O, r), "B_bias": (O,)}
    if kind == "embedding":
        V, D = W.shape
        return {"A": (r, V), "B": (D, r)}
    C_out, C_in, kh, kw = W.shape
    return {"A": (r, C_in, kh, kw), "B": (C_out, r, 1, 1), "B_bias": (C_out,)}


def _lora_dtype(module: nn.Module) -> torch.dtype:
    # LoraLayer._param_dtype's rule: factors of a half-precision base are kept in float32.
    dtype = module.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass
class _Plan:
    cfg: LoraConfig      # the file's, less modules_to_save entries and pattern keys that match nothing
    lora_copies: list    # (parameter name after inject, tensor) for the new LoRA layers
    extra_copies: list   # (parameter or buffer name after inject, tensor) for tensors the model had
    zero_b: list         # modules targeted but absent from the file (strict=False)


def _plan(model: nn.Module, af: AdapterFile, strict: bool) -> tuple[_Plan, list[str]]:
    """Every check against the model, before anything changes; (plan, warnings) or AdapterError."""
    wf, cf = af.weights_file, os.path.join(af.path, CONFIG_NAME)
    problems, notes = [], []
    model_name = type(model).__name__

    def soft(message: str) -> None:
        (problems if strict else notes).append(message if strict else message + " (ignored: strict=False)")

    if get_config(model) is not None or any(True for _ in lora_layers(model)):
        raise AdapterError(f"load_adapter: the model already holds a pylora adapter; unload() or "
                           f"merge_and_unload() it before loading {af.path}", af.path)
    cfg = copy.deepcopy(af.config)
    modules = dict(model.named_modules())

    kept = []
    for entry in cfg.modules_to_save or []:
        if any(n == entry or n.endswith("." + entry) for n in modules):
            kept.append(entry)
        elif entry not in TASK_HEADS.get(cfg.task_type, ()):
            soft(f"{cf}: modules_to_save entry {entry!r} matches no module of {model_name}")
    cfg.modules_to_save = kept or None

    targets = _targets(model, cfg)
    if not targets:
        problems.append(f"{cf}: target_modules={cfg.target_modules!r} matches no module of {model_name} (is this "
                        f"adapter for another model? its base model: {af.raw_config.get('base_model_name_or_path')!r})")
    for pname in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, pname)
        for key in list(pattern):
            if not any(re.match(rf"(.*\.)?({key})$", n) for n in targets):
                # PEFT ignores such keys too; they change nothing.
                notes.append(f"{cf}: {pname} key {key!r} matches none of the targeted modules; ignored")
                del pattern[key]
    for name in targets:
        if _module_kind(modules[name]) is None:
            problems.append(f"{cf}: target_modules={cfg.target_modules!r} selects {name!r}, a "
                            f"{type(modules[name]).__name__}, which LoRA does not support (nn.Linear, Conv1D, "
                            "nn.Embedding, nn.Conv2d)")

    prefix = af.key_prefix
    target_set = set(targets)
    lora_copies, zero_b = [], []
    for name, mw in af.modules.items():
        if name not in modules:
            soft(f"{wf}: keys for module {name!r} ({prefix}{name}.*), which {model_name} lacks")
            continue
        if name not in target_set:
            soft(f"{wf}: keys for module {name!r}, which the config does not target in {model_name}")
            continue
        module = modules[name]
        kind = _module_kind(module)
        if kind is None:
            continue  # reported above
        if kind != mw.kind:
            problems.append(f"{wf}: module {name!r} holds {mw.kind} factors (lora_A shape {_shape(mw.lora_A)}) but "
                            f"{model_name}.{name} is a {type(module).__name__} ({kind})")
            continue
        expected = _expected_shapes(module, kind, mw.r)
        suffixes = {"A": _ROLE_SUFFIX["embedding" if kind == "embedding" else "lora", "A"],
                    "B": _ROLE_SUFFIX["embedding" if kind == "embedding" else "lora", "B"], "B_bias": "lora_B.bias"}
        ok = True
        for role, t in (("A", mw.lora_A), ("B", mw.lora_B), ("B_bias", mw.lora_B_bias)):
            if t is not None and tuple(t.shape) != expected[role]:
                ok = False
                problems.append(f"{wf}: key {prefix}{name}.{suffixes[role]!s}: shape {_shape(t)} does not fit "
                                f"{model_name}.{name} ({type(module).__name__}, weight {_shape(module.weight)}): "
                                f"expected {list(expected[role])}")
        dtype = _lora_dtype(module)
        for role, t in (("A", mw.lora_A), ("B", mw.lora_B), ("B_bias", mw.lora_B_bias)):
            if ok and t is not None and t.dtype != dtype and not bool(torch.isfinite(t.to(dtype)).all()):
                ok = False
                problems.append(f"{wf}: key {prefix}{name}.{suffixes[role]!s}: values beyond the range of "
                                f"{_dtype_name(dtype)}, the dtype of {name}'s LoRA factors; expected values it "
                                "can hold")
        if ok:
            lora_copies += [(f"{name}.lora_A", mw.lora_A), (f"{name}.lora_B", mw.lora_B)]
            if mw.lora_B_bias is not None:
                lora_copies.append((f"{name}.lora_B_bias", mw.lora_B_bias))
    for name in targets:
        if name not in af.modules:
            kind = _module_kind(modules[name])
            suffix = "lora_embedding_A" if kind == "embedding" else "lora_A.weight"
            message = (f"{wf}: key {prefix}{name}.{suffix} is missing: the config targets module {name!r} "
                       f"(target_modules={cfg.target_modules!r})")
            W = modules[name].weight
            r, limit = cfg.rank_for(name), max(W.shape)
            if strict:
                problems.append(message)
            elif r > limit:
                # Nothing in the file bounds this rank; refuse to allocate a layer larger than the module.
                problems.append(message + f"; and its config rank r={r} exceeds the module's largest dimension "
                                          f"{limit}, so no layer is made for it")
            else:
                notes.append(message + " (left without effect, B = 0: strict=False)")
                zero_b.append(name)

    extra_copies = _plan_extras(model, af, cfg, targets, modules, prefix, problems, soft)
    if problems:
        raise AdapterError(problems, af.path)
    return _Plan(cfg=cfg, lora_copies=lora_copies, extra_copies=extra_copies, zero_b=zero_b), notes


def _plan_extras(model, af, cfg, targets, modules, prefix, problems, soft) -> list:
    """Checks and live names for the extra tensors: each must be a tensor of the model before
    injection, with its shape; those the config saves must all be there."""
    wf, model_name = af.weights_file, type(model).__name__
    plain = model.state_dict(keep_vars=True)
    saved_modules = [n for n in modules if n and any(n == e or n.endswith("." + e) for e in cfg.modules_to_save or [])]
    # The outermost match only: a saved module's own children are saved with it.
    saved_modules = [n for n in saved_modules if not any(n.startswith(s + ".") for s in saved_modules)]
    lora_targets = set(targets)
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if layer is not None:
            embeddings |= {n for n, m in modules.items() if m is layer}

    def live_name(name: str) -> str:
        for s in saved_modules:
            if name.startswith(s + "."):
                return f"{s}.trained_module.{name[len(s) + 1:]}"
        module, _, param = name.rpartition(".")
        return f"{module}.base_layer.{param}" if module in lora_targets else name

    copies = []
    for name, t in af.extra_tensors.items():
        kind = af.extra_kinds[name]
        module = name.rpartition(".")[0]
        key = f"{prefix}{name}"
        if name not in plain:
            soft(f"{wf}: key for {kind} tensor {name!r} ({key}), which {model_name} lacks")
            continue
        if kind == "modules_to_save" and not any(name.startswith(s + ".") for s in saved_modules):
            soft(f"{wf}: modules_to_save tensor {name!r} lies in no module the config's modules_to_save="
                 f"{cfg.modules_to_save!r} selects in {model_name}")
            continue
        if kind == "embedding" and embeddings and module not in embeddings:
            soft(f"{wf}: embedding tensor {name!r}: {module!r} is not {model_name}'s input or output embedding")
            continue
        target = plain[name]
        if tuple(t.shape) != tuple(target.shape):
            problems.append(f"{wf}: {kind} tensor {name!r}: shape {_shape(t)} does not fit {model_name}.{name}: "
                            f"expected {_shape(target)}")
            continue
        converted = t.to(target.dtype)
        if target.dtype.is_floating_point and not bool(torch.isfinite(converted).all()):
            problems.append(f"{wf}: {kind} tensor {name!r}: values beyond the range of {_dtype_name(target.dtype)} "
                            f"(the model's dtype for {name}); expected values it can hold")
            continue
        copies.append((live_name(name), t))

    expected = []
    for s in saved_modules:
        expected += [f"{s}.{k}" for k in modules[s].state_dict()]
    if cfg.bias == "all":
        expected += [k for k in plain if k == "bias" or k.endswith(".bias")]
    elif cfg.bias == "lora_only":
        expected += [f"{n}.bias" for n in targets if getattr(modules[n], "bias", None) is not None]
    for name in dict.fromkeys(expected):
        if name not in af.extra_tensors:
            why = "modules_to_save" if any(name.startswith(s + ".") for s in saved_modules) else f"bias={cfg.bias!r}"
            soft(f"{wf}: the tensor for {model_name}.{name} is missing (the config saves it: {why})")
    return copies


def load_adapter(model: nn.Module, path: Union[str, os.PathLike, AdapterFile], adapter_name: Optional[str] = None, *,
                 allow_pickle: bool = False, strict: bool = True) -> nn.Module:
    """Inject the adapter in `path` (a directory, or an AdapterFile from read_adapter) into `model` and
    load its tensors; returns the model.

    Semantics: read_adapter(path, adapter_name) is checked against the model (every file module is a
    module the config targets, every targeted module has its tensors, shapes fit the modules, extra
    tensors fit the model's parameters) before the model changes; then inject(model, config), A, B
    (and lora_B bias) copied into each LoRA layer, extra tensors into the trained modules_to_save copies
    and the base parameters (biases, embedding weights), as PEFT loads them. On any AdapterError the
    model's structure, parameters and buffers are as they were. strict=False turns unexpected and
    missing keys into AdapterWarnings (a targeted module without tensors gets B = 0).
    """
    af = path if isinstance(path, AdapterFile) else read_adapter(path, adapter_name, allow_pickle=allow_pickle,
                                                                  strict=strict)
    plan, notes = _plan(model, af, strict)
    for message in notes:
        warnings.warn(message, AdapterWarning, stacklevel=2)
    try:
        inject(model, plan.cfg)
    except ValueError as exc:  # inject validates before it changes anything
        raise AdapterError(f"{af.path}: {exc}", af.path) from None
    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(dict(model.named_buffers(remove_duplicate=False)))
    originals = []
    try:
        with torch.no_grad():
            for name in plan.zero_b:
                model.get_submodule(name).lora_B.zero_()
            for name, t in plan.lora_copies:
                live[name].copy_(t.to(device=live[name].device, dtype=live[name].dtype))
            # Tensors the model had before: their old values are kept so that a failure puts them back.
            for name, t in plan.extra_copies:
                target = live[name]
                originals.append((target, target.detach().clone()))
                target.copy_(t.to(device=target.device, dtype=target.dtype))
    except BaseException:
        with torch.no_grad():
            for target, old in originals:
                target.copy_(old)
        unload(model)
        raise
    return model


