"""lora_linear / lora_linear_backward: kernels and reference against a float64 truth (forward and every
gradient), the dropout mask bit for bit, gradcheck, opcheck, argument errors, output_mask, saved tensors."""
import math
import subprocess

import pytest
import torch

from tests.helpers import DTYPES, HAS_CUDA, PYTHON, TOL
from pylora import _ext, ops
from pylora.ops import dispatch
from pylora.ops.linear import as_seed
from pylora.ops import reference as ref

KERNEL_OPS = ("lora_linear", "lora_linear_backward")
GRAD_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def make(T, I, O, r, dtype=torch.float32, device="cpu", bias=True, fifo=False):
    """x ~ N(0, 1) and factors scaled so that y, h and s * h B^T are all O(1); B is never zero."""
    x = torch.randn(T, I)
    W = torch.randn(O, I) / math.sqrt(I)
    b = torch.randn(O) * 0.5 if bias else None
    A = (torch.rand(r, I) * 2 - 1) * math.sqrt(3.0 / I)
    B = torch.randn(O, r) / math.sqrt(r)
    if fifo:
        W = W.t().contiguous()
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(A), cast(B)


def truth(x, W, b, A, B, scale, p, seed, fifo, grad_y):
    """float64 forward and gradients of the same inputs and mask, by torch autograd of the reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (x, W, b, A, B)]
    y, h = ref.lora_linear(*leaves, scale, p, seed, fifo)
    y.backward(grad_y.double())
    return y.detach(), h.detach(), [None if t is None else t.grad for t in leaves]


def truth_abs(x, W, b, A, B, scale, p, seed, fifo, grad_y):
    """The same float64 computation on |inputs|: every output element's sum of |terms|, the scale its
    rounding errors grow with (a cancelling sum is only as accurate as its terms are large)."""
    ab = lambda t: None if t is None else t.abs()  # noqa: E731
    return truth(ab(x), ab(W), ab(b), ab(A), ab(B), abs(scale), p, seed, fifo, grad_y.abs())


def assert_near(actual, expected, dtype, what, reduce_len, terms=None):
    """Within the dtype's (rtol, atol): rtol per element, atol in units of the output's largest sum of
    |terms| (or largest value) and grown like the sqrt(K) rounding error of a length-K reduction."""
    rtol, atol = TOL[dtype]
    scale_of = expected if terms is None else terms
    mag = float(scale_of.abs().max()) if scale_of.numel() else 0.0
    atol = atol * max(mag, 1e-3) * max(1.0, math.sqrt(reduce_len / 16))
    torch.testing.assert_close(actual.detach().double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


# (T, I, O, r, bias, fan_in_fan_out): odd sizes; the last two cross the CPU kernel's 64-row tiles and
# 512-column chunks with remainders.
CASES = [
    (1, 1, 1, 1, False, False),
    (7, 33, 13, 7, True, False),
    (33, 7, 1, 33, True, True),
    (130, 1030, 33, 7, True, False),
    (65, 600, 7, 1, False, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_I{}_O{}_r{}{}{}".format(*c[:4], "_bias" * c[4],
                                                                                 "_fifo" * c[5]))
def test_forward_and_grads_match_float64_truth(backend, device, dtype, p, case):
    T, I, O, r, bias, fifo = case
    x, W, b, A, B = make(T, I, O, r, dtype, device, bias, fifo)
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    scale, seed = 1.7, 1234
    y = ops.lora_linear(*leaves, scale, dropout_p=p, seed=seed, fan_in_fan_out=fifo)
    assert y.shape == (T, O) and y.dtype == dtype and y.device.type == device
    grad_y = torch.randn(T, O, device=device).to(dtype)
    y.backward(grad_y)
    y64, _, grads64 = truth(x, W, b, A, B, scale, p, seed, fifo, grad_y)
    y_terms, _, grad_terms = truth_abs(x, W, b, A, B, scale, p, seed, fifo, grad_y)
    assert_near(y, y64, dtype, "y", I, y_terms)
    reduce_len = {"x": O + r, "weight": T, "bias": T, "lora_A": T, "lora_B": T}
    for name, leaf, g64, terms in zip(GRAD_NAMES, leaves, grads64, grad_terms):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype, name
        assert_near(leaf.grad, g64, dtype, f"grad {name}", reduce_len[name], terms)
    # Every gradient is non-trivial: a missing LoRA term or a zero B would show.
    assert float(leaves[4].grad.abs().max()) > 0 and float(leaves[3].grad.abs().max()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_backward_op_matches_reference_op(device, dtype, p):
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled {device} kernel")
    x, W, _, A, B = make(70, 530, 19, 5, dtype, device, bias=False)
    grad_y = torch.randn(70, 19, device=device).to(dtype)
    _, h = torch.ops.pylora.lora_linear(x, W, None, A, B, 0.5, p, as_seed(77), False)
    _, h_ref = ref.lora_linear(x, W, None, A, B, 0.5, p, 77, False)
    assert_near(h, h_ref.double(), dtype, "h", 530)
    got = ops.lora_linear_backward(grad_y, x, W, A, B, h, 0.5, p, 77)
    with ops.reference_mode():
        want = ops.lora_linear_backward(grad_y, x, W, A, B, h, 0.5, p, 77)
    lens = (19 + 5, 70, 70, 70, 70)
    for name, g, w, k in zip(GRAD_NAMES, got, want, lens):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_near(g, w.double(), dtype, name, k)


# ----------------------------------------------------------------------------------------------
# The dropout mask: identical bits in kernel and reference, in forward and backward
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_exact_in_h(backend, device, dtype, p):
    # With A = identity (r = I) every h element is a single product, so h must equal drop(x) bit for bit.
    T, I = 70, 600
    x = torch.randn(T, I, dtype=dtype, device=device)
    A = torch.eye(I, dtype=dtype, device=device)
    W = torch.randn(5, I, dtype=dtype, device=device)
    B = torch.randn(5, I, dtype=dtype, device=device)
    seed = 0x1234_5678_9ABC
    _, h = dispatch.impl("lora_linear")(x, W, None, A, B, 1.0, p, as_seed(seed), False)
    keep = ref.dropout_keep(seed, T, I, p, device)
    expected = torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=dtype, device=device))
    assert torch.equal(h, expected)
    frac = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(frac - (1 - p)) < 5 * sigma, frac
    # The mask is no repeated row pattern: rows agree only as often as chance says.
    same = (keep[1:] == keep[:-1]).double().mean().item()
    assert abs(same - (p * p + (1 - p) ** 2)) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_mask_exact_in_backward(backend, device, dtype):
    # B = identity makes u = s * grad_y exactly and A = identity makes u A = u: then
    # grad_x = grad_y @ 0 + where(keep, u / (1 - p), 0) and, with grad_y diagonal (T = r),
    # grad_A[k, i] = s * d_k * drop(x)[k, i], each a single product.
    N, p, s, seed = 600, 0.3, 0.75, -987654321
    dev = device
    x = torch.randn(N, N, dtype=dtype, device=dev)
    W = torch.zeros(N, N, dtype=dtype, device=dev)
    eye = torch.eye(N, dtype=dtype, device=dev)
    keep = ref.dropout_keep(seed, N, N, p, dev)
    inv = 1.0 / (1.0 - p)
    zero = torch.zeros((), dtype=dtype, device=dev)
    _, h = dispatch.impl("lora_linear")(x, W, None, eye, eye, s, p, as_seed(seed), False)
    grad_y = torch.randn(N, N, dtype=dtype, device=dev)
    gx = ops.lora_linear_backward(grad_y, x, W, eye, eye, h, s, p, seed, output_mask=(1, 0, 0, 0, 0))[0]
    assert torch.equal(gx, torch.where(keep, (grad_y * s) * inv, zero))
    d = torch.randn(N, dtype=dtype, device=dev)
    gA = ops.lora_linear_backward(torch.diag(d), x, W, eye, eye, h, s, p, seed, output_mask=(0, 0, 0, 1, 0))[3]
    assert torch.equal(gA, (d * s)[:, None] * torch.where(keep, x * inv, zero))


def test_dropout_keep_definition():
    # The hash, spelled out for two elements in plain Python integers (common/dropout_hash.h).
    def mix32(v):
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    seed, p, I = (5 << 32) | 77, 0.5, 3_000_000_000  # counters past 2^32 exercise the high word
    k0, k1 = seed & 0xFFFFFFFF, mix32((seed >> 32) ^ 0x9E3779B9)
    keep = ref.dropout_keep(seed, 3, 4, p)
    for t in range(3):
        for i in range(4):
            n = t * 4 + i
            hsh = mix32(mix32((n & 0xFFFFFFFF) ^ k0) ^ (((n >> 32) + k1) & 0xFFFFFFFF))
            assert bool(keep[t, i]) == (hsh >= round(p * 2**32))
    n = 2 * I + 5
    hsh = mix32(mix32((n & 0xFFFFFFFF) ^ k0) ^ (((n >> 32) + k1) & 0xFFFFFFFF))
    # dropout_keep(T=3, I) would be 9e9 elements: check the counter arithmetic on a narrow slice instead.
    n_t = torch.tensor([[n]])
    got = ref._mix32(ref._mix32((n_t & 0xFFFFFFFF) ^ k0) ^ (((n_t >> 32) + k1) & 0xFFFFFFFF))
    assert int(got) == hsh
    # Different seeds give different masks, the same seed the same one.
    assert torch.equal(ref.dropout_keep(1, 8, 64, 0.5), ref.dropout_keep(1, 8, 64, 0.5))
    assert not torch.equal(ref.dropout_keep(1, 8, 64, 0.5), ref.dropout_keep(2, 8, 64, 0.5))
    assert not torch.equal(ref.dropout_keep(1, 8, 64, 0.5), ref.dropout_keep(1 + (1 << 32), 8, 64, 0.5))


def test_seed_drawn_from_cpu_generator(backend, device):
    x, W, b, A, B = make(9, 40, 6, 3, torch.float32, device)
    torch.manual_seed(5)
    y1 = ops.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    y2 = ops.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    torch.manual_seed(5)
    y3 = ops.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.5)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)
    # p == 0 draws nothing: the generator's state is untouched.
    state = torch.get_rng_state()
    ops.lora_linear(x, W, b, A, B, 1.0)
    assert torch.equal(state, torch.get_rng_state())


# ----------------------------------------------------------------------------------------------
# Layouts: leading batch dims, non-contiguous x, empty T
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.2])
def test_leading_dims_and_noncontiguous_x(backend, device, p):
    x, W, b, A, B = make(2 * 3 * 5, 70, 11, 4, torch.float32, device)
    y_flat = ops.lora_linear(x, W, b, A, B, 0.5, dropout_p=p, seed=3)
    x4 = x.reshape(2, 3, 5, 70).requires_grad_(True)
    y4 = ops.lora_linear(x4, W, b, A, B, 0.5, dropout_p=p, seed=3)
    assert y4.shape == (2, 3, 5, 11)
    torch.testing.assert_close(y4.reshape(30, 11), y_flat, **_tol32())
    y4.sum().backward()
    assert x4.grad.shape == x4.shape
    # Non-contiguous x [T, I]: a column slice (stride (2I, 2)) and a transposed tensor.
    for xn in (torch.stack([x, torch.full_like(x, float("nan"))], dim=2)[:, :, 0], x.t().contiguous().t()):
        assert not xn.is_contiguous()
        xn = xn.detach().requires_grad_(True)
        xc = xn.detach().contiguous().requires_grad_(True)
        yn = ops.lora_linear(xn, W, b, A, B, 0.5, dropout_p=p, seed=3)
        yc = ops.lora_linear(xc, W, b, A, B, 0.5, dropout_p=p, seed=3)
        torch.testing.assert_close(yn, yc, **_tol32())
        g = torch.randn_like(yn)
        yn.backward(g)
        yc.backward(g)
        torch.testing.assert_close(xn.grad, xc.grad, **_tol32())
    # A 1-D x is one token.
    y1 = ops.lora_linear(x[3], W, b, A, B, 0.5, dropout_p=p, seed=3)
    assert y1.shape == (11,)


def _tol32():
    rtol, atol = TOL[torch.float32]
    return {"rtol": rtol, "atol": 10 * atol}


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_empty_tokens(backend, device, p):
    x, W, b, A, B = make(0, 20, 6, 3, torch.float32, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b, A, B)]
    y = ops.lora_linear(*leaves, 2.0, dropout_p=p, seed=1)
    assert y.shape == (0, 6)
    y.sum().backward()
    for name, leaf in zip(GRAD_NAMES, leaves):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, name
        assert not bool(leaf.grad.any()), name


# ----------------------------------------------------------------------------------------------
# Autograd: gradcheck on the kernels, what is saved, what output_mask skips
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fifo", [False, True])
def test_gradcheck_float64(backend, device, p, fifo):
    x, W, b, A, B = make(5, 7, 4, 3, torch.float64, device, bias=True, fifo=fifo)
    leaves = tuple(t.requires_grad_(True) for t in (x, W, b, A, B))

    def f(*args):
        return ops.lora_linear(*args, 1.3, dropout_p=p, seed=11, fan_in_fan_out=fifo)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_saved_tensors_are_x_weight_factors_and_h(backend, device):
    T, I, O, r = 40, 96, 24, 4
    x, W, b, A, B = make(T, I, O, r, torch.float32, device)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.lora_linear(x, W, b, A, B, 2.0, dropout_p=0.1, seed=1)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    if backend == "kernel":
        allowed = {t.untyped_storage().data_ptr() for t in (x, W, A, B)}
        extra = {ptr: n for ptr, n in storages.items() if ptr not in allowed}
        # Only h [T, r] and the 8-byte seed are new: no mask, no dropped copy of x.
        assert sorted(extra.values()) == sorted([T * r * 4, 8]), extra
    else:
        # The reference is plain torch: it keeps drop(x) and a mask, which is what the kernels avoid.
        assert sum(storages.values()) > (T * I * 4) * 2


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_output_mask_computes_only_what_is_asked(backend, device, p):
    T, I, O, r = 9, 30, 12, 3
    x, W, _, A, B = make(T, I, O, r, torch.float64, device)
    grad_y = torch.randn(T, O, dtype=torch.float64, device=device)
    _, h = ref.lora_linear(x, W, None, A, B, 0.8, p, 5, False)
    full = ops.lora_linear_backward(grad_y, x, W, A, B, h, 0.8, p, 5)
    nan = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    # Each output alone, with every tensor it does not need poisoned: only what is asked is computed,
    # from only what it needs.
    needs = {0: ("weight", "lora_A", "lora_B"), 1: ("x",), 2: (), 3: ("x", "lora_B"), 4: ("h",)}
    for k in range(5):
        args = {"x": x, "weight": W, "lora_A": A, "lora_B": B, "h": h}
        args = {n: (t if n in needs[k] else nan(t)) for n, t in args.items()}
        mask = [i == k for i in range(5)]
        out = ops.lora_linear_backward(grad_y, args["x"], args["weight"], args["lora_A"], args["lora_B"],
                                       args["h"], 0.8, p, 5, output_mask=mask)
        for i, g in enumerate(out):
            if i == k:
                torch.testing.assert_close(g, full[i], rtol=1e-12, atol=1e-12)
            else:
                assert g.numel() == 0, (k, i)
    # Autograd passes needs_input_grad on: a frozen base weight and frozen A get no gradient.
    xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
    ops.lora_linear(xs, W, None, As.detach(), Bs, 0.8, dropout_p=p, seed=5).sum().backward()
    assert xs.grad is not None and Bs.grad is not None and As.grad is None and W.grad is None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_frozen_A_does_no_grad_A_work(device, p):
    """Counts the GEMM work (M*N*K of every aten mm/addmm) the backward kernel does: dropping lora_A from
    output_mask must remove exactly the r*T*I of dA, and grad_B alone is one O*T*r GEMM."""
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled {device} kernel")
    from torch.profiler import ProfilerActivity, profile

    T, I, O, r = 70, 530, 23, 3
    x, W, _, A, B = make(T, I, O, r, torch.float32, device)
    grad_y = torch.randn(T, O, device=device)
    _, h = torch.ops.pylora.lora_linear(x, W, None, A, B, 1.0, p, as_seed(9), False)

    def work(mask):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # every tile GEMM of the CPU kernel then runs on the profiled thread
        try:
            with profile(activities=activities, record_shapes=True) as prof:
                torch.ops.pylora.lora_linear_backward(grad_y, x, W, A, B, h, 1.0, p, as_seed(9), False, mask)
                if device == "cuda":
                    torch.cuda.synchronize()
        finally:
            torch.set_num_threads(threads)
        flops, kernels = 0, set()
        for ev in prof.events():
            if ev.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
                shapes = [s for s in ev.input_shapes if len(s) == 2]
                a, b = shapes[-2:] if ev.name != "aten::mm" else shapes[:2]
                flops += a[0] * a[1] * b[1]
            kernels.add(ev.name)
        return flops, kernels

    all_flops, all_kernels = work([True] * 5)
    no_a_flops, no_a_kernels = work([True, True, True, False, True])
    b_flops, _ = work([False, False, False, False, True])
    assert b_flops == O * T * r
    if device == "cpu" or p == 0:
        assert all_flops - no_a_flops == r * T * I
    else:
        # On CUDA the masked dA is a pylora kernel, not a GEMM: it must run only when asked for.
        assert any("masked_grad_A" in k for k in all_kernels)
        assert not any("masked_grad_A" in k for k in no_a_kernels)
        assert all_flops == no_a_flops


# ----------------------------------------------------------------------------------------------
# Argument errors: named, with values; identical in kernel and reference; nothing mutated
# ----------------------------------------------------------------------------------------------

def _args(device="cpu"):
    x, W, b, A, B = make(5, 10, 12, 4, torch.float32, device)
    return {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B, "scale": 2.0, "dropout_p": 0.1,
            "seed": as_seed(3), "fan_in_fan_out": False}


def _with(**changes):
    def mutate(a):
        for k, v in changes.items():
            a[k] = v(a) if callable(v) else v
        return a
    return mutate


FWD_BAD = [
    ("x 3-D", _with(x=lambda a: a["x"][None]), r"lora_linear: x\.dim\(\)=3 must be 2 \(\[T, I\]\)"),
    ("weight 1-D", _with(weight=lambda a: a["weight"][0]), r"weight\.dim\(\)=1 must be 2 \(\[O, I\]\)"),
    ("lora_A 1-D", _with(lora_A=lambda a: a["lora_A"][0]), r"lora_A\.dim\(\)=1 must be 2 \(\[r, I\]\)"),
    ("lora_B 3-D", _with(lora_B=lambda a: a["lora_B"][None]), r"lora_B\.dim\(\)=3 must be 2 \(\[O, r\]\)"),
    ("bias 2-D", _with(bias=lambda a: a["bias"][None]), r"bias\.dim\(\)=2 must be 1 \(\[O\]\)"),
    ("x int", _with(x=lambda a: a["x"].int()),
     r"x\.dtype=int32 is not supported \(float32, float16, bfloat16, float64\)"),
    ("weight half", _with(weight=lambda a: a["weight"].half()), r"weight\.dtype=float16 must equal x\.dtype=float32"),
    ("bias double", _with(bias=lambda a: a["bias"].double()), r"bias\.dtype=float64 must equal x\.dtype=float32"),
    ("lora_A bf16", _with(lora_A=lambda a: a["lora_A"].bfloat16()),
     r"lora_A\.dtype=bfloat16 must equal x\.dtype=float32"),
    ("lora_B double", _with(lora_B=lambda a: a["lora_B"].double()),
     r"lora_B\.dtype=float64 must equal x\.dtype=float32"),
    ("rank 0", _with(lora_A=lambda a: a["lora_A"][:0], lora_B=lambda a: a["lora_B"][:, :0]),
     r"lora_A\.size\(0\)=0 \(r\) must be >= 1"),
    ("ranks differ", _with(lora_B=lambda a: a["lora_B"][:, :2]),
     r"lora_B\.size\(1\)=2 must equal lora_A\.size\(0\)=4 \(r\)"),
    ("I differs", _with(x=lambda a: torch.randn(5, 11, device=a["x"].device)),
     r"x\.size\(1\)=11 must equal lora_A\.size\(1\)=10 \(I\)"),
    ("weight shape", _with(weight=lambda a: a["weight"][:7]),
     r"weight\.shape=\[7, 10\] must equal \[O, I\]=\[12, 10\] from lora_A \[r, I\]=\[4, 10\] "
     r"and lora_B \[O, r\]=\[12, 4\] "
     r"\(fan_in_fan_out=False\)"),
    ("fifo shape", _with(fan_in_fan_out=True), r"weight\.shape=\[12, 10\] must equal \[I, O\]=\[10, 12\]"),
    ("bias shape", _with(bias=lambda a: a["bias"][:5]), r"bias\.shape=\[5\] must equal \[O\]=\[12\]"),
    ("scale nan", _with(scale=float("nan")), r"scale=nan must be finite"),
    ("scale inf", _with(scale=float("-inf")), r"scale=-inf must be finite"),
    ("dropout 1", _with(dropout_p=1.0), r"dropout_p=1 must satisfy 0 <= dropout_p < 1"),
    ("dropout negative", _with(dropout_p=-0.25), r"dropout_p=-0.25 must satisfy 0 <= dropout_p < 1"),
    ("dropout nan", _with(dropout_p=float("nan")), r"dropout_p=nan must satisfy 0 <= dropout_p < 1"),
]

_FWD_ORDER = ("x", "weight", "bias", "lora_A", "lora_B", "scale", "dropout_p", "seed", "fan_in_fan_out")


def _snapshot(a):
    return {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}


def _unchanged(a, snap):
    return all(torch.equal(a[k], v) for k, v in snap.items())


@pytest.mark.parametrize("case", FWD_BAD, ids=[c[0] for c in FWD_BAD])
def test_forward_bad_arguments_named(backend, device, case):
    _, mutate, pattern = case
    a = mutate(_args(device))
    snap = _snapshot(a)
    impl = dispatch.impl("lora_linear")
    with pytest.raises(ValueError, match=pattern):
        impl(*(a[k] for k in _FWD_ORDER))
    assert _unchanged(a, snap)


def _bwd_args(device="cpu"):
    a = _args(device)
    del a["bias"]
    a["grad_y"] = torch.randn(5, 12, device=device)
    a["h"] = torch.randn(5, 4, device=device)
    a["output_mask"] = [True] * 5
    return a


_BWD_ORDER = ("grad_y", "x", "weight", "lora_A", "lora_B", "h", "scale", "dropout_p", "seed", "fan_in_fan_out",
              "output_mask")

BWD_BAD = [
    ("grad_y 1-D", _with(grad_y=lambda a: a["grad_y"][0]),
     r"lora_linear_backward: grad_y\.dim\(\)=1 must be 2 \(\[T, O\]\)"),
    ("h 3-D", _with(h=lambda a: a["h"][None]), r"h\.dim\(\)=3 must be 2 \(\[T, r\]\)"),
    ("grad_y half", _with(grad_y=lambda a: a["grad_y"].half()), r"grad_y\.dtype=float16 must equal x\.dtype=float32"),
    ("h double", _with(h=lambda a: a["h"].double()), r"h\.dtype=float64 must equal x\.dtype=float32"),
    ("grad_y shape", _with(grad_y=lambda a: a["grad_y"][:, :7]),
     r"grad_y\.shape=\[5, 7\] must equal \[T, O\]=\[5, 12\]"),
    ("h shape", _with(h=lambda a: a["h"][:3]), r"h\.shape=\[3, 4\] must equal \[T, r\]=\[5, 4\]"),
    ("I differs", _with(lora_A=lambda a: a["lora_A"][:, :9]),
     r"lora_linear_backward: x\.size\(1\)=10 must equal lora_A\.size\(1\)=9 \(I\)"),
    ("dropout", _with(dropout_p=2.0), r"lora_linear_backward: dropout_p=2 must satisfy 0 <= dropout_p < 1"),
]


@pytest.mark.parametrize("case", BWD_BAD, ids=[c[0] for c in BWD_BAD])
def test_backward_bad_arguments_named(backend, device, case):
    _, mutate, pattern = case
    a = mutate(_bwd_args(device))
    snap = _snapshot(a)
    impl = dispatch.impl("lora_linear_backward")
    with pytest.raises(ValueError, match=pattern):
        impl(*(a[k] for k in _BWD_ORDER))
    assert _unchanged(a, snap)


def test_kernel_and_reference_messages_identical(device):
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled {device} kernel")
    for cases, make_args, order, op in ((FWD_BAD, _args, _FWD_ORDER, "lora_linear"),
                                        (BWD_BAD, _bwd_args, _BWD_ORDER, "lora_linear_backward")):
        for desc, mutate, _ in cases:
            a = mutate(make_args(device))
            msgs = []
            for impl in (getattr(torch.ops.pylora, op), getattr(ref, op)):
                with pytest.raises(ValueError) as exc:
                    impl(*(a[k] for k in order))
                msgs.append(str(exc.value).splitlines()[0])
            assert msgs[0] == msgs[1], desc


@pytest.mark.cuda
def test_device_mismatch_named():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    a = _args("cuda")
    a["lora_A"] = a["lora_A"].cpu()
    impls = [ref.lora_linear] + ([torch.ops.pylora.lora_linear] if _ext.has_kernel("lora_linear", "cuda") else [])
    for impl in impls:
        with pytest.raises(ValueError, match=r"lora_A\.device=cpu must equal x\.device=cuda:0"):
            impl(*(a[k] for k in _FWD_ORDER))


# ----------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.loaded, reason=f"pylora._C not loaded ({_ext.load_error})")
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(device, p):
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled {device} kernel")
    x, W, b, A, B = make(6, 9, 5, 2, torch.float32, device)
    args = [x.requires_grad_(True), W, b.requires_grad_(True), A.requires_grad_(True), B.requires_grad_(True),
            1.5, p, as_seed(21), False]
    torch.library.opcheck(torch.ops.pylora.lora_linear.default, args)
    x2, W2, _, A2, B2 = make(6, 9, 5, 2, torch.float32, device, fifo=True)
    torch.library.opcheck(torch.ops.pylora.lora_linear.default, (x2, W2, None, A2, B2, 0.5, p, as_seed(2), True))
    _, h = torch.ops.pylora.lora_linear(x.detach(), W, b.detach(), A.detach(), B.detach(), 1.5, p, as_seed(21), False)
    grad_y = torch.randn(6, 5, device=device)
    for mask in ([True] * 5, [True, False, False, True, False]):
        torch.library.opcheck(torch.ops.pylora.lora_linear_backward.default,
                              (grad_y, x.detach(), W, A.detach(), B.detach(), h, 1.5, p, as_seed(21), False, mask))


def test_reference_path_with_extension_disabled(python_env):
    """Without pylora._C, ops.lora_linear runs the reference and torch autograd differentiates it."""
    code = (
        "import torch, pylora\n"
        "from pylora import _ext, ops\nfrom pylora.ops import reference as ref\n"
        "assert not _ext.loaded and ops.backend('lora_linear', 'cpu') == 'reference'\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 3, 20, requires_grad=True); W = torch.randn(8, 20)\n"
        "A = torch.randn(4, 20, requires_grad=True); B = torch.randn(8, 4, requires_grad=True)\n"
        "y = ops.lora_linear(x, W, None, A, B, 0.5, dropout_p=0.3, seed=7)\n"
        "keep = ref.dropout_keep(7, 6, 20, 0.3)\n"
        "dx = torch.where(keep, x.reshape(6, 20) / 0.7, torch.zeros(()))\n"
        "want = x.reshape(6, 20) @ W.t() + 0.5 * (dx @ A.t()) @ B.t()\n"
        "torch.testing.assert_close(y.reshape(6, 8), want)\n"
        "y.sum().backward()\n"
        "assert x.grad.shape == x.shape and A.grad is not None and B.grad is not None\n"
        "print('ok')\n"
    )
    env = dict(python_env, PYLORA_DISABLE_EXT="1")
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
