"""transformers' save_pretrained for an injected model: the adapter in PEFT's files, as a PeftModel writes
them, so that Trainer's checkpoints hold the adapter, not the model, and load back.

inject installs it on every transformers model it wraps (pylora.nn.inject.MODEL_METHODS); unload and
merge_and_unload remove it, so a plain model saves whole again. Trainer saves through
model.save_pretrained; its resume and load_best_model_at_end load `model.safetensors` of a checkpoint
folder with model.load_state_dict. So in a Trainer checkpoint folder (checkpoint-N) the adapter's tensors
are also written there under the model's own keys (a few kilobytes to megabytes), which an injected model
loads without calling the base missing (pylora.nn.inject.adapter_keys). No config.json is written: a
directory saved here is no model, and transformers' from_pretrained loads it as PEFT's adapter over the
base model named in adapter_config.json (with peft installed) or refuses it (no config.json), never as a
model with random LoRA weights.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Union

from torch import nn

from pylora.adapters.errors import AdapterError
from pylora.adapters.save import adapter_config_json, adapter_tensors, write_adapter, write_atomic
from pylora.nn.inject import adapter_keys

# Trainer writes its checkpoints to <output_dir>/checkpoint-<step> (transformers.trainer_utils.
# PREFIX_CHECKPOINT_DIR) and resumes from them by their model.safetensors (transformers' SAFE_WEIGHTS_NAME).
CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+")
RESUME_NAME = "model.safetensors"
RESUME_METADATA = {"format": "pt", "pylora": "adapter only: the LoRA tensors of an injected model under its own "
                                            "state_dict keys, for Trainer's resume; the model is the base model "
                                            "plus the PEFT adapter in adapter_model.safetensors"}


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (without importing transformers: a model of it means it is imported)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], is_main_process: bool = True,
                    state_dict: dict | None = None, *, save_embedding_layers: Union[bool, str] = "auto",
                    resume_state: Union[bool, str] = "auto", safe_serialization: bool = True,
                    push_to_hub: bool = False, variant: str | None = None, **kwargs) -> None:
    """The injected model's save_pretrained: writes its adapter as PEFT does (adapter_config.json and
    adapter_model.safetensors, pylora.save_adapter's files), as PeftModel.save_pretrained would.

    Semantics: on the main process only, pylora.adapters.save_adapter's files for `model` in
    save_directory, each tensor taken from `state_dict` where given (Trainer passes one gathered from
    FSDP / DeepSpeed shards); with resume_state (default "auto": when save_directory is a Trainer checkpoint
    folder, checkpoint-N) also model.safetensors holding the adapter under the model's own state_dict keys,
    which Trainer's resume loads. No config.json, no base weights. Arguments of transformers' own
    save_pretrained that change nothing here (max_shard_size, token, save_peft_format, ...) are accepted;
    push_to_hub=True, safe_serialization=False and a variant are refused. AdapterError as save_adapter.
    """
    if push_to_hub:
        raise NotImplementedError("save_pretrained(push_to_hub=True) on a pylora model: save to a directory, then "
                                  "upload it (huggingface_hub.upload_folder)")
    if not safe_serialization:
        raise AdapterError("save_pretrained(safe_serialization=False): pylora writes adapter_model.safetensors only")
    if variant is not None:
        raise AdapterError(f"save_pretrained(variant={variant!r}): PEFT's adapter files have no variants")
    if resume_state not in ("auto", True, False):
        raise AdapterError(f"save_pretrained: resume_state={resume_state!r} must be 'auto', True or False")
    if not is_main_process:
        return
    directory = os.fspath(save_directory)
    if os.path.isfile(directory):
        raise AdapterError(f"save_pretrained: {directory} is a file; expected a directory")
    _warn_if_trained_outside_adapter(model)
    tensors = adapter_tensors(model, save_embedding_layers, state_dict=state_dict)
    write_adapter(directory, adapter_config_json(model), tensors)
    if resume_state == "auto":
        resume_state = CHECKPOINT_FOLDER.fullmatch(os.path.basename(os.path.normpath(directory))) is not None
    if resume_state:
        write_resume_state(model, directory, state_dict)


def adapter_state(model: nn.Module, state_dict: dict | None = None) -> dict:
    """{key: CPU copy} of the adapter's tensors under the model's own state_dict keys (adapter_keys), each
    taken from `state_dict` where given."""
    live = model.state_dict(keep_vars=True)
    source = state_dict or {}
    return {k: source.get(k, live[k]).detach().to("cpu", copy=True).contiguous() for k in adapter_keys(model)}


def write_resume_state(model: nn.Module, directory: Union[str, os.PathLike], state_dict: dict | None = None) -> str:
    """Write model.safetensors in `directory`: adapter_state(model), the file Trainer resumes from. Returns
    its path."""
    from safetensors.torch import save_file

    path = os.path.join(os.fspath(directory), RESUME_NAME)
    tensors = adapter_state(model, state_dict)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=RESUME_METADATA))
    return path


def _warn_if_trained_outside_adapter(model: nn.Module) -> None:
    adapter = set(adapter_keys(model))
    outside = [n for n, p in model.named_parameters() if p.requires_grad and n not in adapter]
    if outside:
        shown = ", ".join(outside[:3]) + (f", ... ({len(outside)} in all)" if len(outside) > 3 else "")
        warnings.warn(f"save_pretrained writes the adapter only, but parameters outside it require grad ({shown}): "
                      "their training is not saved. Call pylora.mark_only_lora_trainable(model) before training, "
                      "or name such modules in LoraConfig.modules_to_save", stacklevel=4)
