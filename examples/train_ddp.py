"""Train a LoRA adapter under DistributedDataParallel (launch with torchrun; gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 2 examples/train_ddp.py --out ddp_adapter

Only the adapter's gradients are all-reduced: the frozen base weights never cross the wire.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig, LlamaForCausalLM

import pylora


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="save the adapter (PEFT format) here from rank 0")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same base and the same initial adapter on every rank
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    pylora.inject(model, pylora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    pylora.mark_only_lora_trainable(model)
    model = DDP(model.to(device), device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-3)

    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        batch = torch.arange(32).repeat(8, 1) % 256 + torch.randint(0, 8, (8, 1), generator=g)
        local = batch.chunk(world)[rank].to(device)  # each rank takes its share of the global batch
        loss = model(input_ids=local, labels=local).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    if rank == 0 and args.out:
        pylora.save_adapter(model.module, args.out)
        print(f"saved {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
