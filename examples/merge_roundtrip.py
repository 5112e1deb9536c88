"""Merge a LoRA update into a bf16 weight and take it back out, bit for bit."""
import torch

from pylora import ops

torch.manual_seed(0)
W = (torch.randn(4096, 4096) * 0.02).bfloat16()
A = torch.randn(16, 4096) / 64
B = torch.randn(4096, 16) * 1e-3
original = W.clone()

record = ops.merge_(W, A, B, scale=2.0)  # W += 2.0 * B @ A, fp32 accumulation, one rounding
truth = (original.double() + 2.0 * B.double() @ A.double()).bfloat16()
print(f"merged: {(W != truth).float().mean().item():.2e} of elements differ from the float64 truth rounded once")

ops.unmerge_(W, A, B, 2.0, record)
naive = ((original.float() + 2.0 * B @ A).bfloat16().float() - 2.0 * B @ A).bfloat16()
print(f"unmerge: bit-exact={torch.equal(W.view(torch.int16), original.view(torch.int16))}; "
      f"record {record.nbytes / 2**10:.1f} KiB = {100 * record.nbytes / (W.numel() * 2):.2f}% of W; "
      f"subtracting instead would change {(naive != original).float().mean().item():.1%} of W")
