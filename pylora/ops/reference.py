"""Pure-torch twin of every pylora op: the same semantics, the same validation messages.

It is the fallback when the compiled extension is missing (or a device has no kernel) and the
oracle the tests compare the kernels against. Where an op is defined down to the bit (merge_ and
unmerge_), the twin reproduces the kernels' rounding exactly.
"""
from __future__ import annotations

import math

import torch

CHUNK = 4096  # record chunk: up to CHUNK consecutive elements of one storage row
MIN_DELTA, MAX_DELTA = -8, 7  # an entry's signed nibble; other key differences are escapes (index and value)
_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STORAGE_MAX = {
    torch.float32: torch.finfo(torch.float32).max,
    torch.float16: torch.finfo(torch.float16).max,
    torch.bfloat16: torch.finfo(torch.bfloat16).max,
}


def _value_error(op: str, msg: str) -> ValueError:
    return ValueError(f"{op}: {msg}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# fp32 arithmetic with one rounding per operation, as the kernels do it
# ----------------------------------------------------------------------------------------------

_F32_MIN_NORMAL = 2.0 ** -126
# Elements a row chunk of the fp32 chains holds: float64 temporaries that stay in the cache.
_CHUNK_ELEMENTS = 1 << 18


def _fma32_round_to_odd(a64: torch.Tensor, b64: torch.Tensor, c64: torch.Tensor) -> torch.Tensor:
    """fp32 fma on float64 operands holding fp32 values, exactly: float64 holds a * b exactly (24 + 24
    bits); the float64 sum is made round-to-odd from its exact error (TwoSum), and a 53-bit round-to-odd
    value rounds correctly to 24 bits (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums",
    2008)."""
    p = a64 * b64
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    odd = (s.contiguous().view(torch.int64) & 1) == 1
    toward = torch.where(err > 0, math.inf, -math.inf).to(s.dtype)
    s = torch.where((err != 0) & ~odd, torch.nextafter(s, toward), s)
    return s.float()


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None = None,
          tiny: bool = True) -> torch.Tensor:
    """fp32 fma(a, b, c) = round(a * b + c), one rounding, elementwise with broadcasting (into `out`, a
    float32 tensor of the broadcast shape, when given).

    Semantics: s = a * b + c in float64 (a * b is exact there, so s is the sum rounded once to 53 bits),
    then rounded to float32: the correct fp32 fma except where that double rounding can differ from one
    rounding, i.e. where s lies exactly on a float32 midpoint (the 29 bits below float32's last one are
    1000...0) or, unless the caller rules it out with tiny=False, in float32's subnormal range (where the
    midpoints sit elsewhere). Those elements are recomputed exactly (round-to-odd). Bits identical to an
    fp32 fma instruction.
    """
    a64, b64, c64 = a.double(), b.double(), c.double()
    s = torch.addcmul(c64, a64, b64)
    r = s.float() if out is None else out.copy_(s)
    suspect = (s.view(torch.int64) & 0x1FFFFFFF) == 0x10000000
    if tiny:
        suspect |= (s.abs() < _F32_MIN_NORMAL) & (s != 0)
    if bool(suspect.any()):
        idx = suspect.nonzero(as_tuple=True)
        shape = s.shape
        r[idx] = _fma32_round_to_odd(a64.expand(shape)[idx], b64.expand(shape)[idx], c64.expand(shape)[idx])
    return r


def _no_subnormal_chain(U: torch.Tensor, V: torch.Tensor) -> bool:
    """True when no partial sum of any fp32 chain over U[p, k] * V[k, q] can fall in float32's subnormal
    range: every product is a multiple of quantum(u) quantum(v) >= |u| |v| 2^-48 (u, v normal), every
    partial sum (exact, or rounded onto a coarser grid) a multiple of the smallest such quantum, so a
    nonzero one is at least that large; >= 2^-126 rules the range out."""
    nu, nv = U[U != 0].abs(), V[V != 0].abs()
    if nu.numel() == 0 or nv.numel() == 0:
        return True
    return float(nu.min()) * float(nv.min()) * 2.0 ** -48 >= _F32_MIN_NORMAL


def _products_exact(U: torch.Tensor, V: torch.Tensor) -> bool:
    """True when every fp32 product U[p, k] * V[k, q] is exact, so fma(u, v, acc) == acc + u * v."""
    if U.dtype not in (torch.float16, torch.bfloat16) or V.dtype not in (torch.float16, torch.bfloat16):
        return False
    nz_u, nz_v = U[U != 0], V[V != 0]
    if nz_u.numel() == 0 or nz_v.numel() == 0:
        return True
    # <= 11 + 11 significant bits fit in 24; only a product below fp32's normal range could round.
    return nz_u.abs().min().double().item() * nz_v.abs().min().double().item() >= 2.0 ** -126


def chain_kind(U: torch.Tensor, V: torch.Tensor) -> tuple[bool, bool]:
    """(exact, tiny) of the fp32 chains over U[p, k] * V[k, q]: every product exact in fp32 (then plain
    fp32 adds are the fmas), and whether a partial sum may fall in float32's subnormal range."""
    exact = _products_exact(U, V)
    return exact, not exact and not _no_subnormal_chain(U.float(), V.float())


def _row_chunks(P: int, Q: int):
    rows = max(1, _CHUNK_ELEMENTS // max(Q, 1))
    for p0 in range(0, P, rows):
        yield p0, min(P, p0 + rows)


def lora_product_fp32(U: torch.Tensor, V: torch.Tensor, rows: tuple[int, int] | None = None,
                      kind: tuple[bool, bool] | None = None) -> torch.Tensor:
    """acc[P, Q] = the fp32 fma chain over k of U[p, k] * V[k, q], k = 0 .. r-1 in order (for U's rows
    [p0, p1) when `rows` is given); row chunk by row chunk, so the temporaries stay in the cache. `kind`,
    chain_kind(U, V) computed once by a caller that asks for many row ranges."""
    p0, p1 = rows if rows is not None else (0, U.shape[0])
    exact, tiny = kind if kind is not None else chain_kind(U, V)
    U32, V32 = U[p0:p1].float(), V.float()
    acc = torch.zeros(p1 - p0, V.shape[1], dtype=torch.float32, device=U.device)
    for c0, c1 in _row_chunks(p1 - p0, V.shape[1]):
        a = acc[c0:c1]
        for k in range(U.shape[1]):
            u, v = U32[c0:c1, k : k + 1], V32[k : k + 1, :]
            if exact:
                a.addcmul_(u, v)
            else:
                fma32(u, v, a, out=a, tiny=tiny)
    return acc


def _round_to(x32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> storage dtype, round to nearest even (torch's conversion)."""
    return x32 if dtype == torch.float32 else x32.to(dtype)


def _keys(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Monotone int64 key of storage bits (-0 sorts just below +0)."""
    if dtype == torch.float32:
        b = bits.to(torch.int64) & 0xFFFFFFFF
        sign, mag = 0x80000000, 0x7FFFFFFF
    else:
        b = bits.to(torch.int64) & 0xFFFF
        sign, mag = 0x8000, 0x7FFF
    return torch.where((b & sign) != 0, -(b & mag) - 1, b)


def _unkeys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    sign, bits_dtype = (0x80000000, torch.int32) if dtype == torch.float32 else (0x8000, torch.int16)
    return torch.where(keys < 0, (-(keys + 1)) | sign, keys).to(bits_dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


class _MergeProblem:
    """S[P, Q] (+|-)= s * U[P, r] @ V[r, Q] on the contiguous storage view S of the weight."""

    def __init__(self, op, weight, lora_A, lora_B, scale, fan_in_fan_out):
        for name, t, want in (("weight", weight, None), ("lora_A", lora_A, "[r, I]"), ("lora_B", lora_B, "[O, r]")):
            if t.dim() != 2:
                extra = f" ({_shape(t)})" if want is None else f" ({want})"
                raise _value_error(op, f"{name}.dim()={t.dim()} must be 2{extra}")
        for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype not in _STORAGE_DTYPES:
                raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} is not supported "
                                       "(float32, float16, bfloat16)")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.device != weight.device:
                raise _value_error(op, f"{name}.device={t.device} must equal weight.device={weight.device}")
        r = lora_A.shape[0]
        if r < 1:
            raise _value_error(op, f"lora_A.size(0)={r} (r) must be >= 1")
        if lora_B.shape[1] != r:
            raise _value_error(op, f"lora_B.size(1)={lora_B.shape[1]} must equal lora_A.size(0)={r} (r)")
        O, I = lora_B.shape[0], lora_A.shape[1]
        want = (I, O) if fan_in_fan_out else (O, I)
        if tuple(weight.shape) != want:
            raise _value_error(
                op, f"weight.shape={_shape(weight)} must equal {'[I, O]' if fan_in_fan_out else '[O, I]'}="
                f"[{want[0]}, {want[1]}] from lora_A [r, I]={_shape(lora_A)} and lora_B [O, r]={_shape(lora_B)} "
                f"(fan_in_fan_out={fan_in_fan_out})")
        if not math.isfinite(scale):
            raise _value_error(op, f"scale={scale} must be finite")
        if abs(scale) > torch.finfo(torch.float32).max:
            raise _value_error(op, f"scale={scale} must fit in float32")
        if weight.is_contiguous():
            self.S, self.transposed = weight, False
        elif weight.t().is_contiguous():
            self.S, self.transposed = weight.t(), True
        else:
            raise _value_error(op, f"weight.stride()={list(weight.stride())} is not supported (the weight must be "
                                   "contiguous or a transposed contiguous tensor)")
        in_out = fan_in_fan_out != self.transposed
        self.U, self.V = (lora_A.t(), lora_B.t()) if in_out else (lora_B, lora_A)
        self.P, self.Q = self.S.shape
        self.r = r
        self.s = float(torch.tensor(scale, dtype=torch.float32))
        self.nb = -(-self.Q // CHUNK) if self.Q else 0

    def where(self, p: int, q: int) -> str:
        return f"weight[{q}, {p}]" if self.transposed else f"weight[{p}, {q}]"

    def s_tensor(self, sign: float = 1.0) -> torch.Tensor:
        return torch.tensor(sign * self.s, dtype=torch.float32, device=self.S.device)


def merge_(weight, lora_A, lora_B, scale, fan_in_fan_out=False, record=True):
    """Reference of torch.ops.pylora.merge_: returns the record (counts, entries, esc_index, esc_value), four
    empty tensors with record=False."""
    mp = _MergeProblem("merge_", weight, lora_A, lora_B, scale, fan_in_fan_out)
    S, dtype = mp.S, mp.S.dtype
    # Row chunk by row chunk (the fp32 chains' temporaries stay in the cache): the merged y and the
    # unmerge candidate c; nothing is written to the weight until every chunk is finite.
    y, c = torch.empty_like(S), torch.empty_like(S) if record else None
    s_pos, s_neg, kind = mp.s_tensor(), mp.s_tensor(-1.0), chain_kind(mp.U, mp.V)
    for p0, p1 in _row_chunks(mp.P, mp.Q):
        acc = lora_product_fp32(mp.U, mp.V, (p0, p1), kind)
        w32 = S[p0:p1].float()
        z = fma32(s_pos, acc, w32)
        y[p0:p1] = _round_to(z, dtype)
        bad = ~(torch.isfinite(z) & torch.isfinite(y[p0:p1]))
        if bool(bad.any()):
            f = int(bad.flatten().nonzero()[0, 0])
            p, q = divmod(f, mp.Q)
            delta = mp.s * float(acc[p, q])
            raise _value_error("merge_", f"the merged weight would not be finite at {mp.where(p0 + p, q)} "
                                         f"(weight={float(w32[p, q]):g}, scale*(B@A)={delta:g}); nothing was "
                                         "written")
        if record:
            c[p0:p1] = _round_to(fma32(s_neg, acc, y[p0:p1].float()), dtype)
    if not record:
        S.copy_(y)
        return (torch.empty(0, dtype=torch.int16, device=S.device), torch.empty(0, dtype=torch.int16, device=S.device),
                torch.empty(0, dtype=torch.int64, device=S.device), S.new_empty(0))
    wb, cb = _bits(S.contiguous()).flatten(), _bits(c).flatten()
    flat = (wb != cb).nonzero().flatten()
    d = _keys(wb[flat], dtype) - _keys(cb[flat], dtype)
    small = (d >= MIN_DELTA) & (d <= MAX_DELTA)
    fs = flat[small]
    p, q = fs // mp.Q, fs % mp.Q
    chunk = p * mp.nb + q // CHUNK
    counts = torch.bincount(chunk, minlength=mp.P * mp.nb).to(torch.int16)
    entries = (((q % CHUNK) << 4) | (d[small] & 0xF)).to(torch.int16)
    esc_index = flat[~small].to(torch.int64)
    esc_value = S.flatten()[esc_index].clone()
    S.copy_(y)
    return counts, entries, esc_index, esc_value


def _check_record(op, mp, counts, entries, esc_index, esc_value):
    dev = mp.S.device
    for name, t, dt in (("counts", counts, torch.int16), ("entries", entries, torch.int16),
                        ("esc_index", esc_index, torch.int64), ("esc_value", esc_value, mp.S.dtype)):
        if t.dim() != 1:
            raise _value_error(op, f"{name}.dim()={t.dim()} must be 1")
        if t.dtype != dt:
            raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} must be {_dtype_name(dt)}")
        if t.device != dev:
            raise _value_error(op, f"{name}.device={t.device} must equal weight.device={dev}")
        if not t.is_contiguous():  # as the kernels, which read the record through its data pointer
            raise _value_error(op, f"{name} must be contiguous, got a view with stride {t.stride(0)} "
                                   f"(pass {name}.contiguous())")
    if counts.numel() != mp.P * mp.nb:
        raise _value_error(op, f"counts.numel()={counts.numel()} must equal the weight's record chunks "
                               f"P*ceil(Q/{CHUNK})={mp.P * mp.nb} (the record belongs to a weight of another "
                               "shape or layout)")
    if esc_index.numel() != esc_value.numel():
        raise _value_error(op, f"esc_index.numel()={esc_index.numel()} must equal "
                               f"esc_value.numel()={esc_value.numel()}")
    if counts.numel():
        cmin, total = int(counts.min()), int(counts.long().sum())
        if cmin < 0:
            raise _value_error(op, f"counts holds {cmin}, counts must be >= 0")
        if total != entries.numel():
            raise _value_error(op, f"counts.sum()={total} must equal entries.numel()={entries.numel()}")
    elif entries.numel():
        raise _value_error(op, f"entries.numel()={entries.numel()} must be 0 for an empty weight")
    if entries.numel():
        cmax = int(_entry_position(mp, counts, entries)[1].max())
        if cmax >= mp.Q:
            raise _value_error(op, f"entries point at column {cmax}, columns must be < Q={mp.Q}")
    if esc_index.numel():
        lo, hi = int(esc_index.min()), int(esc_index.max())
        if lo < 0 or hi >= mp.S.numel():
            raise _value_error(op, f"esc_index holds values in [{lo}, {hi}], they must lie in [0, {mp.S.numel()})")


def _entry_position(mp, counts, entries):
    """(storage row, column) of each entry: chunk from counts, column in chunk from the high 12 bits."""
    chunk = torch.repeat_interleave(torch.arange(mp.P * mp.nb, device=counts.device), counts.long())
    return chunk // mp.nb, (chunk % mp.nb) * CHUNK + ((entries.long() >> 4) & 0xFFF)


def unmerge_(weight, lora_A, lora_B, scale, fan_in_fan_out, counts, entries, esc_index, esc_value):
    """Reference of torch.ops.pylora.unmerge_."""
    mp = _MergeProblem("unmerge_", weight, lora_A, lora_B, scale, fan_in_fan_out)
    _check_record("unmerge_", mp, counts, entries, esc_index, esc_value)
    S, dtype = mp.S, mp.S.dtype
    s_neg, kind = mp.s_tensor(-1.0), chain_kind(mp.U, mp.V)
    for p0, p1 in _row_chunks(mp.P, mp.Q):
        acc = lora_product_fp32(mp.U, mp.V, (p0, p1), kind)
        S[p0:p1] = _round_to(fma32(s_neg, acc, S[p0:p1].float()), dtype)
    flat = S.view(-1)
    if entries.numel():
        row, col = _entry_position(mp, counts, entries)
        idx = row * mp.Q + col
        delta = ((entries.long() & 0xF) ^ 8) - 8  # the signed low nibble
        bits = _bits(flat)
        bits[idx] = _unkeys(_keys(bits[idx], dtype) + delta, dtype)
    if esc_index.numel():
        flat[esc_index] = esc_value


# ----------------------------------------------------------------------------------------------
# lora_linear / lora_linear_backward
# ----------------------------------------------------------------------------------------------

_LINEAR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32 (common/dropout_hash.h) on uint32 values held in int64 tensors or Python ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(seed: int, T: int, I: int, dropout_p: float, device=None) -> torch.Tensor:
    """The keep mask of lora_linear, bool [T, I], exactly as the kernels hash it.

    Semantics: with n = t * I + i and seed as 64 unsigned bits, k0 = lo32(seed),
    k1 = mix32(hi32(seed) ^ 0x9E3779B9), hash = mix32(mix32(lo32(n) ^ k0) ^ (hi32(n) + k1)) mod 2^32;
    keep iff hash >= min(round_half_even(dropout_p * 2^32), 2^32 - 1).
    """
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = s & _M32, _mix32((s >> 32) ^ 0x9E3779B9)
    threshold = min(round(dropout_p * 2**32), _M32)
    n = (torch.arange(T, dtype=torch.int64, device=device)[:, None] * I
         + torch.arange(I, dtype=torch.int64, device=device)[None, :])
    h = _mix32(_mix32((n & _M32) ^ k0) ^ (((n >> 32) + k1) & _M32))
    return h >= threshold


def _check_lora_linear(op, x, weight, bias, lora_A, lora_B, scale, dropout_p, fan_in_fan_out):
    """The checks of csrc/common/lora_linear_problem.cpp, in the same order with the same messages. -> (T, I, O, r)."""
    if x.dim() != 2:
        raise _value_error(op, f"x.dim()={x.dim()} must be 2 ([T, I])")
    if weight.dim() != 2:
        raise _value_error(op, f"weight.dim()={weight.dim()} must be 2 ({'[I, O]' if fan_in_fan_out else '[O, I]'})")
    if lora_A.dim() != 2:
        raise _value_error(op, f"lora_A.dim()={lora_A.dim()} must be 2 ([r, I])")
    if lora_B.dim() != 2:
        raise _value_error(op, f"lora_B.dim()={lora_B.dim()} must be 2 ([O, r])")
    if bias is not None and bias.dim() != 1:
        raise _value_error(op, f"bias.dim()={bias.dim()} must be 1 ([O])")
    if x.dtype not in _LINEAR_DTYPES:
        raise _value_error(op, f"x.dtype={_dtype_name(x.dtype)} is not supported (float32, float16, bfloat16, float64)")
    others = (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B))
    for name, t in others:
        if t is not None and t.dtype != x.dtype:
            raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} must equal x.dtype={_dtype_name(x.dtype)}")
    for name, t in others:
        if t is not None and t.device != x.device:
            raise _value_error(op, f"{name}.device={t.device} must equal x.device={x.device}")
    r, I, O = lora_A.shape[0], lora_A.shape[1], lora_B.shape[0]
    if r < 1:
        raise _value_error(op, f"lora_A.size(0)={r} (r) must be >= 1")
    if lora_B.shape[1] != r:
        raise _value_error(op, f"lora_B.size(1)={lora_B.shape[1]} must equal lora_A.size(0)={r} (r)")
    if x.shape[1] != I:
        raise _value_error(op, f"x.size(1)={x.shape[1]} must equal lora_A.size(1)={I} (I)")
    want = (I, O) if fan_in_fan_out else (O, I)
    if tuple(weight.shape) != want:
        raise _value_error(
            op, f"weight.shape={_shape(weight)} must equal {'[I, O]' if fan_in_fan_out else '[O, I]'}="
            f"[{want[0]}, {want[1]}] from lora_A [r, I]={_shape(lora_A)} and lora_B [O, r]={_shape(lora_B)} "
            f"(fan_in_fan_out={fan_in_fan_out})")
    if bias is not None and bias.shape[0] != O:
        raise _value_error(op, f"bias.shape={_shape(bias)} must equal [O]=[{O}]")
    if not math.isfinite(scale):
        raise _value_error(op, f"scale={scale:g} must be finite")
    if not (0.0 <= dropout_p < 1.0):
        raise _value_error(op, f"dropout_p={dropout_p:g} must satisfy 0 <= dropout_p < 1")
    return x.shape[0], I, O, r


def _check_lora_linear_grads(op, T, O, r, x, grad_y, h):
    if grad_y.dim() != 2:
        raise _value_error(op, f"grad_y.dim()={grad_y.dim()} must be 2 ([T, O])")
    if h.dim() != 2:
        raise _value_error(op, f"h.dim()={h.dim()} must be 2 ([T, r])")
    for name, t in (("grad_y", grad_y), ("h", h)):
        if t.dtype != x.dtype:
            raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} must equal x.dtype={_dtype_name(x.dtype)}")
    for name, t in (("grad_y", grad_y), ("h", h)):
        if t.device != x.device:
            raise _value_error(op, f"{name}.device={t.device} must equal x.device={x.device}")
    if tuple(grad_y.shape) != (T, O):
        raise _value_error(op, f"grad_y.shape={_shape(grad_y)} must equal [T, O]=[{T}, {O}]")
    if tuple(h.shape) != (T, r):
        raise _value_error(op, f"h.shape={_shape(h)} must equal [T, r]=[{T}, {r}]")


def _dropped(x, keep, dropout_p):
    """drop(x) = where(keep, x * (1 / (1 - p)), 0); the factor rounds to x's dtype as in the kernels."""
    return torch.where(keep, x * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=x.dtype, device=x.device))


def _seed_value(op, seed) -> int:
    """The ops take the seed as a one-element int64 CPU tensor (the kernels' message); the twin also an int."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device.type != "cpu":
            raise _value_error(op, f"seed must be a one-element int64 tensor on the CPU, got "
                                   f"{_dtype_name(seed.dtype)} of shape {_shape(seed)} on {seed.device}")
        return int(seed)
    return int(seed)


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, seed, fan_in_fan_out):
    """Reference of torch.ops.pylora.lora_linear -> (y, h); plain torch, differentiable by autograd."""
    T, I, _, _ = _check_lora_linear("lora_linear", x, weight, bias, lora_A, lora_B, scale, dropout_p,
                                    fan_in_fan_out)
    seed = _seed_value("lora_linear", seed)
    dx = _dropped(x, dropout_keep(seed, T, I, dropout_p, x.device), dropout_p) if dropout_p > 0 else x
    h = dx @ lora_A.t()
    w_io = weight if fan_in_fan_out else weight.t()
    y = x @ w_io if bias is None else torch.addmm(bias, x, w_io)
    return torch.addmm(y, h, lora_B.t(), alpha=scale), h


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, h, scale, dropout_p, seed, fan_in_fan_out, output_mask):
    """Reference of torch.ops.pylora.lora_linear_backward -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)."""
    op = "lora_linear_backward"
    T, I, O, r = _check_lora_linear(op, x, weight, None, lora_A, lora_B, scale, dropout_p, fan_in_fan_out)
    seed = _seed_value(op, seed)
    _check_lora_linear_grads(op, T, O, r, x, grad_y, h)
    need_x, need_w, need_b, need_A, need_B = (bool(m) for m in output_mask)
    out = [x.new_empty(0) for _ in range(5)]
    if need_B:
        out[4] = (grad_y.t() @ h) * scale
    if need_b:
        out[2] = grad_y.sum(0)
    if need_w:
        out[1] = x.t() @ grad_y if fan_in_fan_out else grad_y.t() @ x
    if need_x or need_A:
        u = (grad_y @ lora_B) * scale
        keep = dropout_keep(seed, T, I, dropout_p, x.device) if dropout_p > 0 else None
        if need_x:
            lora = u @ lora_A
            if keep is not None:
                lora = _dropped(lora, keep, dropout_p)
            out[0] = grad_y @ (weight.t() if fan_in_fan_out else weight) + lora
        if need_A:
            out[3] = u.t() @ (_dropped(x, keep, dropout_p) if keep is not None else x)
    return tuple(out)
# lora_apply_: batched LoRA over a paged pool of rank rows
# ----------------------------------------------------------------------------------------------

def check_lora_apply_args(op, y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot):
    """Dims, dtypes, devices and shapes of lora_apply_, with the messages of csrc/common/lora_apply_problem.cpp."""
    for name, t, dim, shape in (("y", y, 2, "[T, O]"), ("x", x, 2, "[T, I]"), ("A_rows", A_rows, 2, "[P, I]"),
                                ("B_rows", B_rows, 2, "[P, O]"), ("row_ptr", row_ptr, 1, "[N+1]"),
                                ("row_idx", row_idx, 1, "[nnz]"), ("scales", scales, 1, "[N]"),
                                ("seg_ptr", seg_ptr, 1, "[S+1]"), ("seg_slot", seg_slot, 1, "[S]")):
        if t.dim() != dim:
            raise _value_error(op, f"{name}.dim()={t.dim()} must be {dim} ({shape})")
    if y.dtype not in _STORAGE_DTYPES:
        raise _value_error(op, f"y.dtype={_dtype_name(y.dtype)} is not supported (float32, float16, bfloat16)")
    for name, t in (("x", x), ("A_rows", A_rows), ("B_rows", B_rows)):
        if t.dtype != y.dtype:
            raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} must equal y.dtype={_dtype_name(y.dtype)}")
    for name, t in (("row_ptr", row_ptr), ("row_idx", row_idx), ("seg_ptr", seg_ptr), ("seg_slot", seg_slot)):
        if t.dtype != torch.int32:
            raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} must be int32")
    if scales.dtype != torch.float32:
        raise _value_error(op, f"scales.dtype={_dtype_name(scales.dtype)} must be float32")
    for name, t in (("x", x), ("A_rows", A_rows), ("B_rows", B_rows), ("row_ptr", row_ptr), ("row_idx", row_idx),
                    ("scales", scales), ("seg_ptr", seg_ptr), ("seg_slot", seg_slot)):
        if t.device != y.device:
            raise _value_error(op, f"{name}.device={t.device} must equal y.device={y.device}")
    if x.shape[0] != y.shape[0]:
        raise _value_error(op, f"x.size(0)={x.shape[0]} must equal y.size(0)={y.shape[0]} (T)")
    if A_rows.shape[1] != x.shape[1]:
        raise _value_error(op, f"A_rows.size(1)={A_rows.shape[1]} must equal x.size(1)={x.shape[1]} (I)")
    if B_rows.shape[1] != y.shape[1]:
        raise _value_error(op, f"B_rows.size(1)={B_rows.shape[1]} must equal y.size(1)={y.shape[1]} (O)")
    if B_rows.shape[0] != A_rows.shape[0]:
        raise _value_error(op, f"B_rows.size(0)={B_rows.shape[0]} must equal A_rows.size(0)={A_rows.shape[0]} (P)")
    if row_ptr.numel() < 1:
        raise _value_error(op, f"row_ptr.numel()={row_ptr.numel()} must be >= 1 (N+1)")
    if scales.numel() != row_ptr.numel() - 1:
        raise _value_error(op, f"scales.numel()={scales.numel()} must equal row_ptr.numel()-1={row_ptr.numel() - 1} (N)")
    if seg_ptr.numel() < 1:
        raise _value_error(op, f"seg_ptr.numel()={seg_ptr.numel()} must be >= 1 (S+1)")
    if seg_slot.numel() != seg_ptr.numel() - 1:
        raise _value_error(op, f"seg_slot.numel()={seg_slot.numel()} must equal seg_ptr.numel()-1="
                               f"{seg_ptr.numel() - 1} (S)")
    if torch._debug_has_internal_overlap(y) == 1:
        raise _value_error(op, f"y.stride()={list(y.stride())} makes elements of y share memory; "
                               "y must not overlap itself")


def _first(mask: torch.Tensor) -> int | None:
    idx = mask.nonzero()
    return int(idx[0, 0]) if idx.numel() else None


def _check_pointer(op: str, name: str, ptr: torch.Tensor) -> None:
    """A CSR-style pointer starts at 0 and never decreases (same messages as the C++ check)."""
    if int(ptr[0]) != 0:
        raise _value_error(op, f"{name}[0]={int(ptr[0])} must be 0")
    k = _first(ptr[1:] < ptr[:-1])
    if k is not None:
        raise _value_error(op, f"{name}[{k + 1}]={int(ptr[k + 1])} must be >= {name}[{k}]={int(ptr[k])} "
                               f"({name} is non-decreasing)")


def check_lora_apply_plan(row_ptr, row_idx, seg_ptr, seg_slot, T, P, op="lora_apply_"):
    """The index contents of lora_apply_, checked in the C++ op's order with its messages.

    row_ptr [N+1] starts at 0, never decreases and ends at row_idx.numel(); row_idx [nnz] in [0, P);
    seg_ptr [S+1] starts at 0, never decreases and ends at T; seg_slot [S] in [-1, N).
    Tensors on a GPU are copied to the host in one transfer (this synchronises with the device).
    """
    sizes = [row_ptr.numel(), row_idx.numel(), seg_ptr.numel(), seg_slot.numel()]
    flat = torch.cat([row_ptr.reshape(-1), row_idx.reshape(-1), seg_ptr.reshape(-1), seg_slot.reshape(-1)]).cpu()
    rp, ri, sp, ss = (t.long() for t in torch.split(flat, sizes))
    N, nnz, S = sizes[0] - 1, sizes[1], sizes[3]
    _check_pointer(op, "row_ptr", rp)
    if int(rp[N]) != nnz:
        raise _value_error(op, f"row_ptr[N={N}]={int(rp[N])} must equal row_idx.numel()={nnz} (nnz)")
    k = _first((ri < 0) | (ri >= P))
    if k is not None:
        raise _value_error(op, f"row_idx[{k}]={int(ri[k])} must be in [0, P={P})")
    _check_pointer(op, "seg_ptr", sp)
    if int(sp[S]) != T:
        raise _value_error(op, f"seg_ptr[S={S}]={int(sp[S])} must equal T={T}")
    g = _first((ss < -1) | (ss >= N))
    if g is not None:
        raise _value_error(op, f"seg_slot[{g}]={int(ss[g])} must be in [-1, N={N})")


def lora_apply_(y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot):
    """Reference of torch.ops.pylora.lora_apply_: one segment at a time, fp32 matmuls, one rounding into y."""
    check_lora_apply_args("lora_apply_", y, x, A_rows, B_rows, row_ptr, row_idx, scales, seg_ptr, seg_slot)
    check_lora_apply_plan(row_ptr, row_idx, seg_ptr, seg_slot, y.shape[0], A_rows.shape[0])
    rp, sp, ss = row_ptr.tolist(), seg_ptr.tolist(), seg_slot.tolist()
    for g, s in enumerate(ss):
        t0, t1 = sp[g], sp[g + 1]
        # No adapter, no tokens, or a slot without rows here: nothing is added and y keeps its bits.
        if s == -1 or t1 == t0 or rp[s + 1] == rp[s]:
            continue
        rows = row_idx[rp[s]:rp[s + 1]].long()
        h = x[t0:t1].float() @ A_rows[rows].float().t()  # [n, r]
        delta = h @ B_rows[rows].float()  # [n, O]
        y[t0:t1] = torch.addcmul(y[t0:t1].float(), scales[s], delta).to(y.dtype)


# ----------------------------------------------------------------------------------------------
# lora_multi: many adapters in one batch, each its own factor tensors, differentiable
# ----------------------------------------------------------------------------------------------

def check_lora_multi(op, x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx):
    """The checks of lora_multi at its boundary, with the kernels' messages. -> (T, I, O, N).
    tok_idx contents are checked when it lives on the CPU (on a GPU that would synchronise)."""
    if x.dim() != 2:
        raise _value_error(op, f"x.dim()={x.dim()} must be 2 ([T, I])")
    if x.dtype not in _LINEAR_DTYPES:
        raise _value_error(op, f"x.dtype={_dtype_name(x.dtype)} is not supported (float32, float16, bfloat16, float64)")
    N = len(lora_A)
    if N < 1:
        raise _value_error(op, "len(lora_A)=0 (N) must be >= 1: an adapter to apply")
    for name, seq in (("lora_B", lora_B), ("scales", scales), ("dropout_p", dropout_p), ("seeds", seeds)):
        if len(seq) != N:
            raise _value_error(op, f"len({name})={len(seq)} must equal len(lora_A)={N} (N)")
    if len(tok_ptr) != N + 1:
        raise _value_error(op, f"len(tok_ptr)={len(tok_ptr)} must equal N+1={N + 1}")
    T, I = x.shape
    O = lora_B[0].shape[0] if lora_B[0].dim() == 2 else -1
    for k in range(N):
        A, B = lora_A[k], lora_B[k]
        if A.dim() != 2:
            raise _value_error(op, f"lora_A[{k}].dim()={A.dim()} must be 2 ([r, I])")
        if B.dim() != 2:
            raise _value_error(op, f"lora_B[{k}].dim()={B.dim()} must be 2 ([O, r])")
        for name, t in ((f"lora_A[{k}]", A), (f"lora_B[{k}]", B)):
            if t.dtype != x.dtype:
                raise _value_error(op, f"{name}.dtype={_dtype_name(t.dtype)} must equal x.dtype={_dtype_name(x.dtype)}")
            if t.device != x.device:
                raise _value_error(op, f"{name}.device={t.device} must equal x.device={x.device}")
        if A.shape[0] < 1:
            raise _value_error(op, f"lora_A[{k}].size(0)={A.shape[0]} (r) must be >= 1")
        if A.shape[1] != I:
            raise _value_error(op, f"lora_A[{k}].size(1)={A.shape[1]} must equal x.size(1)={I} (I)")
        if B.shape[1] != A.shape[0]:
            raise _value_error(op, f"lora_B[{k}].size(1)={B.shape[1]} must equal lora_A[{k}].size(0)={A.shape[0]} (r)")
        if B.shape[0] != O:
            raise _value_error(op, f"lora_B[{k}].size(0)={B.shape[0]} must equal lora_B[0].size(0)={O} (O)")
        if not math.isfinite(scales[k]):
            raise _value_error(op, f"scales[{k}]={scales[k]:g} must be finite")
        if not (0.0 <= dropout_p[k] < 1.0):
            raise _value_error(op, f"dropout_p[{k}]={dropout_p[k]:g} must satisfy 0 <= dropout_p < 1")
    if tok_idx.dim() != 1 or tok_idx.dtype != torch.int64:
        raise _value_error(op, f"tok_idx must be a 1-D int64 tensor, got {_dtype_name(tok_idx.dtype)} of shape "
                               f"{_shape(tok_idx)}")
    if tok_idx.device != x.device:
        raise _value_error(op, f"tok_idx.device={tok_idx.device} must equal x.device={x.device}")
    if tok_ptr[0] != 0:
        raise _value_error(op, f"tok_ptr[0]={tok_ptr[0]} must be 0")
    for k in range(N):
        if tok_ptr[k + 1] < tok_ptr[k]:
            raise _value_error(op, f"tok_ptr[{k + 1}]={tok_ptr[k + 1]} must be >= tok_ptr[{k}]={tok_ptr[k]}")
    if tok_ptr[N] != tok_idx.numel():
        raise _value_error(op, f"tok_ptr[N]={tok_ptr[N]} must equal tok_idx.numel()={tok_idx.numel()}")
    if tok_idx.device.type == "cpu":
        check_lora_multi_tokens(tok_idx, T, op)
    return T, I, O, N


def check_lora_multi_tokens(tok_idx, T, op="lora_multi"):
    """tok_idx's values in [0, T), each token at most once (one adapter per token)."""
    idx = tok_idx.cpu()
    bad = _first((idx < 0) | (idx >= T))
    if bad is not None:
        raise _value_error(op, f"tok_idx[{bad}]={int(idx[bad])} must be in [0, T={T})")
    if idx.numel() > 1:
        seen = torch.zeros(T, dtype=torch.int64)
        seen.index_add_(0, idx, torch.ones_like(idx))
        twice = _first(seen > 1)
        if twice is not None:
            at = int((idx == twice).nonzero()[1, 0])
            raise _value_error(op, f"tok_idx[{at}]={twice} appears more than once: a token has one adapter")


def _group_x(x, tok_idx, tok_ptr, k):
    idx = tok_idx[tok_ptr[k]:tok_ptr[k + 1]]
    return idx, x.index_select(0, idx)


def lora_multi(x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx):
    """Reference of torch.ops.pylora.lora_multi -> (y, h); plain torch, differentiable by autograd."""
    T, I, O, N = check_lora_multi("lora_multi", x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx)
    y = x.new_zeros(T, O)
    hs = []
    for k in range(N):
        idx, xk = _group_x(x, tok_idx, tok_ptr, k)
        n, p = idx.numel(), float(dropout_p[k])
        dk = _dropped(xk, dropout_keep(seeds[k], n, I, p, x.device), p) if p > 0 else xk
        h = dk @ lora_A[k].t()
        hs.append(h)
        y = y.index_copy(0, idx, (h @ lora_B[k].t()) * scales[k])
    return y, hs


def lora_multi_backward(grad_y, x, lora_A, lora_B, h, scales, dropout_p, seeds, tok_ptr, tok_idx, output_mask):
    """Reference of torch.ops.pylora.lora_multi_backward -> (grad_x, grad_A list, grad_B list)."""
    op = "lora_multi_backward"
    T, I, O, N = check_lora_multi(op, x, lora_A, lora_B, scales, dropout_p, seeds, tok_ptr, tok_idx)
    if grad_y.dim() != 2 or tuple(grad_y.shape) != (T, O):
        raise _value_error(op, f"grad_y.shape={_shape(grad_y)} must equal [T, O]=[{T}, {O}]")
    if len(h) != N:
        raise _value_error(op, f"len(h)={len(h)} must equal N={N}")
    need_x, need_A, need_B = (bool(m) for m in output_mask)
    grad_x = x.new_zeros(T, I) if need_x else x.new_empty(0)
    grad_A, grad_B = [], []
    for k in range(N):
        idx, xk = _group_x(x, tok_idx, tok_ptr, k)
        n, p = idx.numel(), float(dropout_p[k])
        if tuple(h[k].shape) != (n, lora_A[k].shape[0]):
            raise _value_error(op, f"h[{k}].shape={_shape(h[k])} must equal [n, r]=[{n}, {lora_A[k].shape[0]}]")
        gy = grad_y.index_select(0, idx)
        keep = dropout_keep(seeds[k], n, I, p, x.device) if p > 0 else None
        grad_B.append((gy.t() @ h[k]) * scales[k] if need_B else x.new_empty(0))
        u = (gy @ lora_B[k]) * scales[k]
        if need_x:
            lora = u @ lora_A[k]
            grad_x.index_copy_(0, idx, _dropped(lora, keep, p) if keep is not None else lora)
        grad_A.append(u.t() @ (_dropped(xk, keep, p) if keep is not None else xk) if need_A else x.new_empty(0))
    return grad_x, grad_A, grad_B
