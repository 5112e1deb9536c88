"""lora_linear: a linear layer with a LoRA adapter, whose backward is pylora's fused kernels."""
from __future__ import annotations

import torch

from pylora import _ext
from pylora.ops.dispatch import impl


def draw_seed() -> torch.Tensor:
    """A dropout seed from torch's default CPU generator, as a one-element int64 CPU tensor: reproducible
    under torch.manual_seed, restored with the generator by torch.utils.checkpoint, never read on the host
    here (so torch.compile traces it) and never a device sync."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


def as_seed(seed) -> torch.Tensor:
    """A seed as the ops take it: a one-element int64 CPU tensor (an int is wrapped)."""
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(int(seed), dtype=torch.int64)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int | torch.Tensor | None = None,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """A linear layer with a LoRA adapter, forward and fused backward (differentiable in x, weight,
    bias, lora_A and lora_B).

    Semantics: y = x @ W^T + bias + scale * (drop(x) @ lora_A^T) @ lora_B^T, with
    drop(x)[t, i] = x[t, i] * keep(seed, t, i) / (1 - dropout_p) (drop(x) = x when dropout_p == 0) and
    keep the counter hash of reference.dropout_keep; the backward recomputes the same mask from the seed.
    Shapes: x [..., I] (flattened to [T, I]), weight [O, I] ([I, O] when fan_in_fan_out), bias [O] or None,
    lora_A [r, I], lora_B [O, r] -> y [..., O]. All tensors share one dtype (float32, float16, bfloat16,
    float64) and device. seed: an int or a one-element int64 CPU tensor; None with dropout_p > 0 draws one
    from torch's default CPU generator (draw_seed).
    Saved for backward: x, weight, lora_A, lora_B and h = drop(x) @ lora_A^T [T, r]; never drop(x) or a mask.
    Raises ValueError naming the argument and its value on bad arguments.
    """
    dropout_p = float(dropout_p)
    seed = (draw_seed() if dropout_p > 0 else torch.zeros((), dtype=torch.int64)) if seed is None else as_seed(seed)
    flat = x.dim() >= 1 and x.dim() != 2
    x2 = x.reshape(-1, x.shape[-1]) if flat else x
    y, _ = impl("lora_linear")(x2, weight, bias, lora_A, lora_B, float(scale), dropout_p, seed,
                                          bool(fan_in_fan_out))
    return y.reshape(*x.shape[:-1], y.shape[-1]) if flat else y


def lora_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                         lora_B: torch.Tensor, h: torch.Tensor, scale: float, dropout_p: float, seed,
                         fan_in_fan_out: bool = False, output_mask=(True, True, True, True, True)):
    """The gradients of lora_linear, computing only those output_mask asks for.

    Semantics: with u = scale * grad_y @ lora_B [T, r]:
    grad_x = grad_y @ W + (u @ lora_A) * keep / (1 - dropout_p); grad_weight = grad_y^T @ x in weight's layout;
    grad_bias = grad_y.sum(0); grad_A = u^T @ drop(x); grad_B = scale * grad_y^T @ h.
    Shapes: grad_y [T, O], x [T, I], h [T, r] (the forward's), others as in lora_linear.
    Returns (grad_x, grad_weight, grad_bias, grad_A, grad_B); an unrequested one is an empty tensor.
    """
    return impl("lora_linear_backward")(grad_y, x, weight, lora_A, lora_B, h, float(scale),
                                                   float(dropout_p), as_seed(seed), bool(fan_in_fan_out),
                                                   [bool(m) for m in output_mask])


# Shapes for torch.compile / FakeTensor tracing, and the autograd formula of the kernels (the
# reference path is differentiated by torch autograd itself).
if _ext.loaded:

    @torch.library.register_fake("pylora::lora_linear")
    def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out):
        return x.new_empty(x.shape[0], lora_B.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake("pylora::lora_linear_backward")
    def _lora_linear_backward_fake(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p, seed, fan_in_fan_out,
                                   output_mask):
        shapes = (x.shape, weight.shape, (lora_B.shape[0],), lora_A.shape, lora_B.shape)
        return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask))

    def _lora_linear_setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out = inputs
        _, h = output
        # h is the forward's own intermediate, returned so that backward need not recompute it.
        ctx.mark_non_differentiable(h)
        # x rather than drop(x): the backward re-hashes the mask from the seed instead of keeping a
        # [T, I] dropped copy alive (weight and the factors are parameters, saved by reference).
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, seed)
        ctx.args = (scale, dropout_p, fan_in_fan_out)

    def _lora_linear_backward(ctx, grad_y, grad_h):
        x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
        need = [bool(n) for n in ctx.needs_input_grad[:5]]
        if not any(need):
            return (None,) * 9
        scale, dropout_p, fan_in_fan_out = ctx.args
        grads = torch.ops.pylora.lora_linear_backward(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p, seed,
                                                      fan_in_fan_out, need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4

    torch.library.register_autograd("pylora::lora_linear", _lora_linear_backward,
                                    setup_context=_lora_linear_setup_context)
