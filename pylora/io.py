"""PEFT adapter files: read_adapter / read_adapters read and validate them without a model (this
file); load_adapter injects and loads in one step (adapter_load.py); save_adapter writes them
(adapter_save.py). Every failure is an AdapterError.

On disk, what PEFT writes for LoRA, in DIR (a named adapter other than "default": DIR/<name>/):
  adapter_config.json          PEFT's LoraConfig fields (see pylora.adapter_config)
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

Names in AdapterFile are the plain model's: module names without "base_model.model.", extra tensors
under the parameter names of the model before injection ("classifier.weight", "...q_proj.bias").
"""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Union

import torch

from pylora import adapter_config
from pylora.config import LoraConfig
from pylora.tensor_files import FileProblem, load_pickle, load_safetensors, read_bytes

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
_SUFFIXES = {
    "lora_A.weight": ("lora", "A"), "lora_B.weight": ("lora", "B"), "lora_B.bias": ("lora", "B_bias"),
    "lora_embedding_A": ("embedding", "A"), "lora_embedding_B": ("embedding", "B"),
}
_ROLE_SUFFIX = {("lora", "A"): "lora_A.weight", ("lora", "B"): "lora_B.weight", ("lora", "B_bias"): "lora_B.bias",
                ("embedding", "A"): "lora_embedding_A", ("embedding", "B"): "lora_embedding_B"}
_MAX_LISTED = 25


class AdapterError(ValueError):
    """An adapter that cannot be read, validated, loaded or saved.

    `problems` lists every problem found, each naming the file, the key or field, the value found and
    what was expected; `path` is the adapter directory (or None)."""

    def __init__(self, problems: Union[str, list[str]], path: Optional[str] = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            listed = self.problems[:_MAX_LISTED]
            more = len(self.problems) - len(listed)
            message = f"{path}: {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in listed) + \
                (f"\n  ... and {more} more" if more else "")
        super().__init__(message)


class AdapterWarning(UserWarning):
    """With strict=False: a key the adapter holds that is not used, or one it lacks (left at zero)."""


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
class AdapterFile:
    """A validated adapter, read without a model.

    path: the adapter directory; weights_file: the file the tensors came from; config: its LoraConfig;
    raw_config: adapter_config.json as read; modules: module name -> ModuleWeights; extra_tensors: the
    other tensors it applies (modules_to_save copies, trained biases, embedding weights) under the plain
    model's parameter names, with extra_kinds[name] in "modules_to_save" | "bias" | "embedding";
    ignored: file key -> why it is not used (PEFT's redundant copies; unexpected keys with strict=False);
    key_prefix: "base_model.model." as PEFT writes keys, or "" for files without it.
    """

    path: str
    weights_file: str
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
    AdapterFile when there is no problem (AdapterError otherwise)."""

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

    def adapter(self) -> AdapterFile:
        if self.problems:
            raise AdapterError(self.problems, self.path)
        return AdapterFile(path=self.path, weights_file=self.weights_file, config=self.config,
                           raw_config=self.raw_config, modules=self.modules, extra_tensors=self.extra_tensors,
                           extra_kinds=self.extra_kinds, ignored=self.ignored, key_prefix=self.key_prefix)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def read_adapter(path: Union[str, os.PathLike], adapter_name: Optional[str] = None, *, allow_pickle: bool = False,
                 strict: bool = True) -> AdapterFile:
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


def progress_enabled(progress: Optional[bool] = None) -> bool:
    """Progress bars are on when asked for, or by default when stderr is a terminal and TQDM_DISABLE
    is not set."""
    if progress is not None:
        return bool(progress)
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def read_adapters(paths: Union[Mapping[str, Union[str, os.PathLike]], Iterable[Union[str, os.PathLike]]], *,
                  allow_pickle: bool = False, strict: bool = True, on_error: str = "raise",
                  progress: Optional[bool] = None) -> dict[str, AdapterFile]:
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
    from tqdm.auto import tqdm

    out = {}
    with tqdm(items, desc="reading adapters", unit="adapter", disable=not progress_enabled(progress),
              file=sys.stderr) as bar:
        for name, p in bar:
            try:
                out[name] = read_adapter(p, allow_pickle=allow_pickle, strict=strict)
            except AdapterError as exc:
                if on_error == "raise":
                    raise
                warnings.warn(f"read_adapters: adapter {name!r} left out: {exc}", AdapterWarning, stacklevel=2)
    return out


def _check_adapter_name(adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name in (".", "..") or \
            any(c in adapter_name for c in ("/", "\\", "\0", os.sep)):
        raise AdapterError(f"adapter_name={adapter_name!r} must be a plain folder name (not empty, '.' or '..', "
                           "no path separators)")


def _adapter_dir(path, adapter_name) -> str:
    path = os.fspath(path)
    if adapter_name is not None and adapter_name != "default":
        _check_adapter_name(adapter_name)
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


class _DuplicateField(Exception):
    pass


def _unique_fields(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateField(key)
        seen[key] = value
    return seen


def _read_config(config_file: str) -> dict:
    data = read_bytes(config_file, MAX_CONFIG_BYTES, "an adapter directory holds adapter_config.json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{config_file}: not UTF-8 text (invalid byte at offset {exc.start}); expected JSON") \
            from None
    try:
        raw = json.loads(text, object_pairs_hook=_unique_fields)
    except _DuplicateField as exc:
        raise FileProblem(f"{config_file}: field {exc.args[0]!r} appears more than once; expected each field "
                          "once") from None
    except json.JSONDecodeError as exc:
        raise FileProblem(f"{config_file}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") \
            from None
    except RecursionError:
        raise FileProblem(f"{config_file}: malformed JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise FileProblem(f"{config_file}: holds a JSON {type(raw).__name__}, expected an object of config fields")
    return raw


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
        ins.raw_config = _read_config(ins.config_file)
        ins.config, problems = adapter_config.config_from_json(ins.raw_config, ins.config_file)
        ins.problems += problems
        ins.weights_file, ins.tensors = _read_weights(ins.path, allow_pickle)
    except FileProblem as exc:
        ins.problems.append(str(exc))
        return ins
    _sort_keys(ins, _usable_tensors(ins), strict)
    return ins


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _usable_tensors(ins: AdapterInspection) -> dict[str, torch.Tensor]:
    """The float, finite tensors; a problem for each other one."""
    usable = {}
    for key, t in ins.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            ins.problems.append(f"{ins.weights_file}: key {key!r}: dtype {_dtype_name(t.dtype)} is not supported "
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
    for suffix in _SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return name, None


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


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
        family, role = _SUFFIXES[suffix]
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
            ins.problems.append(f"{wf}: key {prefix + module + '.' + _ROLE_SUFFIX[family, role]!r} is missing: module "
                                f"{module!r} has {have} but a LoRA module needs both A and B")
            return None
    (ka, A), (kb, B) = keys["A"], keys["B"]
    if family == "embedding":
        kind, b_shape = "embedding", "[D, r]"
        if A.dim() != 2:
            ins.problems.append(f"{wf}: key {ka!r}: shape {_shape(A)}; expected [r, V] for an embedding")
            return None
    elif A.dim() == 2:
        kind, b_shape = "linear", "[O, r]"
    elif A.dim() == 4:
        kind, b_shape = "conv2d", "[C_out, r, 1, 1]"
    else:
        ins.problems.append(f"{wf}: key {ka!r}: shape {_shape(A)} has {A.dim()} dimensions; expected 2 ([r, I]: "
                            "Linear, Conv1D) or 4 ([r, C_in, kh, kw]: Conv2d)")
        return None
    r = int(A.shape[0])
    b_ok = B.dim() == (4 if kind == "conv2d" else 2) and (kind != "conv2d" or tuple(B.shape[2:]) == (1, 1))
    if not b_ok:
        ins.problems.append(f"{wf}: key {kb!r}: shape {_shape(B)}; expected {b_shape} for {ka!r} of shape "
                            f"{_shape(A)}")
        return None
    if int(B.shape[1]) != r:
        ins.problems.append(f"{wf}: module {module!r}: the ranks of A and B disagree: {ka!r} has shape {_shape(A)} "
                            f"(r={r}) and {kb!r} has shape {_shape(B)} (r={int(B.shape[1])})")
        return None
    if A.numel() == 0 or B.numel() == 0:
        ins.problems.append(f"{wf}: module {module!r}: {ka!r} has shape {_shape(A)} and {kb!r} has shape "
                            f"{_shape(B)}; expected no zero-size dimension (r >= 1)")
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
        ins.problems.append(f"{wf}: key {ka!r}: shape {_shape(A)} has rank {r}, but {CONFIG_NAME} gives module "
                            f"{module!r} {source}={expected_r}")
        return None
    bias_tensor = None
    if bias is not None:
        kbb, bb = bias
        if not cfg.lora_bias:
            unexpected(kbb, "the config has lora_bias=false, so B has no bias")
        elif tuple(bb.shape) != (int(B.shape[0]),):
            ins.problems.append(f"{wf}: key {kbb!r}: shape {_shape(bb)}; expected [{int(B.shape[0])}] (the out size "
                                f"of {kb!r}, shape {_shape(B)})")
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


def _saved_module(cfg: LoraConfig, name: str) -> Optional[tuple[str, str]]:
    """(module, rest) when `name` lies inside a modules_to_save entry's module."""
    for entry in cfg.modules_to_save or []:
        m = re.match(rf"^(?P<module>(?:.*\.)?{re.escape(entry)})\.(?P<rest>.+)$", name)
        if m:
            return m.group("module"), m.group("rest")
    return None


def _sort_extra(ins, key, name, t, parts, unexpected) -> None:
    cfg = ins.config

    def add(plain: str, kind: str) -> None:
        if plain in ins.extra_tensors:
            ins.problems.append(f"{ins.weights_file}: key {key!r} and another key both hold parameter {plain!r}; "
                                "expected one")
        else:
            ins.extra_tensors[plain], ins.extra_kinds[plain] = t, kind

    saved = _saved_module(cfg, name)
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


# The model-side halves use this module's types; they are imported last so that `pylora.io` offers
# the whole file API.
from pylora.adapter_load import load_adapter  # noqa: E402
from pylora.adapter_save import adapter_tensors, save_adapter  # noqa: E402
