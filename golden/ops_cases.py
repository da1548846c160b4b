"""Op-level golden cases (golden/ops/<case>.safetensors).

Each file: inputs under plain names, expected outputs under
``expected.<name>``; ``__metadata__`` has ``op``, ``params`` (JSON object,
sorted keys) and ``description``.  Expected values are computed in float64
from the stored inputs and rounded once to the output dtype, except
act-quant, which is the exact f32 arithmetic of SPEC section 2.
"""

import json
import math

import numpy as np
import torch

import stio
from quant import (BLOCK, act_quant, ceil_div, fp8_gemm, log_uniform,
                   quantize_weight, to_bf16, _fp8_table)
from v3ref import apply_rope, noaux_tc, rope_angles, rope_freqs, yarn_mscale

OPS_SEED = 777


def _f32(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float32))


def _bf16(a):
    return to_bf16(torch.from_numpy(np.asarray(a, dtype=np.float64)))


class CaseWriter:
    def __init__(self, outdir):
        self.outdir = outdir
        self.names = []

    def write(self, name, op, params, description, inputs, expected):
        tensors = dict(inputs)
        for k, v in expected.items():
            tensors["expected." + k] = v
        md = {
            "op": op,
            "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
            "description": description,
        }
        stio.save(self.outdir / f"{name}.safetensors", tensors, md)
        self.names.append(name)


# ---------------------------------------------------------------- act-quant
def _midpoints(fmt):
    t = _fp8_table(fmt)
    return (t[:-1] + t[1:]) / 2.0


def act_quant_cases(w: CaseWriter, rng):
    def emit(name, x, scale_fmt, fmt, desc):
        q, s = act_quant(x, scale_fmt, fmt, check=True)
        w.write(name, "act-quant", {"format": fmt, "scale_fmt": scale_fmt},
                desc + " Bit-exact: q compared as raw bytes, s as f32 bits.",
                {"x": x}, {"q": q, "s": s})

    # --- float scales, e4m3, f32 input: 8 rows x 4 groups of 128
    fmt = "e4m3"
    mids = _midpoints(fmt)
    x = rng.standard_normal((8, 512))
    # row 0: random; row 1: zeros | tiny (amax < 1e-4) | amax exactly at the clamp | huge
    x[1, 0:128] = 0.0
    x[1, 128:256] = rng.standard_normal(128) * 1e-6
    x[1, 256:384] = rng.uniform(-5e-5, 5e-5, 128)
    x[1, 256] = 1e-4
    x[1, 384:512] = rng.standard_normal(128) * 1e30
    # rows 2/3: power-of-two scale (amax = 56 -> s = 0.125 exactly), x/s hits exact midpoints
    for r, sign in ((2, 1.0), (3, -1.0)):
        v = np.concatenate([mids[:60], mids[-60:], [0.0] * 8])[:128]
        g = np.zeros(128)
        g[:len(v)] = v
        g[-1] = 448.0
        x[r, 0:128] = sign * g * 0.125
        # the rest: midpoints with a random (non power of two) amax
        x[r, 128:256] = sign * rng.choice(mids, 128) * 0.01
        x[r, 256:384] = rng.standard_normal(128) * 1e-3
        x[r, 384:512] = sign * rng.choice(mids[:20], 128) * 2.0 ** -12  # subnormal midpoints
        x[r, 384] = sign * 448.0 * 2.0 ** -12
    # row 4: signed zeros and values that underflow to (negative) zero
    x[4, 0:128] = rng.choice([0.0, -0.0, 1e-12, -1e-12, 3.0, -3.0], 128)
    x[4, 127] = 7.0
    # row 5: huge dynamic range inside a group
    x[5, :] = rng.standard_normal(512) * 1e-3
    x[5, ::97] = 1e3
    # rows 6/7: per-group magnitudes log-uniform over 1e-3 .. 1e3
    for r in (6, 7):
        x[r] = rng.standard_normal(512) * np.repeat(log_uniform(rng, 1e-3, 1e3, 4), 128)
    emit("act_quant_float_e4m3_f32", _f32(x), "float", fmt,
         "f32 input; rows: random; zero/tiny/clamped/1e30 groups; exact RNE midpoints with a power-of-two "
         "scale (+ and -), incl. subnormal midpoints; signed zeros and underflow to -0; huge dynamic range; "
         "log-uniform group magnitudes.")

    # --- bf16 input
    xb = rng.standard_normal((16, 256)) * np.repeat(log_uniform(rng, 1e-2, 1e2, (16, 2)), 128, axis=1)
    xb[0, :128] = np.resize(mids, 128) * 0.25  # midpoints (5 significant bits: exact in bf16)
    xb[0, 127] = 448.0 * 0.25
    xb[1, 128:] = 0.0
    emit("act_quant_float_e4m3_bf16", _bf16(xb), "float", fmt,
         "bf16 input (converted exactly to f32 first); includes an exact-midpoint group and an all-zero group.")

    # --- UE8M0 scales
    xu = rng.standard_normal((8, 384))
    xu[0, 0:128] = rng.uniform(-1, 1, 128) * 56.0
    xu[0, 0] = 448.0 * 2.0 ** -3          # amax/448 is exactly 2^-3: s stays 2^-3
    xu[0, 128:256] = rng.uniform(-1, 1, 128)
    xu[0, 128] = np.float32(448.0 * 2.0 ** -3) * (1 + 2.0 ** -20)  # just above: s = 2^-2
    xu[1, 0:128] = 0.0                    # amax clamps to 1e-4: s = 2^ceil(log2(1e-4/448)) = 2^-22
    xu[1, 128:256] = rng.choice(mids, 128) * 0.5 * np.sign(rng.standard_normal(128))
    xu[1, 128] = 200.0                     # amax 216 -> s rounds up to 0.5, x/s hits exact midpoints
    xu[2:] *= np.repeat(log_uniform(rng, 1e-4, 1e4, (6, 3)), 128, axis=1)
    emit("act_quant_ue8m0_e4m3_f32", _f32(xu), "ue8m0", fmt,
         "UE8M0 scales: s = 2^ceil(log2(amax/448)) with amax/448 computed by f32 division (SPEC section 1/2); "
         "includes amax/448 exactly a power of two (kept), one ulp-ish above (rounded up), the 1e-4 clamp, "
         "and RNE midpoints.")

    # --- e4m3fnuz
    fz = "e4m3fnuz"
    mz = _midpoints(fz)
    xz = rng.standard_normal((8, 256)) * np.repeat(log_uniform(rng, 1e-3, 1e3, (8, 2)), 128, axis=1)
    g = np.zeros(128)
    g[:120] = np.concatenate([mz[:60], mz[-60:]])
    g[120:124] = [0.0, -0.0, -1e-9, 1e-9]
    g[127] = 240.0
    xz[0, 0:128] = g * 0.25               # amax 60 -> s = 0.25 exactly
    xz[1, 0:128] = -g * 0.25
    xz[2, 128:256] = 0.0
    emit("act_quant_float_e4m3fnuz_f32", _f32(xz), "float", fz,
         "e4m3fnuz (max 240, bias 8, NaN 0x80, no negative zero: -0 and negative underflow give 0x00); "
         "s = amax/240; exact midpoints with a power-of-two scale.")
    xz2 = rng.standard_normal((4, 256)) * np.repeat(log_uniform(rng, 1e-3, 1e3, (4, 2)), 128, axis=1)
    xz2[0, 0] = 240.0 * 2.0 ** 2
    emit("act_quant_ue8m0_e4m3fnuz_f32", _f32(xz2), "ue8m0", fz,
         "e4m3fnuz with UE8M0 scales: s = 2^ceil(log2(amax/240)).")


# ---------------------------------------------------------------- FP8 GEMMs
def _rand_act_fp8(rng, shape):
    """Realistic FP8 activations: act_quant of rows with varied magnitudes."""
    m, k = shape
    x = rng.standard_normal((m, k)) * np.repeat(log_uniform(rng, 0.1, 10.0, (m, k // BLOCK)), BLOCK, axis=1)
    return act_quant(_f32(x), "float", "e4m3")


def _rand_weight_fp8(rng, n, k):
    w = rng.standard_normal((n, k)) / math.sqrt(k)
    return quantize_weight(w, log_uniform(rng, 1.0, 16.0, (ceil_div(n, BLOCK), ceil_div(k, BLOCK))))


def _round_out(d, out_dtype):
    return to_bf16(d) if out_dtype == "bf16" else d.to(torch.float32)


def fp8_gemm_cases(w: CaseWriter, rng):
    for (m, n, k, od) in ((37, 576, 512, "bf16"), (64, 256, 256, "f32"), (5, 320, 384, "bf16"),
                          (1, 128, 128, "bf16")):
        a, sa = _rand_act_fp8(rng, (m, k))
        b, sb = _rand_weight_fp8(rng, n, k)
        d = fp8_gemm(a, sa, b, sb, acc=torch.float64)
        w.write(f"fp8_gemm_m{m}_n{n}_k{k}_{od}", "fp8-gemm", {"out_dtype": od},
                f"D = sum_kb (a.b over the 128-wide K block) * sa[m,kb] * sb[n//128,kb]; m={m} n={n} k={k}"
                + (" (n partial: last 128-row block of b has %d rows)" % (n % BLOCK) if n % BLOCK else "")
                + f"; expected evaluated in float64 from the stored e4m3 inputs and scales, rounded once to {od}.",
                {"a": a, "sa": sa, "b": b, "sb": sb}, {"d": _round_out(d, od)})

    # grouped, contiguous layout
    G, n, k = 4, 192, 256
    blocks = [2, 0, -1, 3, 0]  # group 1 has no rows; one padding block
    m_sum = BLOCK * len(blocks)
    a, sa = _rand_act_fp8(rng, (m_sum, k))
    bs, sbs = zip(*[_rand_weight_fp8(rng, n, k) for _ in range(G)])
    b, sb = torch.stack(bs), torch.stack(sbs)
    m_idx = torch.tensor(np.repeat(blocks, BLOCK), dtype=torch.int32)
    d = torch.zeros(m_sum, n, dtype=torch.float64)
    for blk, g in enumerate(blocks):
        if g < 0:
            continue
        rows = slice(blk * BLOCK, (blk + 1) * BLOCK)
        d[rows] = fp8_gemm(a[rows], sa[rows], b[g], sb[g], acc=torch.float64)
    w.write("fp8_grouped_contiguous_g4_n192_k256", "fp8-grouped-contiguous", {"out_dtype": "bf16"},
            "MoE prefill layout: row r uses group m_indices[r] (constant per 128-row block, blocks = "
            f"{blocks}); -1 marks padding rows, whose expected value is stored as 0 and is NOT checked. "
            "Group 1 has no rows; n=192 has a partial last scale block. Expected in float64, rounded once to bf16.",
            {"a": a, "sa": sa, "b": b, "sb": sb, "m_indices": m_idx}, {"d": to_bf16(d)})

    # grouped, masked layout
    G, m_max, n, k = 3, 64, 256, 256
    masked = [17, 0, 64]
    acts = [_rand_act_fp8(rng, (m_max, k)) for _ in range(G)]
    a = torch.stack([x[0] for x in acts])
    sa = torch.stack([x[1] for x in acts])
    bs, sbs = zip(*[_rand_weight_fp8(rng, n, k) for _ in range(G)])
    b, sb = torch.stack(bs), torch.stack(sbs)
    d = torch.zeros(G, m_max, n, dtype=torch.float64)
    for g in range(G):
        mm = masked[g]
        if mm:
            d[g, :mm] = fp8_gemm(a[g, :mm], sa[g, :mm], b[g], sb[g], acc=torch.float64)
    w.write("fp8_grouped_masked_g3_m64_n256_k256", "fp8-grouped-masked", {"out_dtype": "bf16"},
            f"MoE decode layout: group g computes rows < masked_m[g] (masked_m = {masked}); rows >= masked_m "
            "are stored as 0 and are NOT checked (their a rows hold ordinary random data). Expected in float64, "
            "rounded once to bf16.",
            {"a": a, "sa": sa, "b": b, "sb": sb, "masked_m": torch.tensor(masked, dtype=torch.int32)},
            {"d": to_bf16(d)})


# ------------------------------------------------- grouped plain GEMMs (f32/bf16)
GROUPED_SEED = OPS_SEED + 1  # own stream: the cases above keep their bytes


def gemm_grouped_cases(w: CaseWriter):
    """gemm_grouped_contiguous / gemm_grouped_masked (DeepGEMM's
    m_grouped_bf16_gemm_nt_*): every computed row is a.b[g]^T of that row and
    its group, evaluated in float64 from the stored inputs, rounded once."""
    rng = np.random.default_rng(GROUPED_SEED)

    # contiguous, bf16 operands and output: 128-row blocks (group, rows); the
    # rest of each block is padding (-1); group 1 has no rows.
    G, n, k = 4, 192, 256
    blocks = [(2, 100), (0, 128), (3, 37), (0, 128)]
    m_idx = np.concatenate([np.r_[np.full(r, g), np.full(BLOCK - r, -1)] for g, r in blocks])
    m_sum = len(m_idx)
    a = _bf16(rng.standard_normal((m_sum, k)))
    b = _bf16(rng.standard_normal((G, n, k)) / math.sqrt(k))
    d = torch.zeros(m_sum, n, dtype=torch.float64)
    for r, g in enumerate(m_idx):
        if g >= 0:
            d[r] = b[g].to(torch.float64) @ a[r].to(torch.float64)
    w.write("gemm_grouped_contiguous_g4_n192_k256_bf16", "gemm-grouped-contiguous",
            {"out_dtype": "bf16"},
            "MoE prefill layout for f32/bf16 experts: row r uses group m_indices[r] (blocks (group, rows) = "
            f"{blocks}, each padded to 128 rows with -1); -1 rows are stored as 0 and are NOT checked. "
            "Group 1 has no rows. bf16 inputs; expected in float64, rounded once to bf16.",
            {"a": a, "b": b, "m_indices": torch.tensor(m_idx, dtype=torch.int32)},
            {"d": to_bf16(d)})

    # masked, f32 operands and output.
    G, m_max, n, k = 3, 64, 256, 320
    masked = [17, 0, 64]
    a = _f32(rng.standard_normal((G, m_max, k)))
    b = _f32(rng.standard_normal((G, n, k)) / math.sqrt(k))
    d = torch.zeros(G, m_max, n, dtype=torch.float64)
    for g in range(G):
        mm = masked[g]
        if mm:
            d[g, :mm] = a[g, :mm].to(torch.float64) @ b[g].to(torch.float64).T
    w.write("gemm_grouped_masked_g3_m64_n256_k320_f32", "gemm-grouped-masked", {"out_dtype": "f32"},
            f"MoE decode layout for f32/bf16 experts: group g computes rows < masked_m[g] (masked_m = {masked}); "
            "rows >= masked_m are stored as 0 and are NOT checked. f32 inputs; expected in float64, rounded "
            "once to f32.",
            {"a": a, "b": b, "masked_m": torch.tensor(masked, dtype=torch.int32)},
            {"d": d.to(torch.float32)})


# ---------------------------------------------------------------- MLA decode
HUGE_BLOCK = 2 ** 30


def mla_decode_reference(q, kcache, block_table, seqlens, scale, causal, dv=512):
    b, s_q, h_q, D = q.shape
    h_kv = kcache.shape[2]
    page = kcache.shape[1]
    qd = q.to(torch.float64)
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    for i in range(b):
        L = int(seqlens[i])
        if L == 0:
            continue
        nb = ceil_div(L, page)
        K = torch.cat([kcache[int(block_table[i, j])] for j in range(nb)]).to(torch.float64)[:L]
        for j in range(s_q):
            vis = L - (s_q - 1 - j) if causal else L
            if vis <= 0:
                continue
            for h in range(h_q):
                kvh = h // (h_q // h_kv)
                Kh = K[:vis, kvh]
                S = (Kh @ qd[i, j, h]) * scale
                mx = S.max()
                p = torch.exp(S - mx)
                ssum = p.sum()
                lse[i, h, j] = mx + torch.log(ssum)
                out[i, j, h] = (p @ Kh[:, :dv]) / ssum
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    return to_bf16(out), lse.to(torch.float32)


def mla_decode_cases(w: CaseWriter, rng):
    v3_scale = 192 ** -0.5 * yarn_mscale(40, 1.0) ** 2
    default_scale = 576 ** -0.5
    cases = [
        # name, b, s_q, h_q, h_kv, seqlens, extra_unused_blocks, max_blocks, scale, causal, desc
        ("mla_decode_varlen_b3_hq16_hkv1", 3, 1, 16, 1, [20, 140, 1], 2, 4, default_scale, False,
         "variable lengths (20, 140, 1)"),
        ("mla_decode_zero_len_b2", 2, 1, 4, 1, [0, 70], 1, 2, default_scale, False,
         "sequence 0 has length 0: out = 0, lse = +inf"),
        ("mla_decode_causal_sq2_hq8", 2, 2, 8, 1, [65, 3], 1, 2, v3_scale, True,
         "causal s_q=2, bottom-right aligned; V3 softmax scale"),
        ("mla_decode_causal_sq4_hq6_hkv2", 2, 4, 6, 2, [100, 4], 1, 3, v3_scale, True,
         "causal s_q=4 with h_kv=2 (query head h reads kv head h // 3)"),
        ("mla_decode_fully_masked_sq4", 1, 4, 2, 1, [2], 1, 2, default_scale, True,
         "causal s_q=4 over 2 keys: queries 0 and 1 see no key (out = 0, lse = +inf), 2 sees key 0, 3 sees 0..1"),
        ("mla_decode_hkv3_hq9_exact_page", 2, 1, 9, 3, [64, 1], 1, 2, v3_scale, False,
         "h_kv=3, h_q=9; length exactly one 64-token page"),
    ]
    for name, b, s_q, h_q, h_kv, seqlens, extra, max_blocks, scale, causal, desc in cases:
        page = 64
        used = [ceil_div(L, page) for L in seqlens]
        nblocks = sum(used) + extra
        perm = rng.permutation(nblocks)
        kc = torch.full((nblocks, page, h_kv, 576), float("nan"), dtype=torch.float64)
        bt = torch.full((b, max_blocks), HUGE_BLOCK, dtype=torch.int32)
        nxt = 0
        for i, L in enumerate(seqlens):
            for j in range(used[i]):
                phys = int(perm[nxt])
                nxt += 1
                bt[i, j] = phys
                n_valid = min(page, L - j * page)
                kc[phys, :n_valid] = torch.from_numpy(rng.standard_normal((n_valid, h_kv, 576)))
        assert nxt == sum(used)
        kcache = to_bf16(kc)
        q = to_bf16(torch.from_numpy(rng.standard_normal((b, s_q, h_q, 576))))
        sl = torch.tensor(seqlens, dtype=torch.int32)
        out, lse = mla_decode_reference(q, kcache, bt, sl, scale, causal)
        w.write(name, "mla-decode", {"causal": causal, "head_dim_v": 512, "softmax_scale": scale},
                f"FlashMLA dense decode: {desc}. Paged cache (page 64) with a random block permutation; unused "
                f"block_table entries = 2**30; every cache slot that must not be read (past the length in a used "
                f"page, and {extra} whole unused page(s)) is NaN. out = softmax(q.K^T*scale).V (V = first 512 "
                "channels), lse natural-log; expected in float64, out rounded once to bf16, lse to f32.",
                {"q": q, "kcache": kcache, "block_table": bt, "cache_seqlens": sl},
                {"out": out, "lse": lse})


# ---------------------------------------------------------------- MoE gate
def moe_gate_reference(x, weight, bias, n_group, topk_group, topk, scale):
    logits = x.to(torch.float64) @ weight.to(torch.float64).T
    s = torch.sigmoid(logits)
    idx, wts, mg = noaux_tc(s, bias.to(torch.float64), n_group, topk_group, topk, scale)
    return idx, wts.to(torch.float32), mg


def moe_gate_cases(w: CaseWriter, rng):
    def emit(name, x, weight, bias, p, desc, want_ties=False):
        idx, wts, mg = moe_gate_reference(x, weight, bias, p["n_group"], p["topk_group"], p["topk"],
                                          p["route_scale"])
        gmin = float(mg["group"].min())
        emin = float(mg["expert"].min())
        if want_ties:
            assert emin == 0.0, "tie case has no boundary tie"
            extra = f" Exact ties at the selection boundary in {int((mg['expert'] == 0).sum())} of {x.shape[0]} tokens."
        else:
            assert gmin > 1e-4 and emin > 1e-4, (name, gmin, emin)
            extra = f" No near-ties: smallest decision gaps (biased scores) group {gmin:.3g}, expert {emin:.3g}."
        w.write(name, "moe-gate", p,
                "DeepSeek-V3 noaux_tc (SPEC section 6): s = sigmoid(x.W^T), s+bias for selection only, group "
                "score = sum of top-2, keep topk_group groups, top-k; weights = s[idx]/(sum+1e-20)*route_scale. "
                "Ties go to the lower index. idx sorted ascending, weights in the same order; expected in float64."
                + " " + desc + extra,
                {"x": x, "weight": weight, "bias": bias}, {"topk_idx": idx, "topk_weights": wts})

    p = {"n_group": 4, "topk_group": 2, "topk": 4, "route_scale": 2.5}
    T, dim, E = 64, 256, 16
    for _ in range(100):
        x = _bf16(rng.standard_normal((T, dim)))
        wt = _bf16(rng.standard_normal((E, dim)) * 2.0 / math.sqrt(dim))
        bias = _f32(rng.standard_normal(E) * 0.1)
        _, _, mg = moe_gate_reference(x, wt, bias, **{k: p[k] for k in ("n_group", "topk_group", "topk")},
                                      scale=p["route_scale"])
        if float(mg["group"].min()) > 1e-4 and float(mg["expert"].min()) > 1e-4:
            break
    emit("moe_gate_e16_bf16", x, wt, bias, p, "Tiny-model shape (E=16, 4 groups, keep 2, top-4), bf16 x and weight.")

    p = {"n_group": 8, "topk_group": 4, "topk": 8, "route_scale": 2.5}
    T, dim, E = 16, 256, 256
    for _ in range(100):
        x = _f32(rng.standard_normal((T, dim)))
        wt = _f32(rng.standard_normal((E, dim)) * 2.0 / math.sqrt(dim))
        bias = _f32(rng.standard_normal(E) * 0.1)
        _, _, mg = moe_gate_reference(x, wt, bias, 8, 4, 8, 2.5)
        if float(mg["group"].min()) > 1e-4 and float(mg["expert"].min()) > 1e-4:
            break
    emit("moe_gate_e256_f32", x, wt, bias, p, "DeepSeek-V3 routing shape (E=256, 8 groups, keep 4, top-8), f32.")

    p = {"n_group": 1, "topk_group": 1, "topk": 6, "route_scale": 1.0}
    T, dim, E = 8, 128, 64
    for _ in range(100):
        x = _f32(rng.standard_normal((T, dim)))
        wt = _f32(rng.standard_normal((E, dim)) * 2.0 / math.sqrt(dim))
        bias = _f32(rng.standard_normal(E) * 0.1)
        _, _, mg = moe_gate_reference(x, wt, bias, 1, 1, 6, 1.0)
        if float(mg["expert"].min()) > 1e-4:
            break
    emit("moe_gate_e64_nogroup_f32", x, wt, bias, p, "n_group=1 (no group restriction), top-6, route_scale 1.")

    # exact ties
    p = {"n_group": 4, "topk_group": 2, "topk": 3, "route_scale": 2.5}
    T, dim, E = 16, 256, 16
    base = rng.standard_normal((E // 2, dim)) * 2.0 / math.sqrt(dim)
    wt = _bf16(np.repeat(base, 2, axis=0))  # experts 2j and 2j+1 have identical rows
    bias_np = np.zeros(E, dtype=np.float32)
    for g in range(4):  # in each group: a top pair at 0.1 (group scores tie when x = 0) and a lower pair
        bias_np[4 * g: 4 * g + 2] = 0.1
        bias_np[4 * g + 2: 4 * g + 4] = np.float32(-0.05 * (g + 1))
    pairs = bias_np.reshape(-1, 2)
    rot = rng.permutation(4)  # shuffle which pair comes first inside each group, keeping twins equal
    for g in range(4):
        if rot[g] % 2:
            pairs[2 * g], pairs[2 * g + 1] = pairs[2 * g + 1].copy(), pairs[2 * g].copy()
    bias = torch.from_numpy(pairs.reshape(-1).copy())
    x = _bf16(rng.standard_normal((T, dim)))
    x[:3] = 0.0  # all scores exactly 0.5: group scores tie too
    emit("moe_gate_exact_ties", x, wt, bias, p,
         "Experts 2j and 2j+1 have identical weight rows and bias, so every score has an exact twin and with "
         "top-3 the third pick always splits a pair: the lower index wins. Tokens 0-2 are all-zero: every group "
         "scores the same, groups 0 and 1 are kept.", want_ties=True)


# ---------------------------------------------------------------- RoPE
def rope_reference(x, positions, p):
    freqs = rope_freqs(64, p["theta"], p["factor"], p["original_max_position_embeddings"], p["beta_fast"],
                       p["beta_slow"])
    ang = rope_angles(positions, freqs)
    cs = yarn_mscale(p["factor"], p["mscale"]) / yarn_mscale(p["factor"], p["mscale_all_dim"])
    return apply_rope(x.to(torch.float64), ang, cs, torch.float64).to(torch.float32)


def rope_cases(w: CaseWriter, rng):
    v3 = {"theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    pos = torch.tensor([0, 1, 2, 7, 63, 100, 1000, 4095, 4096, 32768, 100000, 163839], dtype=torch.int64)
    common = ("Interleaved pairs (x[2i], x[2i+1]) of 64 dims. freq'_i per SPEC section 8 evaluated in float64 "
              "and rounded to f32; angle = f32(pos) * freq' as ONE f32 multiply; cos/sin and the rotation in "
              "float64 from that f32 angle, times mscale(f,mscale)/mscale(f,mscale_all_dim); output rounded to "
              "f32. At position 1e5 one ulp of freq' moves the angle by ~6e-3 rad, so freq' must be computed as "
              "described (or the tolerance widened) for the large positions.")
    x = _f32(rng.standard_normal((len(pos), 4, 64)))
    w.write("rope_yarn_v3", "rope", v3, "DeepSeek-V3 YaRN (factor 40, low 10, high 23). " + common,
            {"x": x, "positions": pos}, {"y": rope_reference(x, pos, v3)})
    p2 = dict(v3, mscale=0.8, mscale_all_dim=0.5)
    x = _f32(rng.standard_normal((len(pos), 2, 64)))
    w.write("rope_yarn_mscale_ratio", "rope", p2,
            "YaRN with mscale 0.8 / mscale_all_dim 0.5, so cos/sin carry a factor "
            f"{yarn_mscale(40, 0.8) / yarn_mscale(40, 0.5):.9f}. " + common,
            {"x": x, "positions": pos}, {"y": rope_reference(x, pos, p2)})
    p3 = {"theta": 10000.0, "factor": 1.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    x = _f32(rng.standard_normal((len(pos), 3, 64)))
    w.write("rope_plain_theta1e4", "rope", p3, "Plain RoPE (factor 1: no YaRN, mscale 1). " + common,
            {"x": x, "positions": pos}, {"y": rope_reference(x, pos, p3)})


# ---------------------------------------------------------------- RMSNorm
def rms_reference(x, weight, eps):
    xd = x.to(torch.float64)
    y = xd * torch.rsqrt((xd * xd).mean(-1, keepdim=True) + eps) * weight.to(torch.float64)
    return to_bf16(y) if x.dtype == torch.bfloat16 else y.to(x.dtype)


def rms_norm_cases(w: CaseWriter, rng):
    eps = 1e-6
    desc = ("y = x / sqrt(mean(x^2) + eps) * weight, evaluated in float64, rounded once to the dtype of x. ")
    x = _f32(rng.standard_normal((4, 7168)) * 1.7)
    wt = _f32(1 + 0.1 * rng.standard_normal(7168))
    w.write("rms_norm_f32_d7168", "rms-norm", {"eps": eps}, desc + "f32, model width.",
            {"x": x, "weight": wt}, {"y": rms_reference(x, wt, eps)})
    x = _bf16(rng.standard_normal((8, 512)) * 3.0)
    wt = _bf16(1 + 0.1 * rng.standard_normal(512))
    w.write("rms_norm_bf16_d512", "rms-norm", {"eps": eps}, desc + "bf16 x and weight (kv_a_layernorm width).",
            {"x": x, "weight": wt}, {"y": rms_reference(x, wt, eps)})
    xr = rng.standard_normal((4, 1536))
    xr[0] = 0.0
    xr[1] *= 1e-5   # eps dominates
    xr[2] *= 1e3
    x = _f32(xr)
    wt = _f32(1 + 0.1 * rng.standard_normal(1536))
    w.write("rms_norm_f32_d1536_edge", "rms-norm", {"eps": eps},
            desc + "Rows: all zeros (y = 0), 1e-5 scale (eps dominates), 1e3 scale, ordinary.",
            {"x": x, "weight": wt}, {"y": rms_reference(x, wt, eps)})


def generate_all(outdir):
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(OPS_SEED)
    w = CaseWriter(outdir)
    act_quant_cases(w, rng)
    fp8_gemm_cases(w, rng)
    mla_decode_cases(w, rng)
    moe_gate_cases(w, rng)
    rope_cases(w, rng)
    rms_norm_cases(w, rng)
    gemm_grouped_cases(w)
    return w.names


# ---------------------------------------------------------------- f32 variants
def _ulps(a, ref, dtype):
    """max |a - ref| in units of ulp(ref) of the output dtype."""
    a, ref = a.to(torch.float64), ref.to(torch.float64)
    mant = 7 if dtype == torch.bfloat16 else 23
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -126))) - mant)
    fin = torch.isfinite(ref)
    return float(((a - ref).abs()[fin] / ulp[fin]).max()) if fin.any() else 0.0


def _calc_diff(a, ref):
    a, ref = a.to(torch.float64), ref.to(torch.float64)
    fin = torch.isfinite(ref)
    a, ref = a[fin], ref[fin]
    den = (a * a + ref * ref).sum()
    return float(1 - 2 * (a * ref).sum() / den) if den > 0 else 0.0


def _rope_f32_path(x, positions, p):
    """RoPE the way an all-f32 implementation (HF, DeepSeek's reference) computes it."""
    d = 64
    base, f = p["theta"], p["factor"]
    freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if f > 1:
        def corr(beta):
            return d * math.log(p["original_max_position_embeddings"] / (2 * math.pi * beta)) / (2 * math.log(base))
        low = max(math.floor(corr(p["beta_fast"])), 0)
        high = min(math.ceil(corr(p["beta_slow"])), d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freq = freq / f * ramp + freq * (1 - ramp)
    ang = positions.to(torch.float32)[:, None] * freq[None, :]
    cs = yarn_mscale(f, p["mscale"]) / yarn_mscale(f, p["mscale_all_dim"])
    c = (torch.cos(ang) * cs)[:, None, :]
    s = (torch.sin(ang) * cs)[:, None, :]
    y = torch.empty_like(x)
    y[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    y[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    return y


def _mla_f32(t, p):
    q, kc, bt, sl = t["q"], t["kcache"], t["block_table"], t["cache_seqlens"]
    b, s_q, h_q, _ = q.shape
    h_kv = kc.shape[2]
    out = torch.zeros(b, s_q, h_q, 512)
    lse = torch.full((b, h_q, s_q), float("inf"))
    for i in range(b):
        L = int(sl[i])
        if L == 0:
            continue
        K = torch.cat([kc[int(bt[i, j])] for j in range(ceil_div(L, 64))]).float()[:L]
        for j in range(s_q):
            vis = L - (s_q - 1 - j) if p["causal"] else L
            if vis <= 0:
                continue
            for h in range(h_q):
                Kh = K[:vis, h // (h_q // h_kv)]
                S = (Kh @ q[i, j, h].float()) * np.float32(p["softmax_scale"])
                mx = S.max()
                e = torch.exp(S - mx)
                ssum = e.sum()
                lse[i, h, j] = mx + torch.log(ssum)
                out[i, j, h] = (e @ Kh[:, :512]) / ssum
    return out.to(torch.bfloat16), lse


def f32_variant_report(outdir):
    """Recompute every tolerance-judged op case the way a plain f32
    implementation would and report how far it lands from the expected
    values (evidence for the tolerances in SPEC / the README)."""
    rep = {}
    for path in sorted(outdir.glob("*.safetensors")):
        t, md = stio.load(path)
        op, p = md["op"], json.loads(md["params"])
        name = path.stem
        if op == "fp8-gemm":
            d = fp8_gemm(t["a"], t["sa"], t["b"], t["sb"], acc=torch.float32)
            ref = t["expected.d"]
            d = d.to(ref.dtype)
            diff = (d.double() - ref.double()).abs()
            rms = ref.double().pow(2).mean().sqrt()
            if ref.dtype == torch.bfloat16:
                ulp = torch.exp2(torch.floor(torch.log2(ref.double().abs().clamp_min(2.0 ** -126))) - 7)
                spec_ok = diff <= 2 * ulp + 1e-3 * rms
            else:
                spec_ok = diff <= 1e-5 * ref.double().abs()
            rep[name] = {"calc_diff": _calc_diff(d, ref), "max_ulps": _ulps(d, ref, ref.dtype),
                         "frac_differing": float((d.float() != ref.float()).double().mean()),
                         "max_abs_over_rms": float(diff.max() / rms),
                         "frac_outside_spec_elementwise_tol": float((~spec_ok).double().mean())}
        elif op == "mla-decode":
            out, lse = _mla_f32(t, p)
            r_out, r_lse = t["expected.out"], t["expected.lse"]
            do = (out.double() - r_out.double()).abs()
            rel = do / (r_out.double().abs() + 1e-6)
            ok_out = (do < 8e-4) | (rel < 2.01 / 128)
            fin = torch.isfinite(r_lse)
            dl = (lse.double()[fin] - r_lse.double()[fin]).abs()
            ok_lse = (dl < 1e-6) | (dl / (r_lse.double()[fin].abs() + 1e-6) < 8.01 / 65536)
            rep[name] = {"out_calc_diff": _calc_diff(out, r_out), "out_max_abs": float(do.max()),
                         "out_frac_outside_spec_tol": float((~ok_out).double().mean()),
                         "lse_max_abs": float(dl.max()) if dl.numel() else 0.0,
                         "lse_frac_outside_spec_tol": float((~ok_lse).double().mean()) if dl.numel() else 0.0,
                         "inf_positions_match": bool(torch.equal(torch.isinf(lse), torch.isinf(r_lse)))}
        elif op == "moe-gate":
            logits = t["x"].float() @ t["weight"].float().T
            idx, w, _ = noaux_tc(torch.sigmoid(logits), t["bias"].float(), p["n_group"], p["topk_group"],
                                 p["topk"], p["route_scale"])
            same = (idx == t["expected.topk_idx"]).all(-1)
            rep[name] = {"tokens_identical": float(same.double().mean()),
                         "weights_max_abs": float((w[same] - t["expected.topk_weights"][same]).abs().max())}
        elif op == "rope":
            y = _rope_f32_path(t["x"], t["positions"], p)
            ref = t["expected.y"]
            pos = t["positions"]
            small = pos <= 4096
            rep[name] = {"max_abs_pos_le_4096": float((y[small] - ref[small]).abs().max()),
                         "max_abs_pos_gt_4096": float((y[~small] - ref[~small]).abs().max()),
                         "max_abs_exact_freqs_f32_angle": float(
                             (_rope_exact_freq_f32_math(t["x"], pos, p) - ref).abs().max())}
        elif op == "rms-norm":
            x = t["x"].float()
            y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + p["eps"]) * t["weight"].float()
            ref = t["expected.y"]
            y = y.to(ref.dtype)
            rep[name] = {"max_ulps": _ulps(y, ref, ref.dtype), "calc_diff": _calc_diff(y, ref)}
    return rep


def _rope_exact_freq_f32_math(x, positions, p):
    """freq' exactly as the golden (f64 -> f32), everything else in f32."""
    freqs = rope_freqs(64, p["theta"], p["factor"], p["original_max_position_embeddings"], p["beta_fast"],
                       p["beta_slow"])
    ang = rope_angles(positions, freqs)
    cs = yarn_mscale(p["factor"], p["mscale"]) / yarn_mscale(p["factor"], p["mscale_all_dim"])
    return apply_rope(x.float(), ang, cs, torch.float32)
