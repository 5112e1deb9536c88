"""Reading an adapter directory (PEFT's layout; pylora.adapters.format) into a validated Adapter,
without a model: read_adapter / inspect_adapter for one directory, read_adapters for many, and
inspect_tensors, the same checks on a config dict and file tensors from elsewhere (a model in memory).
Every failure is an AdapterError naming the file, key or field, the value found and what was expected.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Iterable, Mapping, Optional, Union

import torch

from pylora.adapters import config_json
from pylora.adapters.errors import AdapterError, AdapterWarning
from pylora.adapters.format import (CONFIG_NAME, EMBEDDING_LAYER_NAMES, FLOAT_DTYPES, MAX_CONFIG_BYTES, PICKLE_NAME,
                                    PREFIX, ROLE_SUFFIX, SUFFIXES, WEIGHTS_NAME, Adapter, AdapterInspection,
                                    ModuleWeights)
from pylora.util.files import FileProblem, read_json
from pylora.util.names import dtype_name, shape
from pylora.util.patterns import PatternError
from pylora.util.progress import progress_bar
from pylora.util.safetensors import load_pickle, load_safetensors


def read_adapter(path: Union[str, os.PathLike], adapter_name: Optional[str] = None, *, allow_pickle: bool = False,
                 strict: bool = True) -> Adapter:
    """Read and validate the adapter in directory `path` (its subfolder `adapter_name` when that is
    given and not "default", as PEFT saves named adapters), without a model.

    Semantics: adapter_config.json -> LoraConfig (PEFT fields pylora cannot reproduce are refused);
    adapter_model.safetensors (adapter_model.bin only with allow_pickle=True, via
    torch.load(weights_only=True)) -> float, finite tensors whose keys and shapes fit PEFT's layout and
    the config's ranks. strict=False turns keys the adapter cannot use, and lora_B.bias tensors it
    lacks, into AdapterWarnings. Raises AdapterError listing every problem.
    """
    inspection = inspect_adapter(path, adapter_name, allow_pickle=allow_pickle, strict=strict)
    adapter = inspection.adapter()
    for message in inspection.warnings:
        warnings.warn(message, AdapterWarning, stacklevel=2)
    return adapter


def read_adapters(paths: Union[Mapping[str, Union[str, os.PathLike]], Iterable[Union[str, os.PathLike]]], *,
                  allow_pickle: bool = False, strict: bool = True, on_error: str = "raise",
                  progress: Optional[bool] = None) -> dict[str, Adapter]:
    """Read many adapter directories (a mapping name -> directory, or directories named by their last
    path component), with a progress bar (see progress_enabled).

    Semantics: {name: read_adapter(dir)} in the given order. on_error="raise" raises the first
    AdapterError; "warn" issues it as an AdapterWarning and leaves that adapter out.
    """
    if on_error not in ("raise", "warn"):
        raise ValueError(f"read_adapters: on_error={on_error!r} must be 'raise' or 'warn'")
    if isinstance(paths, Mapping):
        items = [(str(name), p) for name, p in paths.items()]
    else:
        items = [(os.path.basename(os.path.normpath(os.fspath(p))), p) for p in paths]
    duplicates = sorted(n for n, count in Counter(name for name, _ in items).items() if count > 1)
    if duplicates:
        raise ValueError(f"read_adapters: adapter names {duplicates} appear more than once; pass a mapping "
                         "name -> directory")
    out = {}
    with progress_bar(items, progress=progress, desc="reading adapters", unit="adapter") as bar:
        for name, p in bar:
            try:
                out[name] = read_adapter(p, allow_pickle=allow_pickle, strict=strict)
            except AdapterError as exc:
                if on_error == "raise":
                    raise
                warnings.warn(f"read_adapters: adapter {name!r} left out: {exc}", AdapterWarning, stacklevel=2)
    return out


def check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name in (".", "..") or \
            any(c in adapter_name for c in ("/", "\\", "\0", os.sep)):
        raise AdapterError(f"adapter_name={adapter_name!r} must be a plain folder name (not empty, '.' or '..', "
                           "no path separators)")


def _adapter_dir(path, adapter_name) -> str:
    path = os.fspath(path)
    if adapter_name is not None and adapter_name != "default":
        check_adapter_name(adapter_name)
        path = os.path.join(path, adapter_name)
    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise FileProblem(f"{path}: {what} (an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not os.path.lexists(os.path.join(path, CONFIG_NAME)):
        named = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
        if named:
            raise FileProblem(f"{os.path.join(path, CONFIG_NAME)}: missing; adapters lie in subfolders "
                              f"({', '.join(named)}): pass adapter_name=<subfolder> or the subfolder's path")
    return path


def _read_weights(directory: str, allow_pickle: bool) -> tuple[str, dict[str, torch.Tensor]]:
    st_file, pk_file = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, PICKLE_NAME)
    if os.path.lexists(st_file):
        return st_file, load_safetensors(st_file)
    if os.path.lexists(pk_file):
        if not allow_pickle:
            raise FileProblem(f"{pk_file}: a pickle file is refused (unpickling can run code); pass "
                              "allow_pickle=True to read it with torch.load(weights_only=True), or convert it to "
                              f"{WEIGHTS_NAME}")
        return pk_file, load_pickle(pk_file)
    raise FileProblem(f"{st_file}: missing (and there is no {PICKLE_NAME}): the adapter has no weights file")


def inspect_adapter(path: Union[str, os.PathLike], adapter_name: Optional[str] = None, *,
                    allow_pickle: bool = False, strict: bool = True) -> AdapterInspection:
    """Everything read_adapter checks, collected instead of raised (`pylora info --adapter` prints it).

    Semantics: the checks of read_adapter, in order; a file that cannot be read at all (missing,
    malformed, truncated) stops the inspection, every other problem is listed and the inspection goes
    on, so that `.modules` holds every module that passed and `.tensors` everything the weights file
    holds. `.adapter()` is read_adapter's result (or its AdapterError)."""
    ins = AdapterInspection(path=os.fspath(path))
    try:
        ins.path = _adapter_dir(path, adapter_name)
        ins.config_file = os.path.join(ins.path, CONFIG_NAME)
        raw = read_json(ins.config_file, MAX_CONFIG_BYTES, "an adapter directory's adapter_config.json")
        if not isinstance(raw, dict):
            raise FileProblem(f"{ins.config_file}: holds a JSON {type(raw).__name__}, expected an object of config "
                              "fields")
        ins.raw_config = raw
        ins.config, problems = config_json.config_from_json(ins.raw_config, ins.config_file)
        ins.problems += problems
        ins.weights_file, ins.tensors = _read_weights(ins.path, allow_pickle)
    except FileProblem as exc:
        ins.problems.append(str(exc))
        return ins
    _validate(ins, strict)
    return ins


def inspect_tensors(raw_config: dict, tensors: dict[str, torch.Tensor], where: str, *,
                    strict: bool = True) -> AdapterInspection:
    """The checks of inspect_adapter on an adapter given as its adapter_config.json dict and its file
    tensors (PEFT's keys), as a model in memory presents itself; `where` names it in every problem."""
    ins = AdapterInspection(path=where, config_file=f"{where}: {CONFIG_NAME}", weights_file=where,
                            raw_config=raw_config, tensors=dict(tensors))
    ins.config, problems = config_json.config_from_json(raw_config, ins.config_file)
    ins.problems += problems
    _validate(ins, strict)
    return ins


def _validate(ins: AdapterInspection, strict: bool) -> None:
    try:
        _sort_keys(ins, _usable_tensors(ins), strict)
    except PatternError as exc:  # a config pattern that ran out of time: nothing more can be matched
        ins.problems.append(f"{ins.config_file}: {exc}")


def _usable_tensors(ins: AdapterInspection) -> dict[str, torch.Tensor]:
    """The float, finite tensors; a problem for each other one."""
    usable = {}
    for key, t in ins.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            ins.problems.append(f"{ins.weights_file}: key {key!r}: dtype {dtype_name(t.dtype)} is not supported "
                                "(expected float16, bfloat16, float32 or float64)")
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = bad.nonzero()[0].tolist()
            value = t[tuple(first)].item()
            ins.problems.append(f"{ins.weights_file}: key {key!r}: {int(bad.sum())} of {t.numel()} values are not "
                                f"finite (first: {value} at index {first}); expected finite values")
            continue
        usable[key] = t
    return usable


def _split_lora_key(name: str) -> tuple[str, Optional[str]]:
    for suffix in SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, None


def _sort_keys(ins: AdapterInspection, usable: dict[str, torch.Tensor], strict: bool) -> None:
    """Group the keys into LoRA modules and extra tensors, checking shapes, ranks and the config."""
    wf, cfg = ins.weights_file, ins.config
    prefixed = [k for k in ins.tensors if k.startswith(PREFIX)]
    if prefixed and len(prefixed) < len(ins.tensors):
        other = next(k for k in ins.tensors if not k.startswith(PREFIX))
        ins.problems.append(f"{wf}: {len(prefixed)} keys start with {PREFIX!r} and {len(ins.tensors) - len(prefixed)} "
                            f"do not (e.g. {other!r}); expected one form for every key")
    prefix = ins.key_prefix = PREFIX if prefixed else ""

    def unexpected(key: str, why: str) -> None:
        if strict:
            ins.problems.append(f"{wf}: unexpected key {key!r}: {why}")
        else:
            ins.warnings.append(f"{wf}: unexpected key {key!r} ignored (strict=False): {why}")
            ins.ignored[key] = why

    parts: dict[str, dict] = {}
    others = []
    for key, t in ins.tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, suffix = _split_lora_key(name)
        if suffix is None:
            if key in usable:
                others.append((key, name, t))
            continue
        family, role = SUFFIXES[suffix]
        entry = parts.setdefault(module, {"keys": {}, "families": set(), "bad": False})
        entry["families"].add(family)
        if key not in usable:
            entry["bad"] = True  # its problem is already listed
        elif role in entry["keys"]:
            ins.problems.append(f"{wf}: module {module!r} has two keys for {suffix}: {entry['keys'][role][0]!r} and "
                                f"{key!r}; expected one")
            entry["bad"] = True
        else:
            entry["keys"][role] = (key, t)

    if not parts:
        ins.problems.append(f"{wf}: holds no LoRA tensors ({len(ins.tensors)} tensors, none named like "
                            f"{PREFIX}<module>.lora_A.weight or .lora_embedding_A); expected a LoRA adapter")
    for module, entry in parts.items():
        if not entry["bad"]:
            weights = _module_weights(ins, module, entry, prefix, strict, unexpected)
            if weights is not None:
                ins.modules[module] = weights
    if cfg is not None:
        for key, name, t in others:
            _sort_extra(ins, key, name, t, parts, unexpected)


def _module_weights(ins, module, entry, prefix, strict, unexpected) -> Optional[ModuleWeights]:
    wf, cfg, keys = ins.weights_file, ins.config, entry["keys"]
    if len(entry["families"]) > 1:
        ins.problems.append(f"{wf}: module {module!r} has both lora_A/lora_B and lora_embedding_A/lora_embedding_B "
                            "keys; expected one pair")
        return None
    family = next(iter(entry["families"]))
    for role in ("A", "B"):
        if role not in keys:
            have = ", ".join(repr(k) for k, _ in keys.values())
            ins.problems.append(f"{wf}: key {prefix + module + '.' + ROLE_SUFFIX[family, role]!r} is missing: module "
                                f"{module!r} has {have} but a LoRA module needs both A and B")
            return None
    (ka, A), (kb, B) = keys["A"], keys["B"]
    if family == "embedding":
        kind, b_shape = "embedding", "[D, r]"
        if A.dim() != 2:
            ins.problems.append(f"{wf}: key {ka!r}: shape {shape(A)}; expected [r, V] for an embedding")
            return None
    elif A.dim() == 2:
        kind, b_shape = "linear", "[O, r]"
    elif A.dim() == 4:
        kind, b_shape = "conv2d", "[C_out, r, 1, 1]"
    else:
        ins.problems.append(f"{wf}: key {ka!r}: shape {shape(A)} has {A.dim()} dimensions; expected 2 ([r, I]: "
                            "Linear, Conv1D) or 4 ([r, C_in, kh, kw]: Conv2d)")
        return None
    r = int(A.shape[0])
    b_ok = B.dim() == (4 if kind == "conv2d" else 2) and (kind != "conv2d" or tuple(B.shape[2:]) == (1, 1))
    if not b_ok:
        ins.problems.append(f"{wf}: key {kb!r}: shape {shape(B)}; expected {b_shape} for {ka!r} of shape "
                            f"{shape(A)}")
        return None
    if int(B.shape[1]) != r:
        ins.problems.append(f"{wf}: module {module!r}: the ranks of A and B disagree: {ka!r} has shape {shape(A)} "
                            f"(r={r}) and {kb!r} has shape {shape(B)} (r={int(B.shape[1])})")
        return None
    if A.numel() == 0 or B.numel() == 0:
        ins.problems.append(f"{wf}: module {module!r}: {ka!r} has shape {shape(A)} and {kb!r} has shape "
                            f"{shape(B)}; expected no zero-size dimension (r >= 1)")
        return None
    bias = keys.get("B_bias")
    if cfg is None:
        return None
    if not cfg.is_all_linear() and not cfg.matches(module):
        for k, _ in keys.values():
            unexpected(k, f"module {module!r} is not selected by the config's target_modules="
                          f"{cfg.target_modules!r} (exclude_modules={cfg.exclude_modules!r}, layers_to_transform="
                          f"{cfg.layers_to_transform!r})")
        return None
    expected_r = cfg.rank_for(module)
    if r != expected_r:
        source = cfg.pattern_key(cfg.rank_pattern, module)
        source = f"rank_pattern[{source!r}]" if source is not None else "r"
        ins.problems.append(f"{wf}: key {ka!r}: shape {shape(A)} has rank {r}, but {CONFIG_NAME} gives module "
                            f"{module!r} {source}={expected_r}")
        return None
    bias_tensor = None
    if bias is not None:
        kbb, bb = bias
        if not cfg.lora_bias:
            unexpected(kbb, "the config has lora_bias=false, so B has no bias")
        elif tuple(bb.shape) != (int(B.shape[0]),):
            ins.problems.append(f"{wf}: key {kbb!r}: shape {shape(bb)}; expected [{int(B.shape[0])}] (the out size "
                                f"of {kb!r}, shape {shape(B)})")
            return None
        else:
            bias_tensor = bb
    elif cfg.lora_bias and kind != "embedding":
        missing = f"{wf}: key {prefix + module + '.lora_B.bias'!r} is missing: the config has lora_bias=true"
        if strict:
            ins.problems.append(missing)
            return None
        ins.warnings.append(missing + " (left at zero: strict=False)")
    return ModuleWeights(kind=kind, lora_A=A, lora_B=B, lora_B_bias=bias_tensor, r=r,
                         alpha=float(cfg.alpha_for(module)), scale=float(cfg.scale_for(module)))


def _sort_extra(ins, key, name, t, parts, unexpected) -> None:
    cfg = ins.config

    def add(plain: str, kind: str) -> None:
        if plain in ins.extra_tensors:
            ins.problems.append(f"{ins.weights_file}: key {key!r} and another key both hold parameter {plain!r}; "
                                "expected one")
        else:
            ins.extra_tensors[plain], ins.extra_kinds[plain] = t, kind

    saved = cfg.split_saved(name)
    if saved is not None:
        module, rest = saved
        if rest.startswith(("original_module.", "modules_to_save.")):
            if cfg.bias == "all" and rest.count(".") == 1 and rest.endswith(".bias"):
                ins.ignored[key] = (f"PEFT's copy of a modules_to_save bias (bias='all'); the trained value is "
                                    f"{module}.bias")
            else:
                unexpected(key, f"inside modules_to_save module {module!r}, PEFT stores the trained copy's tensors "
                                f"as {module}.<name>")
            return
        add(name, "modules_to_save")
        return
    if ".base_layer." in name:
        owner, _, param = name.partition(".base_layer.")
        if owner not in parts:
            unexpected(key, f"a base tensor of module {owner!r}, which has no LoRA factors in this file")
        elif "." in param:
            unexpected(key, f"module {owner!r}'s base layer has no nested tensor {param!r}")
        elif param == "bias" and cfg.bias in ("all", "lora_only"):
            add(f"{owner}.bias", "bias")
        elif owner.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES or "embedding" in parts[owner]["families"]:
            add(f"{owner}.{param}", "embedding")
        else:
            unexpected(key, f"a base tensor of LoRA module {owner!r}: PEFT stores base tensors only for biases "
                            f"(bias='all' or 'lora_only'; this config has bias={cfg.bias!r}) and for embedding layers")
        return
    module, _, param = name.rpartition(".")
    if module in parts:
        unexpected(key, f"module {module!r} is a LoRA module: its base tensors are stored as "
                        f"{module}.base_layer.{param}")
    elif param == "bias" and cfg.bias == "all":
        add(name, "bias")
    elif module.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES:
        add(name, "embedding")
    else:
        unexpected(key, f"{name!r} is neither a LoRA factor nor a tensor this config saves (bias={cfg.bias!r}, "
                        f"modules_to_save={cfg.modules_to_save!r})")
