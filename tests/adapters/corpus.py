"""Broken adapters: each case turns a copy of a valid adapter directory (tiny Llama, q_proj/v_proj,
r=4, PEFT's layout) into a broken one, and names the error it must produce.

A case is (id, mutate(dir), pattern the AdapterError message must match, model_free[, merge pattern]):
model_free cases fail in read_adapter already; the others only against a base: the model
(tests.models.llama) or, for `pylora merge`, its checkpoint on disk, named BASE in the patterns. Where
the checkpoint merge words a problem in its own terms (checkpoint keys and shapes), the fifth entry is
the pattern its error must match.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DELETE = object()
BASE = r"(LlamaForCausalLM|the checkpoint \S+)"


def _config(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        return json.load(f)


def config(**changes):
    """Set (or, with DELETE, remove) adapter_config.json fields."""
    def mutate(d):
        cfg = _config(d)
        for key, value in changes.items():
            if value is DELETE:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump(cfg, f)
    return mutate


def config_text(text):
    def mutate(d):
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(os.path.join(d, "adapter_config.json"), mode) as f:
            f.write(text)
    return mutate


def tensors(edit):
    """edit(dict of file tensors) in place, then written back as safetensors."""
    def mutate(d):
        path = os.path.join(d, "adapter_model.safetensors")
        t = load_file(path)
        edit(t)
        save_file(t, path, metadata={"format": "pt"})
    return mutate


def weights_bytes(edit):
    def mutate(d):
        path = os.path.join(d, "adapter_model.safetensors")
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(edit(data))
    return mutate


def remove(name):
    return lambda d: os.remove(os.path.join(d, name))


def both(*mutations):
    def mutate(d):
        for m in mutations:
            m(d)
    return mutate


def _set(key, fn):
    def edit(t):
        t[key] = fn(t[key])
    return edit


def _poison(value):
    def fn(x):
        x = x.clone()
        x.view(-1)[5] = value
        return x
    return fn


def _only_a_norm_weight(t):
    t.clear()
    t[P + "model.norm.weight"] = torch.ones(32)


def _link(target, name):
    return lambda d: os.symlink(target, os.path.join(d, name))


def _fifo(name):
    # Reading a FIFO blocks until something writes to it: the reader must refuse it unopened.
    return lambda d: os.mkfifo(os.path.join(d, name))


def _rename_to_pickle(d):
    t = load_file(os.path.join(d, "adapter_model.safetensors"))
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    torch.save(t, os.path.join(d, "adapter_model.bin"))


def _huge_header(data):
    return (2**60).to_bytes(8, "little") + data[8:]


def _garbage_header(data):
    n = int.from_bytes(data[:8], "little")
    return data[:8] + b"\x00{" * (n // 2) + b" " * (n % 2) + data[8 + n:]


def _other_model_keys(t):
    for key in list(t):
        t[key.replace("model.layers.", "transformer.h.").replace("self_attn.q_proj", "attn.c_attn")
          .replace("self_attn.v_proj", "attn.c_proj")] = t.pop(key)


CASES = [
    # adapter_config.json
    ("config_missing", remove("adapter_config.json"), r"adapter_config\.json: missing", True),
    ("config_malformed", config_text('{"peft_type": "LORA", "r": 4,'), r"malformed JSON at line 1 column \d+", True),
    ("config_not_an_object", config_text("[1, 2]"), r"holds a JSON list, expected an object of config fields", True),
    ("config_duplicate_field", config_text('{"peft_type": "LORA", "r": 4, "r": 8, "target_modules": ["q_proj"]}'),
     r"field 'r' appears more than once", True),
    ("config_not_utf8", config_text(b'{"r": "\xff\xfe"}'), r"adapter_config\.json: not UTF-8 text", True),
    ("peft_type_other", config(peft_type="ADALORA"), r"peft_type='ADALORA' is not supported \(expected 'LORA'", True),
    ("peft_type_missing", config(peft_type=DELETE), r"field peft_type is missing \(expected 'LORA'\)", True),
    ("r_zero", config(r=0), r"adapter_config\.json: r=0 must be an integer >= 1", True),
    ("r_not_integer", config(r=4.5), r"r=4\.5 must be an integer >= 1", True),
    ("alpha_nan", config(lora_alpha=float("nan")), r"lora_alpha=nan must be a finite number > 0", True),
    ("alpha_negative", config(lora_alpha=-8), r"lora_alpha=-8 must be a finite number > 0", True),
    ("rank_pattern_zero", config(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\]=0 must be an integer >= 1",
     True),
    ("use_dora", config(use_dora=True), r"use_dora=True is not supported \(DoRA .*use_dora must be False", True),
    ("layer_replication", config(layer_replication=[[0, 2], [1, 2]]),
     r"layer_replication=\[\[0, 2\], \[1, 2\]\] is not supported \(layer replication", True),
    ("trainable_token_indices", config(trainable_token_indices=[1, 2]),
     r"trainable_token_indices=\[1, 2\] is not supported", True),
    ("init_pissa", config(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not supported \(PiSSA", True),
    ("init_loftq", config(init_lora_weights="loftq"), r"init_lora_weights='loftq' is not supported \(LoftQ", True),
    ("unknown_field_set", config(future_option={"mode": 2}),
     r"unknown field future_option=\{'mode': 2\}: pylora does not know this option", True),
    ("bool_field_as_string", config(use_rslora="false"), r"use_rslora='false' must be true or false", True),
    ("alpha_overflows_float32", config(lora_alpha=1e300),
     r"lora_alpha=1e\+300 gives the scale lora_alpha / r = 2\.5e\+299 with r=4, outside float32's normal range", True),
    ("alpha_pattern_underflows_float32", config(alpha_pattern={"v_proj": 1e-300}),
     r"alpha_pattern\['v_proj'\]=1e-300 gives the scale .* outside float32's normal range", True),
    ("layers_pattern_invalid", config(layers_to_transform=[0], layers_pattern="layers["),
     r"layers_pattern='layers\[' is not a valid regular expression", True),
    # Exponential backtracking: Python's re takes longer than any test's patience on a module name.
    ("target_modules_backtracks", config(target_modules=r"(.*?)+\.(.*?)+\.(.*?)+X"),
     r"target_modules='\(\.\*\?\)\+.*': matching it against the module name '.*' took more than 0\.25 s", True),
    ("rank_pattern_key_backtracks", config(rank_pattern={r"(.*?)+\.(.*?)+\.(.*?)+X": 2}),
     r"rank_pattern key='\(\.\*\?\)\+.*': matching it against the module name '.*' took more than 0\.25 s", True),
    # the weights file
    ("weights_missing", remove("adapter_model.safetensors"), r"adapter_model\.safetensors: missing", True),
    ("weights_empty", weights_bytes(lambda b: b""), r"truncated: 0 bytes", True),
    ("weights_truncated", weights_bytes(lambda b: b[:-100]), r"truncated: tensor '.*' ends at byte \d+ of the data "
                                                             r"section, which holds \d+ bytes", True),
    ("weights_header_length_huge", weights_bytes(_huge_header), r"header length field says 1152921504606846976 bytes",
     True),
    ("weights_header_garbage", weights_bytes(_garbage_header), r"corrupt safetensors header: not valid JSON", True),
    ("weights_without_lora_tensors", tensors(_only_a_norm_weight), r"holds no LoRA tensors \(1 tensors, none named "
                                                                   r"like", True),
    ("weights_is_a_device", both(remove("adapter_model.safetensors"), _link("/dev/zero", "adapter_model.safetensors")),
     r"adapter_model\.safetensors: not a regular file", True),
    ("config_is_a_fifo", both(remove("adapter_config.json"), _fifo("adapter_config.json")),
     r"adapter_config\.json: not a regular file", True),
    ("weights_only_pickle", _rename_to_pickle, r"adapter_model\.bin: a pickle file is refused.*allow_pickle=True",
     True),
    # tensors
    ("dtype_int", tensors(_set(P + Q0 + ".lora_A.weight", lambda x: x.to(torch.int32))),
     r"key '.*q_proj\.lora_A\.weight': dtype int32 is not supported \(expected float16, bfloat16, float32", True),
    ("nan_in_B", tensors(_set(P + Q0 + ".lora_B.weight", _poison(float("nan")))),
     r"q_proj\.lora_B\.weight': 1 of 128 values are not finite \(first: nan at index \[1, 1\]\)", True),
    ("inf_in_A", tensors(_set(P + V1 + ".lora_A.weight", _poison(float("inf")))),
     r"v_proj\.lora_A\.weight': 1 of 128 values are not finite \(first: inf", True),
    ("rank_differs_from_config", config(r=8),
     r"shape \[4, 32\] has rank 4, but adapter_config\.json gives module '.*q_proj' r=8", True),
    ("factor_beyond_float32", tensors(_set(P + Q0 + ".lora_A.weight", lambda x: _poison(1e300)(x.double()))),
     r"q_proj\.lora_A\.weight: values beyond the range of float32, the dtype of .*q_proj's LoRA factors", False),
    ("ranks_of_A_and_B_disagree", tensors(_set(P + Q0 + ".lora_B.weight", lambda x: x[:, :2].contiguous())),
     r"the ranks of A and B disagree: '.*lora_A\.weight' has shape \[4, 32\] \(r=4\) and '.*lora_B\.weight' has "
     r"shape \[32, 2\] \(r=2\)", True),
    ("B_missing", tensors(lambda t: t.pop(P + V1 + ".lora_B.weight")),
     r"key 'base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight' is missing", True),
    ("shape_does_not_fit_module", tensors(_set(P + Q0 + ".lora_A.weight", lambda x: torch.cat([x, x[:, :16]], 1))),
     r"q_proj\.lora_A\.weight: shape \[4, 48\] does not fit LlamaForCausalLM\.model\.layers\.0\.self_attn\.q_proj "
     r"\(Linear, weight \[32, 32\]\): expected \[4, 32\]", False,
     r"checkpoint tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[32, 32\]; expected \[32, 48\]"),
    ("factor_with_3_dims", tensors(_set(P + Q0 + ".lora_A.weight", lambda x: x.reshape(4, 4, 8))),
     r"q_proj\.lora_A\.weight': shape \[4, 4, 8\] has 3 dimensions; expected 2 \(\[r, I\]: Linear, Conv1D\) or 4",
     True),
    ("conv_factors_for_a_linear", tensors(lambda t: t.update({
        P + Q0 + ".lora_A.weight": t[P + Q0 + ".lora_A.weight"].reshape(4, 2, 4, 4),
        P + Q0 + ".lora_B.weight": t[P + Q0 + ".lora_B.weight"].reshape(32, 4, 1, 1)})),
     r"module '.*q_proj' holds conv2d factors .* is a Linear", False,
     r"checkpoint tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[32, 32\]; expected \[32, 2, 4, 4\] "
     r"\(Conv2d"),
    ("module_the_model_lacks", tensors(lambda t: t.update({
        P + "model.layers.7.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
        P + "model.layers.7.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)})),
     r"keys for module 'model\.layers\.7\.self_attn\.q_proj' .*which LlamaForCausalLM lacks", False,
     r"the checkpoint has no tensor 'model\.layers\.7\.self_attn\.q_proj\.weight'"),
    ("module_not_targeted", tensors(lambda t: t.update({
        P + "model.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(4, 32),
        P + "model.layers.0.self_attn.k_proj.lora_B.weight": torch.randn(16, 4)})),
     r"unexpected key '.*k_proj\.lora_A\.weight': module '.*k_proj' is not selected by the config's target_modules",
     True),
    ("targeted_module_without_tensors", tensors(lambda t: [t.pop(k) for k in list(t) if V1 in k]),
     r"key base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_A\.weight is missing: the config targets "
     r"module 'model\.layers\.1\.self_attn\.v_proj'", False),
    ("targets_the_model_lacks", both(config(target_modules=["c_attn", "c_proj"]), tensors(_other_model_keys)),
     r"target_modules=\[.*'c_attn'.*\] matches no module of LlamaForCausalLM", False,
     r"the checkpoint has no tensor '.*c_attn\.weight'"),
    ("lora_bias_not_configured", tensors(lambda t: t.update({P + Q0 + ".lora_B.bias": torch.randn(32)})),
     r"unexpected key '.*q_proj\.lora_B\.bias': the config has lora_bias=false", True),
    ("lora_bias_missing", config(lora_bias=True), r"key '.*q_proj\.lora_B\.bias' is missing: the config has "
                                                  r"lora_bias=true", True),
    ("modules_to_save_entry_the_model_lacks", config(modules_to_save=["classifier_head"]),
     r"modules_to_save entry 'classifier_head' matches no module of " + BASE, False),
    ("modules_to_save_tensor_missing", config(modules_to_save=["lm_head"]),
     r"the tensor for " + BASE + r"\.lm_head\.weight is missing \(the config saves it: modules_to_save\)", False),
    ("modules_to_save_tensor_shape", both(config(modules_to_save=["lm_head"]),
                                          tensors(lambda t: t.update({P + "lm_head.weight": torch.randn(4, 4)}))),
     r"modules_to_save tensor 'lm_head\.weight': shape \[4, 4\] does not fit LlamaForCausalLM\.lm_head\.weight: "
     r"expected \[96, 32\]", False,
     r"tensor 'lm_head\.weight' \(modules_to_save\): shape \[4, 4\], but checkpoint tensor 'lm_head\.weight' has "
     r"shape \[96, 32\]"),
    ("bias_without_bias_mode", tensors(lambda t: t.update({P + "model.norm.bias": torch.randn(32)})),
     r"unexpected key 'base_model\.model\.model\.norm\.bias': 'model\.norm\.bias' is neither a LoRA factor nor a "
     r"tensor this config saves \(bias='none'", True),
    ("base_weight_of_a_lora_module", tensors(lambda t: t.update({P + Q0 + ".base_layer.weight": torch.randn(32, 32)})),
     r"a base tensor of LoRA module '.*q_proj': PEFT stores base tensors only for biases", True),
    ("keys_mix_prefix_forms", tensors(lambda t: t.update({Q0 + ".lora_A.weight": t.pop(P + Q0 + ".lora_A.weight")})),
     r"\d+ keys start with 'base_model\.model\.' and 1 do not", True),
]
