"""FP8 number formats, act_quant and the FP8 GEMM (SPEC sections 1-3).

Conversions use torch, and are cross-checked against an independent
table-driven round-to-nearest-even implementation in numpy
(``check_fp8_rounding``) on every tensor the generator writes.
"""

import math

import numpy as np
import torch

E4M3_MAX = 448.0
E4M3FNUZ_MAX = 240.0
BLOCK = 128

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e4m3fnuz": torch.float8_e4m3fnuz}
FP8_MAX = {"e4m3": E4M3_MAX, "e4m3fnuz": E4M3FNUZ_MAX}


def ceil_div(a, b):
    return -(-a // b)


def to_fp8(x: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """f32 -> fp8, round to nearest even, saturating (SPEC section 1).

    torch 2.15 saturates for e4m3fn but turns out-of-range values into NaN
    for e4m3fnuz, so clamp first (clamp keeps NaN, and values in
    (max, next-binade midpoint) round to max under RNE anyway).
    """
    m = FP8_MAX[fmt]
    x = x.to(torch.float32)
    return torch.clamp(x, -m, m).to(FP8_DTYPES[fmt])


# ---------------------------------------------------------------- reference
def _fp8_table(fmt):
    """All non-negative finite values of the format, indexed by code."""
    codes = np.arange(128)
    e = (codes >> 3) & 0xF
    m = codes & 7
    bias = 7 if fmt == "e4m3" else 8
    val = np.where(e == 0, m / 8.0 * 2.0 ** (1 - bias), (1 + m / 8.0) * 2.0 ** (e - bias))
    n = 127 if fmt == "e4m3" else 128  # e4m3fn: 0x7f is NaN
    return val[:n]


def fp8_bits_reference(x_f32: np.ndarray, fmt: str) -> np.ndarray:
    """Independent RNE + saturation, returns the uint8 codes."""
    x = np.asarray(x_f32, dtype=np.float64).reshape(-1)
    table = _fp8_table(fmt)
    a = np.abs(x)
    hi = np.clip(np.searchsorted(table, a, side="left"), 0, len(table) - 1)
    lo = np.clip(hi - 1, 0, len(table) - 1)
    dlo = a - table[lo]
    dhi = table[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo)
    code = np.where(a >= table[-1], len(table) - 1, code)  # saturate
    neg = np.signbit(x)
    if fmt == "e4m3":
        out = np.where(neg, code | 0x80, code)
        out = np.where(np.isnan(x), 0x7F | np.where(neg, 0x80, 0), out)
    else:
        out = np.where(neg & (code != 0), code | 0x80, code)
        out = np.where(np.isnan(x), 0x80, out)
    return out.astype(np.uint8)


def check_fp8_rounding(x_f32: torch.Tensor, q: torch.Tensor, fmt: str):
    ref = fp8_bits_reference(x_f32.to(torch.float32).numpy(), fmt)
    got = q.contiguous().view(torch.uint8).reshape(-1).numpy()
    bad = np.nonzero(ref != got)[0]
    if len(bad):
        i = bad[0]
        raise AssertionError(
            f"fp8 {fmt} rounding mismatch at {i}: x={x_f32.reshape(-1)[i].item()!r} "
            f"torch=0x{got[i]:02x} ref=0x{ref[i]:02x} ({len(bad)} mismatches)"
        )


# ---------------------------------------------------------------- act_quant
def ue8m0_round_up(s: torch.Tensor) -> torch.Tensor:
    """s -> 2^ceil(log2(s)) exactly, for positive finite f32 s."""
    mant, exp = torch.frexp(s)  # s = mant * 2^exp, mant in [0.5, 1)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(s), exp).to(torch.float32)


def act_quant(x: torch.Tensor, scale_fmt: str = "float", fmt: str = "e4m3", check=True):
    """SPEC section 2. x [m, k] (any float dtype holding f32/bf16 values).

    All arithmetic is f32: amax = max(|x|, 1e-4), s = amax / fp8_max
    (ue8m0: rounded up to a power of two), q = fp8(x / s).
    """
    x = x.to(torch.float32)
    m, k = x.shape
    assert k % BLOCK == 0, k
    g = x.reshape(m, k // BLOCK, BLOCK)
    amax = g.abs().amax(dim=-1).clamp_min(torch.tensor(1e-4, dtype=torch.float32))
    s = amax / torch.tensor(FP8_MAX[fmt], dtype=torch.float32)
    if scale_fmt == "ue8m0":
        s = ue8m0_round_up(s)
    else:
        assert scale_fmt == "float", scale_fmt
    y = (g / s.unsqueeze(-1)).reshape(m, k)
    q = to_fp8(y, fmt)
    if check:
        check_fp8_rounding(y, q, fmt)
    return q, s.contiguous()


# ---------------------------------------------------------------- FP8 GEMM
def fp8_gemm(qa, sa, qb, sb, acc=torch.float64):
    """SPEC section 3.  D[m,n] = sum_kb (sum_{k in kb} a b) * sa[m,kb] * sb[n//128,kb].

    With acc=float64 the inner 128-wide sums are exact (products of two
    e4m3 values have <= 8 significant bits and span < 2^43), so the result
    is the exact value of the formula up to the final f64 additions.
    Returns the result in ``acc``; the caller rounds to the output dtype.
    acc=float32 emulates an f32-accumulating kernel (used only to measure).
    """
    m, k = qa.shape
    n = qb.shape[0]
    kb = k // BLOCK
    a = qa.to(acc).reshape(m, kb, BLOCK)
    b = qb.to(acc).reshape(n, kb, BLOCK)
    inner = torch.einsum("mbk,nbk->mnb", a, b)
    sbx = sb.to(acc).repeat_interleave(BLOCK, dim=0)[:n]  # [n, kb]
    scaled = inner * sa.to(acc).unsqueeze(1) * sbx.unsqueeze(0)
    return scaled.sum(-1)


def block_expand(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[ceil(rows/128), ceil(cols/128)] -> [rows, cols]."""
    return s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]


def dequant_f32(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q.float() * scale, one f32 rounding (what DeepSeek's weight_dequant does)."""
    return q.to(torch.float32) * block_expand(s.to(torch.float32), *q.shape)


def dequant_f64(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact dequantized value (the f32 product would need 28 bits)."""
    return q.to(torch.float64) * block_expand(s.to(torch.float64), *q.shape)


def quantize_weight(w: np.ndarray, scale_mult: np.ndarray):
    """Block-quantize a master weight w [out, in] (float64).

    Per 128x128 block: s = amax(block) / 448 * scale_mult[block] (in f32),
    q = e4m3(w / s).  scale_mult >= 1 varies the scales strongly from block
    to block while keeping q in range.
    """
    out_f, in_f = w.shape
    rb, cb = ceil_div(out_f, BLOCK), ceil_div(in_f, BLOCK)
    s = np.zeros((rb, cb), dtype=np.float32)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
            s[i, j] = np.float32(np.abs(blk).max() / E4M3_MAX * scale_mult[i, j])
    st = torch.from_numpy(s)
    y = torch.from_numpy(w) / block_expand(st.to(torch.float64), out_f, in_f)
    y32 = y.to(torch.float32)
    q = to_fp8(y32, "e4m3")
    check_fp8_rounding(y32, q, "e4m3")
    return q, st


def log_uniform(rng, lo, hi, shape):
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=shape))


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 (RNE) with a single rounding, also from float64.

    torch converts f64 -> bf16 through f32, which double-rounds; here the
    f64 -> f32 step uses round-to-odd, which makes the second (RNE) step
    exact-once.
    """
    if x.dtype != torch.float64:
        return x.to(torch.bfloat16)
    y = x.to(torch.float32)
    over = y.to(torch.float64).abs() > x.abs()
    y = torch.where(over, torch.nextafter(y, torch.zeros_like(y)), y)
    inexact = y.to(torch.float64) != x
    bits = y.view(torch.int32)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(torch.bfloat16)
