"""LoraConfig: PEFT's LoRA field names and meanings, validated when it is built."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from pylora.util import patterns

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


def _regex(name: str, pattern: str) -> None:
    try:
        patterns.check(name, pattern)
    except patterns.PatternError as exc:
        raise ValueError(f"LoraConfig: {exc}") from None


def names_module(entry: str, name: str) -> bool:
    """PEFT's rule for a list entry (target_modules, exclude_modules, modules_to_save): module `name`
    is the entry or ends in "." + entry."""
    return name == entry or name.endswith("." + entry)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """The LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _scale_fits(name: str, r: int, alpha: float, use_rslora: bool) -> None:
    # The kernels take the scale as float32: one that overflows (or underflows to zero) there would make
    # every forward fail or the adapter vanish.
    s = lora_scale(r, alpha, use_rslora)
    if not _FLOAT32_TINY <= s <= _FLOAT32_MAX:
        rule = f"{name} / sqrt(r)" if use_rslora else f"{name} / r"
        raise ValueError(f"LoraConfig: {name}={alpha!r} gives the scale {rule} = {s:g} with r={r}, outside float32's "
                         f"normal range [{_FLOAT32_TINY:g}, {_FLOAT32_MAX:g}]")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LoraConfig: {name}={value!r} must be an integer >= 1")


def _positive_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"LoraConfig: {name}={value!r} must be a finite number > 0")


@dataclass
class LoraConfig:
    """Where LoRA goes and how it is shaped, with PEFT's field names and meanings.

    Semantics: every module whose name matches `target_modules` (a list: the name equals an entry
    or ends with "." + entry; a string: a full-match regex; "all-linear": every Linear/Conv1D but
    the output layer), is not excluded, and (with layers_to_transform) sits in a chosen layer, gets
    A [r, I] and B [O, r] with scale lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).
    rank_pattern / alpha_pattern override r / lora_alpha for the modules their keys match (the
    first key k for which the name matches "(.*\\.)?(k)$", as PEFT does). target_modules=None means
    PEFT's default for the model's type (pylora.nn.targets), chosen by inject when it sees the model.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False
    use_dora: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False

    def __post_init__(self):
        _positive_int("r", self.r)
        _positive_finite("lora_alpha", self.lora_alpha)
        if self.target_modules is None:
            pass  # PEFT's default for the model's type, chosen when the config meets a model (pylora.nn.targets)
        elif isinstance(self.target_modules, str):
            if self.target_modules.lower() != ALL_LINEAR:
                _regex("target_modules", self.target_modules)
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"LoraConfig: target_modules={self.target_modules!r} must be a non-empty list of "
                                 "module names, a regex string, or 'all-linear'")
        if isinstance(self.exclude_modules, str):
            _regex("exclude_modules", self.exclude_modules)
        elif self.exclude_modules is not None:
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) \
                or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig: bias={self.bias!r} must be one of {', '.join(map(repr, BIAS_MODES))}")
        if self.init_lora_weights not in INIT_MODES or (
                isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool)):
            raise ValueError(f"LoraConfig: init_lora_weights={self.init_lora_weights!r} is not supported "
                             "(True, False or 'gaussian'; initialisations that rewrite the base weight, such as "
                             "PiSSA, OLoRA or LoftQ, are not)")
        if self.use_dora:
            raise ValueError("LoraConfig: use_dora=True is not supported (DoRA changes the forward; pylora "
                             "implements plain LoRA)")
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name) or {}
            setattr(self, name, dict(pattern))
            for key, value in pattern.items():
                _regex(f"{name} key", key)
                (_positive_int if name == "rank_pattern" else _positive_finite)(f"{name}[{key!r}]", value)
        # Any alpha may meet any rank (the patterns' keys select modules independently).
        ranks = sorted({self.r, *self.rank_pattern.values()})
        for name, alpha in [("lora_alpha", self.lora_alpha)] + \
                [(f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()]:
            for r in ranks:
                _scale_fits(name, r, alpha, self.use_rslora)
        if self.layers_pattern is not None:
            layer_patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(layer_patterns, (list, tuple)) or not layer_patterns:
                raise ValueError(f"LoraConfig: layers_pattern={self.layers_pattern!r} must be a regex string or a "
                                 "non-empty list of them")
            for p in layer_patterns:
                _regex("layers_pattern", p)
            if not isinstance(self.layers_pattern, str):
                self.layers_pattern = list(layer_patterns)
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) \
                else list(self.layers_to_transform)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"LoraConfig: layers_to_transform={self.layers_to_transform!r} must be layer "
                                 "indices >= 0")
            if not isinstance(self.layers_to_transform, int):
                self.layers_to_transform = layers
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            if not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(f"LoraConfig: modules_to_save={self.modules_to_save!r} must be module names")

    # ------------------------------------------------------------------------------------------
    # What each module gets
    # ------------------------------------------------------------------------------------------

    def is_all_linear(self) -> bool:
        return isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR

    def is_excluded(self, key: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return patterns.fullmatch("exclude_modules", ex, key)
        return any(names_module(e, key) for e in ex)

    def saves(self, name: str) -> bool:
        """Whether module `name` is one a modules_to_save entry names: equal to it or ending in "." + it."""
        return any(names_module(e, name) for e in self.modules_to_save or [])

    def split_saved(self, name: str) -> Optional[tuple[str, str]]:
        """(module, rest) when `name` lies inside a module that modules_to_save names (the outermost one),
        e.g. "score.weight" -> ("score", "weight"); else None."""
        parts = name.split(".")
        for i in range(1, len(parts)):
            module = ".".join(parts[:i])
            if self.saves(module):
                return module, ".".join(parts[i:])
        return None

    def is_saved_module(self, key: str) -> bool:
        """A modules_to_save module or inside one (never a LoRA target: the two would conflict)."""
        return self.saves(key) or self.split_saved(key) is not None

    def matches(self, key: str) -> bool:
        """Whether the module named `key` is a target (exclusions included), as PEFT decides it.
        With "all-linear" the caller resolves the list of linear layers first (inject does)."""
        targets = self.target_modules
        if targets is None:
            raise ValueError("LoraConfig: target_modules=None selects no module by itself: the default for a "
                             "model's type is chosen by inject (pylora.nn.targets.with_default_targets)")
        if self.is_excluded(key) or self.is_saved_module(key):
            return False
        if isinstance(targets, str):
            return patterns.fullmatch("target_modules", targets, key)
        if key in targets:
            return True
        if not any(names_module(t, key) for t in targets):
            return False
        layers = self.layers_to_transform
        if layers is None or (isinstance(layers, list) and not layers):
            return True
        idx = self.layer_index(key)
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers

    def layer_index(self, key: str) -> Optional[int]:
        """The first numbered segment of a module name (PEFT's rule for layers_to_transform)."""
        layer_patterns = self.layers_pattern
        if not layer_patterns:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            m = None
            for pattern in [layer_patterns] if isinstance(layer_patterns, str) else layer_patterns:
                m = patterns.match("layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, shown=pattern)
                if m is not None:
                    break
        return int(m.group("idx")) if m else None

    @staticmethod
    def pattern_key(keys, name: str, field: str = "rank_pattern") -> Optional[str]:
        """The first key of a rank/alpha pattern that matches module `name` (PEFT's get_pattern_key)."""
        for key in keys:
            if patterns.match(f"{field} key", rf"(.*\.)?({key})$", name, shown=key):
                return key
        return None

    def rank_for(self, name: str) -> int:
        key = self.pattern_key(self.rank_pattern, name, "rank_pattern")
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, name: str) -> float:
        key = self.pattern_key(self.alpha_pattern, name, "alpha_pattern")
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scale_for(self, name: str) -> float:
        return lora_scale(self.rank_for(name), self.alpha_for(name), self.use_rslora)

    # ------------------------------------------------------------------------------------------
    # PEFT's adapter_config.json
    # ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """Builds a config from the fields pylora knows (the caller vets the rest: pylora.io does)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
