"""Serving and training many adapters over one base model: MultiLoRA (server.py), the paged pool of rank
rows and its residency (pool.py), the batch plans each forward builds (batch.py), and trainable
adapters with the joint loss (training.py)."""
from pylora.serve.pool import PoolFullError
from pylora.serve.server import MultiLoRA
from pylora.serve.training import per_adapter_loss

__all__ = ["MultiLoRA", "PoolFullError", "per_adapter_loss"]
