"""merge_ / unmerge_: kernels against the bit-exact reference and a float64 truth, exact round trips,
refusal of non-finite results, argument errors, opcheck."""
import math
import subprocess

import pytest
import torch

from tests.helpers import DTYPES, PYTHON
from pylora import _ext, ops
from pylora.ops import reference as ref

KERNEL_OPS = ("merge_", "unmerge_")


def bits(t):
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16).clone()


def make(O, I, r, dtype, ab_dtype=torch.float32, device="cpu", fifo=False, delta_scale=1e-2):
    """A weight ~ N(0, 0.02) and non-zero LoRA factors: std(B@A) = 2 * delta_scale * std(W)."""
    W = (torch.randn(O, I) * 0.02).to(dtype)
    if fifo:
        W = W.t().contiguous()
    A = ((torch.rand(r, I) * 2 - 1) / math.sqrt(I)).to(ab_dtype)
    B = (torch.randn(O, r) * 0.02 * delta_scale * math.sqrt(I / max(r, 1)) * math.sqrt(3)).to(ab_dtype)
    return W.to(device), A.to(device), B.to(device)


SHAPES = [(1, 1, 1), (7, 13, 3), (64, 300, 8), (4097, 7, 2), (3, 70000, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_reference_bitwise(device, dtype, ab_dtype, fifo, shape):
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled kernel for {device}")
    O, I, r = shape
    W, A, B = make(O, I, r, dtype, ab_dtype, device, fifo)
    W_ref = W.clone()
    rec = ops.merge_(W, A, B, 1.7, fan_in_fan_out=fifo)
    with ops.reference_mode():
        rec_ref = ops.merge_(W_ref, A, B, 1.7, fan_in_fan_out=fifo)
    assert torch.equal(bits(W), bits(W_ref))
    for name, a, b in zip(("counts", "entries", "esc_index", "esc_value"), rec.tensors(), rec_ref.tensors()):
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b), name


@pytest.mark.parametrize("exp", [-70, -62, -56, -50, 0, 40, 60])
@pytest.mark.parametrize("r", [5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_factors_at_every_scale_give_the_reference_bits(device, exp, r, dtype):
    """bf16 factors take the CPU kernel's bf16 dot-product path (AVX512-BF16) only where it gives the fma
    chain's bits: every product a normal fp32 number and none overflowing. Factors ~2^exp put the
    products near 2^(2 exp): subnormal (-70, -62), at the limit (-56), ordinary, and large (60); each
    merge and its record equal the reference's, whichever path the kernel took."""
    if not all(_ext.has_kernel(op, device) for op in KERNEL_OPS):
        pytest.skip(f"no compiled kernel for {device}")
    g = torch.Generator().manual_seed(exp + 1000 * r)
    O, I = 40, 100  # three full 32-column blocks and a tail
    W = (torch.randn(O, I, generator=g, dtype=torch.float64) * 2.0 ** (2 * exp)).to(dtype).to(device)
    A = (torch.randn(r, I, generator=g) * 2.0 ** exp).to(torch.bfloat16).to(device)
    B = (torch.randn(O, r, generator=g) * 2.0 ** exp).to(torch.bfloat16).to(device)
    W_ref = W.clone()
    rec = ops.merge_(W, A, B, 1.7)
    with ops.reference_mode():
        rec_ref = ops.merge_(W_ref, A, B, 1.7)
    assert torch.equal(bits(W), bits(W_ref))
    for name, a, b in zip(("counts", "entries", "esc_index", "esc_value"), rec.tensors(), rec_ref.tensors()):
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_merge_matches_float64_truth(backend, device, dtype, fifo):
    W, A, B = make(96, 4097, 16, dtype, torch.float32, device, fifo, delta_scale=0.05)
    s = 2.0
    delta = s * (B.double() @ A.double())
    truth64 = W.double() + (delta.t() if fifo else delta)
    ops.merge_(W, A, B, s, fan_in_fan_out=fifo)
    if dtype == torch.float32:
        # fp32: one rounding of w + acc*s, with acc an r-step fp32 chain: within 1 ulp plus the chain's error.
        ulp = torch.finfo(torch.float32).eps * truth64.abs()
        chain = 16 * torch.finfo(torch.float32).eps * (s * (B.double().abs() @ A.double().abs()))
        chain = chain.t() if fifo else chain
        assert bool(((W.double() - truth64).abs() <= ulp + chain + 1e-45).all())
    else:
        truth = truth64.to(dtype)
        diff = W != truth
        # Rounding once per element: equal to the float64 truth rounded, but for rare near-ties.
        assert diff.float().mean().item() < 2e-3
        near = (bits(W).long() - bits(truth).long()).abs()
        assert int(near.max()) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_roundtrip_100_cycles_bit_exact(backend, device, dtype, fifo):
    W, A, B = make(33, 515, 8, dtype, torch.float32, device, fifo, delta_scale=0.05)
    W0 = bits(W)
    A2, B2 = torch.randn_like(A) * A.std(), torch.randn_like(B) * B.std() * 3
    total_corrections = 0
    for cycle in range(100):
        a, b, s = (A, B, 2.0) if cycle % 2 == 0 else (A2, B2, -0.75)
        rec = ops.merge_(W, a, b, s, fan_in_fan_out=fifo)
        total_corrections += rec.corrections
        ops.unmerge_(W, a, b, s, rec, fan_in_fan_out=fifo)
        assert torch.equal(bits(W), W0), f"cycle {cycle}"
    assert total_corrections > 0  # the record was exercised, not trivially empty


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_escapes_and_large_deltas(backend, device, dtype):
    # A large update against tiny weights: many elements whose unmerge candidate lies far away.
    W, A, B = make(16, 700, 4, dtype, torch.float32, device, delta_scale=1.0)
    W[:, ::3] *= 1e-4
    W0 = bits(W)
    rec = ops.merge_(W, A, B, 3.0)
    assert rec.esc_index.numel() > 0 and rec.entries.numel() > 0
    ops.unmerge_(W, A, B, 3.0, rec)
    assert torch.equal(bits(W), W0)


def test_records_portable_between_kernel_and_reference(device):
    if not _ext.has_kernel("merge_", device):
        pytest.skip(f"no compiled kernel for {device}")
    for dtype in DTYPES:
        W, A, B = make(40, 1000, 8, dtype, torch.float32, device, delta_scale=0.05)
        W0 = bits(W)
        rec = ops.merge_(W, A, B, 2.0)
        with ops.reference_mode():
            ops.unmerge_(W, A, B, 2.0, rec)
            rec2 = ops.merge_(W, A, B, 2.0)
        ops.unmerge_(W, A, B, 2.0, rec2)
        assert torch.equal(bits(W), W0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous_inputs(backend, device, dtype):
    W, A, B = make(48, 200, 6, dtype, torch.float32, device, delta_scale=0.05)
    A_nc = torch.stack([A, torch.zeros_like(A)], dim=2)[:, :, 0]  # stride (400, 2)
    B_nc = B.t().contiguous().t()  # column-major
    assert not A_nc.is_contiguous() and not B_nc.is_contiguous()
    W1, W2 = W.clone(), W.clone()
    r1 = ops.merge_(W1, A, B, 1.5)
    r2 = ops.merge_(W2, A_nc, B_nc, 1.5)
    assert torch.equal(bits(W1), bits(W2))
    # A transposed-contiguous weight is the same matrix in the other memory order.
    Wt = W.t().contiguous().t()
    assert not Wt.is_contiguous()
    r3 = ops.merge_(Wt, A, B, 1.5)
    assert torch.equal(bits(Wt), bits(W1))
    ops.unmerge_(Wt, A, B, 1.5, r3)
    ops.unmerge_(W2, A_nc, B_nc, 1.5, r2)
    assert torch.equal(bits(Wt), bits(W)) and torch.equal(bits(W2), bits(W))
    assert r1.corrections == r2.corrections


def test_record_small_for_an_ordinary_adapter(backend, device):
    # A trained-like adapter: std(scale * B@A) = 0.3% of std(W) (make: 2 * delta_scale * scale).
    # The record then costs under 1% of W's bytes; `pylora bench merge` reports it across update sizes.
    for dtype in DTYPES:
        W, A, B = make(512, 2048, 16, dtype, torch.float32, device, delta_scale=1.5e-3)
        rec = ops.merge_(W, A, B, 1.0)
        assert 0 < rec.nbytes < 0.01 * W.numel() * W.element_size(), (dtype, rec.nbytes)


# ----------------------------------------------------------------------------------------------
# Refusals: non-finite results and bad arguments leave the weight untouched
# ----------------------------------------------------------------------------------------------

def test_nonfinite_result_refused_weight_untouched(backend, device):
    W, A, B = make(20, 50, 4, torch.float16, torch.float32, device)
    W[13, 7] = 65000.0
    W[15, 2] = 65000.0
    B[13] = 1.0
    A[:, 7] = 1.0
    W0 = bits(W)
    with pytest.raises(ValueError, match=r"not be finite at weight\[13, 7\].*nothing was written"):
        ops.merge_(W, A, B, 400.0)  # 65000 + 400 * 4 > 65504, the float16 maximum
    assert torch.equal(bits(W), W0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_nonfinite_message_is_the_same_on_every_backend(device, dtype, fifo):
    """The refusal names the position and the fp32 chain's value, the same numbers on every backend (CUDA
    once printed a float64 sum instead)."""
    if not _ext.has_kernel("merge_", device):
        pytest.skip(f"no compiled {device} kernel for merge_")
    messages = []
    for ref_mode in (False, True):
        torch.manual_seed(3)
        W, A, B = make(24, 40, 6, dtype, torch.float32, device, fifo=fifo)
        big = torch.finfo(dtype).max
        o, i = 17, 29
        with torch.no_grad():
            (W[i, o] if fifo else W[o, i]).fill_(big * 0.75)
            B[o] = torch.linspace(0.3, 0.9, B.shape[1])
            A[:, i] = torch.linspace(0.7, 0.2, A.shape[0])
        with ops.reference_mode(ref_mode), pytest.raises(ValueError) as info:
            ops.merge_(W, A, B, big / 2, fan_in_fan_out=fifo)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert f"weight[{i}, {o}]" in messages[0] if fifo else f"weight[{o}, {i}]" in messages[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_weight_or_factors_refused(backend, device, dtype):
    W, A, B = make(9, 30, 2, dtype, torch.float32, device)
    W[4, 5] = float("nan")
    W0 = bits(W)
    with pytest.raises(ValueError, match=r"weight\[4, 5\]"):
        ops.merge_(W, A, B, 1.0)
    assert torch.equal(bits(W), W0)
    W, A, B = make(9, 30, 2, dtype, torch.float32, device, fifo=True)
    A[1, 6] = float("inf")
    W0 = bits(W)
    with pytest.raises(ValueError, match=r"weight\[6, 0\]"):  # [I, O] with fan_in_fan_out
        ops.merge_(W, A, B, 1.0, fan_in_fan_out=True)
    assert torch.equal(bits(W), W0)


BAD_ARGS = [
    # (description, mutate(W, A, B) -> (W, A, B, scale, fifo), pattern)
    ("weight 1-D", lambda W, A, B: (W[0], A, B, 1.0, False), r"weight\.dim\(\)=1 must be 2"),
    ("lora_A 3-D", lambda W, A, B: (W, A[None], B, 1.0, False), r"lora_A\.dim\(\)=3 must be 2"),
    ("weight float64", lambda W, A, B: (W.double(), A, B, 1.0, False), r"weight\.dtype=float64 is not supported"),
    ("lora_B int", lambda W, A, B: (W, A, B.int(), 1.0, False), r"lora_B\.dtype=int32 is not supported"),
    ("rank 0", lambda W, A, B: (W, A[:0], B[:, :0], 1.0, False), r"lora_A\.size\(0\)=0 \(r\) must be >= 1"),
    ("ranks differ", lambda W, A, B: (W, A, B[:, :2], 1.0, False), r"lora_B\.size\(1\)=2 must equal lora_A\.size\(0\)=4"),
    ("weight shape", lambda W, A, B: (W[:, :9], A, B, 1.0, False),
     r"weight\.shape=\[12, 9\] must equal \[O, I\]=\[12, 10\]"),
    ("fifo shape", lambda W, A, B: (W, A, B, 1.0, True), r"weight\.shape=\[12, 10\] must equal \[I, O\]=\[10, 12\]"),
    ("scale nan", lambda W, A, B: (W, A, B, float("nan"), False), r"scale=nan must be finite"),
    ("scale huge", lambda W, A, B: (W, A, B, 1e300, False), r"scale=1e\+300 must fit in float32"),
    ("layout", lambda W, A, B: (torch.zeros(12, 20, dtype=W.dtype, device=W.device)[:, ::2], A, B, 1.0, False),
     r"weight\.stride\(\)=\[20, 2\] is not supported"),
]


@pytest.mark.parametrize("case", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_named_and_nothing_written(backend, device, case):
    _, mutate, pattern = case
    W, A, B = make(12, 10, 4, torch.float32, torch.float32, device)
    W, A, B, s, fifo = mutate(W, A, B)
    W0 = W.clone()
    with pytest.raises(ValueError, match=pattern):
        ops.merge_(W, A, B, s, fan_in_fan_out=fifo)
    assert torch.equal(W, W0)


def test_bad_records_refused_before_writing(backend, device):
    W, A, B = make(12, 10, 4, torch.bfloat16, torch.float32, device, delta_scale=1.0)
    W0 = bits(W)
    rec = ops.merge_(W, A, B, 2.0)
    assert rec.corrections > 0
    W_merged = bits(W)
    t = rec.tensors()
    esc_value = t[3][:1] if t[3].numel() else torch.zeros(1, dtype=W.dtype, device=device)
    cases = [
        (ops.MergeRecord(t[0][:-1], *t[1:]), r"counts\.numel\(\)=11 must equal the weight's record chunks"),
        (ops.MergeRecord(t[0].int(), *t[1:]), r"counts\.dtype=int32 must be int16"),
        (ops.MergeRecord(t[0], t[1][:-1], *t[2:]), r"counts\.sum\(\)=\d+ must equal entries\.numel\(\)=\d+"),
        (ops.MergeRecord(t[0], torch.full_like(t[1], 10 << 4), *t[2:]),
         r"entries point at column 10, columns must be < Q=10"),
        (ops.MergeRecord(*t[:2], torch.tensor([120], device=device), esc_value),
         r"esc_index holds values in \[120, 120\]"),
        (ops.MergeRecord(t[0] * 2, *t[1:]), r"counts\.sum\(\)=\d+ must equal entries\.numel\(\)"),
        (ops.MergeRecord(*t[:3], t[3].float()), r"esc_value\.dtype=float32 must be bfloat16"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ops.unmerge_(W, A, B, 2.0, bad)
        assert torch.equal(bits(W), W_merged)
    with pytest.raises(ValueError, match=r"weight\.shape=\[12, 10\] must equal \[I, O\]"):
        ops.unmerge_(W, A, B, 2.0, rec, fan_in_fan_out=True)
    assert torch.equal(bits(W), W_merged)
    # The op itself reads the record as laid out: a strided view is refused by name; ops.unmerge_ passes
    # contiguous tensors, so a view given to it works.
    strided = torch.stack([t[1], t[1]], 1).reshape(-1)[::2]
    assert not strided.is_contiguous() and torch.equal(strided, t[1])
    with ops.reference_mode(backend == "reference"):
        with pytest.raises(ValueError, match=r"unmerge_: entries must be contiguous, got a view with stride 2"):
            ops.dispatch.impl("unmerge_")(W, A, B, 2.0, False, t[0], strided, t[2], t[3])
        assert torch.equal(bits(W), W_merged)
        ops.unmerge_(W, A, B, 2.0, ops.MergeRecord(t[0], strided, *t[2:]))
    assert torch.equal(bits(W), W0)


@pytest.mark.cuda
def test_device_mismatch_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    W, A, B = make(12, 10, 4, torch.float32, torch.float32, "cuda")
    W0 = W.clone()
    for impl in (torch.ops.pylora.merge_, ref.merge_) if _ext.loaded else (ref.merge_,):
        with pytest.raises((ValueError, RuntimeError), match=r"lora_A\.device=cpu must equal weight\.device=cuda"):
            impl(W, A.cpu(), B, 1.0, False)
    assert torch.equal(W, W0)


# ----------------------------------------------------------------------------------------------
# opcheck, and the reference path with the extension disabled
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not _ext.loaded, reason=f"pylora._C not loaded ({_ext.load_error})")
def test_opcheck(device):
    if not _ext.has_kernel("merge_", device):
        pytest.skip(f"no compiled kernel for {device}")
    W, A, B = make(16, 40, 4, torch.bfloat16, torch.float32, device, delta_scale=0.5)
    # Mutating ops with data-dependent record sizes: schema, fake tensor and autograd registration.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.pylora.merge_.default, (W.clone(), A, B, 2.0, False), test_utils=tests)
    rec = ops.merge_(W, A, B, 2.0)
    torch.library.opcheck(torch.ops.pylora.unmerge_.default, (W.clone(), A, B, 2.0, False, *rec.tensors()),
                          test_utils=tests)


def test_suite_passes_with_extension_disabled(python_env, tmp_path):
    env = dict(python_env, PYLORA_DISABLE_EXT="1")
    out = subprocess.run([PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "not disabled and not opcheck and not failed_load", "-m", "not cuda"],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout


def test_failed_load_warns_once_and_falls_back(python_env):
    code = (
        "import sys, warnings\n"
        "sys.modules['pylora._C'] = None  # makes `from pylora import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pylora, pylora.ops, importlib\n"
        "    import pylora._ext\n"
        "msgs = [str(x.message) for x in w if 'pylora' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'could not be loaded' in msgs[0] and 'import of pylora._C halted' in msgs[0], msgs[0]\n"
        "import torch\n"
        "W = torch.randn(8, 8); A = torch.randn(2, 8); B = torch.randn(8, 2); W0 = W.clone()\n"
        "rec = pylora.ops.merge_(W, A, B, 1.0); pylora.ops.unmerge_(W, A, B, 1.0, rec)\n"
        "assert torch.equal(W, W0) and pylora.ops.backend('merge_', 'cpu') == 'reference'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in python_env.items() if k != "PYLORA_DISABLE_EXT"}
    out = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fifo", [False, True])
def test_merge_without_record_writes_the_same_bits(backend, device, dtype, fifo):
    W, A, B = make(70, 300, 8, dtype, torch.float32, device, fifo=fifo, delta_scale=0.1)
    with_record, without = W.clone(), W.clone()
    rec = ops.merge_(with_record, A, B, 1.7, fan_in_fan_out=fifo)
    assert rec.corrections > 0  # this update loses information somewhere: a record was needed
    assert ops.merge_(without, A, B, 1.7, fan_in_fan_out=fifo, record=False) is None
    assert torch.equal(bits(without), bits(with_record))


def test_merge_without_record_still_refuses_before_writing(backend, device):
    W, A, B = make(20, 50, 4, torch.float16, torch.float32, device)
    W[13, 7] = 65000.0
    B[13] = 1.0
    A[:, 7] = 1.0
    W0 = bits(W)
    with pytest.raises(ValueError, match=r"not be finite at weight\[13, 7\].*nothing was written"):
        ops.merge_(W, A, B, 400.0, record=False)
    assert torch.equal(bits(W), W0)


def test_merge_cannot_overflow_is_a_bound():
    W, A, B = make(30, 40, 4, torch.float16)
    assert ops.merge_cannot_overflow(W, A, B, 2.0)
    W[3, 3] = 65000.0
    assert not ops.merge_cannot_overflow(W, A, B, 1e6)  # might overflow: not necessarily will
    W[3, 3] = float("nan")
    assert not ops.merge_cannot_overflow(W, A, B, 1.0)
