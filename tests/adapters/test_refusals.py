"""The broken-adapter corpus and the PEFT methods pylora does not implement: each refused with its
error by every entry point, and nothing changed."""
import os
import re
import shutil
import warnings

import pytest

import pylora
from pylora import adapters as pa
from pylora import cli
from tests.adapters.common import assert_untouched, peft
from tests.adapters.corpus import CASES as CORPUS
from tests.cli.errors import merge_error_lines
from tests.helpers import assert_same, snapshot
from tests.models import BUILDERS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_corpus_is_large_and_distinct():
    ids = [c[0] for c in CORPUS]
    assert len(ids) >= 20 and len(set(ids)) == len(ids)

@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    """The corpus model saved as a transformers checkpoint, for `pylora merge`."""
    d = tmp_path_factory.mktemp("llama_checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        BUILDERS["llama"]().save_pretrained(str(d))
    return d


def server_state(server):
    """What a refused MultiLoRA.load_adapter must leave as it was."""
    return (snapshot(server.model), server.adapters, server.resident_adapters(), sorted(server.pool.modules))


def assert_server_unchanged(server, state):
    snap, adapters, resident, modules = state
    assert_same(server.model, snap)
    assert (server.adapters, server.resident_adapters(), sorted(server.pool.modules)) == (adapters, resident, modules)


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_every_entry_point_refuses_the_corpus_alike(case, valid_adapter, llama_checkpoint, tmp_path, capsys):
    """One ingestion path: pylora.load_adapter, MultiLoRA.load_adapter, `pylora merge` and `pylora info
    --adapter` refuse each broken adapter with the same AdapterError text and change nothing. Cases that
    only a model can reveal are refused by the three entry points that have one (info has no model)."""
    name, mutate, pattern, model_free = case[:4]
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

    server = pylora.MultiLoRA(BUILDERS["llama"]())
    server.load_adapter("fine", valid_adapter)
    state = server_state(server)
    with pytest.raises(pylora.AdapterError, match=pattern) as served:
        server.load_adapter("broken", d)
    assert_server_unchanged(server, state)
    assert served.value.problems == info.value.problems  # the same problems, word for word

    capsys.readouterr()
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(llama_checkpoint), "--adapter", str(d), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    merge_error_lines(err)  # the headline, then each problem on its own line
    if model_free and len(info.value.problems) > 1:  # found before the checkpoint is read: the same problems
        assert len(err.splitlines()) == 1 + len(info.value.problems), err
    assert re.search(case[4] if len(case) > 4 else pattern, err), (pattern, err)
    assert not out.exists() and os.listdir(tmp_path) == ["adapter"]

    status = cli.main(["info", "--adapter", str(d)])
    text = capsys.readouterr().out
    if model_free:
        assert status == 1 and re.search(pattern, text), text
    else:
        assert status == 0 and "problems: none" in text


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
