"""An independent, straightforward DeepSeek-V3 forward pass (SPEC sections 5, 6, 8).

Numerics modes (class ``Numerics``):

* ``f32``  weights dequantized to f32 (q.float()*s), every activation f32,
           torch f32 matmuls.  Used to cross-check transformers.
* ``f64``  weights dequantized exactly in f64, every activation f64.  The
           "exact" reference used to measure f32 noise.
* ``bf16`` SPEC section 8 bf16 mode.  Weights dequantized to bf16
           (bf16(q.float()*s)); every tensor passed between ops is bf16.
           Each op computes internally in f64 (``acc``; f32 for the
           measurement variant) from its bf16 inputs and rounds its output
           once to bf16 (RNE).  GEMMs therefore accumulate in f64, which is
           "f32 accumulation or better"; see README.
* ``fp8``  as bf16, but each linear with an FP8 weight runs act_quant
           (f32 arithmetic, float scales) and the FP8 GEMM of SPEC section 3
           with the checkpoint's e4m3 weight and weight_scale_inv directly;
           kv_b_proj is used dequantized to bf16 inside the absorbed
           attention, as DeepSeek's inference code does.

Attention formulation: ``naive`` (kv_b_proj expands c into per-head k_nope
and v) or ``absorbed`` (DeepSeek's default: q_nope is absorbed into the
latent space with W_UK, attention runs over [c || k_pe] with V = c, and W_UV
maps back).  In every mode the attention core -- QK^T, scale, causal mask,
softmax, PV -- is one fused op: computed in ``acc`` from its (rounded)
inputs, rounded once at the output, like FlashMLA.
"""

import math

import torch
import torch.nn.functional as F

from quant import act_quant, dequant_f32, dequant_f64, fp8_gemm, to_bf16

FP8_LINEAR_SUFFIXES = (
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
)


# ------------------------------------------------------------------ RoPE
def yarn_mscale(f, x):
    # SPEC: mscale(f, x) = 0.1 x ln(f) + 1.  For f <= 1 this is exactly 1.
    if f <= 1:
        return 1.0
    return 0.1 * x * math.log(f) + 1.0


def rope_freqs(d, theta, factor, orig_max, beta_fast, beta_slow):
    """freq'_i (SPEC section 8), evaluated in f64 and rounded to f32."""
    i = torch.arange(d // 2, dtype=torch.float64)
    freq = theta ** (-2.0 * i / d)
    if factor > 1:
        def corr(beta):
            return d * math.log(orig_max / (2 * math.pi * beta)) / (2 * math.log(theta))
        low = max(math.floor(corr(beta_fast)), 0)
        high = min(math.ceil(corr(beta_slow)), d - 1)
        if high == low:  # not reachable for V3; the usual guard
            high = low + 0.001
        ramp = ((i - low) / (high - low)).clamp(0, 1)
        freq = freq * (1 - ramp) + (freq / factor) * ramp
    return freq.to(torch.float32)


def rope_angles(positions, freqs32):
    """angle = pos * freq' as one f32 multiply (SPEC: 'angle ... in f32')."""
    return positions.to(torch.float32)[:, None] * freqs32[None, :]


def apply_rope(x, angles, cs_scale, acc):
    """Interleaved pairs (x[2i], x[2i+1]) rotated by angles[..., i].

    x [T, ..., 64] (acc dtype), angles [T, 32] f32.  cos/sin are evaluated in
    acc from the f32 angle and multiplied by cs_scale.
    """
    a = angles.to(acc)
    shape = [a.shape[0]] + [1] * (x.dim() - 2) + [a.shape[1]]
    c = (torch.cos(a) * cs_scale).reshape(shape)
    s = (torch.sin(a) * cs_scale).reshape(shape)
    x0 = x[..., 0::2]
    x1 = x[..., 1::2]
    y = torch.empty_like(x)
    y[..., 0::2] = x0 * c - x1 * s
    y[..., 1::2] = x1 * c + x0 * s
    return y


# ------------------------------------------------------------------ MoE gate
def noaux_tc(scores, bias, n_group, topk_group, topk, route_scale):
    """SPEC section 6 with explicit lower-index tie breaking.

    scores [T, E] (sigmoid already applied).  Returns (idx sorted ascending,
    weights in the same order, margins) where margins is a dict of the
    decision gaps per token (group boundary and expert boundary).
    """
    T, E = scores.shape
    sb = scores + bias.to(scores.dtype)
    gsz = E // n_group
    g = sb.reshape(T, n_group, gsz)
    top2 = torch.sort(g, dim=-1, descending=True, stable=True).values[..., :2].sum(-1)
    gord = torch.sort(top2, dim=-1, descending=True, stable=True)
    keep_groups = gord.indices[:, :topk_group]
    keep = torch.zeros(T, n_group, dtype=torch.bool)
    keep.scatter_(1, keep_groups, True)
    keep = keep.unsqueeze(-1).expand(T, n_group, gsz).reshape(T, E)
    masked = sb.masked_fill(~keep, float("-inf"))
    eord = torch.sort(masked, dim=-1, descending=True, stable=True)
    idx = eord.indices[:, :topk].sort(dim=-1).values
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * route_scale
    if topk_group < n_group:
        gm = gord.values[:, topk_group - 1] - gord.values[:, topk_group]
    else:
        gm = torch.full((T,), float("inf"), dtype=scores.dtype)
    em = eord.values[:, topk - 1] - eord.values[:, topk]
    return idx, w, {"group": gm, "expert": em}


# ------------------------------------------------------------------ numerics
class Numerics:
    def __init__(self, mode, acc=None, attn="naive"):
        assert mode in ("f32", "f64", "bf16", "fp8")
        self.mode = mode
        self.attn = attn
        if mode == "f32":
            self.acc = torch.float32
        elif mode == "f64":
            self.acc = torch.float64
        else:
            self.acc = acc or torch.float64
        self.rounds = mode in ("bf16", "fp8")

    def r(self, x):
        """Round an op output to the between-op dtype."""
        if self.rounds:
            return to_bf16(x).to(self.acc)
        return x.to(self.acc)


class V3Model:
    """Holds the checkpoint (HF names) and runs the forward in one mode."""

    def __init__(self, cfg, ckpt, num: Numerics):
        self.cfg = cfg
        self.ckpt = ckpt
        self.num = num
        self.H = cfg["num_attention_heads"]
        self.dn = cfg["qk_nope_head_dim"]
        self.dr = cfg["qk_rope_head_dim"]
        self.dv = cfg["v_head_dim"]
        self.kvr = cfg["kv_lora_rank"]
        self.eps = cfg["rms_norm_eps"]
        rs = cfg["rope_scaling"]
        f = rs["factor"]
        self.freqs = rope_freqs(self.dr, cfg["rope_theta"], f, rs["original_max_position_embeddings"],
                                rs["beta_fast"], rs["beta_slow"])
        self.cs_scale = yarn_mscale(f, rs["mscale"]) / yarn_mscale(f, rs["mscale_all_dim"])
        m = yarn_mscale(f, rs["mscale_all_dim"])
        self.softmax_scale = (self.dn + self.dr) ** -0.5 * m * m
        self._wcache = {}

    # weights -------------------------------------------------------------
    def w(self, name):
        """Dequantized (or plain) weight in the mode's compute dtype."""
        if name in self._wcache:
            return self._wcache[name]
        t = self.ckpt[name]
        sname = name + "_scale_inv"
        if sname in self.ckpt:
            s = self.ckpt[sname]
            if self.num.mode == "f64":
                v = dequant_f64(t, s)
            elif self.num.mode == "f32":
                v = dequant_f32(t, s)
            else:
                v = to_bf16(dequant_f32(t, s)).to(self.num.acc)
        else:
            v = t.to(self.num.acc)
        self._wcache[name] = v
        return v

    def linear(self, x, prefix, allow_fp8=True):
        name = prefix + ".weight"
        if self.num.mode == "fp8" and allow_fp8 and (name + "_scale_inv") in self.ckpt:
            q, s = act_quant(x, "float", "e4m3", check=False)
            y = fp8_gemm(q, s, self.ckpt[name], self.ckpt[name + "_scale_inv"], acc=self.num.acc)
            return self.num.r(y)
        return self.num.r(x @ self.w(name).T)

    def rmsnorm(self, x, wname):
        w = self.w(wname)
        y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * w
        return self.num.r(y)

    # taps ----------------------------------------------------------------
    def _put(self, name, t):
        """Records layers.{L}.{name} while forward() collects taps."""
        taps = getattr(self, "_taps", None)
        if taps is not None:
            taps[f"layers.{self._L}.{name}"] = t

    # blocks --------------------------------------------------------------
    def attention(self, x, L, positions, form=None):
        form = form or self.num.attn
        p = f"model.layers.{L}.self_attn"
        r = self.num.r
        T = x.shape[0]
        H, dn, dr = self.H, self.dn, self.dr
        angles = rope_angles(positions, self.freqs)
        qr = self.rmsnorm(self.linear(x, p + ".q_a_proj"), p + ".q_a_layernorm.weight")
        q = self.linear(qr, p + ".q_b_proj").reshape(T, H, dn + dr)
        q_nope = q[..., :dn]
        q_pe = r(apply_rope(q[..., dn:], angles, self.cs_scale, self.num.acc))
        self._put("q", q.reshape(T, H * (dn + dr)))
        kv = self.linear(x, p + ".kv_a_proj_with_mqa")
        c = self.rmsnorm(kv[:, :self.kvr], p + ".kv_a_layernorm.weight")
        self._put("kv_latent", c)
        k_pe = r(apply_rope(kv[:, self.kvr:], angles, self.cs_scale, self.num.acc))
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        sel = self.index_select(x, qr, L, angles)
        if sel is not None:
            mask = mask & sel
        if form == "naive":
            kvb = self.linear(c, p + ".kv_b_proj").reshape(T, H, dn + self.dv)
            k_nope, v = kvb[..., :dn], kvb[..., dn:]
            s = (torch.einsum("thd,shd->hts", q_nope, k_nope)
                 + torch.einsum("thr,sr->hts", q_pe, k_pe)) * self.softmax_scale
            s = s.masked_fill(~mask, float("-inf"))
            pr = torch.softmax(s, dim=-1)
            o = r(torch.einsum("hts,shd->thd", pr, v))
        else:
            wkv = self.w(p + ".kv_b_proj.weight").reshape(H, dn + self.dv, self.kvr)
            w_uk, w_uv = wkv[:, :dn], wkv[:, dn:]
            q_lat = r(torch.einsum("thd,hdc->thc", q_nope, w_uk))
            s = (torch.einsum("thc,sc->hts", q_lat, c)
                 + torch.einsum("thr,sr->hts", q_pe, k_pe)) * self.softmax_scale
            s = s.masked_fill(~mask, float("-inf"))
            pr = torch.softmax(s, dim=-1)
            o_lat = r(torch.einsum("hts,sc->thc", pr, c))
            o = r(torch.einsum("thc,hdc->thd", o_lat, w_uv))
        self._put("attn_core", o.reshape(T, H * self.dv))
        return self.linear(o.reshape(T, H * self.dv), p + ".o_proj")

    def index_select(self, x, qr, L, angles):
        """DeepSeek-V3.2's sparse attention: the keys each query may attend (None: all, V3)."""
        return None

    def mlp(self, x, prefix):
        g = self.linear(x, prefix + ".gate_proj")
        u = self.linear(x, prefix + ".up_proj")
        a = self.num.r(F.silu(g) * u)
        return self.linear(a, prefix + ".down_proj")

    def gate(self, x, L):
        p = f"model.layers.{L}.mlp.gate"
        cfg = self.cfg
        logits = x @ self.w(p + ".weight").T  # f32 (acc) scores: SPEC section 6
        self._put("gate_logits", logits)
        scores = torch.sigmoid(logits)
        idx, w, margins = noaux_tc(scores, self.w(p + ".e_score_correction_bias"), cfg["n_group"],
                                   cfg["topk_group"], cfg["num_experts_per_tok"],
                                   cfg["routed_scaling_factor"])
        return idx, self.num.r(w), margins

    def moe(self, x, L):
        p = f"model.layers.{L}.mlp"
        idx, w, margins = self.gate(x, L)
        T = x.shape[0]
        acc = torch.zeros_like(x)
        k = idx.shape[1]
        sorted_idx = idx.gather(1, idx.argsort(dim=-1))
        expert_out = torch.zeros(T, k, x.shape[1], dtype=x.dtype)
        for e in range(self.cfg["n_routed_experts"]):
            sel = (idx == e)
            rows = sel.any(-1).nonzero().reshape(-1)
            if len(rows) == 0:
                continue
            y = self.mlp(x[rows], f"{p}.experts.{e}")
            we = (w[rows] * sel[rows].to(w.dtype)).sum(-1, keepdim=True)
            acc[rows] += we * y
            slot = (sorted_idx[rows] == e).to(torch.int64).argmax(-1)
            expert_out[rows, slot] = y
        self._put("expert_out", expert_out)
        z = self.mlp(x, f"{p}.shared_experts")
        self._put("shared_out", z)
        out = self.num.r(acc + z)
        assert T == out.shape[0]
        return out, idx, w, margins

    def ffn(self, x, L):
        if L < self.cfg["first_k_dense_replace"]:
            return self.mlp(x, f"model.layers.{L}.mlp"), None, None, None
        return self.moe(x, L)

    def layer(self, h, L, positions):
        """One decoder layer: returns taps and the new hidden state."""
        a = self.attention(self.rmsnorm(h, f"model.layers.{L}.input_layernorm.weight"), L, positions)
        hm = self.num.r(h + a)
        f, idx, w, mg = self.ffn(self.rmsnorm(hm, f"model.layers.{L}.post_attention_layernorm.weight"), L)
        return a, f, idx, w, mg, self.num.r(hm + f)

    def forward(self, tokens):
        positions = torch.arange(len(tokens), dtype=torch.int64)
        h = self.num.r(self.w("model.embed_tokens.weight")[tokens])
        taps = {}
        margins = {}
        self._taps = taps
        for L in range(self.cfg["num_hidden_layers"]):
            self._L = L
            taps[f"layers.{L}.input"] = h
            a, f, idx, w, mg, h = self.layer(h, L, positions)
            taps[f"layers.{L}.attn_out"] = a
            taps[f"layers.{L}.ffn_out"] = f
            if idx is not None:
                taps[f"layers.{L}.topk_idx"] = idx
                taps[f"layers.{L}.topk_weights"] = w
                margins[L] = mg
        self._taps = None
        fn = self.rmsnorm(h, "model.norm.weight")
        taps["final_norm_out"] = fn
        taps["logits"] = self.num.r(fn @ self.w("lm_head.weight").T)
        return taps, margins

    # teacher forcing -----------------------------------------------------
    def tf_attn(self, h_in, L):
        positions = torch.arange(h_in.shape[0], dtype=torch.int64)
        h = self.num.r(h_in.to(self.num.acc))
        return self.attention(self.rmsnorm(h, f"model.layers.{L}.input_layernorm.weight"), L, positions)

    def tf_ffn(self, h_mid, L):
        hm = self.num.r(h_mid.to(self.num.acc))
        return self.ffn(self.rmsnorm(hm, f"model.layers.{L}.post_attention_layernorm.weight"), L)

    # multi-token prediction ----------------------------------------------
    def mtp(self, hidden, next_tokens):
        """DeepSeek-V3's MTP module (layer index L = num_hidden_layers), one depth.

        Position t combines the main model's final hidden state h_t (after
        ``model.norm``, as vLLM, SGLang and transformers feed it) with the
        embedding of the next token t+1 and predicts token t+2:

            x_t = eh_proj([enorm(embed(tok_{t+1})) || hnorm(h_t)])
            y   = decoder_layer_L(x) at positions 0..T'-1 (causal over the MTP positions)
            logits = shared_head.head(shared_head.norm(y))

        hidden [T', D], next_tokens [T'] (int64).  Returns (taps, margins).
        """
        L = self.cfg["num_hidden_layers"]
        p = f"model.layers.{L}"
        r = self.num.r
        positions = torch.arange(len(next_tokens), dtype=torch.int64)
        taps = {}
        self._taps = taps
        self._L = L
        e = r(self.w("model.embed_tokens.weight")[next_tokens])
        en = self.rmsnorm(e, p + ".enorm.weight")
        hn = self.rmsnorm(r(hidden.to(self.num.acc)), p + ".hnorm.weight")
        taps["mtp.embed_norm"] = en
        taps["mtp.hidden_norm"] = hn
        x = self.linear(torch.cat([en, hn], dim=-1), p + ".eh_proj")
        taps[f"layers.{L}.input"] = x
        a, f, idx, w, mg, h = self.layer(x, L, positions)
        taps[f"layers.{L}.attn_out"] = a
        taps[f"layers.{L}.ffn_out"] = f
        margins = {}
        if idx is not None:
            taps[f"layers.{L}.topk_idx"] = idx
            taps[f"layers.{L}.topk_weights"] = w
            margins[L] = mg
        self._taps = None
        fn = self.rmsnorm(h, p + ".shared_head.norm.weight")
        taps["mtp.norm_out"] = fn
        taps["mtp.logits"] = r(fn @ self.w(p + ".shared_head.head.weight").T)
        return taps, margins


# ------------------------------------------------------------------ DeepSeek-V3.2
def apply_rope_half(x, angles, cs_scale, acc):
    """Non-interleaved ("rotate half") RoPE: pairs (x[i], x[i + d/2]) rotated by angles[..., i].

    This is what DeepSeek-V3.2's fixed reference applies in the indexer (the
    first release applied the interleaved form there, a silent quality bug)."""
    a = angles.to(acc)
    shape = [a.shape[0]] + [1] * (x.dim() - 2) + [a.shape[1]]
    c = (torch.cos(a) * cs_scale).reshape(shape)
    s = (torch.sin(a) * cs_scale).reshape(shape)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def hadamard_matrix(n, dtype):
    """Sylvester's Hadamard matrix H_n (entries +-1), n a power of two."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class V32Model(V3Model):
    """DeepSeek-V3.2: V3 plus the lightning indexer choosing index_topk keys per query.

    Indexer (per layer, names under ``self_attn.indexer``):
      q = wq_b(qr) per head [n, d]; k = k_norm(wk(x)) [d] (LayerNorm with bias);
      non-interleaved RoPE on the first qk_rope_head_dim dims of q and k;
      q, k rotated by the normalized Hadamard transform (H/sqrt(d));
      w = weights_proj(x) * n^-0.5;
      score[i, j] = sum_h relu(q[i,h] . k[j]) * w[i,h] * d^-0.5 (j <= i);
      fp8 mode (the reference's FP8 path): q and k through act_quant (128-wide groups), the
      dot products exact on the e4m3 values, w[i,h] * q_scale[i,h] * d^-0.5 in f32, then
      score[i, j] = sum_h relu(q8[i,h] . k8[j]) * that weight * k_scale[j].
    Attention then sees only the top min(index_topk, i+1) visible keys of query i.
    """

    def __init__(self, cfg, ckpt, num, indexer_rope="half"):
        super().__init__(cfg, ckpt, num)
        self.index_margins = {}
        # "interleaved" reproduces the first V3.2 release's indexer RoPE bug (measurements only).
        assert indexer_rope in ("half", "interleaved")
        self.indexer_rope = apply_rope_half if indexer_rope == "half" else apply_rope

    def layernorm(self, x, prefix):
        w = self.w(prefix + ".weight")
        b = self.w(prefix + ".bias")
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return self.num.r((x - mu) * torch.rsqrt(var + self.eps) * w + b)

    def index_select(self, x, qr, L, angles):
        cfg = self.cfg
        n, d, topk = cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]
        dr = self.dr
        acc = self.num.acc
        r = self.num.r
        p = f"model.layers.{L}.self_attn.indexer"
        T = x.shape[0]
        q = self.linear(qr, p + ".wq_b").reshape(T, n, d)
        rope = self.indexer_rope
        q = torch.cat([r(rope(q[..., :dr], angles, self.cs_scale, acc)), q[..., dr:]], dim=-1)
        k = self.layernorm(self.linear(x, p + ".wk"), p + ".k_norm")
        k = torch.cat([r(rope(k[..., :dr], angles, self.cs_scale, acc)), k[..., dr:]], dim=-1)
        had = hadamard_matrix(d, acc) * (d ** -0.5)
        q = r(q @ had)
        k = r(k @ had)
        self._put("index_q", q.reshape(T, n * d))
        self._put("index_k", k)
        w = r(self.linear(x, p + ".weights_proj") * (n ** -0.5))
        if self.num.mode == "fp8":
            assert d == 128, "one act_quant group per indexer head"
            q8, qs = act_quant(q.reshape(T * n, d), "float", "e4m3", check=False)
            k8, ks = act_quant(k, "float", "e4m3", check=False)
            wq = w.to(torch.float32).reshape(T, n, 1) * qs.reshape(T, n, d // 128)[..., :1] \
                * torch.tensor(d ** -0.5, dtype=torch.float32)
            dots = torch.einsum("ihd,jd->ihj", q8.to(torch.float64).reshape(T, n, d), k8.to(torch.float64))
            score = (torch.relu(dots) * wq.to(torch.float64)).sum(1) * ks[:, 0].to(torch.float64)[None, :]
        else:
            dots = torch.einsum("ihd,jd->ihj", q, k)
            score = (torch.relu(dots) * (w * (d ** -0.5)).unsqueeze(-1)).sum(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        score = score.masked_fill(~causal, float("-inf"))
        self._put("index_score", score)
        kk = min(topk, T)
        order = torch.sort(score, dim=-1, descending=True, stable=True)
        top = order.indices[:, :kk]
        sel = torch.zeros(T, T, dtype=torch.bool)
        sel.scatter_(1, top, True)
        sel = sel & causal
        idx = torch.where(sel, torch.arange(T).expand(T, T), torch.full((T, T), T))
        idx = idx.sort(dim=-1).values[:, :kk]
        idx = torch.where(idx == T, torch.full_like(idx, -1), idx)
        self._put("index_topk", idx)
        vis = torch.arange(T) + 1
        gap = torch.full((T,), float("inf"), dtype=torch.float64)
        if T > kk:
            g = (order.values[:, kk - 1] - order.values[:, kk]).to(torch.float64)
            scale = order.values[:, 0].abs().to(torch.float64).clamp_min(1e-30)
            gap = torch.where(vis > kk, g / scale, gap)
        self.index_margins[L] = gap
        return sel
