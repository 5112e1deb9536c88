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

OPS = ("merge_", "unmerge_", "lora_linear", "lora_linear_backward", "lora_apply_")

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
# lora_linear / lora_linear_backward
# ----------------------------------------------------------------------------------------------

def _draw_seed() -> int:
    """A dropout seed from torch's default CPU generator: reproducible under torch.manual_seed and never
    a device sync (the generator and the draw stay on the CPU whatever device x lives on)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int | None = None,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """A linear layer with a LoRA adapter, forward and fused backward (differentiable in x, weight,
    bias, lora_A and lora_B).

    Semantics: y = x @ W^T + bias + scale * (drop(x) @ lora_A^T) @ lora_B^T, with
    drop(x)[t, i] = x[t, i] * keep(seed, t, i) / (1 - dropout_p) (drop(x) = x when dropout_p == 0) and
    keep the counter hash of reference.dropout_keep; the backward recomputes the same mask from the seed.
    Shapes: x [..., I] (flattened to [T, I]), weight [O, I] ([I, O] when fan_in_fan_out), bias [O] or None,
    lora_A [r, I], lora_B [O, r] -> y [..., O]. All tensors share one dtype (float32, float16, bfloat16,
    float64) and device. seed=None with dropout_p > 0 draws one from torch's default CPU generator.
    Saved for backward: x, weight, lora_A, lora_B and h = drop(x) @ lora_A^T [T, r]; never drop(x) or a mask.
    Raises ValueError naming the argument and its value on bad arguments.
    """
    dropout_p = float(dropout_p)
    if seed is None:
        seed = _draw_seed() if dropout_p > 0 else 0
    flat = x.dim() >= 1 and x.dim() != 2
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    y, _ = _impl("lora_linear", x.device)(x2, weight, bias, lora_A, lora_B, float(scale), dropout_p, int(seed),
                                          bool(fan_in_fan_out))
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y


def lora_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                         lora_B: torch.Tensor, h: torch.Tensor, scale: float, dropout_p: float, seed: int,
                         fan_in_fan_out: bool = False, output_mask=(True, True, True, True, True)):
    """The gradients of lora_linear, computing only those output_mask asks for.

    Semantics: with u = scale * grad_y @ lora_B [T, r]:
    grad_x = grad_y @ W + (u @ lora_A) * keep / (1 - dropout_p); grad_weight = grad_y^T @ x in weight's layout;
    grad_bias = grad_y.sum(0); grad_A = u^T @ drop(x); grad_B = scale * grad_y^T @ h.
    Shapes: grad_y [T, O], x [T, I], h [T, r] (the forward's), others as in lora_linear.
    Returns (grad_x, grad_weight, grad_bias, grad_A, grad_B); an unrequested one is an empty tensor.
    """
    return _impl("lora_linear_backward", x.device)(grad_y, x, weight, lora_A, lora_B, h, float(scale),
                                                   float(dropout_p), int(seed), bool(fan_in_fan_out),
                                                   [bool(m) for m in output_mask])
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
        return (weight.new_empty(chunks, dtype=torch.int16), weight.new_empty(m, dtype=torch.int16),
                weight.new_empty(e, dtype=torch.int64), weight.new_empty(e))

    @torch.library.register_fake("pylora::unmerge_")
    def _unmerge_fake(weight, lora_A, lora_B, scale, fan_in_fan_out, counts, entries, esc_index, esc_value):
        return None

    @torch.library.register_fake("pylora::lora_linear")
    def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out):
        return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake("pylora::lora_linear_backward")
    def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p, seed, fan_in_fan_out,
                                   output_mask):
        shapes = (x.shape, weight.shape, (lora_B.shape[0],), lora_A.shape, lora_B.shape)
        return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask))

    @torch.library.register_fake("pylora::lora_apply_")
    def _lora_apply_fake(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot):
        return None


# ----------------------------------------------------------------------------------------------
# Autograd of the kernels (the reference path is differentiated by torch autograd itself)
# ----------------------------------------------------------------------------------------------

if _ext.loaded:

    def _lora_linear_setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out = inputs
        _, h = output
        # h is the forward's own intermediate, returned so that backward need not recompute it.
        ctx.mark_non_differentiable(h)
        # x rather than drop(x): the backward re-hashes the mask from the seed instead of keeping a
        # [T, I] dropped copy alive (weight and the factors are parameters, saved by reference).
        ctx.save_for_backward(x, weight, lora_A, lora_B, h)
        ctx.args = (scale, dropout_p, seed, fan_in_fan_out)

    def _lora_linear_backward(ctx, grad_y, grad_h):
        x, weight, lora_A, lora_B, h = ctx.saved_tensors
        need = [bool(n) for n in ctx.needs_input_grad[:5]]
        if not any(need):
            return (None,) * 9
        grads = torch.ops.pylora.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, h, *ctx.args, need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4

    torch.library.register_autograd("pylora::lora_linear", _lora_linear_backward,
                                    setup_context=_lora_linear_setup_context)
