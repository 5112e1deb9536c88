"""PEFT's adapter format: every source (a directory, a model in memory) becomes one validated Adapter
(source.py, read.py), which fit.py checks against a base model; load.py and the server apply what it
returns; save.py writes PEFT's files, also as an injected transformers model's save_pretrained
(pretrained.py). Every failure is an AdapterError."""
from pylora.adapters.errors import AdapterError, AdapterWarning
from pylora.adapters.fit import Fit, fit
from pylora.adapters.format import Adapter, AdapterInspection, ModuleWeights
from pylora.adapters.load import load_adapter
from pylora.adapters.pretrained import is_transformers_model, save_pretrained
from pylora.adapters.read import inspect_adapter, read_adapter, read_adapters
from pylora.adapters.save import adapter_tensors, save_adapter
from pylora.adapters.source import adapter_from_model, as_adapter
from pylora.nn.inject import MODEL_METHODS

# Every transformers model inject wraps saves its adapter through save_pretrained, as a PeftModel does
# (this layer writes the files; pylora.nn.inject installs the method, knowing nothing of files).
MODEL_METHODS["save_pretrained"] = (is_transformers_model, save_pretrained)

__all__ = ["AdapterError", "AdapterWarning", "Adapter", "AdapterInspection", "ModuleWeights", "Fit", "fit",
           "read_adapter", "read_adapters", "inspect_adapter", "as_adapter", "adapter_from_model", "load_adapter",
           "save_adapter", "adapter_tensors"]
