"""Training many adapters in one batch: the trainable adapters a MultiLoRA holds, their dropout seeds,
and the loss that keeps them independent.

A trainable adapter holds its factors as parameters of its own (A [r, I] and B [O, r] per module, PEFT's
shapes, float32 by default as PEFT keeps them), registered under the server so that optimizers and
DistributedDataParallel see them; it is served from them directly (no copy into the pool) and so is
always resident. Every wrapped module adds, for the rows that name it, its update through
pylora.ops.lora_multi, whose backward gives each adapter the gradient of its own rows only.

Dropout seeds. A training forward draws one number from torch's default CPU generator, whatever
adapters the batch holds; adapter k's seed in module m mixes that draw, m's name and k's own salt. So
its masks do not depend on its neighbours (adding or removing an adapter changes no other adapter's
masks, nor how far the generator moves), and a recomputation under torch.utils.checkpoint, which reads
the same forward's draw, recomputes the same masks. A module called twice in one forward gets the same
masks both times.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pylora.nn.config import LoraConfig
from pylora.ops import linear
from pylora.nn.layers import init_lora_factors

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def adapter_seed(draw: int, salt: int) -> int:
    """Adapter dropout seed (a non-negative int64) from one module's draw and the adapter's salt."""
    return _splitmix64((draw & _M64) ^ _splitmix64(salt & _M64)) >> 1


def name_salt(name: str) -> int:
    """A stable salt from an adapter's name (the same in every process and run)."""
    return zlib.crc32(name.encode("utf-8"))


def module_draw(step_draw: int, module: str) -> int:
    """One module's share of a forward's draw: the same module gets the same number on every call of the
    forward, recomputations included."""
    return _splitmix64((step_draw & _M64) ^ zlib.crc32(module.encode("utf-8")))


def draw_seed() -> int:
    """One draw from torch's default CPU generator, the one lora_linear makes for its dropout seed."""
    return int(linear.draw_seed())


def _key(module: str) -> str:
    # ModuleDict keys cannot hold ".".
    return module.replace(".", "-")


class ModuleFactors(nn.Module):
    """One adapter's factors in one module: lora_A [r, I] and lora_B [O, r] (PEFT's shapes)."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor):
        super().__init__()
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)


class TrainableAdapter(nn.Module):
    """A trainable adapter of a MultiLoRA: `config` (a LoraConfig with target_modules the list of the
    modules it wraps), per module its factors and scale, and the salt of its dropout seeds."""

    def __init__(self, name: str, config: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scales: dict[str, float], salt: Optional[int] = None):
        super().__init__()
        self.name = name
        self.config = config
        self.factors = nn.ModuleDict({_key(m): ModuleFactors(A, B) for m, (A, B) in factors.items()})
        self.modules_ = list(factors)  # module names, in model order
        self.scales = dict(scales)
        self.salt = name_salt(name) if salt is None else int(salt)

    def of(self, module: str) -> Optional[ModuleFactors]:
        key = _key(module)
        return self.factors[key] if key in self.factors else None

    @property
    def dropout_p(self) -> float:
        return float(self.config.lora_dropout)

    @classmethod
    def fresh(cls, name: str, config: LoraConfig, features: dict[str, tuple[int, int]], *, dtype=torch.float32,
              device=None, salt: Optional[int] = None) -> "TrainableAdapter":
        """New factors with PEFT's initialisation (config.init_lora_weights) for modules {name: (I, O)}."""
        factors, scales = {}, {}
        for m, (I, O) in features.items():
            r = config.rank_for(m)
            A = torch.empty(r, I, dtype=dtype, device=device)
            B = torch.empty(O, r, dtype=dtype, device=device)
            init_lora_factors(A, B, config.init_lora_weights)
            factors[m], scales[m] = (A, B), float(config.scale_for(m))
        return cls(name, config, factors, scales, salt)


def per_adapter_loss(logits: torch.Tensor, labels: torch.Tensor, adapter_names: Sequence, *,
                     ignore_index: int = -100, shift: bool = True) -> tuple[torch.Tensor, dict]:
    """The joint-training loss: the sum over adapters of each adapter's mean token loss.

    Semantics: per-token cross-entropy of logits [B, L, V] against labels [B, L] (shifted by one for a
    causal LM when shift=True, as transformers' loss does; tokens labelled ignore_index do not count);
    adapter a's loss is the mean over the tokens of the rows that name it; the total is the sum of those
    means over the adapters named (rows with None count for none). Each adapter's gradient is then the
    gradient of its mean loss alone, whatever its neighbours in the batch: training N adapters together
    steps each as training it alone on its own rows would. Returns (total, {adapter: its mean loss}).
    """
    if isinstance(adapter_names, str):
        raise ValueError(f"per_adapter_loss: adapter_names={adapter_names!r} must be a sequence with one name (or "
                         "None) per row, not a string")
    names = list(adapter_names)
    if len(names) != logits.shape[0] or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"per_adapter_loss: adapter_names has {len(names)} entries, logits {logits.shape[0]} rows "
                         f"and labels {labels.shape[0]} rows; expected one name per row")
    B, L, V = logits.shape
    if shift:
        # Shift the labels, not the logits (as transformers' loss does): a slice of the logits would cost
        # a full-size zero-filled gradient in backward.
        labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    flat = logits.reshape(-1, V)
    tokens = F.cross_entropy(flat if flat.dtype == torch.float32 else flat.float(), labels.reshape(-1),
                             ignore_index=ignore_index, reduction="none").view(B, L)
    counted = (labels != ignore_index).sum(1)
    order = list(dict.fromkeys(n for n in names if n is not None))
    if not order:
        return logits.new_zeros((), dtype=torch.float32), {}
    rows = [i for i, n in enumerate(names) if n is not None]
    which = torch.tensor([order.index(names[i]) for i in rows], device=logits.device)
    rows_t = torch.tensor(rows, device=logits.device)
    sums = tokens.new_zeros(len(order)).index_add(0, which, tokens.sum(1).index_select(0, rows_t))
    counts = counted.new_zeros(len(order)).index_add(0, which, counted.index_select(0, rows_t))
    means = sums / counts.clamp(min=1)
    return means.sum(), {name: means[i] for i, name in enumerate(order)}
