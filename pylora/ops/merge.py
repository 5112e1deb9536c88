"""merge_ / unmerge_: fold a LoRA update into a weight in place and take it back out bit for bit."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pylora import _ext
from pylora.ops import reference as ref
from pylora.ops.dispatch import impl


@dataclass
class MergeRecord:
    """What unmerge_ needs, besides the LoRA factors, to give back the exact pre-merge weight.

    Most elements come back by themselves: c = R(fma(-s, acc, y)) equals the original w. For the
    rest, each chunk of up to 4096 elements of a storage row lists entries: one uint16 (stored as
    int16) holding the column inside the chunk (high 12 bits) and how many representable values c
    lies from w (low 4 bits, signed). The few farther away are escapes: flat index and value.
    """

    counts: torch.Tensor  # int16 [P * ceil(Q / 4096)]: entries per chunk
    entries: torch.Tensor  # int16 [M]
    esc_index: torch.Tensor  # int64 [E]: flat storage index
    esc_value: torch.Tensor  # weight dtype [E]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.counts, self.entries, self.esc_index, self.esc_value)

    @property
    def nbytes(self) -> int:
        """Bytes the record occupies (compare with weight.numel() * weight.element_size())."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def corrections(self) -> int:
        """Elements the record corrects."""
        return self.entries.numel() + self.esc_index.numel()

    def to(self, device) -> "MergeRecord":
        return MergeRecord(*(t.to(device) for t in self.tensors()))


def merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
           fan_in_fan_out: bool = False, record: bool = True) -> MergeRecord | None:
    """Fold a LoRA update into a weight in place, exactly reversibly.

    Semantics: weight[o, i] = R(w + scale * sum_k B[o, k] * A[k, i]) with the sum as an fp32 fma
    chain in k order and one rounding R to weight.dtype (round to nearest even).
    Shapes: weight [O, I] ([I, O] when fan_in_fan_out), lora_A [r, I], lora_B [O, r];
    weight float32, float16 or bfloat16, contiguous or transposed-contiguous; lora_A/lora_B any of
    those dtypes. Raises ValueError, writing nothing, on bad arguments or a non-finite result.
    Returns the MergeRecord that unmerge_ uses to restore the weight bit for bit; with record=False the
    same merged weight and None (no record is built: a merge that is never undone, such as
    merge_and_unload or merging a checkpoint, skips that work).
    """
    out = impl("merge_")(weight, lora_A, lora_B, float(scale), bool(fan_in_fan_out), bool(record))
    return MergeRecord(*out) if record else None


def unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
             record: MergeRecord, fan_in_fan_out: bool = False) -> None:
    """Undo merge_ in place, bit for bit.

    Semantics: weight = the weight before the merge_(weight, lora_A, lora_B, scale, fan_in_fan_out)
    that returned `record`. Same shapes as merge_; the record must come from that merge (its size and
    indices are checked, ValueError otherwise, before anything is written).
    """
    impl("unmerge_")(weight, lora_A, lora_B, float(scale), bool(fan_in_fan_out),
                     *(t.contiguous() for t in record.tensors()))  # the op reads the record as laid out


def merge_cannot_overflow(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> bool:
    """True when merge_(weight, lora_A, lora_B, scale) cannot refuse: the weight is finite and max|W| plus
    a bound on every update element, |scale| * max_o sum_k |B[o, k]| * max |A|, stays below the weight
    dtype's largest value (with margins for the fp32 roundings, as the kernels' own pre-check). False
    means "might refuse", not "will". One read of the weight."""
    if weight.numel() == 0:
        return True
    lo, hi = torch.aminmax(weight.detach())
    wmax = max(-float(lo), float(hi))
    dmax = abs(float(scale)) * float(lora_B.detach().abs().double().sum(1).max()) * \
        float(lora_A.detach().abs().double().max())
    if not (math.isfinite(wmax) and math.isfinite(dmax)):
        return False
    return (wmax + dmax * 1.001) * 1.001 < torch.finfo(weight.dtype).max


def merge_bias(bias: torch.Tensor, lora_B_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The base bias with a lora_bias adapter's bias folded in, as a new tensor (PEFT's
    bias + lora_B.bias * scale).

    Semantics: out[o] = R(float32(bias[o]) + float32(lora_B_bias[o]) * float32(scale)), the product and the
    sum in fp32 (two roundings, as PEFT's fp32 factors give), one rounding R to bias.dtype.
    Shapes: bias [O], lora_B_bias [O] -> [O] in bias.dtype. Raises ValueError naming the first position when
    a result is not finite (the caller has written nothing yet). Unmerging restores the saved original:
    b - s * lb does not give b back after a rounding.
    """
    if bias.shape != lora_B_bias.shape:
        raise ValueError(f"merge_bias: bias.shape={list(bias.shape)} must equal lora_B_bias.shape="
                         f"{list(lora_B_bias.shape)}")
    s = torch.tensor(float(scale), dtype=torch.float32)
    new = (bias.detach().float() + lora_B_bias.detach().float().to(bias.device) * s.to(bias.device)).to(bias.dtype)
    bad = ~torch.isfinite(new)
    if bool(bad.any()):
        o = int(bad.nonzero()[0, 0])
        raise ValueError(f"merge_bias: the merged bias at [{o}] is {new[o].item():g}, not finite (bias "
                         f"{bias[o].item():g} + scale {float(scale):g} * lora_B.bias {lora_B_bias[o].item():g}; "
                         f"{str(bias.dtype).removeprefix('torch.')} reaches {torch.finfo(bias.dtype).max:g})")
    return new


# Shapes for torch.compile / FakeTensor tracing.
if _ext.loaded:

    @torch.library.register_fake("pylora::merge_")
    def _merge_fake(weight, lora_A, lora_B, scale, fan_in_fan_out, record=True):
        if not record:
            return (weight.new_empty(0, dtype=torch.int16), weight.new_empty(0, dtype=torch.int16),
                    weight.new_empty(0, dtype=torch.int64), weight.new_empty(0))
        P, Q = weight.shape if weight.is_contiguous() else (weight.shape[1], weight.shape[0])
        chunks = P * (-(-Q // ref.CHUNK))
        ctx = torch.library.get_ctx()
        m, e = ctx.new_dynamic_size(), ctx.new_dynamic_size()
        return (weight.new_empty(chunks, dtype=torch.int16), weight.new_empty(m, dtype=torch.int16),
                weight.new_empty(e, dtype=torch.int64), weight.new_empty(e))

    @torch.library.register_fake("pylora::unmerge_")
    def _unmerge_fake(weight, lora_A, lora_B, scale, fan_in_fan_out, counts, entries, esc_index, esc_value):
        return None
