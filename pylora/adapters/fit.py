"""An adapter checked against a base model: fit() says what it does to that model, or raises
AdapterError listing every reason it cannot, before anything changes.

It is the one check between a validated Adapter (pylora.adapters.source) and a model: load_adapter
injects and copies what it returns, MultiLoRA.load_adapter writes it into its pools. The model is
seen as it was before pylora wrapped it (pylora.nn.inject.plain_modules), so a served model checks
the same as the plain one.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from pylora.adapters.errors import AdapterError
from pylora.adapters.format import CONFIG_NAME, ROLE_SUFFIX, TASK_HEADS, Adapter, ModuleWeights
from pylora.nn.config import LoraConfig, names_module
from pylora.nn.inject import plain_modules, plain_state, saved_module_names, target_names
from pylora.nn.kinds import SUPPORTED, factor_dtype, factor_shapes, features, module_kind, quantization
from pylora.util.names import dtype_name, shape
from pylora.util.patterns import PatternError


@dataclass
class Fit:
    """What an adapter does to one base model.

    config: the adapter's LoraConfig less the modules_to_save entries and rank/alpha pattern keys that
    select nothing in this model (PEFT ignores them too); targets: the modules it wraps, in model order;
    modules: target name -> its factors (ModuleWeights) for the targets the adapter holds; without_tensors:
    targets it holds nothing for (only with strict=False: they get B = 0, no effect); extras: plain tensor
    name -> (tensor, kind) replacing the model's tensor (kind "modules_to_save" | "bias" | "embedding");
    saved_modules: the modules modules_to_save selects; notes: what strict=False let through.
    """

    config: LoraConfig
    targets: list[str]
    modules: dict[str, ModuleWeights]
    without_tensors: list[str] = field(default_factory=list)
    extras: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)
    saved_modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# The problems a base can reveal, worded once: fit() and the checkpoint merge (which checks against
# a checkpoint's tensors rather than a model's modules) report them alike.

def unmatched_saved_entry(af: Adapter, entry: str, base: str) -> str:
    return f"{os.path.join(af.path, CONFIG_NAME)}: modules_to_save entry {entry!r} matches no module of {base}"


def missing_module(af: Adapter, cfg: LoraConfig, name: str, kind: Optional[str]) -> str:
    suffix = "lora_embedding_A" if kind == "embedding" else "lora_A.weight"
    return (f"{af.weights_file}: key {af.key_prefix}{name}.{suffix} is missing: the config targets module {name!r} "
            f"(target_modules={cfg.target_modules!r})")


def missing_saved_tensor(af: Adapter, base: str, name: str, why: str) -> str:
    return f"{af.weights_file}: the tensor for {base}.{name} is missing (the config saves it: {why})"


def beyond_range(af: Adapter, name: str, suffix: str, dtype: torch.dtype) -> str:
    return (f"{af.weights_file}: key {af.key_prefix}{name}.{suffix}: values beyond the range of {dtype_name(dtype)}, "
            f"the dtype of {name}'s LoRA factors; expected values it can hold")


def _weight_shape(module: nn.Module) -> str:
    """The module's weight shape for messages; a quantized weight's logical [O, I] (a packed 4-bit weight
    has another storage shape)."""
    q = quantization(module)
    if q is None:
        return f"weight {shape(module.weight)}"
    I, O = features(module)
    return f"{q.description}, weight [{O}, {I}]"


def _embedding_names(model: nn.Module) -> set[str]:
    names = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if layer is not None:
            names |= {n for n, m in model.named_modules() if m is layer}
    return names


def fit(adapter: Adapter, model: nn.Module, *, strict: bool = True,
        lora_dtype: Optional[torch.dtype] = None) -> Fit:
    """Check `adapter` against `model` and return what it does to it.

    Semantics: every module the adapter holds factors for exists in the model, is a target of its config
    and has the kind and shapes the factors need; every target has factors (strict=True); every extra
    tensor is a tensor of the model with its shape; every tensor the config saves is present; each value
    fits the dtype it will be stored in (`lora_dtype`, or per module pylora.nn.kinds.factor_dtype(module), for the
    factors; the model's dtype for extras). strict=False turns unexpected and missing keys into notes.
    Raises AdapterError listing every problem; never changes the model.
    """
    try:
        return _fit(adapter, model, strict, lora_dtype)
    except PatternError as exc:
        raise AdapterError(f"{os.path.join(adapter.path, CONFIG_NAME)}: {exc}", adapter.path) from None


def _fit(af: Adapter, model: nn.Module, strict: bool, lora_dtype: Optional[torch.dtype]) -> Fit:
    wf, cf = af.weights_file, os.path.join(af.path, CONFIG_NAME)
    problems, notes = [], []
    model_name = type(model).__name__

    def soft(message: str) -> None:
        if strict:
            problems.append(message)
        else:
            notes.append(message + " (ignored: strict=False)")

    cfg = copy.deepcopy(af.config)
    modules = plain_modules(model)
    kept = []
    for entry in cfg.modules_to_save or []:
        if any(n and names_module(entry, n) for n in modules):
            kept.append(entry)
        elif entry not in TASK_HEADS.get(cfg.task_type, ()):
            soft(unmatched_saved_entry(af, entry, model_name))
    cfg.modules_to_save = kept or None

    targets = target_names(model, cfg)
    if not targets:
        problems.append(f"{cf}: target_modules={cfg.target_modules!r} matches no module of {model_name} (is this "
                        f"adapter for another model? its base model: {af.raw_config.get('base_model_name_or_path')!r})")
    for pname in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(cfg, pname)
        for key in list(pattern):
            if not any(cfg.pattern_key([key], n, pname) for n in targets):
                # PEFT ignores such keys too; they change nothing.
                notes.append(f"{cf}: {pname} key {key!r} matches none of the targeted modules; ignored")
                del pattern[key]
    for name in targets:
        if module_kind(modules[name]) is None:
            problems.append(f"{cf}: target_modules={cfg.target_modules!r} selects {name!r}, a "
                            f"{type(modules[name]).__name__}, which LoRA does not support ({SUPPORTED})")

    prefix = af.key_prefix
    target_set = set(targets)
    lora = {}
    for name, mw in af.modules.items():
        if name not in modules:
            soft(f"{wf}: keys for module {name!r} ({prefix}{name}.*), which {model_name} lacks")
            continue
        if name not in target_set:
            soft(f"{wf}: keys for module {name!r}, which the config does not target in {model_name}")
            continue
        module = modules[name]
        kind = module_kind(module)
        if kind is None:
            continue  # reported above
        if kind != mw.kind:
            problems.append(f"{wf}: module {name!r} holds {mw.kind} factors (lora_A shape {shape(mw.lora_A)}) but "
                            f"{model_name}.{name} is a {type(module).__name__} ({kind})")
            continue
        expected = factor_shapes(module, mw.r)
        family = "embedding" if kind == "embedding" else "lora"
        ok = True
        for role, t in (("A", mw.lora_A), ("B", mw.lora_B), ("B_bias", mw.lora_B_bias)):
            if t is not None and tuple(t.shape) != expected[role]:
                ok = False
                problems.append(f"{wf}: key {prefix}{name}.{ROLE_SUFFIX[family, role]}: shape {shape(t)} does not "
                                f"fit {model_name}.{name} ({type(module).__name__}, {_weight_shape(module)}): "
                                f"expected {list(expected[role])}")
        dtype = lora_dtype or factor_dtype(module)
        for role, t in (("A", mw.lora_A), ("B", mw.lora_B), ("B_bias", mw.lora_B_bias)):
            if ok and t is not None and t.dtype != dtype and not bool(torch.isfinite(t.to(dtype)).all()):
                ok = False
                problems.append(beyond_range(af, name, ROLE_SUFFIX[family, role], dtype))
        if ok:
            lora[name] = mw
    without = []
    for name in targets:
        if name in af.modules:
            continue
        message = missing_module(af, cfg, name, module_kind(modules[name]))
        r, limit = cfg.rank_for(name), max(features(modules[name]))
        if strict:
            problems.append(message)
        elif r > limit:
            # Nothing in the file bounds this rank; refuse to allocate a layer larger than the module.
            problems.append(message + f"; and its config rank r={r} exceeds the module's largest dimension "
                                      f"{limit}, so no layer is made for it")
        else:
            notes.append(message + " (left without effect, B = 0: strict=False)")
            without.append(name)

    saved = saved_module_names(modules, cfg)
    extras = _extras(model, af, cfg, targets, modules, saved, problems, soft)
    if problems:
        raise AdapterError(problems, af.path)
    return Fit(config=cfg, targets=targets, modules={n: lora[n] for n in targets if n in lora},
               without_tensors=without, extras=extras, saved_modules=saved, notes=notes)


def _extras(model, af, cfg, targets, modules, saved, problems, soft) -> dict:
    """The extra tensors, checked: each must be a tensor of the model with its shape and values its dtype
    can hold; every tensor the config saves must be there."""
    wf, model_name, prefix = af.weights_file, type(model).__name__, af.key_prefix
    plain = plain_state(model)
    embeddings = _embedding_names(model)
    out = {}
    for name, t in af.extra_tensors.items():
        kind = af.extra_kinds[name]
        module = name.rpartition(".")[0]
        if name not in plain:
            soft(f"{wf}: key for {kind} tensor {name!r} ({prefix}{name}), which {model_name} lacks")
            continue
        if kind == "modules_to_save" and not any(name.startswith(s + ".") for s in saved):
            soft(f"{wf}: modules_to_save tensor {name!r} lies in no module the config's modules_to_save="
                 f"{cfg.modules_to_save!r} selects in {model_name}")
            continue
        if kind == "embedding" and embeddings and module not in embeddings:
            soft(f"{wf}: embedding tensor {name!r}: {module!r} is not {model_name}'s input or output embedding")
            continue
        target = plain[name]
        if tuple(t.shape) != tuple(target.shape):
            problems.append(f"{wf}: {kind} tensor {name!r}: shape {shape(t)} does not fit {model_name}.{name}: "
                            f"expected {shape(target)}")
            continue
        if target.dtype.is_floating_point and not bool(torch.isfinite(t.to(target.dtype)).all()):
            problems.append(f"{wf}: {kind} tensor {name!r}: values beyond the range of {dtype_name(target.dtype)} "
                            f"(the model's dtype for {name}); expected values it can hold")
            continue
        out[name] = (t, kind)

    expected = []
    for s in saved:
        expected += [k for k in plain if k.startswith(s + ".")]
    if cfg.bias == "all":
        expected += [k for k in plain if k == "bias" or k.endswith(".bias")]
    elif cfg.bias == "lora_only":
        expected += [f"{n}.bias" for n in targets if getattr(modules[n], "bias", None) is not None]
    for name in dict.fromkeys(expected):
        if name not in af.extra_tensors:
            why = "modules_to_save" if any(name.startswith(s + ".") for s in saved) else f"bias={cfg.bias!r}"
            soft(missing_saved_tensor(af, model_name, name, why))
    return out
