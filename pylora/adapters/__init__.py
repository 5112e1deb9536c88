"""PEFT's adapter format: every source (a directory, a model in memory) becomes one validated Adapter
(source.py, read.py), which fit.py checks against a base model; load.py and the server apply what it
returns; save.py writes PEFT's files. Every failure is an AdapterError."""
from pylora.adapters.errors import AdapterError, AdapterWarning
from pylora.adapters.fit import Fit, fit
from pylora.adapters.format import Adapter, AdapterInspection, ModuleWeights
from pylora.adapters.load import load_adapter
from pylora.adapters.read import inspect_adapter, read_adapter, read_adapters
from pylora.adapters.save import adapter_tensors, save_adapter
from pylora.adapters.source import adapter_from_model, as_adapter

__all__ = ["AdapterError", "AdapterWarning", "Adapter", "AdapterInspection", "ModuleWeights", "Fit", "fit",
           "read_adapter", "read_adapters", "inspect_adapter", "as_adapter", "adapter_from_model", "load_adapter",
           "save_adapter", "adapter_tensors"]
