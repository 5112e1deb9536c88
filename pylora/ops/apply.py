"""lora_apply_: many adapters in one batch, over a paged pool of rank rows (BGMV / SGMV)."""
from __future__ import annotations

import torch

from pylora import _ext
from pylora.ops import reference as ref
from pylora.ops.dispatch import impl


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
    synchronises). A server that validated its host-side batch plan (pylora.serve.batch) passes check=False.

    No gradients: the op writes y in place and has no autograd formula, so it refuses inputs that
    require grad while grad mode is on; run it under torch.no_grad() or torch.inference_mode().
    """
    if torch.is_grad_enabled():
        for name, t in (("y", y), ("x", x), ("A_rows", A_rows), ("B_rows", B_rows), ("scales", scales)):
            if t.requires_grad:
                raise RuntimeError(f"lora_apply_: {name}.requires_grad=True, but the op has no autograd formula "
                                   "(gradients through the pool are not provided); call it under torch.no_grad() "
                                   "or torch.inference_mode()")
    if check and row_ptr.device.type != "cpu":
        ref.check_lora_apply_args("lora_apply_", y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot)
        ref.check_lora_apply_plan(row_ptr, row_idx, seg_ptr, seg_slot, y.shape[0], A_rows.shape[0])
    impl("lora_apply_")(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot)


if _ext.loaded:

    @torch.library.register_fake("pylora::lora_apply_")
    def _lora_apply_fake(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot):
        return None
