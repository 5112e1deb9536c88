"""Joint training under DistributedDataParallel: 2 processes over gloo, each its own rows of every
adapter; only the adapters' gradients cross the wire (counted with a comm hook), and every adapter equals
one process training jointly on the global batch."""
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
    sys.path.insert(0, os.environ["ROOT"])
    import pylora
    from tests.helpers import count_allreduced_bytes
    from tests.models import llama

    NAMES = ("a", "b", "c")
    CONFIGS = {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
               "b": dict(r=2, lora_alpha=2, target_modules=["o_proj", "down_proj"]),
               "c": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)}

    def build():
        server = pylora.MultiLoRA(llama())
        for i, n in enumerate(NAMES):
            torch.manual_seed(10 + i)
            server.add_adapter(n, pylora.LoraConfig(init_lora_weights=False, **CONFIGS[n]))
        return server.train()

    def batches():
        """The global batch of each step: 2 rows per adapter, and 2 of none."""
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            ids = torch.randint(0, 96, (8, 10), generator=g)
            yield ids, ["a", "b", "c", None, "a", "b", "c", None]

    def params(server):
        return {n: p.detach().clone() for n, p in server.named_parameters() if p.requires_grad}

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        server = build()
        torch.save(params(server), out + ".init")
        opt = torch.optim.SGD([{"params": server.adapter_parameters(n)} for n in NAMES], lr=0.5)
        for ids, names in batches():
            torch.manual_seed(5)  # the forward's dropout draw, the same in both runs
            loss, _ = pylora.per_adapter_loss(server(input_ids=ids, adapter_names=names).logits, ids, names)
            opt.zero_grad(); loss.backward(); opt.step()
        torch.save(params(server), out)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = DDP(build())
        sent = count_allreduced_bytes(model)
        opt = torch.optim.SGD([{"params": model.module.adapter_parameters(n)} for n in NAMES], lr=0.5)
        per_step = []
        for ids, names in batches():
            half = len(names) // world
            part, part_names = ids[rank * half:(rank + 1) * half], names[rank * half:(rank + 1) * half]
            torch.manual_seed(5)
            loss, _ = pylora.per_adapter_loss(model(input_ids=part, adapter_names=part_names).logits, part,
                                              part_names)
            opt.zero_grad(); loss.backward(); opt.step()
            per_step.append(sum(sent)); sent.clear()
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        everything = sum(p.numel() * p.element_size() for p in model.parameters())
        if rank == 0:
            torch.save(params(model.module), out)
            with open(out + ".json", "w") as f:
                json.dump({"per_step": per_step, "trainable": trainable, "all": everything}, f)
        dist.destroy_process_group()
''')


@pytest.mark.slow
def test_joint_training_under_ddp_two_processes_gloo(tmp_path, python_env):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(python_env, ROOT=root, OMP_NUM_THREADS="1")
    single, ddp, stats = run_single_and_ddp(script, env, tmp_path, port_offset=7)
    # Every step all-reduces exactly the adapters' gradients: the frozen base never crosses the wire.
    assert stats["per_step"] == [stats["trainable"]] * 3
    assert stats["all"] - stats["trainable"] > stats["trainable"]  # the base, larger, never sent
    a, b = torch.load(single), torch.load(ddp)
    init = torch.load(str(single) + ".init")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
        assert not torch.allclose(a[k], init[k], rtol=1e-3, atol=1e-5), f"{k} did not train"
