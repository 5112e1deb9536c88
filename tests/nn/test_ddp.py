"""Distributed training: 2 processes over gloo under DistributedDataParallel. Only the LoRA
parameters cross the wire (counted with a comm hook), and the adapter equals one process trained
on the global batch."""
import os
import textwrap

import pytest
import torch

from tests.helpers import run_single_and_ddp

WORKER = textwrap.dedent(r'''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, os.environ["TESTS_DIR"])
    import pylora
    from tests.helpers import count_allreduced_bytes
    from tests.models import tiny_llama

    def build():
        model = tiny_llama(seed=0)
        pylora.inject(model, pylora.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights="gaussian"))
        pylora.mark_only_lora_trainable(model)
        torch.manual_seed(1)
        for _, layer in pylora.lora_layers(model):  # non-zero B: every gradient is non-trivial
            torch.nn.init.normal_(layer.lora_B, std=0.02)
        return model.train()

    def batches():
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            yield torch.randint(0, 128, (4, 16), generator=g)  # the global batch

    def lora_params(model):
        return {n.replace("module.", "", 1): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        model = build()
        torch.save(lora_params(model), out + ".init")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for ids in batches():
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(); loss.backward(); opt.step()
        torch.save(lora_params(model), out)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = DDP(build())
        sent = count_allreduced_bytes(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        per_step = []
        for ids in batches():
            part = ids.chunk(world)[rank]
            loss = model(input_ids=part, labels=part).loss
            opt.zero_grad(); loss.backward(); opt.step()
            per_step.append(sum(sent)); sent.clear()
        lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if rank == 0:
            torch.save(lora_params(model), out)
            with open(out + ".json", "w") as f:
                json.dump({"per_step": per_step, "lora_bytes": lora_bytes, "all_bytes": all_bytes}, f)
        dist.destroy_process_group()
''')


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, python_env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(python_env, TESTS_DIR=os.path.dirname(os.path.abspath(__file__)), OMP_NUM_THREADS="1")
    single, ddp, stats = run_single_and_ddp(script, env, tmp_path)
    # Every step all-reduces exactly the LoRA gradients: the frozen base never crosses the wire.
    assert stats["per_step"] == [stats["lora_bytes"]] * 3
    assert stats["lora_bytes"] < stats["all_bytes"] / 10
    a, b = torch.load(single), torch.load(ddp)
    assert a.keys() == b.keys() and len(a) > 0
    init = torch.load(str(single) + ".init")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
        assert not torch.allclose(a[k], init[k], rtol=1e-3, atol=1e-5), f"{k} did not train"
