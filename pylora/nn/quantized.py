"""Dequantize and requantize a quantized base weight: what the explicit dequantize-merge-requantize of a
LoRA layer over a quantized base needs (LoraLayer.merge(dequantize=True), pylora.merge(model,
dequantize=True)). Which weights are quantized, and how, is pylora.nn.kinds.quantization.

The libraries are optional: each is imported here only when a weight of its own is handled.

Requantizing uses the scheme the weight carries:
  torchao Int8Tensor               Int8Tensor.from_hp, the same block size (PerBlock), mapping (symmetric
                                   when the zero points are all zero, else asymmetric), reduce_range and
                                   activation-quantization settings
  torchao IntxUnpackedToInt8Tensor from_hp with the same block size, target dtype (int1..int8), mapping
                                   and activation quantization (IntxWeightOnlyConfig: int4 on a CPU)
  torchao Int4Tensor               from_hp with the same block size (bfloat16; its kernels need a GPU)
  bitsandbytes Int8Params          a new Int8Params of the merged weight, quantized by moving it to the
                                   weight's device (PEFT's recipe), the module's int8 state reset
  bitsandbytes Params4bit          a new Params4bit with the old one's blocksize, quant_type,
                                   compress_statistics and storage (PEFT's recipe)
Other torchao tensor classes are refused with the list above (their scheme is not known here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from pylora.nn.kinds import quantization

TORCHAO_REQUANTIZABLE = ("Int8Tensor", "IntxUnpackedToInt8Tensor", "Int4Tensor")


def requantize_problem(module: nn.Module) -> Optional[str]:
    """Why `module`'s quantized weight cannot be dequantized and requantized here, or None when it can
    (or is not quantized)."""
    q = quantization(module)
    if q is None:
        return None
    if q.scheme == "torchao":
        name = type(module.weight).__name__
        return None if name in TORCHAO_REQUANTIZABLE else _unsupported(name)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes cannot be imported ({exc})"
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False) and \
            not hasattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse"):
        return (f"this bitsandbytes ({bnb.__version__}) gives no way to unpack a 4-bit weight its CPU kernel has "
                "repacked")
    return None


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """`module`'s quantized weight as a new float32 tensor [O, I] on its device."""
    q = quantization(module)
    W = module.weight
    if q.scheme == "torchao":
        return W.dequantize().float()
    import bitsandbytes as bnb

    if q.scheme == "bnb_4bit":
        data, state = _bnb_4bit_plain(W)
        return bnb.functional.dequantize_4bit(data, state).float()
    # 8-bit: the row scales live on the weight until the first forward moves them into the module's state.
    SCB = W.SCB if getattr(W, "SCB", None) is not None else module.state.SCB
    CB = W.data
    return bnb.functional.int8_vectorwise_dequant(CB, SCB.to(CB.device)).float()


def _bnb_4bit_plain(W) -> tuple:
    """A 4-bit weight's (data, quant_state) in bitsandbytes' plain layout, without changing the weight. On a
    CPU with AVX512-BF16, Linear4bit's first inference forward repacks its weight in place for its CPU
    kernel (absmax rounded to bfloat16); bitsandbytes itself unpacks it so (its state_dict does) before
    anything else reads it, and so do we, on copies."""
    import copy

    import bitsandbytes as bnb

    state = W.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return W.data, state
    return bnb.functional._convert_weight_packed_for_cpu_inverse(W.data.clone(), copy.deepcopy(state))


@dataclass
class Requantized:
    """What a requantizing merge replaced: the original weight (and bitsandbytes' int8 state), so that
    unmerge puts it back as it was; `merged` is the weight it put in."""

    original: Any
    merged: Any
    state: Optional[tuple] = None

    @torch.no_grad()
    def restore(self, module: nn.Module) -> None:
        module.weight = self.original
        if self.state is not None:
            module.state.CB, module.state.SCB = self.state


def _torchao_requantize(W: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    from torchao.quantization.quant_primitives import MappingType

    name = type(W).__name__
    zp = getattr(W, "zero_point", None)
    mapping = MappingType.SYMMETRIC if zp is None or not bool(zp.any()) else MappingType.ASYMMETRIC
    new = new.to(W.dtype)
    if name == "Int8Tensor":
        from torchao.quantization.granularity import PerBlock

        return type(W).from_hp(new, PerBlock(tuple(W.block_size)), mapping_type=mapping,
                               act_quant_kwargs=W.act_quant_kwargs, reduce_range=W.reduce_range)
    if name == "IntxUnpackedToInt8Tensor":
        return type(W).from_hp(new, tuple(W.block_size), W.target_dtype, mapping_type=mapping,
                               activation_quantization=W.activation_quantization)
    if name == "Int4Tensor":
        return type(W).from_hp(new, list(W.block_size))
    raise ValueError(_unsupported(name))


def _unsupported(name: str) -> str:
    return (f"pylora does not know the scheme of a torchao {name} to requantize it with "
            f"(supported: {', '.join(TORCHAO_REQUANTIZABLE)})")


@torch.no_grad()
def requantize(module: nn.Module, new: torch.Tensor) -> Requantized:
    """Replace `module`'s quantized weight by `new` (float [O, I]) quantized with the same scheme; returns
    what restores the original. Quantizes first, then swaps: a failure leaves the module as it was."""
    q = quantization(module)
    W = module.weight
    if q.scheme == "torchao":
        weight = nn.Parameter(_torchao_requantize(W, new), requires_grad=False)
        module.weight = weight
        return Requantized(W, weight)
    import bitsandbytes as bnb

    if q.scheme == "bnb_4bit":
        kwargs = {k: v for k, v in vars(W).items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs.pop("quant_state", None)
        kwargs.update(requires_grad=False, bnb_quantized=False)
        dtype = _bnb_4bit_plain(W)[1].dtype if W.quant_state is not None else new.dtype
        weight = bnb.nn.Params4bit(new.to("cpu", dtype), **kwargs).to(W.device)
        module.weight = weight
        return Requantized(W, weight)
    state = module.state
    weight = bnb.nn.Int8Params(new.to("cpu"), requires_grad=False, has_fp16_weights=W.has_fp16_weights).to(W.device)
    saved = (state.CB, state.SCB)
    module.weight = weight
    state.reset_grads()  # the next forward takes the new weight's CB / SCB into the state
    return Requantized(W, weight, saved)
