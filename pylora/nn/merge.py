"""Model-level merge: fold every LoRA layer's adapter into its base weights, take it back out, or
drop the LoRA layers (merge_and_unload / unload)."""
from __future__ import annotations

from torch import nn

from pylora.nn.inject import CONFIG_ATTR, ModulesToSave, lora_layers, set_module, uninstall, unwrap_model


def _named_error(name: str, exc: Exception) -> Exception:
    return type(exc)(f"{name}: {exc}") if isinstance(exc, (ValueError, RuntimeError)) else exc


def merge(model: nn.Module, dequantize: bool = False, record: bool = True) -> nn.Module:
    """Fold every LoRA layer's adapter into its base weight (exactly reversible by unmerge).
    All or nothing: a layer that cannot merge at all (lora_bias without a base bias, a quantized base
    weight without dequantize=True) is refused before any layer is touched; if one layer refuses its
    values (a non-finite result, named with its layer and position), the layers already merged are
    unmerged exactly and the error is raised.

    dequantize=True: layers over a quantized base (torchao, bitsandbytes) are merged by
    dequantize-merge-requantize (LoraLayer.merge(dequantize=True): rounded to the quantization grid;
    unmerge restores the original quantized weights); dense layers merge exactly as always.

    record=False (what merge_and_unload uses): the layers whose merge cannot fail (ops.merge_cannot_overflow)
    merge without an exact-unmerge record, after every other layer has merged with one, so that a refusal
    can still be undone everywhere; those layers then cannot be unmerged, only dropped."""
    for name, layer in lora_layers(model):
        if not layer.merged:
            try:
                layer.check_mergeable(dequantize)
            except ValueError as exc:
                raise _named_error(name, exc) from None
    recorded, unrecorded = [], []
    for name, layer in lora_layers(model):
        if not layer.merged:
            (unrecorded if not record and layer.merge_cannot_fail() else recorded).append((name, layer))
    done = []
    try:
        for name, layer in recorded:
            try:
                layer.merge(dequantize=dequantize)
            except (ValueError, RuntimeError) as exc:
                raise _named_error(name, exc) from None
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unmerge()
        raise
    for _, layer in unrecorded:  # cannot refuse: the bound rules every non-finite result out
        layer.merge(record=False)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out: the base weights are restored bit for bit."""
    for name, layer in lora_layers(model):
        if layer.merged:
            try:
                layer.unmerge()
            except (ValueError, RuntimeError) as exc:
                raise _named_error(name, exc) from None
    return model


def _replace_all(model: nn.Module, merge_first: bool, dequantize: bool = False) -> nn.Module:
    if merge_first:
        merge(model, dequantize=dequantize, record=False)  # never unmerged: no record needed
    for name, layer in list(lora_layers(model)):
        set_module(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            set_module(model, name, module.trained_module if merge_first else module.original_module)
    inner = unwrap_model(model)  # the config lives on the model inside DDP / torch.compile wrappers
    if CONFIG_ATTR in vars(inner):
        object.__delattr__(inner, CONFIG_ATTR)
    uninstall(inner)  # e.g. save_pretrained is transformers' own again: a plain model saves whole
    return model


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Plain modules again with the adapter folded in (and modules_to_save copies in place of the
    originals); returns the model. Over a quantized base it is refused (before anything changes) unless
    dequantize=True asks for dequantize-merge-requantize (see merge); the quantized modules stay quantized
    with their own scheme."""
    return _replace_all(model, merge_first=True, dequantize=dequantize)


def unload(model: nn.Module) -> nn.Module:
    """Plain modules again without the adapter (the original weights, unmerging first if merged)."""
    unmerge(model)
    return _replace_all(model, merge_first=False)
