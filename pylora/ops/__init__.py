"""pylora's functional API: typed wrappers over torch.ops.pylora.*, their fakes and autograd, one
module per op family, and their pure-torch twin (reference.py).

Each function runs the compiled kernel for the tensors' device when there is one, and otherwise
the identical pure-torch twin. The shape letters are the same everywhere:
T tokens, N slots/adapters, r rank, I in-features, O out-features, S segments, P pool rows.
"""
from pylora.ops import reference  # noqa: F401
from pylora.ops.apply import lora_apply_
from pylora.ops.dispatch import OPS, backend, reference_mode
from pylora.ops.linear import lora_linear, lora_linear_backward
from pylora.ops.merge import MergeRecord, merge_, merge_bias, merge_cannot_overflow, unmerge_
from pylora.ops.multi import lora_multi

__all__ = ["OPS", "backend", "reference_mode", "reference", "MergeRecord", "merge_", "merge_bias", "merge_cannot_overflow", "unmerge_", "lora_linear",
           "lora_linear_backward", "lora_apply_", "lora_multi"]
