"""Batch plans for lora_apply_, built on the host once per forward.

A plan says which slot each token uses, as segments: seg_ptr [S+1] and seg_slot [S] (int32), where
segment g covers tokens [seg_ptr[g], seg_ptr[g+1]) and uses slot seg_slot[g] (-1: no adapter).
Consecutive tokens with the same slot share one segment, so a prefill row is one segment (SGMV) and
decode tokens of different adapters are segments of length 1 (BGMV). The server builds the plan here,
validates it against its pool with `validate`, moves it to the device once, and calls
pylora.ops.lora_apply_(..., check=False) in every wrapped module.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pylora.ops import reference as ref


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (a plan, a table) on `device`: itself on the CPU, else copied once from pinned memory
    without waiting."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _as_int64(name: str, v) -> torch.Tensor:
    t = torch.as_tensor(v)
    if t.dim() != 1:
        raise ValueError(f"segments: {name} must be 1-D (a sequence of ints), got shape {list(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):  # [] is float32
        raise ValueError(f"segments: {name}.dtype={str(t.dtype).replace('torch.', '')} must be an integer type")
    return t.to(device="cpu", dtype=torch.int64)


def segments(slots: Sequence[int] | torch.Tensor, tokens_per_row: int | Sequence[int] | torch.Tensor = 1,
             num_slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments (seg_ptr, seg_slot) of a batch, merging consecutive tokens with the same slot.

    Semantics: the batch is B rows; row b holds tokens_per_row tokens (an int: every row, T = B * L, the
    rows of a [B, L] batch flattened; a sequence: row b holds tokens_per_row[b], a packed batch) and every
    token of row b uses slot slots[b] (-1: no adapter). With tokens_per_row=1, slots is per token.
    Shapes: slots [B]; returns int32 CPU tensors seg_ptr [S+1] (seg_ptr[S] = T) and seg_slot [S], S <= B.
    Raises ValueError naming the entry when a slot is below -1 or not below num_slots (when given), or
    a row length is negative.
    """
    s = _as_int64("slots", slots)
    B = s.numel()
    if isinstance(tokens_per_row, int):
        if tokens_per_row < 0:
            raise ValueError(f"segments: tokens_per_row={tokens_per_row} must be >= 0")
        lengths = torch.full((B,), tokens_per_row, dtype=torch.int64)
    else:
        lengths = _as_int64("tokens_per_row", tokens_per_row)
        if lengths.numel() != B:
            raise ValueError(f"segments: tokens_per_row has {lengths.numel()} entries, it must have one per row "
                             f"of slots (B={B})")
        bad = (lengths < 0).nonzero()
        if bad.numel():
            b = int(bad[0, 0])
            raise ValueError(f"segments: tokens_per_row[{b}]={int(lengths[b])} must be >= 0")
    out_of_range = (s < -1) if num_slots is None else (s < -1) | (s >= num_slots)
    bad = out_of_range.nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        want = ">= -1" if num_slots is None else f"in [-1, N={num_slots})"
        raise ValueError(f"segments: slots[{b}]={int(s[b])} must be {want}")
    T = int(lengths.sum())
    if T > torch.iinfo(torch.int32).max:
        raise ValueError(f"segments: T={T} tokens do not fit the int32 seg_ptr")
    # Rows without tokens contribute nothing; the rest merge where the slot does not change.
    keep = lengths > 0
    s, lengths = s[keep], lengths[keep]
    starts = torch.cumsum(lengths, 0) - lengths
    new = torch.ones(s.numel(), dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    seg_ptr = torch.cat([starts[new], torch.tensor([T])]).to(torch.int32)
    return seg_ptr, s[new].to(torch.int32)


def validate(row_ptr: torch.Tensor, row_idx: torch.Tensor, seg_ptr: torch.Tensor, seg_slot: torch.Tensor,
             T: int, P: int) -> None:
    """Checks a plan against a pool, as lora_apply_ would (same messages), before it goes to the device.

    Semantics: row_ptr [N+1] starts at 0, never decreases and ends at row_idx.numel(); row_idx [nnz] in
    [0, P); seg_ptr [S+1] starts at 0, never decreases and ends at T; seg_slot [S] in [-1, N).
    Raises ValueError naming the first entry that is not.
    """
    for name, t in (("row_ptr", row_ptr), ("row_idx", row_idx), ("seg_ptr", seg_ptr), ("seg_slot", seg_slot)):
        if t.dim() != 1 or t.dtype != torch.int32:
            raise ValueError(f"lora_apply_: {name} must be a 1-D int32 tensor, got {t.dtype} of shape "
                             f"{list(t.shape)}")
    if row_ptr.numel() < 1 or seg_ptr.numel() != seg_slot.numel() + 1:
        raise ValueError(f"lora_apply_: row_ptr.numel()={row_ptr.numel()} must be >= 1 (N+1) and "
                         f"seg_ptr.numel()={seg_ptr.numel()} must equal seg_slot.numel()+1={seg_slot.numel() + 1}")
    ref.check_lora_apply_plan(row_ptr, row_idx, seg_ptr, seg_slot, T, P)
