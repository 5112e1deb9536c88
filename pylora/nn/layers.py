"""LoRA layers for nn.Linear, transformers' GPT-2 Conv1D, nn.Embedding and nn.Conv2d.

Each wraps the original module as `base_layer` (frozen by mark_only_lora_trainable) and holds A and
B as parameters `lora_A` and `lora_B` with PEFT's shapes:
  Linear / Conv1D  A [r, I], B [O, r]; the forward is pylora's fused op (ops.lora_linear), or, over a
                   quantized base (torchao, bitsandbytes: pylora.nn.kinds.quantization), the base
                   layer's own forward plus pylora's LoRA-only op (ops.lora_multi) for the r-wide part
  Embedding        A [r, V], B [D, r]; PEFT's semantics: the lookup goes through A, then B
  Conv2d           A [r, C_in, kh, kw] (a conv with the base kernel, stride, padding), B [C_out, r, 1, 1]
Embedding and Conv2d run their LoRA path with torch ops (their compute is the base layer's own op
plus r-wide products; no fused kernel yet). Merging uses pylora's exact merge_/unmerge_ for all four.
Merging into a quantized weight is refused unless asked for with merge(dequantize=True): then the
weight is dequantized, merged exactly in float32 and requantized with its own scheme
(pylora.nn.quantized), and unmerge() puts the original quantized weight back.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pylora import ops
from pylora.ops.linear import draw_seed
from pylora.nn.config import lora_scale
from pylora.nn.kinds import SUPPORTED, factor_dtype, features, is_conv1d, module_kind, quantization
from pylora.nn import quantized as quant


@torch.no_grad()
def init_lora_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, init_lora_weights=True) -> None:
    """PEFT's initialisation of Linear (and Conv2d) factors, in place: True: A like nn.Linear's default
    init (kaiming_uniform, a=sqrt(5)), B zero; "gaussian": A ~ N(0, 1/r), B zero; False: both random (a
    non-identity adapter, for tests)."""
    if init_lora_weights is False:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        return
    if init_lora_weights == "gaussian":
        nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


_DENSE = (torch.Tensor, nn.Parameter)


class LoraLayer(nn.Module):
    """What every LoRA layer shares: rank, scale, dropout, merge state."""

    # PEFT's file keys for A and B, relative to the module (see pylora.adapters.format).
    peft_keys = ("lora_A.weight", "lora_B.weight")
    # The layer stands in for `base_layer`: a view of the model as it was looks through it.
    wraps_base_layer = True

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.use_rslora = bool(use_rslora)
        self.lora_dropout = float(lora_dropout)
        self.merged = False
        self.disabled = False
        self._record: Optional[ops.MergeRecord] = None
        self._merged_version: Optional[int] = None
        self._bias_before: Optional[torch.Tensor] = None  # lora_bias: the base bias before merge()
        self._merged_bias_version: Optional[int] = None
        self._requantized: Optional[quant.Requantized] = None  # merge(dequantize=True) over a quantized base

    @property
    def scaling(self) -> float:
        return lora_scale(self.r, self.lora_alpha, self.use_rslora)

    @property
    def quantization(self):
        """How the base weight is quantized (pylora.nn.kinds.Quantization), or None for a dense base."""
        return quantization(self.base_layer)

    def _param_dtype(self) -> torch.dtype:
        # LoRA factors train in fp32 over a half-precision or quantized base (as PEFT does by default).
        return factor_dtype(self.base_layer)

    # The merge view of the base weight: merge_ sees W [O, I] (or [I, O] with fan_in_fan_out).
    def _merge_args(self):
        raise NotImplementedError

    def _warn_unmergeable_bias(self, lora_bias: bool, name: str) -> None:
        if lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"{name or 'module'}: lora_bias=True, but the base {type(self.base_layer).__name__} has no "
                          "bias: merging it will be refused (as PEFT refuses it); it trains and serves unmerged",
                          stacklevel=4)

    def check_mergeable(self, dequantize: bool = False) -> None:
        """ValueError when merge() cannot be done whatever the values: lora_bias with no base bias to take
        lora_B's bias (PEFT refuses that merge too); a quantized base weight without dequantize=True, or one
        whose scheme cannot be requantized. Model-level merge asks every layer before writing."""
        if getattr(self, "lora_B_bias", None) is not None and getattr(self.base_layer, "bias", None) is None:
            raise ValueError(f"{type(self).__name__}.merge: the adapter has lora_bias=True, but the base "
                             f"{type(self.base_layer).__name__} has no bias to merge lora_B's bias into; serve it "
                             "unmerged")
        q = self.quantization
        if q is None:
            return
        what = f"{type(self).__name__}.merge: the base weight is quantized with {q.description}"
        if not dequantize:
            raise ValueError(f"{what}; merging into it is refused, since a quantized weight cannot hold the "
                             "update exactly. Serve the adapter unmerged over the quantized base, or ask for a "
                             "dequantize-merge-requantize (rounded to the quantization grid; unmerge() restores the "
                             "original): merge(dequantize=True), pylora.merge(model, dequantize=True) or "
                             "pylora.merge_and_unload(model, dequantize=True)")
        if not isinstance(self, LoraLinear):
            raise ValueError(f"{what}: dequantize-merge-requantize supports Linear layers only")
        problem = quant.requantize_problem(self.base_layer)
        if problem is not None:
            raise ValueError(f"{what}: {problem}")

    def merge_cannot_fail(self) -> bool:
        """True when merge(record=False) cannot refuse this layer's values (a dense weight whose bound rules
        out overflow, and a lora_bias that merges finitely): such a merge needs no record to be undone."""
        if self.merged or self.quantization is not None:
            return False
        extra = getattr(self, "lora_B_bias", None)
        if extra is not None:
            try:
                self.check_mergeable()
                ops.merge_bias(self.base_layer.bias, extra, self.scaling)
            except ValueError:
                return False
        W, A, B, _ = self._merge_args()
        return ops.merge_cannot_overflow(W, A, B, self.scaling)

    @torch.no_grad()
    def merge(self, dequantize: bool = False, record: bool = True) -> None:
        """Fold the adapter into the base weight (and, with lora_bias, lora_B's bias into the base bias),
        exactly reversibly by unmerge(). All or nothing: every refusal (ValueError: a non-finite result,
        named with its position) comes before anything is written.

        Over a quantized base weight (torchao, bitsandbytes) merging is refused unless dequantize=True:
        then the weight is dequantized to float32, the adapter merged into it as into a float32 weight
        (merge_'s arithmetic), and the result quantized again with the weight's own scheme
        (pylora.nn.quantized), so the merged layer computes the dequantized-weight update rounded to the
        quantization grid, not the exact one. unmerge() puts the original quantized weight back (the
        layer holds it while merged: the quantized weight's memory again). dequantize=True changes nothing
        for a dense base.

        record=False merges a dense weight without building the exact-unmerge record (the same merged
        weight, less work): the layer then cannot be unmerged, only dropped (merge_and_unload)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: the adapter is already merged")
        self.check_mergeable(dequantize)
        extra = getattr(self, "lora_B_bias", None)
        bias = self.base_layer.bias if extra is not None else None
        new_bias = ops.merge_bias(bias, extra, self.scaling) if extra is not None else None
        if self.quantization is not None:
            W = quant.dequantize(self.base_layer)
            _, A, B, fifo = self._merge_args()
            ops.merge_(W, A.float(), B.float(), self.scaling, fan_in_fan_out=fifo)  # refuses before writing
            self._requantized = quant.requantize(self.base_layer, W)
        else:
            W, A, B, fifo = self._merge_args()
            self._record = ops.merge_(W, A, B, self.scaling, fan_in_fan_out=fifo, record=record)  # refuses first
        if new_bias is not None:
            self._bias_before = bias.detach().clone()
            bias.copy_(new_bias)
            self._merged_bias_version = bias._version
        self.merged = True
        self._merged_version = self.base_layer.weight._version

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out: the base weight (and bias) are restored bit for bit."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        if self._record is None and self._requantized is None:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the adapter was merged without a record "
                               "(merge(record=False)): it cannot be unmerged, only dropped")
        bias = self.base_layer.bias if self._bias_before is not None else None
        W = self.base_layer.weight
        weight_changed = W._version != self._merged_version or \
            (self._requantized is not None and W is not self._requantized.merged)
        if weight_changed or (bias is not None and bias._version != self._merged_bias_version):
            what = "weight" if weight_changed else "bias"
            raise RuntimeError(f"{type(self).__name__}.unmerge: the merged {what} was modified after merge(); "
                               "the exact unmerge record no longer applies")
        if self._requantized is not None:
            self._requantized.restore(self.base_layer)
            self._requantized = None
        else:
            W, A, B, fifo = self._merge_args()
            ops.unmerge_(W, A, B, self.scaling, self._record.to(W.device), fan_in_fan_out=fifo)
        if bias is not None:
            bias.copy_(self._bias_before)
            self._bias_before = None
        self._record = None
        self.merged = False

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True) -> None:
        """PEFT's initialisation (init_lora_factors); a lora_B bias starts at zero."""
        init_lora_factors(self.lora_A, self.lora_B, init_lora_weights)
        if getattr(self, "lora_B_bias", None) is not None and init_lora_weights is not False:
            nn.init.zeros_(self.lora_B_bias)

    @property
    def record_nbytes(self) -> int:
        """Bytes of the exact-unmerge record while merged (0 otherwise)."""
        return self._record.nbytes if self._record is not None else 0

    def _check_merged_forward(self):
        if self.training and self.lora_dropout > 0:
            raise RuntimeError(f"{type(self).__name__}: the adapter is merged and the layer is training with "
                               f"lora_dropout={self.lora_dropout}; a merged weight cannot reproduce dropout. "
                               "Call unmerge() (or model.eval()) first")

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout:g}, merged={self.merged}")


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear (weight [O, I]) or GPT-2's Conv1D (weight [I, O], fan_in_fan_out)."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, fan_in_fan_out: bool = False, init_lora_weights=True,
                 lora_bias: bool = False, name: str = ""):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        conv1d = is_conv1d(base_layer)
        if conv1d and not fan_in_fan_out:
            warnings.warn(f"{name or 'module'}: a Conv1D stores its weight as [in, out]; setting fan_in_fan_out=True",
                          stacklevel=3)
            fan_in_fan_out = True
        elif not conv1d and fan_in_fan_out:
            warnings.warn(f"{name or 'module'}: nn.Linear stores its weight as [out, in]; setting "
                          "fan_in_fan_out=False", stacklevel=3)
            fan_in_fan_out = False
        self.fan_in_fan_out = fan_in_fan_out
        W = base_layer.weight
        # From the module's attributes: a quantized (packed) weight may have another shape.
        self.in_features, self.out_features = features(base_layer)
        kw = {"dtype": self._param_dtype(), "device": W.device}
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **kw))
        self.lora_B_bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if lora_bias else None
        self._warn_unmergeable_bias(lora_bias, name)
        self.reset_lora_parameters(init_lora_weights)

    def _merge_args(self):
        # The factors stay in their own dtype: merge_ accumulates in fp32 whatever the storage.
        return self.base_layer.weight, self.lora_A, self.lora_B, self.fan_in_fan_out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            self._check_merged_forward()
            return base(x, *args, **kwargs)
        if self.disabled:
            return base(x, *args, **kwargs)
        W, b = base.weight, base.bias
        # A dense weight is a plain Tensor or Parameter: that test alone, which torch.compile folds, on
        # the common path; a quantized weight is a subclass (torchao) or a bitsandbytes Parameter.
        if type(W) not in _DENSE and self.quantization is not None:
            return self._forward_quantized(x, *args, **kwargs)
        dtype = W.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        if self.lora_B_bias is not None:
            extra = self.lora_B_bias * self.scaling
            b = extra if b is None else b + extra
        cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
        return ops.lora_linear(cast(x), cast(W), cast(b), cast(self.lora_A), cast(self.lora_B), self.scaling,
                               dropout_p=self.lora_dropout if self.training else 0.0,
                               fan_in_fan_out=self.fan_in_fan_out)

    def _forward_quantized(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """y = base(x) + s * drop(x) A^T B^T: the quantized base through its own forward, the r-wide part
        through lora_multi with this layer as the one adapter owning every token (tok_idx = 0..T-1), whose
        dropout mask is lora_linear's for the same seed and token. It computes in the input's dtype (the
        autocast dtype under autocast), as the dense path does; the factors stay float32 parameters."""
        y = self.base_layer(x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        T = x2.shape[0]
        p = self.lora_dropout if self.training else 0.0
        cast = (lambda t: t if t.dtype == dtype else t.to(dtype))
        delta = ops.lora_multi(x2, [cast(self.lora_A)], [cast(self.lora_B)], [self.scaling], [0, T],
                               torch.arange(T, device=x2.device), dropout_p=[p],
                               seeds=[int(draw_seed()) if p > 0 else 0], check=False)
        if self.lora_B_bias is not None:
            delta = delta + cast(self.lora_B_bias * self.scaling)
        return y + delta.view(*y.shape[:-1], delta.shape[-1]).to(y.dtype)


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding (weight [V, D]): y = base(x) + embedding(x, Aᵀ) Bᵀ · s (torch ops)."""

    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, name: str = "", **_):
        super().__init__(base_layer, r, lora_alpha, 0.0, use_rslora)  # PEFT applies no dropout to embeddings
        V, D = base_layer.weight.shape
        kw = {"dtype": self._param_dtype(), "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.r, V, **kw))
        self.lora_B = nn.Parameter(torch.empty(D, self.r, **kw))
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True) -> None:
        """PEFT's embedding init: A zero, B ~ N(0, 1) (True or "gaussian"); False: both random."""
        if init_lora_weights is False:
            nn.init.normal_(self.lora_A)
        else:
            nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def _merge_args(self):
        # weight [V, D] += s * (B A)ᵀ: merge_'s fan_in_fan_out layout with I = V, O = D.
        return self.base_layer.weight, self.lora_A, self.lora_B, True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        out = base(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        after_A = F.embedding(x, self.lora_A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                              sparse=base.sparse)
        return out + ((after_A @ self.lora_B.t()) * self.scaling).to(out.dtype)


class LoraConv2d(LoraLayer):
    """LoRA around nn.Conv2d: A is a conv with the base kernel, stride and padding and r output
    channels, B a 1x1 conv (PEFT's semantics), computed with torch's conv ops."""

    def __init__(self, base_layer: nn.Conv2d, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, lora_bias: bool = False, name: str = "", **_):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        for attr, ok in (("groups", 1), ("dilation", (1, 1))):
            if getattr(base_layer, attr) != ok:
                raise ValueError(f"LoraConv2d: {name or 'module'}.{attr}={getattr(base_layer, attr)} is not "
                                 f"supported (only {attr}={ok})")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoraConv2d: {name or 'module'}.padding_mode={base_layer.padding_mode!r} is not "
                             "supported (only 'zeros')")
        out_c, in_c, kh, kw_ = base_layer.weight.shape
        kw = {"dtype": self._param_dtype(), "device": base_layer.weight.device}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_c, kh, kw_, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_c, self.r, 1, 1, **kw))
        self.lora_B_bias = nn.Parameter(torch.zeros(out_c, **kw)) if lora_bias else None
        self._warn_unmergeable_bias(lora_bias, name)
        self.reset_lora_parameters(init_lora_weights)

    def _merge_args(self):
        # weight [C_out, C_in*kh*kw] += s * B[C_out, r] @ A[r, C_in*kh*kw].
        W = self.base_layer.weight
        return W.view(W.shape[0], -1), self.lora_A.reshape(self.r, -1), self.lora_B.reshape(-1, self.r), False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        out = base(x, *args, **kwargs)
        if self.merged:
            self._check_merged_forward()
            return out
        if self.disabled:
            return out
        h = x.to(self.lora_A.dtype)
        if self.training and self.lora_dropout > 0:
            h = F.dropout(h, self.lora_dropout)
        h = F.conv2d(h, self.lora_A, None, base.stride, base.padding)
        h = F.conv2d(h, self.lora_B, self.lora_B_bias)
        return out + (h * self.scaling).to(out.dtype)


def make_lora_layer(module: nn.Module, *, name: str = "", **kwargs) -> LoraLayer:
    """The LoRA layer for `module`'s kind; ValueError naming the module when the kind is not supported."""
    kind = module_kind(module)
    if kind == "linear":
        return LoraLinear(module, name=name, **kwargs)
    if kind == "embedding":
        kwargs.pop("fan_in_fan_out", None)
        kwargs.pop("lora_bias", None)
        return LoraEmbedding(module, name=name, **kwargs)
    if kind == "conv2d":
        kwargs.pop("fan_in_fan_out", None)
        return LoraConv2d(module, name=name, **kwargs)
    raise ValueError(f"{name or 'module'}: {type(module).__name__} is not supported by LoRA (supported: {SUPPORTED})")
