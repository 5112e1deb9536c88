"""lora_apply_: kernels and reference against a float64 truth built from explicit per-slot matrices,
untouched rows, poisoned pool rows, batch invariance, layouts, argument errors, the unchecked GPU
path, the plan helper, opcheck."""
import math
import subprocess

import pytest
import torch

from tests.helpers import DTYPES, PYTHON, TOL
from pylora import _ext, ops
from pylora.serve import batch as plan
from pylora.ops import reference as ref

KERNEL_OPS = ("lora_apply_",)

# Ranks of the slots of every pool: 1 to 256, a rank-0 slot (an adapter that does not target this
# module), different per slot; one case adds a rank-1024 slot.
RANKS = [1, 2, 0, 5, 8, 16, 33, 64, 256, 128]
POISON_ROWS = 13  # pool rows no slot references, filled with NaN


def bits(t):
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16).clone()


class Pool:
    """A pool of rank rows: each slot's rows scattered over the pool, out of order; unreferenced rows NaN."""

    def __init__(self, I, O, ranks, dtype, device, gen):
        self.ranks = list(ranks)
        nnz = sum(ranks)
        P = nnz + POISON_ROWS
        perm = torch.randperm(P, generator=gen)
        A = (torch.rand(P, I, generator=gen) * 2 - 1) / math.sqrt(I) * math.sqrt(3)
        B = torch.randn(P, O, generator=gen)
        for s, r in enumerate(ranks):  # B ~ N(0, 1/r) per slot keeps each update near unit size
            B[perm[sum(ranks[:s]):sum(ranks[:s + 1])]] /= math.sqrt(max(r, 1))
        A[perm[nnz:]] = float("nan")
        B[perm[nnz:]] = float("nan")
        self.A_rows = A.to(dtype).to(device)
        self.B_rows = B.to(dtype).to(device)
        self.row_idx = perm[:nnz].to(torch.int32).to(device)
        self.row_ptr = torch.tensor([0] + ranks, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
        sign = torch.where(torch.rand(len(ranks), generator=gen) < 0.3, -1.0, 1.0)
        self.scales = (sign * (0.25 + 1.5 * torch.rand(len(ranks), generator=gen))).to(device)
        self.N, self.P = len(ranks), P

    def args(self):
        return self.A_rows, self.B_rows, self.row_ptr, self.row_idx, self.scales

    def explicit(self, s):
        """A_s [r, I] and B_s [O, r] of slot s in float64."""
        rows = self.row_idx[self.row_ptr[s]:self.row_ptr[s + 1]].long()
        return self.A_rows[rows].double(), self.B_rows[rows].double().t()


def random_segments(T, N, gen, prefill_frac):
    """Decode segments (length 1) and prefill segments (5..60 tokens), slots in [-1, N), repeats allowed."""
    segs, t = [], 0
    while t < T:
        prefill = float(torch.rand(1, generator=gen)) < prefill_frac
        n = min(T - t, int(torch.randint(5, 61, (1,), generator=gen)) if prefill else 1)
        segs.append((n, int(torch.randint(-1, N, (1,), generator=gen))))
        t += n
    return segs


def plan_tensors(segs, device):
    seg_ptr = torch.tensor([0] + [n for n, _ in segs], dtype=torch.int64).cumsum(0).to(torch.int32)
    seg_slot = torch.tensor([s for _, s in segs], dtype=torch.int32)
    return seg_ptr.to(device), seg_slot.to(device)


def truth(pool, x, y0, segs):
    """float64 y0 + s * B_s (A_s x) per segment, and the magnitude each result is a rounding of."""
    out, mag = y0.double().clone(), y0.double().abs()
    t = 0
    for n, s in segs:
        if s != -1 and pool.ranks[s] > 0:
            A_s, B_s = pool.explicit(s)
            xs = x[t:t + n].double()
            sc = float(pool.scales[s])
            out[t:t + n] += sc * (xs @ A_s.t() @ B_s.t())
            mag[t:t + n] += abs(sc) * ((xs.abs() @ A_s.abs().t()) @ B_s.abs().t())
        t += n
    return out, mag


def assert_close_to_truth(y, want, mag):
    rtol, atol = TOL[y.dtype]
    err = (y.double() - want).abs()
    bound = rtol * mag + atol
    worst = int((err - bound).flatten().argmax())
    assert bool((err <= bound).all()), (f"{y.dtype}: |y - truth| = {err.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g} "
                                        f"at {divmod(worst, y.shape[1])}")


def setup_case(T, I, O, ranks, dtype, device, segs=None, prefill_frac=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pool = Pool(I, O, ranks, dtype, device, gen)
    if segs is None:
        segs = random_segments(T, pool.N, gen, prefill_frac)
    x = torch.randn(T, I, generator=gen)
    y0 = torch.randn(T, O, generator=gen)
    t = 0
    for n, s in segs:  # x rows of tokens without an adapter are never read: poison them
        if s == -1:
            x[t:t + n] = float("nan")
        t += n
    return pool, segs, x.to(dtype).to(device), y0.to(dtype).to(device)


CASES = {
    # name: (T, I, O, ranks, segments or None for random)
    "T1": (1, 97, 83, RANKS, [(1, 8)]),
    "T7": (7, 97, 83, RANKS, [(1, 0), (2, 8), (1, -1), (1, 1), (1, 8), (1, 3)]),
    "T64": (64, 131, 97, RANKS, None),
    "T300-r1024": (300, 257, 129, RANKS + [1024], None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_truth(backend, device, dtype, case):
    T, I, O, ranks, segs = CASES[case]
    pool, segs, x, y0 = setup_case(T, I, O, ranks, dtype, device, segs)
    assert any(s == -1 for _, s in segs) or T == 1
    assert any(n == 1 and s != -1 for n, s in segs)
    if T >= 64:
        assert any(n >= 5 and s != -1 for n, s in segs) and len({s for _, s in segs}) >= 6
        if 1024 in ranks:
            assert any(s == len(ranks) - 1 for _, s in segs)
    y = y0.clone()
    ops.lora_apply_(y, x, *pool.args(), *plan_tensors(segs, device))
    want, mag = truth(pool, x, y0, segs)
    # Tokens without an adapter (slot -1, or a rank-0 slot) keep their bits; poisoned pool rows and
    # poisoned x rows of those tokens leak nowhere.
    t = 0
    for n, s in segs:
        if s == -1 or pool.ranks[s] == 0:
            assert torch.equal(bits(y[t:t + n]), bits(y0[t:t + n])), f"tokens {t}..{t + n} (slot {s}) changed"
        else:
            assert not torch.equal(y[t:t + n], y0[t:t + n])
        t += n
    assert bool(torch.isfinite(y).all())
    assert_close_to_truth(y, want, mag)


def test_kernel_and_reference_agree(device):
    if not _ext.has_kernel("lora_apply_", device):
        pytest.skip(f"no compiled {device} kernel for lora_apply_")
    for dtype in DTYPES:
        pool, segs, x, y0 = setup_case(64, 131, 97, RANKS, dtype, device, seed=3)
        y_k, y_r = y0.clone(), y0.clone()
        ops.lora_apply_(y_k, x, *pool.args(), *plan_tensors(segs, device))
        with ops.reference_mode():
            ops.lora_apply_(y_r, x, *pool.args(), *plan_tensors(segs, device))
        _, mag = truth(pool, x, y0, segs)
        rtol, atol = TOL[dtype]
        assert bool(((y_k.double() - y_r.double()).abs() <= 2 * (rtol * mag + atol)).all()), dtype


def test_one_token_alone_equals_it_in_a_batch(backend, device):
    # The compiled kernels compute each token's sums in an order that does not depend on the rest of the
    # batch, so a token alone gives the same bits; the reference (torch matmuls) is held to the tolerance.
    for dtype in DTYPES:
        segs = [(1, 1), (20, 8), (1, 8), (1, -1), (15, 0), (1, 3), (25, 7)]  # slot 8: prefill and decode
        pool, segs, x, y0 = setup_case(64, 131, 97, RANKS, dtype, device, segs=segs, seed=5)
        y = y0.clone()
        ops.lora_apply_(y, x, *pool.args(), *plan_tensors(segs, device))
        _, mag = truth(pool, x, y0, segs)
        starts = torch.tensor([0] + [n for n, _ in segs]).cumsum(0).tolist()
        checked = 0
        for g, (n, s) in enumerate(segs):
            if s == -1 or pool.ranks[s] == 0:
                continue
            for t in {starts[g], starts[g] + n - 1}:
                y1 = y0[t:t + 1].clone()
                ops.lora_apply_(y1, x[t:t + 1], *pool.args(), *plan_tensors([(1, s)], device))
                if backend == "kernel":
                    assert torch.equal(bits(y1), bits(y[t:t + 1])), (dtype, t, s)
                else:
                    rtol, atol = TOL[dtype]
                    assert bool(((y1.double() - y[t:t + 1].double()).abs() <= 2 * (rtol * mag[t] + atol)).all())
                checked += 1
        assert checked == 9


def test_y_accumulates(backend, device):
    pool, segs, x, y0 = setup_case(64, 131, 97, RANKS, torch.float32, device, seed=7)
    assert bool((y0 != 0).all())
    y = y0.clone()
    seg = plan_tensors(segs, device)
    ops.lora_apply_(y, x, *pool.args(), *seg)
    ops.lora_apply_(y, x, *pool.args(), *seg)
    once, mag = truth(pool, x, y0, segs)
    assert_close_to_truth(y, 2 * once - y0.double(), 2 * mag)


def test_thread_count_does_not_change_bits(backend):
    if backend == "reference":
        pytest.skip("a property of the compiled CPU kernel")
    pool, segs, x, y0 = setup_case(300, 257, 129, RANKS + [1024], torch.bfloat16, "cpu", seed=11)
    seg = plan_tensors(segs, "cpu")
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y = y0.clone()
            ops.lora_apply_(y, x, *pool.args(), *seg)
            outs.append(bits(y))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_layouts(backend, device):
    # y a column block of a wider buffer (row stride > O), y transposed (no unit stride: worked on a copy),
    # x, A_rows, B_rows strided: same bits as contiguous operands, and nothing outside y written.
    pool, segs, x, y0 = setup_case(64, 131, 97, RANKS, torch.float16, device, seed=13)
    seg = plan_tensors(segs, device)
    y_ref = y0.clone()
    ops.lora_apply_(y_ref, x, *pool.args(), *seg)

    wide = torch.full((64, 97 + 20), 7.0, dtype=y0.dtype, device=device)
    wide[:, 10:107] = y0
    x_wide = torch.zeros(64, 131 + 5, dtype=x.dtype, device=device)
    x_wide[:, 2:133] = x
    A_wide = torch.zeros(pool.P, 131 + 3, dtype=x.dtype, device=device)
    A_wide[:, :131] = pool.A_rows
    B_t = pool.B_rows.t().contiguous().t()  # column-major: no unit last stride
    ops.lora_apply_(wide[:, 10:107], x_wide[:, 2:133], A_wide[:, :131], B_t, pool.row_ptr, pool.row_idx,
                    pool.scales, *seg)
    assert torch.equal(bits(wide[:, 10:107]), bits(y_ref))
    assert bool((wide[:, :10] == 7).all() and (wide[:, 107:] == 7).all())

    y_t = y0.t().contiguous().t()
    assert not y_t.is_contiguous()
    ops.lora_apply_(y_t, x, *pool.args(), *seg)
    assert torch.equal(bits(y_t), bits(y_ref))


def test_empty_batches_and_pools(backend, device):
    pool, _, x, y0 = setup_case(5, 9, 11, [3, 0, 2], torch.float32, device, segs=[(5, 0)])
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    y = y0[:0].clone()
    ops.lora_apply_(y, x[:0], *pool.args(), zero, empty)  # T = 0, S = 0
    y = y0.clone()
    ops.lora_apply_(y, x, *pool.args(), *plan_tensors([(5, -1)], device))  # no adapter anywhere
    assert torch.equal(bits(y), bits(y0))
    ops.lora_apply_(y, x, pool.A_rows[:0], pool.B_rows[:0], zero, empty, pool.scales[:0],
                    *plan_tensors([(2, -1), (3, -1)], device))  # an empty pool (N = 0, P = 0)
    assert torch.equal(bits(y), bits(y0))
    y = y0[:, :0].clone()
    ops.lora_apply_(y, x, pool.A_rows, pool.B_rows[:, :0], pool.row_ptr, pool.row_idx, pool.scales,
                    *plan_tensors([(5, 0)], device))  # O = 0


# ----------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument and value, y untouched
# ----------------------------------------------------------------------------------------------

def _idx(device, *v):
    return torch.tensor(v, dtype=torch.int32, device=device)


# (description, mutate(dict of arguments) -> None, pattern). The base case: T=6, I=9, O=11, N=3 slots
# of ranks (3, 0, 2), P=5+13 pool rows, segments [0, 2, 3, 6] with slots (0, -1, 2).
BAD_ARGS = [
    ("y 1-D", lambda a: a.update(y=a["y"][0]), r"y\.dim\(\)=1 must be 2 \(\[T, O\]\)"),
    ("x 3-D", lambda a: a.update(x=a["x"][None]), r"x\.dim\(\)=3 must be 2 \(\[T, I\]\)"),
    ("A_rows 1-D", lambda a: a.update(A_rows=a["A_rows"][0]), r"A_rows\.dim\(\)=1 must be 2 \(\[P, I\]\)"),
    ("row_ptr 2-D", lambda a: a.update(row_ptr=a["row_ptr"][None]), r"row_ptr\.dim\(\)=2 must be 1 \(\[N\+1\]\)"),
    ("seg_slot 0-D", lambda a: a.update(seg_slot=a["seg_slot"][0]), r"seg_slot\.dim\(\)=0 must be 1 \(\[S\]\)"),
    ("y float64", lambda a: a.update(y=a["y"].double()), r"y\.dtype=float64 is not supported"),
    ("x float16", lambda a: a.update(x=a["x"].half()), r"x\.dtype=float16 must equal y\.dtype=float32"),
    ("B_rows bfloat16", lambda a: a.update(B_rows=a["B_rows"].bfloat16()),
     r"B_rows\.dtype=bfloat16 must equal y\.dtype=float32"),
    ("row_idx int64", lambda a: a.update(row_idx=a["row_idx"].long()), r"row_idx\.dtype=int64 must be int32"),
    ("seg_ptr int64", lambda a: a.update(seg_ptr=a["seg_ptr"].long()), r"seg_ptr\.dtype=int64 must be int32"),
    ("scales float64", lambda a: a.update(scales=a["scales"].double()), r"scales\.dtype=float64 must be float32"),
    ("T differs", lambda a: a.update(x=a["x"][:5]), r"x\.size\(0\)=5 must equal y\.size\(0\)=6 \(T\)"),
    ("I differs", lambda a: a.update(A_rows=a["A_rows"][:, :8]), r"A_rows\.size\(1\)=8 must equal x\.size\(1\)=9 \(I\)"),
    ("O differs", lambda a: a.update(B_rows=a["B_rows"][:, :10]),
     r"B_rows\.size\(1\)=10 must equal y\.size\(1\)=11 \(O\)"),
    ("P differs", lambda a: a.update(B_rows=a["B_rows"][:17]), r"B_rows\.size\(0\)=17 must equal A_rows\.size\(0\)=18 \(P\)"),
    ("row_ptr empty", lambda a: a.update(row_ptr=a["row_ptr"][:0]), r"row_ptr\.numel\(\)=0 must be >= 1 \(N\+1\)"),
    ("scales short", lambda a: a.update(scales=a["scales"][:2]),
     r"scales\.numel\(\)=2 must equal row_ptr\.numel\(\)-1=3 \(N\)"),
    ("seg_ptr empty", lambda a: a.update(seg_ptr=a["seg_ptr"][:0], seg_slot=a["seg_slot"][:0]),
     r"seg_ptr\.numel\(\)=0 must be >= 1 \(S\+1\)"),
    ("seg_slot long", lambda a: a.update(seg_slot=_idx(a["y"].device, 0, -1, 2, 1)),
     r"seg_slot\.numel\(\)=4 must equal seg_ptr\.numel\(\)-1=3 \(S\)"),
    ("y overlaps", lambda a: a.update(y=a["y"][:1].expand(6, 11)), r"y\.stride\(\)=\[0, 1\] makes elements of y share"),
    ("row_ptr start", lambda a: a.update(row_ptr=_idx(a["y"].device, 1, 3, 3, 5)), r"row_ptr\[0\]=1 must be 0"),
    ("row_ptr decreasing", lambda a: a.update(row_ptr=_idx(a["y"].device, 0, 4, 3, 5)),
     r"row_ptr\[2\]=3 must be >= row_ptr\[1\]=4 \(row_ptr is non-decreasing\)"),
    ("row_ptr end", lambda a: a.update(row_ptr=_idx(a["y"].device, 0, 3, 3, 4)),
     r"row_ptr\[N=3\]=4 must equal row_idx\.numel\(\)=5 \(nnz\)"),
    ("row_idx high", lambda a: a["row_idx"].__setitem__(3, 18), r"row_idx\[3\]=18 must be in \[0, P=18\)"),
    ("row_idx negative", lambda a: a["row_idx"].__setitem__(0, -2), r"row_idx\[0\]=-2 must be in \[0, P=18\)"),
    ("seg_ptr start", lambda a: a.update(seg_ptr=_idx(a["y"].device, 1, 2, 3, 6)), r"seg_ptr\[0\]=1 must be 0"),
    ("seg_ptr decreasing", lambda a: a.update(seg_ptr=_idx(a["y"].device, 0, 4, 3, 6)),
     r"seg_ptr\[2\]=3 must be >= seg_ptr\[1\]=4 \(seg_ptr is non-decreasing\)"),
    ("seg_ptr end", lambda a: a.update(seg_ptr=_idx(a["y"].device, 0, 2, 3, 7)), r"seg_ptr\[S=3\]=7 must equal T=6"),
    ("seg_slot high", lambda a: a.update(seg_slot=_idx(a["y"].device, 0, 3, 2)), r"seg_slot\[1\]=3 must be in \[-1, N=3\)"),
    ("seg_slot low", lambda a: a.update(seg_slot=_idx(a["y"].device, 0, -1, -2)),
     r"seg_slot\[2\]=-2 must be in \[-1, N=3\)"),
]


def base_args(device, dtype=torch.float32):
    pool, segs, x, y0 = setup_case(6, 9, 11, [3, 0, 2], dtype, device, segs=[(2, 0), (1, -1), (3, 2)])
    seg_ptr, seg_slot = plan_tensors(segs, device)
    return dict(y=y0.clone(), x=x, A_rows=pool.A_rows, B_rows=pool.B_rows, row_ptr=pool.row_ptr,
                row_idx=pool.row_idx.clone(), scales=pool.scales, seg_ptr=seg_ptr, seg_slot=seg_slot)


def test_base_args_are_valid(backend, device):
    a = base_args(device)
    y0 = a["y"].clone()
    ops.lora_apply_(**a)
    assert not torch.equal(a["y"][:2], y0[:2]) and torch.equal(bits(a["y"][2:3]), bits(y0[2:3]))


@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_named_and_y_untouched(backend, device, case):
    _, mutate, pattern = case
    a = base_args(device)
    mutate(a)
    y0 = a["y"].clone()
    with pytest.raises(ValueError, match=pattern):
        ops.lora_apply_(**a)
    assert torch.equal(bits(a["y"]), bits(y0))


def test_the_op_checks_cpu_contents_itself():
    # On the CPU the compiled op reads the plan on the host and refuses bad contents even unasked.
    if not _ext.has_kernel("lora_apply_", "cpu"):
        pytest.skip("no compiled cpu kernel for lora_apply_")
    a = base_args("cpu")
    a["seg_slot"] = _idx("cpu", 0, 9, 2)
    y0 = a["y"].clone()
    with pytest.raises(ValueError, match=r"lora_apply_: seg_slot\[1\]=9 must be in \[-1, N=3\)"):
        ops.lora_apply_(**a, check=False)
    with pytest.raises(ValueError, match=r"lora_apply_: seg_slot\[1\]=9 must be in \[-1, N=3\)"):
        torch.ops.pylora.lora_apply_(*a.values())
    assert torch.equal(bits(a["y"]), bits(y0))


@pytest.mark.cuda
def test_device_mismatch_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    a = base_args("cuda")
    a["row_idx"] = a["row_idx"].cpu()
    y0 = a["y"].clone()
    for impl in (torch.ops.pylora.lora_apply_, ref.lora_apply_) if _ext.loaded else (ref.lora_apply_,):
        with pytest.raises((ValueError, RuntimeError), match=r"row_idx\.device=cpu must equal y\.device=cuda"):
            impl(*a.values())
    assert torch.equal(y0, a["y"])


def test_no_gradients(backend, device):
    a = base_args(device)
    a["x"] = a["x"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=r"x\.requires_grad=True, but the op has no autograd formula"):
        ops.lora_apply_(**a)
    with torch.no_grad():
        ops.lora_apply_(**a)


# ----------------------------------------------------------------------------------------------
# The unchecked GPU path: no synchronisation, and bad indices are skipped, never followed
# ----------------------------------------------------------------------------------------------

def _gpu_kernel_or_skip(device):
    if device != "cuda":
        pytest.skip("the unchecked path is the GPU's (the CPU op always checks)")
    if not _ext.has_kernel("lora_apply_", device):
        pytest.skip("no compiled cuda kernel for lora_apply_")


def test_unchecked_gpu_call_does_not_synchronise(device):
    _gpu_kernel_or_skip(device)
    pool, segs, x, y0 = setup_case(64, 131, 97, RANKS, torch.bfloat16, device, seed=17)
    seg = plan_tensors(segs, device)
    y = y0.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.lora_apply_(y, x, *pool.args(), *seg, check=False)
        torch.ops.pylora.lora_apply_(y, x, *pool.args(), *seg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, mag = truth(pool, x, y0, segs)
    assert_close_to_truth(y, 2 * want - y0.double(), 2 * mag)


def test_checked_gpu_call_names_bad_contents(device):
    _gpu_kernel_or_skip(device)
    a = base_args(device)
    a["seg_slot"] = _idx(device, 0, 9, 2)
    y0 = a["y"].clone()
    with pytest.raises(ValueError, match=r"lora_apply_: seg_slot\[1\]=9 must be in \[-1, N=3\)"):
        ops.lora_apply_(**a)
    assert torch.equal(bits(a["y"]), bits(y0))


def test_unchecked_gpu_bad_indices_are_skipped(device):
    _gpu_kernel_or_skip(device)
    # y lives inside a guarded buffer: any stray write shows in the guard rows and columns.
    a = base_args(device, torch.float16)
    T, O = a["y"].shape
    buf = torch.full((T + 4, O + 6), 3.0, dtype=a["y"].dtype, device=device)
    buf[2:T + 2, 3:O + 3] = a["y"]
    y = buf[2:T + 2, 3:O + 3]
    guard = buf.clone()
    guard[2:T + 2, 3:O + 3] = 0
    good = a["y"].clone()
    ops.lora_apply_(good, *list(a.values())[1:])

    def run(**changes):
        b = dict(a, y=y, **changes)
        y.copy_(a["y"])
        ops.lora_apply_(**b, check=False)
        torch.cuda.synchronize()
        outside = buf.clone()
        outside[2:T + 2, 3:O + 3] = 0
        assert torch.equal(bits(outside), bits(guard)), f"a write outside y with {list(changes)}"
        return y.clone()

    # A slot out of range: its segment is skipped, the others are as before.
    out = run(seg_slot=_idx(device, 9, -1, 2))
    assert torch.equal(bits(out[:2]), bits(a["y"][:2])) and torch.equal(bits(out[2:]), bits(good[2:]))
    out = run(seg_slot=_idx(device, 0, -7, 2))
    assert torch.equal(bits(out), bits(good))
    # A row out of range: that row contributes nothing; the rest of its slot still does.
    row_idx = a["row_idx"].clone()
    row_idx[4] = 1 << 30
    out = run(row_idx=row_idx)
    trimmed = dict(a, y=a["y"].clone(), row_ptr=_idx(device, 0, 3, 3, 4), row_idx=a["row_idx"][:4].clone())
    ops.lora_apply_(**trimmed)
    assert torch.equal(bits(out[:2]), bits(good[:2]))
    assert torch.equal(bits(out[3:]), bits(trimmed["y"][3:]))
    # Segments and row pointers past the ends: clamped, never followed.
    run(seg_ptr=_idx(device, 0, 2, 3, 1 << 20))
    run(seg_ptr=_idx(device, -5, 2, 1, 6))
    run(row_ptr=_idx(device, 0, 3, 3, 1 << 20))
    run(row_ptr=_idx(device, -4, 3, 2, 5))


# ----------------------------------------------------------------------------------------------
# The plan helper
# ----------------------------------------------------------------------------------------------

def test_plan_segments_merge_consecutive_slots():
    seg_ptr, seg_slot = plan.segments([0, 0, 1, -1, -1, 2, 0])
    assert seg_ptr.tolist() == [0, 2, 3, 5, 6, 7] and seg_slot.tolist() == [0, 1, -1, 2, 0]
    assert seg_ptr.dtype == seg_slot.dtype == torch.int32
    seg_ptr, seg_slot = plan.segments([3, 3, -1, 1], tokens_per_row=4)  # a [4, 4] batch
    assert seg_ptr.tolist() == [0, 8, 12, 16] and seg_slot.tolist() == [3, -1, 1]
    seg_ptr, seg_slot = plan.segments(torch.tensor([0, 1, 1, -1, 0]), tokens_per_row=[2, 0, 5, 1, 0])
    assert seg_ptr.tolist() == [0, 2, 7, 8] and seg_slot.tolist() == [0, 1, -1]
    seg_ptr, seg_slot = plan.segments([])
    assert seg_ptr.tolist() == [0] and seg_slot.tolist() == []


@pytest.mark.parametrize("call, pattern", [
    (lambda: plan.segments([0, 9, 1], num_slots=8), r"segments: slots\[1\]=9 must be in \[-1, N=8\)"),
    (lambda: plan.segments([0, -2]), r"segments: slots\[1\]=-2 must be >= -1"),
    (lambda: plan.segments([0, 1], tokens_per_row=-1), r"tokens_per_row=-1 must be >= 0"),
    (lambda: plan.segments([0, 1], tokens_per_row=[1, -3]), r"tokens_per_row\[1\]=-3 must be >= 0"),
    (lambda: plan.segments([0, 1], tokens_per_row=[1]), r"tokens_per_row has 1 entries, .* \(B=2\)"),
    (lambda: plan.segments([0.5]), r"slots\.dtype=float32 must be an integer type"),
])
def test_plan_segments_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_plan_drives_the_op(backend, device):
    # Rows of a [B, L] batch with one adapter name per row, as the server sees them, against the same
    # batch applied one row at a time.
    B, L = 6, 5
    pool, _, x, y0 = setup_case(B * L, 33, 21, RANKS, torch.float32, device, segs=[(B * L, 0)])
    row_slots = [8, 8, -1, 3, 8, 0]
    seg_ptr, seg_slot = plan.segments(row_slots, tokens_per_row=L, num_slots=pool.N)
    assert seg_slot.tolist() == [8, -1, 3, 8, 0]
    plan.validate(pool.row_ptr.cpu(), pool.row_idx.cpu(), seg_ptr, seg_slot, T=B * L, P=pool.P)
    y = y0.clone()
    ops.lora_apply_(y, x, *pool.args(), seg_ptr.to(device), seg_slot.to(device), check=False)
    for b, s in enumerate(row_slots):
        yb = y0[b * L:(b + 1) * L].clone()
        ops.lora_apply_(yb, x[b * L:(b + 1) * L], *pool.args(), *plan_tensors([(L, s)], device))
        assert torch.equal(bits(yb), bits(y[b * L:(b + 1) * L])) or backend == "reference"
        if backend == "reference":
            torch.testing.assert_close(yb, y[b * L:(b + 1) * L], **dict(zip(("rtol", "atol"), TOL[y.dtype])))
    with pytest.raises(ValueError, match=r"lora_apply_: seg_ptr\[S=5\]=30 must equal T=31"):
        plan.validate(pool.row_ptr.cpu(), pool.row_idx.cpu(), seg_ptr, seg_slot, T=31, P=pool.P)


# ----------------------------------------------------------------------------------------------
# opcheck, and the reference path with the extension disabled
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.loaded, reason=f"pylora._C not loaded ({_ext.load_error})")
def test_opcheck(device):
    if not _ext.has_kernel("lora_apply_", device):
        pytest.skip(f"no compiled kernel for {device}")
    for dtype in (torch.float32, torch.bfloat16):
        a = base_args(device, dtype)
        torch.library.opcheck(torch.ops.pylora.lora_apply_.default, tuple(a.values()))


def test_reference_runs_with_extension_disabled(python_env):
    code = (
        "import torch\n"
        "from pylora import ops, _ext\n"
        "assert not _ext.loaded and ops.backend('lora_apply_', 'cpu') == 'reference'\n"
        "y = torch.zeros(3, 4); x = torch.ones(3, 2)\n"
        "A = torch.tensor([[1., 2.], [0., 1.], [9., 9.]]); B = torch.tensor([[1., 0., 0., 1.], [0., 1., 0., 0.],"
        " [9., 9., 9., 9.]])\n"
        "i = lambda *v: torch.tensor(v, dtype=torch.int32)\n"
        "ops.lora_apply_(y, x, A, B, i(0, 2), i(1, 0), torch.tensor([2.]), i(0, 1, 3), i(-1, 0))\n"
        "assert y.tolist() == [[0, 0, 0, 0], [6, 2, 0, 6], [6, 2, 0, 6]], y.tolist()\n"
        "print('ok')\n"
    )
    env = dict(python_env, PYLORA_DISABLE_EXT="1")
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
