"""LoraConfig refuses what no forward could use, naming the field: a scale outside float32, invalid
patterns; and its matching rules are PEFT's."""
import pytest

import pylora


@pytest.mark.parametrize("fields, message", [
    (dict(lora_alpha=1e300), r"lora_alpha=1e\+300 gives the scale lora_alpha / r = 1\.25e\+299 with r=8, outside "
                             r"float32's normal range"),
    (dict(lora_alpha=1e-300, use_rslora=True), r"lora_alpha=1e-300 gives the scale lora_alpha / sqrt\(r\) = "),
    (dict(r=4, alpha_pattern={"q_proj": 1e39}, rank_pattern={"v_proj": 1}),
     r"alpha_pattern\['q_proj'\]=1e\+39 gives the scale .* with r=1"),
    (dict(layers_to_transform=[0], layers_pattern="layers["), r"layers_pattern='layers\[' is not a valid"),
    (dict(layers_pattern=[]), r"layers_pattern=\[\] must be a regex string or a non-empty list"),
    (dict(target_modules="q_proj("), r"target_modules='q_proj\(' is not a valid regular expression"),
    (dict(rank_pattern={"[": 2}), r"rank_pattern key='\[' is not a valid regular expression"),
])
def test_refused_with_the_field_named(fields, message):
    fields.setdefault("target_modules", ["q_proj"])
    with pytest.raises(ValueError, match="LoraConfig: " + message):
        pylora.LoraConfig(**fields)


def test_the_largest_and_smallest_usable_alphas_are_accepted():
    assert pylora.LoraConfig(r=1, lora_alpha=3e38, target_modules=["q"]).scale_for("q") == 3e38
    assert pylora.LoraConfig(r=4, lora_alpha=1e-30, target_modules=["q"]).scale_for("q") == 2.5e-31


def test_list_entries_match_by_name_suffix_and_saved_modules_are_not_targets():
    cfg = pylora.LoraConfig(target_modules=["q_proj", "mlp.up_proj"], exclude_modules=["layers.1.self_attn.q_proj"],
                            modules_to_save=["score"])
    assert cfg.matches("model.layers.0.self_attn.q_proj") and cfg.matches("model.layers.3.mlp.up_proj")
    assert not cfg.matches("model.layers.1.self_attn.q_proj")  # excluded
    assert not cfg.matches("model.layers.0.self_attn.xq_proj")  # a suffix of the name, not of a component
    assert cfg.split_saved("score.weight") == ("score", "weight") and cfg.split_saved("a.score.b.bias") == \
        ("a.score", "b.bias")
    assert cfg.is_saved_module("score") and cfg.is_saved_module("a.score.inner") and not cfg.is_saved_module("scores")
