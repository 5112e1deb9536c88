"""One way in: a pylora model in memory (plain, inside a DistributedDataParallel-style wrapper, or
compiled) is read as the adapter its saved files hold, through the same checks; load_adapter and the
server take any source."""
import warnings

import pytest
import torch

import pylora
from pylora import adapters as pa
from tests.adapters.common import CASES, pylora_model
from tests.helpers import bits
from tests.models import BUILDERS, output

pytestmark = pytest.mark.usefixtures("one_thread")


class Wrapper(torch.nn.Module):
    """What DistributedDataParallel and FSDP look like from outside: the model as `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def same_adapter(a, b):
    assert a.config.to_dict() == b.config.to_dict()
    assert a.modules.keys() == b.modules.keys() and a.extra_tensors.keys() == b.extra_tensors.keys()
    for name, m in a.modules.items():
        n = b.modules[name]
        assert (m.kind, m.r, m.alpha, m.scale) == (n.kind, n.r, n.alpha, n.scale)
        for x, y in ((m.lora_A, n.lora_A), (m.lora_B, n.lora_B)):
            assert torch.equal(bits(x), bits(y))
    for key, t in a.extra_tensors.items():
        assert torch.equal(bits(t), bits(b.extra_tensors[key])) and a.extra_kinds[key] == b.extra_kinds[key]


@pytest.mark.parametrize("case", ["llama_patterns_rslora", "llama_layers_lm_head_saved", "bert_bias_all",
                                  "convnet_conv_embedding", "gpt2_conv1d"])
def test_a_model_in_memory_reads_as_its_saved_files(case, tmp_path):
    kind, fields = CASES[case]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path)
    from_files = pa.read_adapter(tmp_path)
    for source in (model, Wrapper(model), Wrapper(Wrapper(model))):
        same_adapter(pa.as_adapter(source), from_files)
    assert pa.as_adapter(from_files) is from_files
    # and load_adapter takes the model itself as the source
    loaded = pylora.load_adapter(BUILDERS[kind](), Wrapper(model))
    assert torch.equal(output(loaded, kind), output(model, kind))


def test_a_compiled_model_is_read_through(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    pylora.save_adapter(model, tmp_path)
    compiled = torch.compile(model)  # an OptimizedModule holding the model as _orig_mod; never run here
    same_adapter(pa.as_adapter(compiled), pa.read_adapter(tmp_path))


def test_a_model_in_memory_gets_the_file_checks():
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    with torch.no_grad():
        dict(model.named_parameters())["model.layers.1.self_attn.v_proj.lora_B"][3, 1] = float("inf")
    with pytest.raises(pylora.AdapterError, match=r"LlamaForCausalLM \(a model in memory\): key "
                                                   r"'base_model\.model\.model\.layers\.1\.self_attn\.v_proj\."
                                                   r"lora_B\.weight': 1 of 64 values are not finite"):
        pa.as_adapter(model)
    server = pylora.MultiLoRA(BUILDERS[kind]())
    with pytest.raises(pylora.AdapterError, match=r"1 of 64 values are not finite"):
        server.load_adapter("bad", model)
    assert server.adapters == [] and not server.pool.modules
    with pytest.raises(pylora.AdapterError, match=r"LlamaForCausalLM \(a model in memory\) holds no pylora adapter"):
        pa.as_adapter(BUILDERS[kind]())
    with pytest.raises(pylora.AdapterError, match=r"source=int: expected an adapter directory"):
        pa.as_adapter(3)


def test_the_server_refuses_what_it_cannot_serve_from_memory_as_from_files(tmp_path):
    """modules_to_save and trained biases were silently dropped from a model in memory; now both sources
    are refused alike."""
    for case in ("llama_layers_lm_head_saved", "bert_bias_all"):
        kind, fields = CASES[case]
        model = pylora_model(kind, fields)
        pylora.save_adapter(model, tmp_path / case)
        server = pylora.MultiLoRA(BUILDERS[kind]())
        errors = []
        for source in (model, tmp_path / case):
            with pytest.raises(pylora.AdapterError) as info:
                server.load_adapter("x", source)
            errors.append(sorted(p.split(": ", 2)[-1] for p in info.value.problems))
        assert errors[0] == errors[1] and all("serving supports LoRA factors over the unchanged base model" in e
                                              for e in errors[0])
        assert server.adapters == [] and not server.pool.modules


def test_warnings_of_a_lenient_read_reach_the_caller(tmp_path):
    kind, fields = CASES["llama_q_v"]
    model = pylora_model(kind, fields)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pa.as_adapter(model, strict=False)
    assert record == []  # a sound model warns about nothing
