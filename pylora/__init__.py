"""pylora: LoRA with compiled CPU and CUDA kernels.

Train adapters on any PyTorch model, merge and unmerge them exactly, serve many adapters in one
batch, and read and write PEFT's adapter format.
"""
from pylora import _ext, ops  # noqa: F401

__version__ = "0.1.0"
