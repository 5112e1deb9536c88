"""Serving many adapters over one base model: MultiLoRA (server.py), the paged pool of rank rows and
its residency (pool.py), and the batch plans each forward builds (batch.py)."""
from pylora.serve.pool import PoolFullError
from pylora.serve.server import MultiLoRA

__all__ = ["MultiLoRA", "PoolFullError"]
