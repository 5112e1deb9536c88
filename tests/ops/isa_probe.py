"""Run as `python -m tests.ops.isa_probe` (PYLORA_CPU_ISA picking the level): every CPU kernel on seeded
inputs, printed as one JSON line {"isa": the level that ran, "digests": {case: sha256 of its outputs' bytes}}.
tests/ops/test_isa.py compares the digests of the levels."""
import hashlib
import json
import math

import torch

from pylora import _ext


def _rand(gen, *shape):
    """Uniform in [-1, 1) on a 2^-20 grid, from integers: the same bits on every CPU (torch.randn's
    vectorised kernels differ by CPU, and these inputs are compared across machines and emulated CPUs)."""
    return torch.randint(-2**20, 2**20, shape, generator=gen).float() / 2**20


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, (list, tuple)):
            h.update(_digest(*t).encode())
        elif t is not None:
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def merge_cases(gen):
    """merge_ then unmerge_ (the record and both weights), every storage dtype, both layouts; Q past one
    register block and one tile so every path of the kernel runs."""
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fifo in (False, True):
            O, I, r = 67, 1000, 12
            W = (_rand(gen, O, I) * 0.02).to(dtype)
            if fifo:
                W = W.t().contiguous()
            A = _rand(gen, r, I) / math.sqrt(I)
            B = _rand(gen, O, r) * 0.02
            W0 = W.clone()
            rec = torch.ops.pylora.merge_(W, A, B, 1.7, fifo)
            merged = W.clone()
            torch.ops.pylora.unmerge_(W, A, B, 1.7, fifo, *rec)
            assert torch.equal(W.view(torch.uint8), W0.view(torch.uint8)), "unmerge_ must restore the weight"
            out[f"merge {dtype} fifo={fifo}"] = _digest(merged, rec)
    return out


def lora_linear_cases(gen):
    """lora_linear and its backward, with and without dropout; lora_multi and its backward."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for p in (0.0, 0.25):
            T, I, O, r = 70, 600, 130, 8
            x = _rand(gen, T, I).to(dtype)
            W = (_rand(gen, O, I) / math.sqrt(I)).to(dtype)
            bias = _rand(gen, O).to(dtype)
            A = (_rand(gen, r, I) / math.sqrt(I)).to(dtype)
            B = _rand(gen, O, r).to(dtype)
            seed = torch.tensor(1234, dtype=torch.int64)
            y, h = torch.ops.pylora.lora_linear(x, W, bias, A, B, 0.5, p, seed, False)
            gy = _rand(gen, T, O).to(dtype)
            grads = torch.ops.pylora.lora_linear_backward(gy, x, W, A, B, h, 0.5, p, seed, False, [True] * 5)
            out[f"lora_linear {dtype} p={p}"] = _digest(y, h, grads)
            As = [A, A[: r // 2].contiguous()]
            Bs = [B, B[:, : r // 2].contiguous()]
            tok_idx = torch.randperm(T, generator=gen)[:50]
            tok_ptr = [0, 30, 50]
            ym, hs = torch.ops.pylora.lora_multi(x, As, Bs, [0.5, 2.0], [p, 0.1], [7, 8], tok_ptr, tok_idx)
            gm = torch.ops.pylora.lora_multi_backward(gy, x, As, Bs, hs, [0.5, 2.0], [p, 0.1], [7, 8], tok_ptr,
                                                      tok_idx, [True] * 3)
            out[f"lora_multi {dtype} p={p}"] = _digest(ym, hs, gm)
    return out


def lora_apply_cases(gen):
    """lora_apply_ over a paged pool: decode tokens (one per slot) and a prefill segment."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        I, O, ranks = 520, 300, [4, 16, 0, 33]
        P = sum(ranks) + 5
        A_rows = (_rand(gen, P, I) / math.sqrt(I)).to(dtype)
        B_rows = _rand(gen, P, O).to(dtype)
        row_idx = torch.randperm(P, generator=gen)[: sum(ranks)].to(torch.int32)
        row_ptr = torch.tensor([0] + ranks).cumsum(0).to(torch.int32)
        scales = torch.tensor([0.5, -1.0, 2.0, 0.25])
        for name, seg_ptr, seg_slot in (("decode", [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, -1]),
                                        ("prefill", [0, 40, 41, 77], [1, -1, 3])):
            T = seg_ptr[-1]
            x = _rand(gen, T, I).to(dtype)
            y = _rand(gen, T, O).to(dtype)
            torch.ops.pylora.lora_apply_(y, x, A_rows, B_rows, row_ptr, row_idx, scales,
                                         torch.tensor(seg_ptr, dtype=torch.int32),
                                         torch.tensor(seg_slot, dtype=torch.int32))
            out[f"lora_apply {dtype} {name}"] = _digest(y)
    return out


def main():
    assert _ext.loaded, _ext.load_error
    gen = torch.Generator().manual_seed(0)
    digests = {**merge_cases(gen), **lora_linear_cases(gen), **lora_apply_cases(gen)}
    print(json.dumps({"isa": _ext.build_info()["cpu_isa"], "digests": digests}))


if __name__ == "__main__":
    main()
