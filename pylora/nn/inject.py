"""Putting LoRA into any PyTorch model by module names.

inject(model, cfg) wraps every module cfg targets in place; mark_only_lora_trainable freezes the rest;
lora_state_dict returns just the adapter; target_names says which modules a config selects, over
plain_modules, the view of a model as it was before any wrapping. An injected model loads a state dict
holding only its adapter's tensors without calling the base model missing (adapter_keys), and gains the
methods the layers above register in MODEL_METHODS (pylora.adapters: transformers' save_pretrained).
"""
from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from pylora.nn.config import LoraConfig, names_module
from pylora.nn.kinds import module_kind
from pylora.nn.layers import LoraLayer, make_lora_layer
from pylora.nn.targets import with_default_targets

CONFIG_ATTR = "pylora_config"
METHODS_ATTR = "_pylora_methods"  # the names of the MODEL_METHODS installed on a model
_HOOKS_ATTR = "_pylora_state_hooks"  # set once the load_state_dict hooks are registered
_LOAD_PREFIX_ATTR = "_pylora_load_prefix"  # from the pre-hook to the post-hook of one load_state_dict

# Methods an injected model gains, by name: (applies(model) -> bool, function(model, *args, **kwargs)).
# inject installs each that applies on the model itself (an instance attribute, found before the class's
# method), unload and merge_and_unload remove them. The layers above fill this in (imports go downward):
# pylora.adapters registers save_pretrained for transformers models, which writes PEFT's adapter files.
MODEL_METHODS: dict[str, tuple[Callable[[nn.Module], bool], Callable]] = {}


class ModulesToSave(nn.Module):
    """A trainable copy of a module (e.g. a task head) saved with the adapter; the original stays frozen
    beside it so that unload() can put it back."""

    # The copy's original stands in the plain model's place (see plain_modules).
    wraps_original_module = True

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.trained_module(*args, **kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / FSDP (`.module`) and torch.compile (`._orig_mod`)
    wrappers: the first one that holds a pylora config, else the innermost."""
    # The model's own attribute, not getattr: torch.compile's wrapper forwards attribute lookups.
    while vars(model).get(CONFIG_ATTR) is None:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def get_config(model: nn.Module) -> Optional[LoraConfig]:
    """The LoraConfig a model was injected with (None for a model without pylora layers); looks
    through wrappers such as DistributedDataParallel and torch.compile."""
    return vars(unwrap_model(model)).get(CONFIG_ATTR)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def plain_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module of the model as it was before pylora wrapped anything: a module that stands in for
    its `base_layer` (a LoRA layer, a served layer) is replaced by it, a modules_to_save wrapper by its
    original; the wrappers' own children are left out. For a model without wrappers this is
    dict(model.named_modules())."""
    out = {}

    def walk(prefix: str, module: nn.Module) -> None:
        while True:
            if getattr(module, "wraps_base_layer", False):
                module = module.base_layer
            elif getattr(module, "wraps_original_module", False):
                module = module.original_module
            else:
                break
        out[prefix] = module
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    return out


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter or persistent buffer of the model as plain_modules sees it: the keys its
    state_dict() had before pylora wrapped anything."""
    out = {}
    for name, module in plain_modules(model).items():
        prefix = f"{name}." if name else ""
        for pname, p in module.named_parameters(recurse=False):
            out[prefix + pname] = p
        for bname, b in module.named_buffers(recurse=False):
            if bname not in getattr(module, "_non_persistent_buffers_set", ()):
                out[prefix + bname] = b
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _output_layer_names(model: nn.Module, cfg: LoraConfig) -> set[str]:
    """The output layer "all-linear" leaves out: transformers' output embeddings, or, for a sequence
    classifier, its head (PEFT's rule)."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    elif cfg.task_type == "SEQ_CLS":
        heads += [getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, m in model.named_modules() if any(m is h for h in heads)}


def target_names(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The names of the modules of `model` (as plain_modules sees it) that `cfg` targets, in model order.
    A pattern that runs out of time raises pylora.util.patterns.PatternError (a ValueError)."""
    modules = plain_modules(model)
    if cfg.is_all_linear():
        linear = {n for n, m in modules.items() if module_kind(m) == "linear"}
        linear -= _output_layer_names(model, cfg)
        return [n for n in modules if n in linear and not cfg.is_excluded(n) and not cfg.is_saved_module(n)]
    return [n for n in modules if n and cfg.matches(n)]


def saved_module_names(modules, cfg: LoraConfig) -> list[str]:
    """The modules a config's modules_to_save entries select (a name equal to an entry or ending in
    "." + entry), outermost only: a saved module's children are saved with it."""
    found = [n for n in modules if n and cfg.saves(n)]
    return [n for n in found if not any(n.startswith(s + ".") for s in found)]


def _leaf_names(model: nn.Module, limit: int = 12) -> str:
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())})
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def inject(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap every module of `model` that `cfg` targets in a LoRA layer, in place; returns the model.

    Semantics: module m (nn.Linear, Conv1D, nn.Embedding or nn.Conv2d) named n with cfg.matches(n)
    becomes a LoRA layer around m with r = cfg.rank_for(n), alpha = cfg.alpha_for(n); modules named
    in cfg.modules_to_save get a trainable copy. cfg.target_modules=None takes PEFT's default for the
    model's type (config.model_type; pylora.nn.targets), logged, and get_config(model) then returns a copy
    of cfg with those targets. Everything is validated before the model changes: nothing matched, an
    unsupported module type, a rank/alpha pattern key or modules_to_save entry that matches nothing, no
    default for the model's type, or a model that already holds LoRA layers raise ValueError.
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"inject: cfg must be a pylora.LoraConfig, got {type(cfg).__name__}")
    if get_config(model) is not None or any(True for _ in lora_layers(model)):
        raise ValueError("inject: the model already holds pylora LoRA layers; merge_and_unload() or unload() "
                         "it first")
    cfg = with_default_targets(model, cfg)
    targets = target_names(model, cfg)
    if not targets:
        raise ValueError(f"inject: target_modules={cfg.target_modules!r} matched no module of "
                         f"{type(model).__name__}; its modules include: {_leaf_names(model)}")
    for pname in ("rank_pattern", "alpha_pattern"):
        for key in getattr(cfg, pname):
            if not any(cfg.pattern_key([key], n, pname) for n in targets):
                raise ValueError(f"inject: {pname} key {key!r} matches none of the targeted modules "
                                 f"({', '.join(targets[:6])}{', ...' if len(targets) > 6 else ''})")
    saved = []
    for entry in cfg.modules_to_save or []:
        found = [n for n, _ in model.named_modules() if n and names_module(entry, n)]
        if not found:
            raise ValueError(f"inject: modules_to_save entry {entry!r} matches no module of "
                             f"{type(model).__name__}; its modules include: {_leaf_names(model)}")
        saved += found

    # Build every new layer before replacing any, so a failure leaves the model as it was.
    new_layers = {}
    for name in targets:
        module = model.get_submodule(name)
        new_layers[name] = make_lora_layer(
            module, name=name, r=cfg.rank_for(name), lora_alpha=cfg.alpha_for(name), lora_dropout=cfg.lora_dropout,
            use_rslora=cfg.use_rslora, fan_in_fan_out=cfg.fan_in_fan_out, init_lora_weights=cfg.init_lora_weights,
            lora_bias=cfg.lora_bias)
        # A new module starts in training mode; the wrapper follows the module it replaces, so that
        # an eval-mode model does not start applying LoRA dropout.
        new_layers[name].train(module.training)
    new_saved = {name: ModulesToSave(model.get_submodule(name)) for name in saved}
    for name, layer in new_layers.items():
        set_module(model, name, layer)
    for name, wrapper in new_saved.items():
        set_module(model, name, wrapper)
    object.__setattr__(model, CONFIG_ATTR, cfg)
    _install(model)
    return model


class _ModelMethod:
    """function(model, ...) as an attribute of the model. Unlike a bound method, it stays bound to the right
    model through pickle (torch.save of a whole model: a bound method is rebuilt by getattr before the
    model's __dict__ is back, and would find the class's method) and deepcopy (bound to the copy); and it
    holds the model weakly, so that `del model` frees it at once, with no reference cycle to wait for."""

    def __init__(self, function: Callable, model: nn.Module):
        self.__func__, self._model = function, weakref.ref(model)
        self.__name__, self.__doc__ = function.__name__, function.__doc__

    @property
    def __self__(self) -> nn.Module:
        return self._model()

    def __call__(self, *args, **kwargs):
        return self.__func__(self._model(), *args, **kwargs)

    def __getstate__(self):
        return {"function": self.__func__, "model": self._model()}

    def __setstate__(self, state):
        self.__init__(state["function"], state["model"])

    def __repr__(self):
        return f"<pylora method {self.__name__} of {type(self._model()).__name__}>"


def _install(model: nn.Module) -> None:
    installed = []
    for name, (applies, function) in MODEL_METHODS.items():
        if applies(model):
            object.__setattr__(model, name, _ModelMethod(function, model))
            installed.append(name)
    object.__setattr__(model, METHODS_ATTR, tuple(installed))
    if not vars(model).get(_HOOKS_ATTR):  # once per model: the hooks do nothing while it holds no adapter
        model.register_load_state_dict_pre_hook(_note_load_prefix)
        model.register_load_state_dict_post_hook(_base_not_missing_for_adapter_state)
        object.__setattr__(model, _HOOKS_ATTR, True)


def uninstall(model: nn.Module) -> None:
    """Remove what inject installed on `model` (the model holding the config): its MODEL_METHODS."""
    for name in vars(model).pop(METHODS_ATTR, ()):
        vars(model).pop(name, None)


def _note_load_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    if vars(module).get(CONFIG_ATTR) is not None:
        object.__setattr__(module, _LOAD_PREFIX_ATTR, prefix)


def _base_not_missing_for_adapter_state(module, incompatible_keys) -> None:
    """After load_state_dict of an injected model: when the state dict held adapter tensors and no base
    tensor at all (an adapter state dict: Trainer's resume, lora_state_dict), the base's keys are not
    reported missing (strict=True then passes); adapter keys it lacked still are. Any other state dict is
    reported as torch reports it."""
    prefix = vars(module).pop(_LOAD_PREFIX_ATTR, None)
    if prefix is None or vars(module).get(CONFIG_ATTR) is None:
        return
    adapter = {prefix + k for k in adapter_keys(module)}
    base = {prefix + k for k in module.state_dict(keep_vars=True)} - adapter
    missing = set(incompatible_keys.missing_keys)
    if base and base <= missing and not adapter <= missing:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in base]


def mark_only_lora_trainable(model: nn.Module, bias: Optional[str] = None) -> nn.Module:
    """requires_grad only for the adapter: A, B (and lora_B_bias), modules_to_save copies, and biases
    per `bias` ("none" | "all" | "lora_only"; default: the injected config's)."""
    cfg = get_config(model)
    bias = bias if bias is not None else (cfg.bias if cfg is not None else "none")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"mark_only_lora_trainable: bias={bias!r} must be one of 'none', 'all', 'lora_only'")
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(name))
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            b = getattr(layer.base_layer, "bias", None)
            if b is not None:
                b.requires_grad_(True)
    return model


def _is_adapter_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("lora_A", "lora_B", "lora_B_bias") or ".trained_module." in f".{name}"


def adapter_keys(model: nn.Module) -> list[str]:
    """The keys of model.state_dict() that hold the adapter, in its order: lora_state_dict's parameters and
    the buffers of the modules_to_save copies; everything else is the base model's."""
    keys = set(lora_state_dict(model))
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            keys.update(f"{name}.trained_module.{k}" for k in module.trained_module.state_dict(keep_vars=True))
    return [k for k in model.state_dict(keep_vars=True) if k in keys]


def lora_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The adapter alone, keyed by the model's parameter names: LoRA factors, modules_to_save copies,
    and the biases the config's `bias` mode trains."""
    cfg = get_config(model)
    bias = cfg.bias if cfg is not None else "none"
    lora_bias_names = {f"{n}.base_layer.bias" for n, _ in lora_layers(model)}
    out = OrderedDict()
    for name, p in model.named_parameters():
        if _is_adapter_param(name) or (bias == "all" and name.endswith("bias")) or \
                (bias == "lora_only" and name in lora_bias_names):
            out[name] = p.detach()
    return out
