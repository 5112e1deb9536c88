"""One way in: every source of an adapter becomes one validated Adapter.

A PEFT directory is read by pylora.adapters.read; a pylora model in memory (also inside
DistributedDataParallel or torch.compile) is read as save_adapter would write it, through the same
checks; an Adapter is already validated. So whatever the source, the same cases are refused with the
same AdapterError, and an adapter served from memory is the one its saved files would give.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Union

from torch import nn

from pylora.adapters.errors import AdapterError, AdapterWarning
from pylora.adapters.format import Adapter
from pylora.adapters.read import inspect_tensors, read_adapter
from pylora.adapters.save import adapter_config_json, adapter_tensors
from pylora.nn.inject import get_config, unwrap_model

Source = Union[str, os.PathLike, nn.Module, Adapter]


def adapter_from_model(model: nn.Module, *, strict: bool = True) -> Adapter:
    """The adapter a pylora model in memory holds, as save_adapter would write and read_adapter read it
    (factors, modules_to_save copies, trained biases, embedding layers; finiteness and every other check),
    with host copies of its tensors."""
    inner = unwrap_model(model)
    if get_config(inner) is None:
        raise AdapterError(f"{type(inner).__name__} (a model in memory) holds no pylora adapter: inject() or "
                           "load_adapter() it first, or pass an adapter directory")
    where = f"{type(inner).__name__} (a model in memory)"
    ins = inspect_tensors(adapter_config_json(inner), adapter_tensors(inner, check_finite=False), where,
                          strict=strict)
    adapter = ins.adapter()
    for message in ins.warnings:
        warnings.warn(message, AdapterWarning, stacklevel=3)
    return adapter


def as_adapter(source: Source, adapter_name: Optional[str] = None, *, allow_pickle: bool = False,
               strict: bool = True) -> Adapter:
    """The validated Adapter of `source`: a PEFT-format directory (its subfolder `adapter_name`), a pylora
    model in memory, or an Adapter (returned as it is). Raises AdapterError."""
    if isinstance(source, Adapter):
        return source
    if isinstance(source, nn.Module):
        return adapter_from_model(source, strict=strict)
    if isinstance(source, (str, os.PathLike)):
        return read_adapter(source, adapter_name, allow_pickle=allow_pickle, strict=strict)
    raise AdapterError(f"source={type(source).__name__}: expected an adapter directory (str or os.PathLike), a "
                       "pylora model in memory (nn.Module), or a pylora.adapters.Adapter")
