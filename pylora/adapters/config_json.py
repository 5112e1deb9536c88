"""adapter_config.json: PEFT's LoRA config read into a LoraConfig, and a LoraConfig written as PEFT writes it.

Reading sorts every field of the file into one of four groups (the tables below):
  pylora's own fields      LoraConfig's fields: PEFT's names and meanings, validated by LoraConfig
  harmless fields          metadata, or options that act only through another field checked here:
                           any value is accepted
  refused unless default   options that change the forward, the base weights or the model's structure;
                           their default (off) values are accepted, anything else is refused by name
  unknown fields           accepted at an "off" value (null, false, {}, [], ""), refused otherwise: a newer
                           PEFT option pylora does not know may change what the adapter computes
init_lora_weights is checked by value: initialisations that only set A and B before training are
accepted (the file holds the trained A and B); those that rewrite the base weight are refused.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from pylora.nn.config import LoraConfig

PEFT_TYPE = "LORA"

# Fields that describe the adapter or act only at training time or at run time: any value.
HARMLESS_FIELDS = {
    "task_type": "the task PEFT wraps the model for",
    "auto_mapping": "the base model's class, for PEFT's AutoPeftModel",
    "peft_version": "the PEFT version that wrote the file",
    "base_model_name_or_path": "the base model's name",
    "revision": "the base model's revision",
    "inference_mode": "a training flag (PEFT writes true)",
    "lora_dropout": "dropout acts only in training",
    "runtime_config": "run-time options PEFT never saves",
    "merge_weights": "early PEFT's merge-on-eval flag: a run-time switch, not a weight",
    # Each acts only together with an option that is refused here, so alone it changes nothing.
    "megatron_core": "used only with megatron_config, which must be null",
    "qalora_group_size": "used only with use_qalora, which must be false",
    "loftq_config": "used only with init_lora_weights='loftq', which is refused",
    "corda_config": "used only with init_lora_weights='corda', which is refused",
    "lora_ga_config": "used only with init_lora_weights='lora_ga', which is refused",
    # EVA initialises A from activations before training; the file holds the trained A.
    "eva_config": "used only with init_lora_weights='eva', which sets A before training",
}

# Options pylora does not implement: (accepted values, why any other value is refused).
REFUSED_UNLESS_DEFAULT = {
    "use_dora": ((False,), "DoRA (weight-decomposed LoRA) rescales the output by a learned magnitude"),
    "layer_replication": ((None,), "layer replication duplicates base layers, changing the model's structure"),
    "trainable_token_indices": ((None,), "trainable tokens rewrite rows of the embedding"),
    "target_parameters": ((None, []), "LoRA on bare nn.Parameters (e.g. MoE experts) is not implemented"),
    "alora_invocation_tokens": ((None,), "Activated LoRA applies the adapter only after an invocation sequence"),
    "use_qalora": ((False,), "QA-LoRA pools the input before A"),
    "megatron_config": ((None,), "Megatron's parallel linear layers are not supported"),
    "velora_config": ((None,), "VeLoRA is a PEFT LoRA variant pylora does not implement"),
    "monteclora_config": ((None,), "MonteCLoRA samples the factors, changing the forward"),
    "use_bdlora": ((None,), "BD-LoRA uses block-diagonal factors"),
    "arrow_config": ((None,), "Arrow routes between adapters, changing the forward"),
    "kasa_config": ((None,), "KaSA truncates the base weight's singular values and adds a diagonal between A and B"),
    "ensure_weight_tying": ((False,), "it ties the adapters of tied layers, which pylora does not"),
    "enable_lora": ((None,), "early PEFT's fused-QKV MergedLinear is not supported"),
}

# init_lora_weights values whose adapters are plain LoRA once trained (the base weight is untouched).
INIT_ACCEPTED = (True, False, "gaussian", "eva", "orthogonal")
# Those that rewrite the base weight at initialisation (the adapter only fits the rewritten base), or
# that select a PEFT variant (mica).
INIT_REFUSED_WHY = {
    "pissa": "PiSSA moves the top singular components out of the base weight",
    "corda": "CorDA rewrites the base weight",
    "olora": "OLoRA subtracts its initial factors from the base weight",
    "loftq": "LoftQ replaces the base weight by a quantised one",
    "lora_ga": "LoRA-GA offsets the base weight by its initial factors",
    "mica": "MiCA is a PEFT variant with a frozen B",
}

# pylora's LoraConfig fields that must be JSON booleans (a string "false" would be truthy).
_BOOL_FIELDS = ("fan_in_fan_out", "use_rslora", "lora_bias")
_OWN_FIELDS = set(LoraConfig.__dataclass_fields__)


def _is_off(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (dict, list, str)) and len(value) == 0)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_from_json(raw: dict, where: str) -> tuple[Optional[LoraConfig], list[str]]:
    """The LoraConfig an adapter_config.json dict describes, and the problems found (each naming
    `where`, the field, its value and what is expected). The config is None when it cannot be built.

    Semantics: peft_type must be "LORA"; each field is checked against the tables above; pylora's own
    fields build the LoraConfig (init_lora_weights "eva"/"orthogonal" become True: only the
    initialisation differed).
    """
    problems = []
    peft_type = raw.get("peft_type", None)
    if "peft_type" not in raw:
        problems.append(f"{where}: field peft_type is missing (expected {PEFT_TYPE!r})")
    elif peft_type != PEFT_TYPE:
        problems.append(f"{where}: peft_type={_short(peft_type)} is not supported (expected {PEFT_TYPE!r}: "
                        "pylora reads LoRA adapters only)")
    for name, value in raw.items():
        if name == "peft_type" or name in HARMLESS_FIELDS:
            continue
        if name in REFUSED_UNLESS_DEFAULT:
            accepted, why = REFUSED_UNLESS_DEFAULT[name]
            if not any(value == a and type(value) is type(a) for a in accepted):
                problems.append(f"{where}: {name}={_short(value)} is not supported ({why}); pylora loads plain "
                                f"LoRA only ({name} must be {' or '.join(map(repr, accepted))})")
            continue
        if name in _OWN_FIELDS:
            continue
        if not _is_off(value):
            problems.append(f"{where}: unknown field {name}={_short(value)}: pylora does not know this option and "
                            "refuses it when set, since it may change what the adapter computes (expected it "
                            "absent, null, false or empty)")

    for name in _BOOL_FIELDS:
        if name in raw and not isinstance(raw[name], bool):
            problems.append(f"{where}: {name}={_short(raw[name])} must be true or false")
    for name in ("rank_pattern", "alpha_pattern"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            problems.append(f"{where}: {name}={_short(raw[name])} must be an object mapping module patterns to "
                            "values")
    mts = raw.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts)):
        problems.append(f"{where}: modules_to_save={_short(mts)} must be a list of module names or null")
    if raw.get("target_modules") is None:
        # LoraConfig(target_modules=None) means "PEFT's default for the model's type", a choice made when a
        # config meets a model; a file records the choice made (PEFT writes the list it chose).
        problems.append(f"{where}: target_modules={_short(raw.get('target_modules'))} names no module; an adapter "
                        "file must list the modules it targets (PEFT writes the list it chose)")
    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        problems.append(f"{where}: r={_short(r)} must be an integer >= 1")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"{where}: lora_alpha={_short(alpha)} must be a finite number > 0")

    init = raw.get("init_lora_weights", True)
    if not any(init == a and type(init) is type(a) for a in INIT_ACCEPTED):
        why = next((w for k, w in INIT_REFUSED_WHY.items() if isinstance(init, str) and init.lower().startswith(k)),
                   "it is not an initialisation pylora knows")
        problems.append(f"{where}: init_lora_weights={_short(init)} is not supported ({why}); accepted: "
                        f"{', '.join(map(repr, INIT_ACCEPTED))}")
    if problems:
        return None, problems

    fields = {k: v for k, v in raw.items() if k in _OWN_FIELDS}
    if fields.get("init_lora_weights") in ("eva", "orthogonal"):
        fields["init_lora_weights"] = True
    for name in ("rank_pattern", "alpha_pattern"):
        if fields.get(name) is None:
            fields.pop(name, None)
    try:
        return LoraConfig(**fields), []
    except (ValueError, TypeError) as exc:
        return None, [f"{where}: {str(exc).removeprefix('LoraConfig: ')}"]


def config_to_json(cfg: LoraConfig, *, target_modules=None, base_model_name_or_path: Optional[str] = None,
                   auto_mapping: Optional[dict] = None) -> dict:
    """The adapter_config.json dict PEFT writes for `cfg`: pylora's fields (all PEFT fields, with
    PEFT's names), peft_type "LORA", inference_mode true, revision, and auto_mapping when task_type
    is null. PEFT's other fields are left out: PEFT fills them with its defaults, which are what
    pylora computes, and older PEFT versions would warn about fields they do not know.
    `target_modules` replaces cfg's (PEFT writes "all-linear" as the list of modules it chose)."""
    d = cfg.to_dict()
    d["peft_type"] = PEFT_TYPE
    d["inference_mode"] = True
    d["revision"] = None
    if target_modules is not None:
        d["target_modules"] = target_modules
    if isinstance(d.get("exclude_modules"), list):
        d["exclude_modules"] = sorted(d["exclude_modules"])
    if d.get("base_model_name_or_path") is None:
        d["base_model_name_or_path"] = base_model_name_or_path
    if d.get("task_type") is None and auto_mapping is not None:
        d["auto_mapping"] = auto_mapping
    return d
