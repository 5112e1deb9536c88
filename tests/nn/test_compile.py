"""torch.compile of an injected model: one graph, no break (the dispatcher, not Python, picks each op's
kernel; the dropout seed is a traced random tensor, never read on the host), and the compiled forward and
backward equal eager, dropout included."""
import warnings

import pytest
import torch

import pylora
from tests.helpers import rel_err
from tests.models import llama

pytestmark = pytest.mark.usefixtures("one_thread")


def model(dropout):
    m = llama()
    pylora.inject(m, pylora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout,
                                       init_lora_weights=False))
    pylora.mark_only_lora_trainable(m)
    return m.train()


def step(m, ids, seed=1):
    torch.manual_seed(seed)  # the dropout seeds' draws, the same in both runs
    loss = m(input_ids=ids, labels=ids).loss
    params = [p for p in m.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_one_graph_no_break(dropout):
    m = model(dropout)
    ids = torch.randint(0, 96, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(m)(input_ids=ids, labels=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fullgraph_forward_and_backward_equal_eager(dropout):
    m = model(dropout)
    ids = torch.randint(0, 96, (2, 8))
    loss, grads = step(m, ids)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):  # the second call reuses the graph with other seeds
        c_loss, c_grads = step(compiled, ids, seed)
        e_loss, e_grads = (loss, grads) if seed == 1 else step(m, ids, seed)
        assert torch.equal(c_loss, e_loss)
        for a, b in zip(c_grads, e_grads):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_inductor_fullgraph_matches_eager():
    """With inductor's code generation (fallback_random: its random draws are eager's)."""
    import torch._inductor.config as inductor_config

    m = model(0.1)
    ids = torch.randint(0, 96, (2, 8))
    loss, grads = step(m, ids)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        c_loss, c_grads = step(torch.compile(m, fullgraph=True), ids)
    assert rel_err(c_loss, loss) < 1e-6
    for a, b in zip(c_grads, grads):
        assert rel_err(a, b) < 1e-5
