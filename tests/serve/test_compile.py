"""torch.compile of a served model: a decode step with a KV cache is one graph (each served layer adds its
rows' updates through one opaque op that reads the running batch when the graph runs), equal to eager,
and the graph serves the next batch of other adapters without recompiling."""
import copy
import warnings

import pytest
import torch

import pylora
from tests.models import randomize_lora, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server():
    server = pylora.MultiLoRA(tiny_llama())
    for i in range(3):
        m = pylora.inject(tiny_llama(), pylora.LoraConfig(r=2 + 3 * i, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_lora(m, seed=i)
        server.load_adapter(f"a{i}", m)
    server.add_adapter("t", pylora.LoraConfig(r=3, target_modules=["o_proj"], init_lora_weights=False))
    return server.eval()


def prefill(server, names):
    prompt = torch.randint(0, 128, (len(names), 6), generator=torch.Generator().manual_seed(4))
    out = server(input_ids=prompt, adapter_names=names)
    return out.logits[:, -1:].argmax(-1), out.past_key_values


def test_decode_step_is_one_graph(server):
    names = ["a0", "a1", None, "t"]
    token, cache = prefill(server, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explain = torch._dynamo.explain(server.model)
        with server._serving(names, len(names)), torch.no_grad():
            explained = explain(input_ids=token, past_key_values=copy.deepcopy(cache))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_decode_equals_eager_and_serves_other_batches(server):
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    eager = pylora.MultiLoRA(tiny_llama())
    batches = [["a0", "a1", None, "t"], ["a2", "t", "a0", "a0"], ["t", None, None, "a1"]]
    prefilled = [prefill(server, names) for names in batches]  # eager: only decode steps are compiled
    torch._dynamo.reset()
    try:
        for names, (token, cache) in zip(batches, prefilled):
            server.model.compile(fullgraph=True, backend=backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = server(input_ids=token, adapter_names=names, past_key_values=copy.deepcopy(cache)).logits
            server.model._compiled_call_impl = None  # the same server, eager
            reference = server(input_ids=token, adapter_names=names, past_key_values=copy.deepcopy(cache)).logits
            assert torch.equal(compiled, reference), names
            base = eager(input_ids=token, adapter_names=[None] * 4, past_key_values=copy.deepcopy(cache)).logits
            assert not torch.equal(compiled[0], base[0])  # the adapters did act
        assert len(compiles) == 1  # one graph for every batch: the adapters are data, not guards
    finally:
        server.model._compiled_call_impl = None


def test_a_compiled_model_refuses_a_training_batch(server):
    torch._dynamo.reset()
    server.model.compile(fullgraph=True, backend="aot_eager")
    try:
        server.train()
        ids = torch.randint(0, 128, (2, 4))
        with pytest.raises(RuntimeError, match="a compiled model serves"):
            server(input_ids=ids, adapter_names=["t", None])
    finally:
        server.model._compiled_call_impl = None
        server.eval()
