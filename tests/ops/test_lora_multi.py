"""lora_multi / lora_multi_backward: many adapters in one batch, each its own factors. Kernels and
reference against a float64 truth (forward and every gradient) for fp32, fp16 and bf16; each adapter's
dropout mask is lora_linear's over its own tokens; tokens of no adapter get nothing; gradcheck, opcheck,
argument errors with the same message on every backend."""
import math

import pytest
import torch

from pylora import _ext, ops
from pylora.ops import reference as ref
from tests.helpers import DTYPES, TOL, bits

KERNEL_OPS = ("lora_multi", "lora_multi_backward")


def make(T, I, O, ranks, dtype=torch.float32, device="cpu", seed=0, order="interleaved"):
    """x ~ N(0, 1), per adapter A and B (never zero) scaled so that y is O(1); tokens assigned to adapters
    interleaved (token t -> adapter t % (N + 1), the last "adapter" meaning none) or in blocks."""
    g = torch.Generator().manual_seed(seed)
    N = len(ranks)
    x = torch.randn(T, I, generator=g)
    As = [(torch.rand(r, I, generator=g) * 2 - 1) * math.sqrt(3.0 / I) for r in ranks]
    Bs = [torch.randn(O, r, generator=g) / math.sqrt(r) for r in ranks]
    owner = [t % (N + 1) for t in range(T)] if order == "interleaved" else [min(t * (N + 1) // T, N) for t in range(T)]
    groups = [[t for t in range(T) if owner[t] == k] for k in range(N)]  # owner N: no adapter
    tok_ptr = [0]
    for grp in groups:
        tok_ptr.append(tok_ptr[-1] + len(grp))
    tok_idx = torch.tensor([t for grp in groups for t in grp], dtype=torch.int64)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), [cast(a) for a in As], [cast(b) for b in Bs], tok_ptr, tok_idx.to(device), groups


def run(backend, x, As, Bs, scales, tok_ptr, tok_idx, p, seeds, grad_y):
    leaves = [x.detach().requires_grad_(True)] + [t.detach().requires_grad_(True) for t in As + Bs]
    n = len(As)
    with ops.reference_mode(backend == "reference"):
        y = ops.lora_multi(leaves[0], leaves[1:1 + n], leaves[1 + n:], scales, tok_ptr, tok_idx, dropout_p=p,
                           seeds=seeds)
    y.backward(grad_y)
    return y.detach(), [t.grad for t in leaves]


def truth(x, As, Bs, scales, tok_ptr, tok_idx, p, seeds, grad_y):
    """float64: the reference by torch autograd, on |.| too for the sums' magnitudes."""
    out = []
    for f in (lambda t: t, torch.abs):
        x64 = f(x.detach().double()).cpu().requires_grad_(True)
        A64 = [f(a.detach().double()).cpu().requires_grad_(True) for a in As]
        B64 = [f(b.detach().double()).cpu().requires_grad_(True) for b in Bs]
        y, _ = ref.lora_multi(x64, A64, B64, [abs(s) if f is torch.abs else s for s in scales], p, seeds, tok_ptr,
                              tok_idx.cpu())
        y.backward(f(grad_y.double().cpu()))
        out.append((y.detach(), [x64.grad] + [a.grad for a in A64] + [b.grad for b in B64]))
    return out


def assert_near(actual, expected, terms, dtype, what, reduce_len):
    rtol, atol = TOL[dtype]
    mag = float(terms.abs().max()) if terms.numel() else 0.0
    atol = atol * max(mag, 1e-3) * max(1.0, math.sqrt(reduce_len / 16))
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


CASES = [  # (T, I, O, ranks, order)
    (7, 5, 3, [1, 2], "interleaved"),
    (40, 33, 17, [4, 1, 8, 3], "interleaved"),
    (150, 70, 90, [16, 2, 7], "blocks"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}_I{c[1]}_O{c[2]}_r{'-'.join(map(str, c[3]))}" for c in CASES])
def test_matches_float64_truth(backend, device, dtype, p, case):
    T, I, O, ranks, order = case
    x, As, Bs, tok_ptr, tok_idx, groups = make(T, I, O, ranks, dtype, device, order=order)
    N = len(ranks)
    scales, ps, seeds = [0.5 + k for k in range(N)], [p * (k % 2 == 0) for k in range(N)], [11 + 7 * k for k in range(N)]
    grad_y = torch.randn(T, O, generator=torch.Generator().manual_seed(9)).to(dtype=dtype, device=device)
    y, grads = run(backend, x, As, Bs, scales, tok_ptr, tok_idx, ps, seeds, grad_y)
    (y64, g64), (yabs, gabs) = truth(x, As, Bs, scales, tok_ptr, tok_idx, ps, seeds, grad_y)
    assert_near(y, y64, yabs, dtype, "y", I * max(ranks))
    none = [t for t in range(T) if not any(t in grp for grp in groups)]
    assert none and torch.equal(y[none].abs().sum().cpu(), torch.zeros((), dtype=dtype))  # exactly nothing
    assert grads[0][none].abs().sum().item() == 0.0
    names = ["x"] + [f"lora_A[{k}]" for k in range(N)] + [f"lora_B[{k}]" for k in range(N)]
    for name, got, want, mag in zip(names, grads, g64, gabs):
        assert_near(got, want, mag, dtype, f"grad {name}", max(T, O) * max(ranks))


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_each_adapter_is_lora_linear_over_its_own_tokens(backend, device, p):
    """The same h (bit for bit, so the same dropout mask) and the same y and gradients as lora_linear on
    the adapter's tokens alone with a zero base weight."""
    if backend == "kernel" and not _ext.has_kernel("lora_linear", device):
        pytest.skip("no compiled lora_linear")
    T, I, O, ranks = 60, 45, 20, [3, 5, 2]
    x, As, Bs, tok_ptr, tok_idx, groups = make(T, I, O, ranks, torch.float32, device, seed=4)
    seeds = [101, 202, 303]
    with ops.reference_mode(backend == "reference"):
        impl = ops.dispatch.impl("lora_multi")
        y, hs = impl(x, As, Bs, [1.5, 2.0, 0.5], [p] * 3, seeds, tok_ptr, tok_idx)
        for k, grp in enumerate(groups):
            xk = x[grp]
            yk, hk = ops.dispatch.impl("lora_linear")(
                xk, torch.zeros(O, I, device=device), None, As[k], Bs[k], [1.5, 2.0, 0.5][k], p,
                torch.tensor(seeds[k]), False)
            assert torch.equal(bits(hs[k]), bits(hk)), k
            torch.testing.assert_close(y[grp], yk, rtol=1e-6, atol=1e-6)


def test_kernel_and_reference_agree_on_every_device(device):
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled {device} kernel")
    x, As, Bs, tok_ptr, tok_idx, _ = make(90, 64, 48, [4, 9, 1, 6], torch.float32, device, seed=2)
    args = ([0.7, 1.3, 2.0, 0.25], [0.1, 0.0, 0.2, 0.5], [5, 6, 7, 8])
    grad_y = torch.randn(90, 48, device=device)
    yk, gk = run("kernel", x, As, Bs, args[0], tok_ptr, tok_idx, args[1], args[2], grad_y)
    yr, gr = run("reference", x, As, Bs, args[0], tok_ptr, tok_idx, args[1], args[2], grad_y)
    torch.testing.assert_close(yk, yr, rtol=1e-5, atol=1e-6)
    for a, b in zip(gk, gr):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck(backend, device):
    x, As, Bs, tok_ptr, tok_idx, _ = make(12, 6, 5, [2, 3], torch.float64, device, seed=6)
    leaves = [x.requires_grad_(True)] + [t.requires_grad_(True) for t in As + Bs]

    def f(x, a0, a1, b0, b1):
        with ops.reference_mode(backend == "reference"):
            return ops.lora_multi(x, [a0, a1], [b0, b1], [1.5, 0.5], tok_ptr, tok_idx, dropout_p=[0.3, 0.0],
                                  seeds=[3, 4])

    assert torch.autograd.gradcheck(f, leaves)


def test_empty_groups_and_float64(backend, device):
    x, As, Bs, _, _, _ = make(5, 4, 3, [2, 2], torch.float64, device)
    tok_ptr, tok_idx = [0, 0, 2], torch.tensor([4, 1], device=device)
    leaves = [x.requires_grad_(True)] + [t.requires_grad_(True) for t in As + Bs]
    with ops.reference_mode(backend == "reference"):
        y = ops.lora_multi(leaves[0], leaves[1:3], leaves[3:], [1.0, 2.0], tok_ptr, tok_idx)
    y.sum().backward()
    assert torch.count_nonzero(y[[0, 2, 3]]) == 0 and torch.count_nonzero(y[[1, 4]]) > 0
    assert torch.count_nonzero(leaves[1].grad) == 0 and torch.count_nonzero(leaves[3].grad) == 0  # adapter 0: no tokens
    assert torch.count_nonzero(leaves[2].grad) > 0


def _bad_calls(device):
    x, As, Bs, tok_ptr, tok_idx, _ = make(8, 6, 4, [2, 3], torch.float32, device)
    ok = dict(x=x, lora_A=As, lora_B=Bs, scales=[1.0, 1.0], dropout_p=[0.0, 0.0], seeds=[0, 0], tok_ptr=tok_ptr,
              tok_idx=tok_idx)
    return ok, [
        (dict(x=x[0]), r"x\.dim\(\)=1 must be 2 \(\[T, I\]\)"),
        (dict(x=x.long()), r"x\.dtype=int64 is not supported \(float32, float16, bfloat16, float64\)"),
        (dict(lora_A=[], lora_B=[], scales=[], dropout_p=[], seeds=[], tok_ptr=[0]),
         r"len\(lora_A\)=0 \(N\) must be >= 1"),
        (dict(lora_B=Bs[:1]), r"len\(lora_B\)=1 must equal len\(lora_A\)=2 \(N\)"),
        (dict(seeds=[0]), r"len\(seeds\)=1 must equal len\(lora_A\)=2 \(N\)"),
        (dict(tok_ptr=tok_ptr[:2]), r"len\(tok_ptr\)=2 must equal N\+1=3"),
        (dict(lora_A=[As[0], As[1].double()]), r"lora_A\[1\]\.dtype=float64 must equal x\.dtype=float32"),
        (dict(lora_A=[As[0], As[1][:, :5]]), r"lora_A\[1\]\.size\(1\)=5 must equal x\.size\(1\)=6 \(I\)"),
        (dict(lora_B=[Bs[0], Bs[1][:, :2]]), r"lora_B\[1\]\.size\(1\)=2 must equal lora_A\[1\]\.size\(0\)=3 \(r\)"),
        (dict(lora_B=[Bs[0], Bs[1][:3]]), r"lora_B\[1\]\.size\(0\)=3 must equal lora_B\[0\]\.size\(0\)=4 \(O\)"),
        (dict(scales=[1.0, float("inf")]), r"scales\[1\]=inf must be finite"),
        (dict(dropout_p=[0.0, 1.0]), r"dropout_p\[1\]=1 must satisfy 0 <= dropout_p < 1"),
        (dict(dropout_p=[float("nan"), 0.0]), r"dropout_p\[0\]=nan must satisfy"),
        (dict(tok_idx=tok_idx.int()), r"tok_idx must be a 1-D int64 tensor, got int32"),
        (dict(tok_ptr=[1] + tok_ptr[1:]), r"tok_ptr\[0\]=1 must be 0"),
        (dict(tok_ptr=[0, tok_ptr[2], tok_ptr[1]]), r"tok_ptr\[2\]=\d+ must be >= tok_ptr\[1\]=\d+"),
        (dict(tok_ptr=[0, tok_ptr[1], tok_ptr[2] - 1]), r"tok_ptr\[N\]=\d+ must equal tok_idx\.numel\(\)=\d+"),
        (dict(tok_idx=torch.tensor([0, 1, 8, 3, 4, 5], device=device)), r"tok_idx\[2\]=8 must be in \[0, T=8\)"),
        (dict(tok_idx=torch.tensor([0, 1, 2, 3, 4, 0], device=device)),
         r"tok_idx\[5\]=0 appears more than once: a token has one adapter"),
    ]


def test_bad_arguments_named_alike_on_every_backend(device):
    ok, cases = _bad_calls(device)
    for change, pattern in cases:
        args = {**ok, **change}
        ordered = [args[k] for k in ("x", "lora_A", "lora_B", "scales", "dropout_p", "seeds", "tok_ptr", "tok_idx")]
        impls = [ref.lora_multi] + ([torch.ops.pylora.lora_multi] if _ext.has_kernel("lora_multi", device) else [])
        messages = []
        for impl in impls:
            with pytest.raises(ValueError, match="lora_multi: " + pattern) as info:
                impl(*ordered)
            messages.append(str(info.value).split("\n")[0])
        assert len(set(messages)) == 1, messages


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck(device, p):
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled {device} kernel")
    x, As, Bs, tok_ptr, tok_idx, _ = make(10, 7, 5, [2, 3], torch.float32, device)
    args = (x.requires_grad_(True), [a.requires_grad_(True) for a in As], [b.requires_grad_(True) for b in Bs],
            [1.5, 0.5], [p, 0.0], [3, 4], tok_ptr, tok_idx)
    torch.library.opcheck(torch.ops.pylora.lora_multi.default, args)
    _, hs = torch.ops.pylora.lora_multi(x.detach(), [a.detach() for a in As], [b.detach() for b in Bs],
                                        *args[3:])
    grad_y = torch.randn(10, 5, device=device)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.pylora.lora_multi_backward.default,
                              (grad_y, x.detach(), [a.detach() for a in As], [b.detach() for b in Bs], hs,
                               *args[3:], mask))
