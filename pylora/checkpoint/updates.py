"""What merging adapters into a checkpoint does to each of its tensors (its Updates), checked in full
before anything is written, and how a tensor is transformed by them.

Names. An adapter names modules as the model PEFT wrapped did ("model.layers.0.self_attn.q_proj");
a checkpoint names tensors as the model that saved it did. `<module>.weight` is looked up as is, then
without the module name's first component (an adapter made on the task model, a checkpoint saved from
the bare model: "transformer.h.0..." -> "h.0..."), then under one of the checkpoint's top-level
prefixes (an adapter made on the bare model: "layers.0..." -> "model.layers.0..."). A tied output
embedding ("lm_head" with tie_word_embeddings=true in config.json) is absent from the checkpoint, as
transformers saves the shared tensor once, under the input embedding's name; its update goes there, as
PEFT's merge into the shared parameter does.

Layouts. Linear weights are [O, I] and GPT-2's Conv1D [I, O]; the shape tells them apart unless the
weight is square, and then (PEFT's saved fan_in_fan_out reflects only the last module it wrapped, so
it is wrong for one of the two in a model with both) the checkpoint's other, non-square weights of
the same layer name decide, by which dimension their bias matches; only without such evidence does
the adapter's fan_in_fan_out. Embedding weights [V, D] take (B A)^T, Conv2d weights
[C_out, C_in, kh, kw] are merged as [C_out, C_in*kh*kw].

Order. Adapters apply in the order given, each one fully: its replacements first (modules_to_save
tensors, trained biases, saved embedding weights: they are the values PEFT loads into the model before
merging), then its LoRA updates (embeddings before the others, as PEFT meets them first in a model), then
its lora_bias additions. A replacement is not scaled by the adapter's weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from pylora import ops
from pylora.adapters.fit import beyond_range, missing_module, missing_saved_tensor, unmatched_saved_entry
from pylora.adapters.format import ROLE_SUFFIX, TASK_HEADS
from pylora.nn.config import names_module
from pylora.util.names import dtype_name, shape

MERGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# transformers' names of input and output embeddings (the tied pair).
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint merge that cannot be done; the message is one line naming the file, tensor or
    argument, the value found and what was expected. `problems` lists every problem found."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            shown = "; ".join(self.problems[:_LISTED])
            more = len(self.problems) - _LISTED
            message = f"{len(self.problems)} problems: {shown}" + (f"; and {more} more" if more > 0 else "")
        super().__init__(message)


@dataclass(frozen=True)
class Spec:
    """A checkpoint tensor's dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Update:
    """One change to one checkpoint tensor.

    Semantics: "replace": w = value; "lora": w += scale * B A (in w's merge layout, by ops.merge_: fp32
    accumulation, one rounding); "bias": w += scale * value. scale already includes the adapter's weight.
    Shapes: A [r, I] and B [O, r] (Conv2d factors flattened to that), value w's shape ("replace") or [O].
    """

    kind: str
    adapter: str
    source: str
    scale: float = 1.0
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    fan_in_fan_out: bool = False
    value: Optional[torch.Tensor] = None

    def describe(self) -> str:
        if self.kind == "replace":
            return f"the saved tensor {self.source!r} of adapter {self.adapter}"
        what = "the LoRA update" if self.kind == "lora" else "the lora_B.bias"
        return f"{what} of module {self.source!r} of adapter {self.adapter} (scale {self.scale:g})"

    def apply(self, w: torch.Tensor) -> None:
        """Change w in place; ValueError naming the position when the result would not be finite."""
        if self.kind == "replace":
            w.copy_(self.value)
            _check_finite(w, self.value)
        elif self.kind == "lora":
            ops.merge_(w.view(w.shape[0], -1) if w.dim() == 4 else w, self.A, self.B, self.scale,
                       fan_in_fan_out=self.fan_in_fan_out, record=False)  # a checkpoint is never unmerged
        else:
            # PEFT's bias.data += lora_B.bias * scaling, rounded once into w's dtype and checked first.
            w.copy_(ops.merge_bias(w, self.value, self.scale))


def _check_finite(result: torch.Tensor, source: torch.Tensor) -> None:
    """ValueError at the first element that is finite in source but not in result (an overflow)."""
    if result.numel() == 0:
        return
    # The common case with no temporaries (a reduction; NaN propagates into min and max): boolean masks
    # of a large tensor would cost more memory than the merge itself.
    lo, hi = torch.aminmax(result.reshape(-1))
    if math.isfinite(lo.item()) and math.isfinite(hi.item()):
        return
    bad = ~torch.isfinite(result) & torch.isfinite(source)
    if bad.any():
        pos = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"the result at {pos} is {result[tuple(pos)].item()}, not finite (the value there was "
                         f"{source[tuple(pos)].item()}; {result.dtype} reaches {torch.finfo(result.dtype).max:g})")


def transform(key: str, t: torch.Tensor, updates: list[Update], out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The output value of checkpoint tensor `key`: `updates` applied in order, then cast to out_dtype.

    Semantics: without a dtype change, the ops work in t's own dtype (what PEFT's merge on the model loaded
    in that dtype does, with merge_'s single rounding); with one, in float32 (half types widen exactly),
    then one cast: so fp16 -> fp32 keeps the update's full precision and fp32 -> bf16 rounds once more,
    as PEFT's merged model cast with .to(dtype) does. Floating tensors are cast, others kept (as
    transformers' model.to(dtype) does). Raises CheckpointError naming the tensor, the op and the
    position on a non-finite result, including an overflow of the cast.
    """
    target = out_dtype if out_dtype is not None and t.dtype.is_floating_point else t.dtype
    if not updates:
        out = t.to(target)
        if target != t.dtype:
            _cast_check(key, out, t)
        return out
    w = t if target == t.dtype else t.to(torch.float32)
    for update in updates:
        try:
            update.apply(w)
        except ValueError as exc:
            raise CheckpointError(f"tensor {key!r}: merging {update.describe()} fails: {exc}") from None
    out = w.to(target)
    if out.dtype != w.dtype:
        _cast_check(key, out, w)
    return out


def _cast_check(key: str, out: torch.Tensor, src: torch.Tensor) -> None:
    try:
        _check_finite(out, src)
    except ValueError as exc:
        raise CheckpointError(f"tensor {key!r}: casting {src.dtype} to {out.dtype} overflows: {exc}") from None


@dataclass
class Updates:
    """by_key: checkpoint key -> the updates to it, in order; tied: the output embeddings' weights found
    under the input embedding's name; warnings for the user."""

    by_key: dict[str, list[Update]] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class _Names:
    """Checkpoint lookups: adapter names to keys, tied embeddings, the Linear/Conv1D layout evidence."""

    def __init__(self, specs: dict[str, Spec], config: Optional[dict]):
        self.specs, self.config = specs, config
        self.tops = sorted({k.split(".", 1)[0] for k in specs if "." in k})
        self._votes: Optional[dict[str, set[bool]]] = None

    def find(self, name: str) -> tuple[Optional[str], str]:
        """(key, "") or (None, why not)."""
        if name in self.specs:
            return name, ""
        head, sep, rest = name.partition(".")
        if sep and rest.count(".") and rest in self.specs:
            return rest, ""
        added = [f"{t}.{name}" for t in self.tops if f"{t}.{name}" in self.specs]
        if len(added) == 1:
            return added[0], ""
        if added:
            return None, f"{name!r} matches {len(added)} checkpoint tensors ({', '.join(map(repr, added))})"
        tried = [repr(name)] + ([repr(rest)] if sep and rest.count(".") else []) + \
            ([f"'<prefix>.{name}' for prefixes {self.tops}"] if self.tops else [])
        return None, f"the checkpoint has no tensor {' or '.join(tried)}"

    def tied(self, name: str) -> tuple[Optional[str], str]:
        """The input embedding's key when `name` is the weight of an output embedding tied to it."""
        module = name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] not in OUTPUT_EMBEDDINGS:
            return None, ""
        tie = (self.config or {}).get("tie_word_embeddings")
        if tie is not True:
            return None, (f"config.json has tie_word_embeddings={tie!r}, so {module!r} is not the input embedding "
                          "(a checkpoint without it lacks that tensor)")
        found = [k for k in self.specs if k.endswith(".weight") and
                 k[:-len(".weight")].rsplit(".", 1)[-1] in INPUT_EMBEDDINGS]
        if len(found) == 1:
            return found[0], ""
        return None, (f"{module!r} is tied to the input embedding (tie_word_embeddings=true), but the checkpoint holds "
                      f"{len(found)} tensors named like one ({', '.join(map(repr, found)) or 'none'}; known names: "
                      f"{', '.join(INPUT_EMBEDDINGS)})")

    def adapter_view(self, adapter) -> dict[str, str]:
        """Every checkpoint key under the name the adapter's model gives it (key -> name), by the prefix
        relation the adapter's own names reveal: the same, the model's first component dropped from the
        checkpoint ("transformer.h.0" saved as "h.0"), or a top-level prefix added ("model.layers.0")."""
        convert = lambda k: k  # noqa: E731
        for name in list(adapter.modules) + list(adapter.extra_tensors):
            probe = name if name in adapter.extra_tensors else name + ".weight"
            key, _ = self.find(probe)
            if key is None or key == probe:
                continue
            if key == probe.partition(".")[2]:
                head = probe.partition(".")[0]
                convert = lambda k, head=head: f"{head}.{k}"  # noqa: E731
            else:
                top = key[:-len(probe) - 1]
                convert = lambda k, top=top: k[len(top) + 1:] if k.startswith(top + ".") else None  # noqa: E731
            break
        return {k: n for k in self.specs if (n := convert(k)) is not None}

    def conv1d_layout(self, key: str) -> Optional[bool]:
        """True/False when the checkpoint's non-square weights of the same layer name are all Conv1D
        ([I, O]: the bias matches dim 1) or all Linear ([O, I]: dim 0); None without evidence."""
        if self._votes is None:
            self._votes = {}
            for k, spec in self.specs.items():
                if not k.endswith(".weight") or len(spec.shape) != 2 or spec.shape[0] == spec.shape[1]:
                    continue
                bias = self.specs.get(k[:-len("weight")] + "bias")
                if bias is None or len(bias.shape) != 1:
                    continue
                if bias.shape[0] in spec.shape:
                    layer = k[:-len(".weight")].rsplit(".", 1)[-1]
                    self._votes.setdefault(layer, set()).add(bias.shape[0] == spec.shape[1])
        votes = self._votes.get(key[:-len(".weight")].rsplit(".", 1)[-1], set())
        return next(iter(votes)) if len(votes) == 1 else None


def _merge_dtype_ok(spec: Spec, out_dtype: Optional[torch.dtype]) -> bool:
    return spec.dtype in MERGE_DTYPES or (out_dtype is not None and spec.dtype.is_floating_point)


def _dtype_problem(key: str, spec: Spec, what: str) -> str:
    return (f"tensor {key!r} is {dtype_name(spec.dtype)}; {what} needs float32, float16 or "
            "bfloat16 (or, with a --dtype to convert to, any floating type, merged in float32)")


def _factor(t: torch.Tensor) -> torch.Tensor:
    # merge_ takes fp32/fp16/bf16 factors; a float64 adapter is merged with fp32 factors.
    return (t.float() if t.dtype == torch.float64 else t).contiguous()


def _coverage(view: dict[str, str], specs: dict[str, Spec], adapter, base: str) -> list[str]:
    """What the adapter's config says the model holds that the adapter lacks, against the checkpoint (the
    checks pylora.adapters.fit makes against a model, in the same words): targeted modules without
    factors, modules_to_save entries that match nothing or whose tensors are missing, the biases of its
    bias mode. A checkpoint has no module types, so target_modules="all-linear" is not resolved here
    (PEFT writes the modules it chose as a list)."""
    cfg, problems = adapter.config, []
    names = {n: k for k, n in view.items()}  # model name -> checkpoint key
    if not cfg.is_all_linear():
        for name, key in names.items():
            module = name[:-len(".weight")]
            if name.endswith(".weight") and len(specs[key].shape) in (2, 4) and module not in adapter.modules \
                    and cfg.matches(module):
                kind = "embedding" if module.rsplit(".", 1)[-1] in INPUT_EMBEDDINGS else "linear"
                problems.append(missing_module(adapter, cfg, module, kind))
    modules = {n.rsplit(".", i)[0] for n in names for i in range(1, n.count(".") + 1)}
    saved = []
    for entry in cfg.modules_to_save or []:
        found = sorted(m for m in modules if names_module(entry, m))
        held = any(cfg.split_saved(t) is not None for t in adapter.extra_tensors)
        if not found and not held and entry not in TASK_HEADS.get(cfg.task_type, ()):
            problems.append(unmatched_saved_entry(adapter, entry, base))
        saved += found
    expected = {n: "modules_to_save" for n in names for s in saved if n.startswith(s + ".")}
    if cfg.bias == "all":
        expected.update({n: "bias='all'" for n in names if n.endswith(".bias") and n not in expected})
    elif cfg.bias == "lora_only":
        expected.update({f"{m}.bias": "bias='lora_only'" for m in adapter.modules if f"{m}.bias" in names})
    for name, why in expected.items():
        if name not in adapter.extra_tensors:
            problems.append(missing_saved_tensor(adapter, base, name, why))
    for module, mw in adapter.modules.items():
        family = "embedding" if mw.kind == "embedding" else "lora"
        for role, t in (("A", mw.lora_A), ("B", mw.lora_B)):
            if t.dtype == torch.float64 and not bool(torch.isfinite(t.float()).all()):
                problems.append(beyond_range(adapter, module, ROLE_SUFFIX[family, role], torch.float32))
    return problems


def build_updates(specs: dict[str, Spec], config: Optional[dict], adapters: list,
                  out_dtype: Optional[torch.dtype], base: str = "the checkpoint") -> Updates:
    """The updates for merging `adapters` (a list of (path, Adapter, weight)) into the checkpoint whose
    tensors are `specs` (key -> Spec) and whose config.json is `config` (a dict, or None); `base` names
    the checkpoint in messages.

    Raises CheckpointError listing every problem: a module or tensor with no counterpart, a shape that
    does not fit, a dtype that cannot be merged into, what the adapter's config says the model holds and
    the adapter lacks (_coverage).
    """
    names = _Names(specs, config)
    plan, problems = Updates(), []

    def locate(name: str, where: str, tie_ok: bool) -> Optional[str]:
        key, why = names.find(name)
        if key is None and tie_ok:
            key, why_tied = names.tied(name)
            if key is not None:
                if name not in plan.tied:
                    plan.warnings.append(
                        f"{name!r} is tied to {key!r} (tie_word_embeddings): merging into it changes the input "
                        "embedding too, as PEFT's merge does, so the merged model is not the unmerged adapter's")
                plan.tied[name] = key
            why = why_tied or why
        elif key is None and names.tied(name)[0] is not None:
            why += (f" ({name!r} is tied to {names.tied(name)[0]!r} by tie_word_embeddings: the merged checkpoint "
                    "cannot hold a separate copy of it)")
        if key is None:
            problems.append(f"{where}: {why}")
        return key

    def add(key: str, op: Update) -> None:
        earlier = [o for o in plan.by_key.get(key, []) if o.adapter != op.adapter]
        if op.kind == "replace" and earlier:
            plan.warnings.append(f"tensor {key!r}: adapter {op.adapter} replaces it with {op.source!r}, discarding "
                                 f"what {len(earlier)} change(s) of earlier adapters did to it")
        plan.by_key.setdefault(key, []).append(op)

    for path, adapter, weight in adapters:
        problems += _coverage(names.adapter_view(adapter), specs, adapter, base)
        for name, value in adapter.extra_tensors.items():
            kind = adapter.extra_kinds[name]
            where = f"adapter {path}: tensor {name!r} ({kind})"
            key = locate(name, where, tie_ok=kind == "embedding")
            if key is None:
                continue
            spec = specs[key]
            if tuple(value.shape) != spec.shape:
                problems.append(f"{where}: shape {shape(value)}, but checkpoint tensor {key!r} has shape "
                                f"{list(spec.shape)}" + (" (a resized vocabulary is not supported)"
                                                         if kind == "embedding" else ""))
            elif not spec.dtype.is_floating_point:
                problems.append(f"{where}: checkpoint tensor {key!r} is {spec.dtype}; expected a floating type")
            else:
                add(key, Update("replace", path, name, value=value))

        bias_ops = []
        modules = sorted(adapter.modules.items(), key=lambda item: item[1].kind != "embedding")
        for module, mw in modules:
            where = f"adapter {path}: LoRA module {module!r} ({mw.kind}, lora_A {shape(mw.lora_A)}, lora_B " \
                    f"{shape(mw.lora_B)})"
            key = locate(module + ".weight", where, tie_ok=mw.kind == "linear")
            if key is None:
                continue
            spec = specs[key]
            A, B, O, I = mw.lora_A, mw.lora_B, mw.out_features, mw.in_features
            fifo = False
            if mw.kind == "linear":
                if len(spec.shape) != 2 or sorted(spec.shape) != sorted((O, I)):
                    problems.append(f"{where}: checkpoint tensor {key!r} has shape {list(spec.shape)}; expected "
                                    f"[{O}, {I}] (Linear [O, I]) or [{I}, {O}] (Conv1D [I, O])")
                    continue
                if O != I:
                    fifo = spec.shape == (I, O)
                else:
                    evidence = names.conv1d_layout(key)
                    fifo = adapter.config.fan_in_fan_out if evidence is None else evidence
            elif mw.kind == "embedding":
                fifo = True  # weight [V, D] += s (B A)^T: merge_'s [I, O] layout with I = V, O = D
                if spec.shape != (I, O):
                    problems.append(f"{where}: checkpoint tensor {key!r} has shape {list(spec.shape)}; expected "
                                    f"[{I}, {O}] (embedding [V, D])")
                    continue
            else:
                expected = (O,) + tuple(A.shape[1:])
                if spec.shape != expected:
                    problems.append(f"{where}: checkpoint tensor {key!r} has shape {list(spec.shape)}; expected "
                                    f"{list(expected)} (Conv2d [C_out, C_in, kh, kw])")
                    continue
                A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
            if not _merge_dtype_ok(spec, out_dtype):
                problems.append(f"{where}: " + _dtype_problem(key, spec, "merging"))
                continue
            scale = weight * mw.scale
            add(key, Update("lora", path, module, scale, _factor(A), _factor(B), fifo))
            if mw.lora_B_bias is not None:
                bias_key = key[:-len("weight")] + "bias"
                bias = specs.get(bias_key)
                if bias is None:
                    problems.append(f"{where}: the adapter has lora_B.bias, but the checkpoint has no tensor "
                                    f"{bias_key!r} to add it to")
                elif bias.shape != (O,):
                    problems.append(f"{where}: checkpoint tensor {bias_key!r} has shape {list(bias.shape)}; "
                                    f"expected [{O}]")
                elif not _merge_dtype_ok(bias, out_dtype):
                    problems.append(f"{where}: " + _dtype_problem(bias_key, bias, "adding lora_B.bias"))
                else:
                    bias_ops.append((bias_key, Update("bias", path, module, scale, value=mw.lora_B_bias)))
        for bias_key, op in bias_ops:
            add(bias_key, op)
    if problems:
        raise CheckpointError(problems)
    return plan


def check_weight(weight, where: str) -> float:
    """An adapter weight as a finite float."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: weight {weight!r} is not a number") from None
    if not math.isfinite(w):
        raise CheckpointError(f"{where}: weight {w} is not finite")
    return w
