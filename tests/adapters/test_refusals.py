"""The broken-adapter corpus and the PEFT methods pylora does not implement: each refused with its
error by every entry point, and nothing changed."""
import shutil
import warnings

import pytest

import pylora
from pylora import adapters as pa
from tests.adapters.common import assert_untouched, peft
from tests.adapters.corpus import CASES as CORPUS
from tests.helpers import snapshot
from tests.models import BUILDERS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_corpus_is_large_and_distinct():
    ids = [c[0] for c in CORPUS]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)

@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_broken_adapter_refused_model_untouched(case, valid_adapter, tmp_path):
    _, mutate, pattern, model_free = case
    d = tmp_path / "adapter"
    shutil.copytree(valid_adapter, d)
    mutate(str(d))
    if model_free:
        with pytest.raises(pylora.AdapterError, match=pattern):
            pa.read_adapter(d)
    else:
        pa.read_adapter(d)  # only the model shows what is wrong
    model = BUILDERS["llama"]()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=pattern) as info:
        pylora.load_adapter(model, d)
    assert_untouched(model, snap)
    assert isinstance(info.value, ValueError) and str(d) in str(info.value)

PEFT_REFUSED = {
    "dora": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), r"use_dora=True is not supported"),
    "pissa": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
              r"init_lora_weights='pissa' is not supported \(PiSSA moves the top singular components out of the base"),
    "trainable_tokens": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
                         r"trainable_token_indices=\[1, 2\] is not supported"),
    "alora": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6],
                                      task_type="CAUSAL_LM"), r"alora_invocation_tokens=\[5, 6\] is not supported"),
    "ia3": (lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            r"peft_type='IA3' is not supported \(expected 'LORA'"),
}

@pytest.mark.parametrize("method", PEFT_REFUSED)
def test_peft_adapters_pylora_does_not_implement_are_refused(method, tmp_path):
    make_config, pattern = PEFT_REFUSED[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(BUILDERS["llama"](), make_config()).save_pretrained(tmp_path)
    model = BUILDERS["llama"]()
    snap = snapshot(model)
    with pytest.raises(pylora.AdapterError, match=pattern):
        pylora.load_adapter(model, tmp_path)
    assert_untouched(model, snap)
