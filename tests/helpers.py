"""What the tests share besides models and fixtures: the tolerance table, dtypes, the interpreter for
subprocesses, and comparisons that must be able to fail (bits, relative error, untouched models)."""
import json
import os
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
PYTHON = sys.executable

# One tolerance table for the suite: (rtol, atol) per dtype for comparisons that are not bit-exact.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (5e-3, 5e-4),
    torch.bfloat16: (3e-2, 3e-3),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype):
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


def bits(t):
    """A tensor's bytes, for bit-exact comparisons (NaN == NaN, -0.0 != 0.0)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def snapshot(model):
    """A model's structure (names and module types) and a copy of every tensor."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()})


def assert_same(model, snap):
    """The model has the structure and every tensor bit for bit that snapshot() saw."""
    structure, tensors = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for key, before in tensors.items():
        assert now[key].dtype == before.dtype and torch.equal(bits(now[key]), bits(before)), key


# Data-parallel tests (tests/nn/test_ddp.py, tests/serve/test_training_ddp.py): a worker script that runs
# alone ("single") or as one of two gloo ranks ("ddp"), and counts what its all-reduce sends.
def count_allreduced_bytes(model):
    """Registers an all-reduce comm hook on a DDP model that records the bytes of every bucket it sends;
    returns the list it appends to."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    sent = []

    def counting_hook(state, bucket):
        sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(dist.group.WORLD, counting_hook)
    return sent


def run_single_and_ddp(script, env, tmp_path, port_offset=0):
    """Runs `script single OUT` once, then `script ddp OUT` as two ranks over gloo; each must succeed.
    Returns the single run's path, the ddp run's path and the JSON rank 0 wrote beside it."""
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    proc = subprocess.run([PYTHON, str(script), "single", str(single)], env=env, timeout=600, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    procs = []
    for rank in range(2):
        e = dict(env, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(29500 + (os.getpid() + port_offset) % 1000))
        procs.append(subprocess.Popen([PYTHON, str(script), "ddp", str(ddp)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return single, ddp, json.loads((tmp_path / "ddp.pt.json").read_text())
