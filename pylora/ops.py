"""pylora's functional API: typed wrappers over torch.ops.pylora.*, their fakes and autograd.

Each function runs the compiled kernel for the tensors' device when there is one, and otherwise
the identical pure-torch twin in pylora.reference. The shape letters are the same everywhere:
T tokens, N slots/adapters, r rank, I in-features, O out-features, S segments, P pool rows.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch

from pylora import _ext
from pylora import reference as ref

OPS = ("merge_", "unmerge_", "lora_apply_")

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


@functools.lru_cache(maxsize=None)
def _compiled(op: str, device_type: str):
    """torch.ops.pylora.<op> when it has a kernel for `device_type`, else None; looked up once, since the
    per-layer serving path calls lora_apply_ once per wrapped module per forward."""
    return getattr(torch.ops.pylora, op) if _ext.has_kernel(op, device_type) else None


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
    rest, within each chunk of up to 65536 elements of a storage row, `offsets` (uint16 stored as
    int16) says which column and `deltas` how many representable values c lies from w; the few
    whose distance does not fit an int8 are escapes, stored with their index and original value.
    """

    counts: torch.Tensor  # int32 [P * ceil(Q / 65536)]: corrections per chunk
    offsets: torch.Tensor  # int16 [M]
    deltas: torch.Tensor  # int8 [M]
    esc_index: torch.Tensor  # int64 [E]: flat storage index
    esc_value: torch.Tensor  # weight dtype [E]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.counts, self.offsets, self.deltas, self.esc_index, self.esc_value)

    @property
    def nbytes(self) -> int:
        """Bytes the record occupies (compare with weight.numel() * weight.element_size())."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def corrections(self) -> int:
        """Elements the record corrects."""
        return self.offsets.numel() + self.esc_index.numel()

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
# lora_apply_: many adapters in one batch, over a paged pool of rank rows
# ----------------------------------------------------------------------------------------------

def lora_apply_(y: torch.Tensor, x: torch.Tensor, A_rows: torch.Tensor, B_rows: torch.Tensor,
                row_ptr: torch.Tensor, row_idx: torch.Tensor, scales: torch.Tensor, seg_ptr: torch.Tensor,
                seg_slot: torch.Tensor, check: bool = True) -> None:
    """Add every token's own LoRA update to y in place (BGMV for decode tokens, SGMV for prefill segments).

    Semantics: for each segment g (tokens t in [seg_ptr[g], seg_ptr[g+1])) with slot s = seg_slot[g]
    (s == -1: no adapter, y untouched) and rows(s) = row_idx[row_ptr[s]:row_ptr[s+1]] (r_s rows of the
    pool, in that order; r_s = 0 adds nothing):
        h[t, j] = sum_i A_rows[rows(s)[j], i] * x[t, i]                               (fp32)
        y[t, o] = R(y[t, o] + scales[s] * sum_j h[t, j] * B_rows[rows(s)[j], o])       (fp32, one rounding R)
    Shapes: y [T, O], x [T, I], A_rows [P, I], B_rows [P, O] (row j of B_rows is a column of some
    adapter's B), row_ptr [N+1] int32, row_idx [nnz] int32, scales [N] float32, seg_ptr [S+1] int32,
    seg_slot [S] int32. x, y, A_rows, B_rows share one dtype (float32, float16, bfloat16); everything on
    one device. Ranks are exact and may differ per slot. With the compiled kernels a token's result is
    the same bits alone or in any batch (its sums run in an order fixed by I, r and the column).

    Bad arguments raise ValueError naming the argument, its value and the limit, before y is written.
    Index contents are checked by the op itself when the index tensors are on the CPU. On a GPU the op
    never synchronises and checks only sizes and dtypes (its kernels skip an out-of-range slot or row);
    `check=True` makes this wrapper check the contents first (one device-to-host copy, so it
    synchronises). A server that validated its host-side plan (pylora.plan) passes check=False.

    No gradients: the op writes y in place and has no autograd formula, so it refuses inputs that
    require grad while grad mode is on; run it under torch.no_grad() or torch.inference_mode().
    """
    if torch.is_grad_enabled():
        for name, t in (("y", y), ("x", x), ("A_rows", A_rows), ("B_rows", B_rows), ("scales", scales)):
            if t.requires_grad:
                raise RuntimeError(f"lora_apply_: {name}.requires_grad=True, but the op has no autograd formula "
                                   "(gradients through the pool are not provided); call it under torch.no_grad() "
                                   "or torch.inference_mode()")
    kernel = None if _force_reference.get() else _compiled("lora_apply_", y.device.type)
    if kernel is None:
        ref.lora_apply_(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot)
        return
    if check and row_ptr.device.type != "cpu":
        ref.check_lora_apply_args("lora_apply_", y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot)
        ref.check_lora_apply_plan(row_ptr, row_idx, seg_ptr, seg_slot, y.shape[0], A_rows.shape[0])
    kernel(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot)


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
        return (weight.new_empty(chunks, dtype=torch.int32), weight.new_empty(m, dtype=torch.int16),
                weight.new_empty(m, dtype=torch.int8), weight.new_empty(e, dtype=torch.int64),
                weight.new_empty(e))

    @torch.library.register_fake("pylora::unmerge_")
    def _unmerge_fake(weight, lora_A, lora_B, scale, fan_in_fan_out, counts, offsets, deltas, esc_index,
                      esc_value):
        return None

    @torch.library.register_fake("pylora::lora_apply_")
    def _lora_apply_fake(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot):
        return None
