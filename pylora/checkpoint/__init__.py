"""Merging adapters into a safetensors checkpoint on disk, tensor by tensor (`pylora merge`): merge.py
streams the files, updates.py decides what each tensor becomes."""
from pylora.checkpoint.merge import OUT_DTYPES, merge_checkpoint, read_layout
from pylora.checkpoint.updates import CheckpointError

__all__ = ["merge_checkpoint", "read_layout", "CheckpointError", "OUT_DTYPES"]
