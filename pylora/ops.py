"""pylora's functional API: typed wrappers over torch.ops.pylora.*, their fakes and autograd.

Each function runs the compiled kernel for the tensors' device when there is one, and otherwise
the identical pure-torch twin in pylora.reference. The shape letters are the same everywhere:
T tokens, N slots/adapters, r rank, I in-features, O out-features, S segments, P pool rows.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from pylora import _ext
from pylora import reference as ref

OPS = ("merge_", "unmerge_")

_force_reference = contextvars.ContextVar("pylora_force_reference", default=False)


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    """Within the block, every op runs its pure-torch reference (tests compare the two paths)."""
    token = _force_reference.set(enabled)
    try:
        yield
    finally:
        _force_reference.reset(token)


def backend(op: str, device: torch.device | str) -> str:
    """"kernel" when `op` runs compiled code for tensors on `device`, else "reference"."""
    dev = torch.device(device)
    if not _force_reference.get() and _ext.has_kernel(op, dev.type):
        return "kernel"
    return "reference"


def _impl(op: str, device: torch.device):
    if backend(op, device) == "kernel":
        return getattr(torch.ops.pylora, op)
    return getattr(ref, op)


# ----------------------------------------------------------------------------------------------
# merge_ / unmerge_
# ----------------------------------------------------------------------------------------------

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
           fan_in_fan_out: bool = False) -> MergeRecord:
    """Fold a LoRA update into a weight in place, exactly reversibly.

    Semantics: weight[o, i] = R(w + scale * sum_k B[o, k] * A[k, i]) with the sum as an fp32 fma
    chain in k order and one rounding R to weight.dtype (round to nearest even).
    Shapes: weight [O, I] ([I, O] when fan_in_fan_out), lora_A [r, I], lora_B [O, r];
    weight float32, float16 or bfloat16, contiguous or transposed-contiguous; lora_A/lora_B any of
    those dtypes. Raises ValueError, writing nothing, on bad arguments or a non-finite result.
    Returns the MergeRecord that unmerge_ uses to restore the weight bit for bit.
    """
    out = _impl("merge_", weight.device)(weight, lora_A, lora_B, float(scale), bool(fan_in_fan_out))
    return MergeRecord(*out)


def unmerge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
             record: MergeRecord, fan_in_fan_out: bool = False) -> None:
    """Undo merge_ in place, bit for bit.

    Semantics: weight = the weight before the merge_(weight, lora_A, lora_B, scale, fan_in_fan_out)
    that returned `record`. Same shapes as merge_; the record must come from that merge (its size and
    indices are checked, ValueError otherwise, before anything is written).
    """
    _impl("unmerge_", weight.device)(weight, lora_A, lora_B, float(scale), bool(fan_in_fan_out),
                                     *record.tensors())


# ----------------------------------------------------------------------------------------------
# Fakes: shapes for torch.compile / FakeTensor tracing
# ----------------------------------------------------------------------------------------------

if _ext.loaded:

    @torch.library.register_fake("pylora::merge_")
    def _merge_fake(weight, lora_A, lora_B, scale, fan_in_fan_out):
        P, Q = weight.shape if weight.is_contiguous() else (weight.shape[1], weight.shape[0])
        chunks = P * (-(-Q // ref.CHUNK))
        ctx = torch.library.get_ctx()
        m, e = ctx.new_dynamic_size(), ctx.new_dynamic_size()
        return (weight.new_empty(chunks, dtype=torch.int16), weight.new_empty(m, dtype=torch.int16),
                weight.new_empty(e, dtype=torch.int64), weight.new_empty(e))

    @torch.library.register_fake("pylora::unmerge_")
    def _unmerge_fake(weight, lora_A, lora_B, scale, fan_in_fan_out, counts, entries, esc_index, esc_value):
        return None
