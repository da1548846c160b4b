"""Golden cases of DeepSeek-V3.2's sparse-attention ops (docs/spec-v32.md §9).

Written in PyTorch from the steps of DeepSeek's own references, independent
of the Rust code:

* cache-quant: DeepGEMM's ``kv_cache_cast_to_fp8`` (index-k cache: per
  block, block_size*d e4m3 bytes then block_size f32 scales,
  q = fp8(x * (1/s))) and FlashMLA's ``quantize_k_cache`` (V32_FP8Sparse:
  per token 512 e4m3 | 4 f32 scales | 64 bf16, q = fp8(x / s)), UE8M0
  scales rounded up exactly (frexp) where asked;
* indexer-logits: DeepGEMM's ``ref_fp8_paged_mqa_logits`` in float64 over
  the dequantized cache (relu(q.k) * w summed over heads, times the
  token's scale), -inf outside each query's causal window;
* indexer-topk: ``torch.topk`` (sorted) over each row's visible prefix,
  -1 after min(topk, length); the logits are tie-free so the order is
  defined;
* sparse-mla-decode: FlashMLA's ``ref_sparse_attn_decode`` in float64 over
  the exactly dequantized latent cache, attention sink, topk_length,
  +inf lse and zero output for rows without a valid index;
* sparse-mla-prefill: FlashMLA's ``ref_sparse_attn_fwd`` in float64 over
  a plain bf16 latent KV: indices outside [0, s_kv) invalid, topk_length,
  attention sink merged into the lse used for the output (+-inf sinks
  included), max_logits -inf and lse +inf for rows without a valid index.
  Drawn from its own generator (V32_SEED + 1), after the other cases, so
  their files keep their bytes.

Run by generate.py (``generate_all``), or alone to (re)write just these
files: ``python golden/v32_ops.py [OUTDIR]`` prints their manifest entries.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stio  # noqa: E402
from quant import check_fp8_rounding, to_bf16, to_fp8, ue8m0_round_up  # noqa: E402

V32_SEED = 3232
HUGE_BLOCK = 2 ** 30
NOPE, ROPE, D = 512, 64, 576
TOKEN_BYTES = NOPE + 4 * (NOPE // 128) + 2 * ROPE  # 656


def _write(outdir, names, name, op, params, description, inputs, expected):
    tensors = dict(inputs)
    for k, v in expected.items():
        tensors["expected." + k] = v
    md = {"op": op, "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
          "description": description}
    stio.save(outdir / f"{name}.safetensors", tensors, md)
    names.append(name)


def _f32_bytes(s):
    return s.to(torch.float32).contiguous().view(torch.uint8)


def _fp8(y):
    q = to_fp8(y, "e4m3")
    check_fp8_rounding(y, q, "e4m3")
    return q


# ---------------------------------------------------------------- cache writers
def index_cache(x, ue8m0):
    """DeepGEMM kv_cache_cast_to_fp8: x [nb, bs, d] -> u8 [nb, bs, d + 4]."""
    nb, bs, d = x.shape
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(torch.tensor(1e-4, dtype=torch.float32))
    sf = amax / torch.tensor(448.0, dtype=torch.float32)
    if ue8m0:
        sf = ue8m0_round_up(sf)
    q = _fp8(xf * (torch.tensor(1.0, dtype=torch.float32) / sf))
    out = torch.empty((nb, bs * (d + 4)), dtype=torch.uint8)
    out[:, : bs * d] = q.view(torch.uint8).reshape(nb, bs * d)
    out[:, bs * d:] = _f32_bytes(sf.reshape(nb, bs)).reshape(nb, bs * 4)
    return out.reshape(nb, bs, d + 4)


def latent_cache(x, ue8m0):
    """FlashMLA quantize_k_cache (V32_FP8Sparse): x [nb, bs, 576] -> u8 [nb, bs, 656]."""
    nb, bs, _ = x.shape
    xf = x.to(torch.float32)
    out = torch.empty((nb, bs, TOKEN_BYTES), dtype=torch.uint8)
    for t in range(NOPE // 128):
        g = xf[..., t * 128:(t + 1) * 128]
        s = (g.abs().amax(dim=-1) / torch.tensor(448.0, dtype=torch.float32)).clamp_min(
            torch.tensor(1e-4, dtype=torch.float32))
        if ue8m0:
            s = ue8m0_round_up(s)
        out[..., NOPE + 4 * t: NOPE + 4 * (t + 1)] = _f32_bytes(s).reshape(nb, bs, 4)
        out[..., t * 128:(t + 1) * 128] = _fp8(g / s.unsqueeze(-1)).view(torch.uint8)
    rope = x[..., NOPE:].to(torch.float32).to(torch.bfloat16).contiguous()
    out[..., NOPE + 16:] = rope.view(torch.uint8).reshape(nb, bs, 2 * ROPE)
    return out


def dequant_latent(cache):
    """Exact float64 K of every cache token: [slots, 576]."""
    c = cache.reshape(-1, TOKEN_BYTES)
    nope = c[:, :NOPE].contiguous().view(torch.float8_e4m3fn).to(torch.float64)
    sc = c[:, NOPE:NOPE + 16].contiguous().view(torch.float32).to(torch.float64)
    rope = c[:, NOPE + 16:].contiguous().view(torch.bfloat16).to(torch.float64)
    nope = nope * sc.repeat_interleave(128, dim=1)
    return torch.cat([nope, rope], dim=1)


# ---------------------------------------------------------------- paging helpers
def paged(rng, lens, block):
    used = [-(-L // block) for L in lens]
    max_blocks = max(used + [0]) + 1
    nb = sum(used) + 2
    perm = rng.permutation(nb)
    table = torch.full((len(lens), max_blocks), HUGE_BLOCK, dtype=torch.int32)
    valid = torch.zeros(nb * block, dtype=torch.bool)
    nxt = 0
    for i, L in enumerate(lens):
        for j in range(used[i]):
            blk = int(perm[nxt])
            nxt += 1
            table[i, j] = blk
            n = min(block, L - j * block)
            valid[blk * block: blk * block + n] = True
    return table, nb, valid


# ---------------------------------------------------------------- cases
def cache_quant_cases(outdir, names, rng):
    cases = [
        ("cache_quant_index_float_bf16", "index", False, torch.bfloat16, (2, 64, 128),
         "DeepGEMM's paged index-k cache (block 64), float scales"),
        ("cache_quant_index_ue8m0_f32", "index", True, torch.float32, (2, 5, 128),
         "index-k cache with UE8M0 scales, odd block size 5"),
        ("cache_quant_latent_ue8m0_bf16", "latent", True, torch.bfloat16, (2, 7, D),
         "FlashMLA's V3.2 latent cache (656 bytes per token), UE8M0 scales as FlashMLA rounds them"),
        ("cache_quant_latent_float_bf16", "latent", False, torch.bfloat16, (1, 6, D),
         "the latent layout with float scales (not powers of two)"),
    ]
    for name, layout, ue8m0, dt, shape, desc in cases:
        x = torch.from_numpy(rng.standard_normal(shape)) * torch.from_numpy(
            np.exp2(rng.integers(-6, 7, size=shape[:2] + (1,))).astype(np.float64))
        x[0, 0] = 0.0  # the amax floor
        x = x.to(torch.float32).to(dt)
        cache = index_cache(x, ue8m0) if layout == "index" else latent_cache(x, ue8m0)
        _write(outdir, names, name, "cache-quant", {"layout": layout, "ue8m0": ue8m0},
               f"cache_quant: {desc}. Bytes computed with the reference's f32 steps "
               "(DeepGEMM kv_cache_cast_to_fp8 / FlashMLA quantize_k_cache); judged bit-exact.",
               {"x": x}, {"cache": cache})


def indexer_logits_cases(outdir, names, rng):
    cases = [
        ("indexer_logits_b3_nextn2_h8", 3, 2, 8, 128, 64, [70, 0, 129], True,
         "next_n = 2, an empty sequence, UE8M0 index-cache scales"),
        ("indexer_logits_b2_nextn1_h64_block7", 2, 1, 64, 128, 7, [40, 3], False,
         "V3.2's 64 indexer heads, odd block size 7, float scales"),
    ]
    for name, b, next_n, h, d, block, lens, ue8m0, desc in cases:
        table, nb, valid = paged(rng, lens, block)
        keys = torch.from_numpy(rng.standard_normal((nb, block, d))).to(torch.bfloat16)
        cache = index_cache(keys, ue8m0)
        # Unread tokens: all-0xff bytes (NaN values and scales).
        flat = cache.reshape(nb, block * (d + 4))
        for slot in torch.nonzero(~valid).flatten().tolist():
            blk, off = divmod(slot, block)
            flat[blk, off * d:(off + 1) * d] = 0xFF
            flat[blk, block * d + 4 * off: block * d + 4 * off + 4] = 0xFF
        q = to_fp8(torch.from_numpy(rng.standard_normal((b, next_n, h, d))).to(torch.float32), "e4m3")
        w = torch.from_numpy(rng.standard_normal((b * next_n, h)) * h ** -0.5).to(torch.float32)
        max_len = table.shape[1] * block
        kv = flat[:, : block * d].contiguous().view(torch.float8_e4m3fn).to(torch.float64).reshape(nb, block, d)
        sc = flat[:, block * d:].contiguous().view(torch.float32).to(torch.float64).reshape(nb, block)
        logits = torch.full((b * next_n, max_len), float("-inf"), dtype=torch.float64)
        qd, wd = q.to(torch.float64), w.to(torch.float64)
        for i in range(b):
            L = lens[i]
            for j in range(next_n):
                pos = L - next_n + j
                for t in range(pos + 1):
                    blk = int(table[i, t // block])
                    k = kv[blk, t % block]
                    s = torch.relu(qd[i, j] @ k)
                    logits[i * next_n + j, t] = (s * wd[i * next_n + j]).sum() * sc[blk, t % block]
        _write(outdir, names, name, "indexer-logits", {"max_len": max_len},
               f"indexer_logits (DeepGEMM fp8_paged_mqa_logits): {desc}. Keys quantized by "
               "kv_cache_cast_to_fp8; permuted block table, unused entries 2**30, unread tokens all 0xff. "
               "Expected in float64, rounded once to f32; -inf outside each query's window.",
               {"q": q, "weights": w, "kv_cache": cache, "context_lens": torch.tensor(lens, dtype=torch.int32),
                "block_table": table},
               {"logits": logits.to(torch.float32)})


def indexer_topk_cases(outdir, names, rng):
    rows, n, topk = 12, 300, 64
    logits = torch.from_numpy(rng.standard_normal((rows, n))).to(torch.float32)
    lens = [min(n, n - rows + r + 1) if r % 5 else r for r in range(rows)]
    for r, L in enumerate(lens):
        logits[r, L:] = float("-inf")
        vis = logits[r, :L]
        assert torch.unique(vis).numel() == L, "ties would leave the order undefined"
    idx = torch.full((rows, topk), -1, dtype=torch.int32)
    for r, L in enumerate(lens):
        k = min(topk, L)
        if k:
            idx[r, :k] = torch.topk(logits[r, :L].to(torch.float64), k, sorted=True).indices.to(torch.int32)
    _write(outdir, names, "indexer_topk_rows12_n300_k64", "indexer-topk", {"topk": topk},
           "indexer_topk: causal prefill windows and a few short rows (lengths 0, 5, 10 and < topk), "
           "tie-free logits; expected = torch.topk(sorted) over each visible prefix, -1 past min(topk, length).",
           {"logits": logits, "lengths": torch.tensor(lens, dtype=torch.int32)}, {"indices": idx})


def sparse_decode_reference(q, cache, indices, topk_length, sink, scale):
    K = dequant_latent(cache)
    b, s_q, h_q, _ = q.shape
    topk = indices.shape[-1]
    out = torch.zeros((b, s_q, h_q, NOPE), dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), float("inf"), dtype=torch.float64)
    qd = q.to(torch.float64)
    for i in range(b):
        lim = topk if topk_length is None else int(topk_length[i])
        for s in range(s_q):
            sel = [int(v) for v in indices[i, s, :lim] if int(v) != -1]
            if not sel:
                continue
            Ks = K[sel]
            for h in range(h_q):
                S = (Ks @ qd[i, s, h]) * scale
                m = S.max()
                p = torch.exp(S - m)
                tot = p.sum()
                l = m + torch.log(tot)
                o = (p @ Ks[:, :NOPE]) / tot
                if sink is not None:
                    o = o / (1.0 + torch.exp(float(sink[h]) - l))
                out[i, s, h] = o
                lse[i, h, s] = l
    return to_bf16(out), lse.to(torch.float32)


def sparse_mla_decode_cases(outdir, names, rng):
    cases = [
        ("sparse_mla_decode_b2_sq2_sink", 2, 2, 16, 32, 61, [150, 20], True, False, False,
         "attention sink, UE8M0 cache scales, block 61, a sequence shorter than topk (-1 padding)"),
        ("sparse_mla_decode_b3_topklen_invalid", 3, 1, 8, 24, 5, [64, 40, 9], False, True, True,
         "topk_length per sequence, an all-invalid row (every index -1), float cache scales, block 5"),
    ]
    scale = D ** -0.5
    for name, b, s_q, h_q, topk, block, lens, sink_on, topk_len_on, invalid_row, desc in cases:
        table, nb, valid = paged(rng, lens, block)
        keys = torch.from_numpy(rng.standard_normal((nb, block, D))).to(torch.bfloat16)
        cache = latent_cache(keys, ue8m0=sink_on)
        cache.reshape(-1, TOKEN_BYTES)[~valid] = 0xFF
        idx = torch.full((b, s_q, topk), -1, dtype=torch.int32)
        for i in range(b):
            for s in range(s_q):
                if invalid_row and i == b - 1:
                    continue
                pos = rng.permutation(lens[i])[:topk]
                for t, p in enumerate(pos):
                    idx[i, s, t] = int(table[i, p // block]) * block + int(p % block)
        q = torch.from_numpy(rng.standard_normal((b, s_q, h_q, D))).to(torch.bfloat16)
        inputs = {"q": q, "kcache": cache, "indices": idx}
        tl = sink = None
        if topk_len_on:
            tl = torch.tensor([topk // 2, topk, 3][:b], dtype=torch.int32)
            inputs["topk_length"] = tl
        if sink_on:
            sink = torch.from_numpy(rng.standard_normal(h_q) * 2.0).to(torch.float32)
            inputs["attn_sink"] = sink
        out, lse = sparse_decode_reference(q, cache, idx, tl, sink, scale)
        _write(outdir, names, name, "sparse-mla-decode", {"softmax_scale": scale},
               f"sparse_mla_decode (FlashMLA sparse decode, V3.2 FP8 cache): {desc}. Cache written by "
               "quantize_k_cache's steps; unread tokens all 0xff; K dequantized exactly (e4m3 * scale in "
               "float64); expected out rounded once to bf16, lse (natural log, without the sink) to f32.",
               inputs, {"out": out, "lse": lse})


def sparse_prefill_reference(q, kv, idx, topk_length, sink, scale):
    """FlashMLA's ref_sparse_attn_fwd, in float64: q [s_q, h_q, d], kv
    [s_kv, 1, d], idx [s_q, 1, topk] -> out (bf16), max_logits, lse (f32)."""
    s_q, h_q, d = q.shape
    s_kv, topk = kv.shape[0], idx.shape[2]
    ind = idx[:, 0, :].to(torch.int64).clone()
    if topk_length is not None:
        past = torch.arange(topk).unsqueeze(0) >= topk_length.to(torch.int64).unsqueeze(1)
        ind[past] = -1
    invalid = (ind < 0) | (ind >= s_kv)
    ind[invalid] = 0
    kvd = kv[:, 0, :].to(torch.float64)
    if s_kv == 0:
        kvd = torch.zeros(1, d, dtype=torch.float64)
    g = kvd.index_select(0, ind.flatten()).reshape(s_q, topk, d)
    g[invalid] = 0.0  # never read: keeps NaN tokens out of the products
    P = (q.to(torch.float64) @ g.transpose(1, 2)) * scale  # [s_q, h_q, topk]
    P[invalid.unsqueeze(1).expand(P.shape)] = float("-inf")
    lse = torch.logsumexp(P, dim=-1)
    max_logits = P.max(dim=-1).values if topk > 0 else torch.full((s_q, h_q), float("-inf"),
                                                                  dtype=torch.float64)
    lse_o = lse.clone()
    if sink is not None:
        lse_o = torch.logsumexp(torch.stack([lse_o, sink.to(torch.float64).expand(s_q, h_q)]), dim=0)
    lse_o[lse_o == float("-inf")] = float("inf")
    out = torch.exp(P - lse_o.unsqueeze(-1)) @ g[..., :NOPE]
    lse[lse == float("-inf")] = float("inf")
    return to_bf16(out), max_logits.to(torch.float32), lse.to(torch.float32)


def sparse_mla_prefill_cases(outdir, names, rng):
    cases = [
        ("sparse_mla_prefill_sink_topklen", 7, 40, 4, 24, 576, True, True,
         "topk_length per query, attention sink with a -inf and a +inf head, an all-invalid query"),
        ("sparse_mla_prefill_d512_oob", 5, 11, 2, 16, 512, False, False,
         "d_qk = 512 (K = V), topk past s_kv: the remaining slots hold FlashMLA's invalid values"),
    ]
    bad = [-2147483648, -123456, -1, 114514, 1919810, 2147480000, 2147483647]
    scale = 0.5
    for name, s_q, s_kv, h_q, topk, d, sink_on, topk_len_on, desc in cases:
        q = torch.from_numpy(rng.standard_normal((s_q, h_q, d)) * 0.1 + 0.02).to(torch.bfloat16)
        kv = torch.from_numpy(rng.standard_normal((s_kv, 1, d)) * 0.1 - 0.01).to(torch.bfloat16)
        idx = torch.zeros((s_q, 1, topk), dtype=torch.int32)
        for s in range(s_q):
            perm = list(rng.permutation(s_kv)[:topk])
            perm += [bad[int(rng.integers(len(bad)))] if j % 3 else s_kv
                     for j in range(topk - len(perm))]
            idx[s, 0] = torch.tensor(perm, dtype=torch.int32)
        idx[s_q // 2, 0, :] = -1  # a query with no valid index
        named = torch.zeros(s_kv, dtype=torch.bool)
        flat = idx.flatten().to(torch.int64)
        named[flat[(flat >= 0) & (flat < s_kv)]] = True
        kv[~named] = float("nan")  # tokens no slot names are never read
        inputs = {"q": q, "kv": kv, "indices": idx}
        tl = sink = None
        if topk_len_on:
            tl = torch.from_numpy(rng.integers(0, topk + 1, s_q)).to(torch.int32)
            tl[0] = topk
            inputs["topk_length"] = tl
        if sink_on:
            sink = torch.from_numpy(rng.standard_normal(h_q)).to(torch.float32)
            sink[1] = float("-inf")
            sink[2] = float("inf")
            inputs["attn_sink"] = sink
        out, max_logits, lse = sparse_prefill_reference(q, kv, idx, tl, sink, scale)
        _write(outdir, names, name, "sparse-mla-prefill", {"softmax_scale": scale},
               f"sparse_mla_prefill (FlashMLA flash_mla_sparse_fwd): {desc}. FlashMLA's "
               "ref_sparse_attn_fwd in float64 from the bf16 inputs; tokens no index names are NaN; "
               "expected out rounded once to bf16, max_logits and lse (natural log, without the sink) "
               "to f32.",
               inputs, {"out": out, "max_logits": max_logits, "lse": lse})


def generate_all(outdir):
    outdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(V32_SEED)
    names = []
    cache_quant_cases(outdir, names, rng)
    indexer_logits_cases(outdir, names, rng)
    indexer_topk_cases(outdir, names, rng)
    sparse_mla_decode_cases(outdir, names, rng)
    sparse_mla_prefill_cases(outdir, names, np.random.default_rng(V32_SEED + 1))
    return names


if __name__ == "__main__":
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "ops"
    for n in generate_all(out):
        p = out / f"{n}.safetensors"
        data = p.read_bytes()
        print(f"- path: ops/{n}.safetensors\n  sha256: {hashlib.sha256(data).hexdigest()}\n  size: {len(data)}")
