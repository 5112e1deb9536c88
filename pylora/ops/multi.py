"""lora_multi: many adapters in one batch, each with its own factor tensors, differentiable in x and in
every adapter's factors; what training many adapters in one batch runs in every wrapped layer."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pylora import _ext
from pylora.ops import reference as ref
from pylora.ops.dispatch import impl


def lora_multi(x: torch.Tensor, lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
               scales: Sequence[float], tok_ptr: Sequence[int], tok_idx: torch.Tensor,
               dropout_p: Sequence[float] | None = None, seeds: Sequence[int] | None = None,
               check: bool = True) -> torch.Tensor:
    """Each token's LoRA update from its own adapter (none for tokens of no adapter), differentiable.

    Semantics: adapter k (of N) owns the tokens tok_idx[tok_ptr[k]:tok_ptr[k+1]], in that order, each
    token at most once, and acts on them as lora_linear without the base layer:
        h_k = drop_k(x_k) @ lora_A[k]^T,   y[tok] = scales[k] * h_k @ lora_B[k]^T,   y = 0 elsewhere,
    with drop_k the mask of lora_linear hashed from (seeds[k], the token's index within the group, i),
    so each adapter sees the mask stream lora_linear would over its tokens alone.
    Shapes: x [..., I] (flattened to [T, I]), lora_A[k] [r_k, I], lora_B[k] [O, r_k] -> y [..., O]; tok_idx
    int64 [sum n_k] on x's device; tok_ptr N+1 ints (host). All tensors share x's dtype (float32,
    float16, bfloat16, float64) and device; ranks may differ per adapter.
    Gradients: grad_x through every adapter, grad_A[k] and grad_B[k] from adapter k's tokens only.
    With check=True, tok_idx's contents are checked on the host first even when it lives on a GPU (a
    device-to-host copy); a caller that built it on the host and checked it there passes check=False.
    Raises ValueError naming the argument and its value.
    """
    N = len(lora_A)
    dropout_p = [0.0] * N if dropout_p is None else [float(p) for p in dropout_p]
    seeds = [0] * N if seeds is None else [int(s) for s in seeds]
    scales, tok_ptr = [float(s) for s in scales], [int(t) for t in tok_ptr]
    flat = x.dim() != 2
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    if check and tok_idx.device.type != "cpu":
        ref.check_lora_multi_tokens(tok_idx, x2.shape[0])
    y, _ = impl("lora_multi")(x2, list(lora_A), list(lora_B), scales, dropout_p, seeds, tok_ptr, tok_idx)
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y


# Shapes for torch.compile / FakeTensor tracing, and the autograd formula of the kernels (the
# reference path is differentiated by torch autograd itself).
if _ext.loaded:

    @torch.library.register_fake("pylora::lora_multi")
    def _lora_multi_fake(x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx):
        hs = [x.new_empty(tok_ptr[k + 1] - tok_ptr[k], A.shape[0]) for k, A in enumerate(lora_A)]
        return x.new_empty(x.shape[0], lora_B[0].shape[0]), hs

    @torch.library.register_fake("pylora::lora_multi_backward")
    def _lora_multi_backward_fake(grad_y, x, lora_A, lora_B, h, scales, dropout_p, seeds, tok_ptr, tok_idx,
                                  output_mask):
        gx = x.new_empty(x.shape if output_mask[0] else (0,))
        gA = [A.new_empty(A.shape if output_mask[1] else (0,)) for A in lora_A]
        gB = [B.new_empty(B.shape if output_mask[2] else (0,)) for B in lora_B]
        return gx, gA, gB

    def _lora_multi_setup_context(ctx, inputs, output):
        x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx = inputs
        _, hs = output
        ctx.mark_non_differentiable(*hs)
        # x rather than each adapter's dropped copy: the backward re-hashes the masks from the seeds.
        ctx.save_for_backward(x, tok_idx, *lora_A, *lora_B, *hs)
        ctx.n = len(lora_A)
        ctx.args = (scales, dropout_p, seeds, tok_ptr)

    def _lora_multi_backward(ctx, grad_y, grad_h):
        x, tok_idx, *rest = ctx.saved_tensors
        n = ctx.n
        lora_A, lora_B, hs = rest[:n], rest[n:2 * n], rest[2 * n:]
        need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), bool(ctx.needs_input_grad[2])]
        if not any(need):
            return (None,) * 8
        scales, dropout_p, seeds, tok_ptr = ctx.args
        gx, gA, gB = torch.ops.pylora.lora_multi_backward(grad_y, x, lora_A, lora_B, hs, scales, dropout_p, seeds,
                                                          tok_ptr, tok_idx, need)
        return (gx if need[0] else None, list(gA) if need[1] else None, list(gB) if need[2] else None,
                None, None, None, None, None)

    torch.library.register_autograd("pylora::lora_multi", _lora_multi_backward,
                                    setup_context=_lora_multi_setup_context)
