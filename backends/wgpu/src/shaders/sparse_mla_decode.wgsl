// MLA decode over selected tokens of FlashMLA's V3.2 FP8 latent cache
// (spec-v32 §9.3). One workgroup per (b, s, tile of HT = 8 heads); the
// heads of a tile share the keys. The topk slots are walked in chunks of
// T = 8 keys, all in f32 with an online softmax:
// * staging: the chunk's latent bytes are decoded from e4m3 into f16 pairs
//   in workgroup memory (e4m3 values are exact in f16), with the 4 scales
//   and the 64 bf16 rope values; an invalid slot (−1, past topk_length, or
//   out of range, which the check kernel reports) stages zeros and its
//   cache token is never read;
// * scores: invocation (head, group g, key) owns 128 latent channels of
//   group g and 16 rope channels, its q slice kept in registers; the dot
//   over the group is multiplied by the group's scale once (K = e4m3·scale
//   is never rounded on its own), the 4 partials summed per (head, key);
// * softmax: running max m, rescale α = e^(m_old − m_new), p = e^(S − m),
//   running sum l (one invocation per head);
// * o = α·o + Σ p·scale·e4m3: invocation j owns channels 2j, 2j + 1 of all
//   8 heads.
// Finally out = o / l · 1/(1 + e^(sink − lse)), lse = m + ln l; a row with no
// valid slot gives out = 0, lse = +inf.
struct Params {
    s_q: u32,
    h_q: u32,
    topk: u32,
    slots: u32,    // num_blocks · block_size
    tiles: u32,    // ceil(h_q / HT)
    total: u32,    // workgroups
    has_len: u32,
    has_sink: u32,
    scale: f32,
}

const HT: u32 = 8u;
const T: u32 = 8u;
const TW: u32 = 164u; // words per token (656 bytes)
const NEG_BIG: f32 = -3.0e38;
const INVALID: u32 = 0xffffffffu;

var<workgroup> Kh: array<u32, 2048>;  // [T][256] f16 pairs of latent channels
var<workgroup> Rp: array<u32, 256>;   // [T][32] bf16 pairs of rope channels
var<workgroup> Sc: array<f32, 32>;    // [T][4] scales
var<workgroup> Slot: array<u32, 8>;
var<workgroup> Part: array<f32, 256>; // [HT][4 groups][T]
var<workgroup> Pr: array<f32, 64>;    // [HT][T]
var<workgroup> Al: array<f32, 8>;
var<workgroup> Fac: array<f32, 8>;
var<workgroup> klen_w: u32;

// ln x for finite x ≥ 2^-126 (mla_combine.wgsl's).
fn ln_f32(x: f32) -> f32 {
    let u = bitcast<u32>(x);
    var e = i32(u >> 23u) - 127;
    var m = bitcast<f32>((u & 0x7fffffu) | 0x3f800000u);
    if m > 1.4142135 {
        m = m * 0.5;
        e = e + 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    var p = 0.18181818;
    p = p * z + 0.22222222;
    p = p * z + 0.28571429;
    p = p * z + 0.4;
    p = p * z + 0.66666667;
    p = p * z + 2.0;
    let fe = f32(e);
    return fe * 0.693145751953125 + (fe * 1.428606765330187e-6 + s * p);
}

fn e4m3_pair(w: u32) -> u32 {
    return pack2x16float(vec2<f32>(e4m3_to_f32(w & 0xffu, false), e4m3_to_f32((w >> 8u) & 0xffu, false)));
}

fn h4(w0: u32, w1: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w0), unpack2x16float(w1));
}

fn r4(w0: u32, w1: u32) -> vec4<f32> {
    return vec4<f32>(bf16_to_f32(w0 & 0xffffu), bf16_to_f32(w0 >> 16u), bf16_to_f32(w1 & 0xffffu), bf16_to_f32(w1 >> 16u));
}

fn per_workgroup(wg: u32, lid: u32) {
    if wg >= P.total {
        return;
    }
    let tile = wg % P.tiles;
    let bs = wg / P.tiles; // b · s_q + s
    let b = bs / P.s_q;
    let s = bs % P.s_q;
    let h0 = tile * HT;
    if lid == 0u {
        var klen = P.topk;
        if P.has_len == 1u {
            let l = ldi_tl(b);
            if i64_is_negative(l) {
                klen = 0u;
            } else if l.y == 0u && l.x < P.topk {
                klen = l.x;
            }
        }
        klen_w = klen;
    }
    let klen = workgroupUniformLoad(&klen_w);

    // Score role: head hh, group gg, key tt; q slice in registers.
    let hh = lid / 32u;
    let gg = (lid / 8u) % 4u;
    let tt = lid % 8u;
    var qv: array<vec4<f32>, 36>;
    let head = h0 + hh;
    let qb = (bs * P.h_q + head) * 576u;
    for (var i = 0u; i < 32u; i = i + 1u) {
        var v = vec4<f32>(0.0);
        if head < P.h_q {
            let c = qb + gg * 128u + 4u * i;
            v = vec4<f32>(ld_q(c), ld_q(c + 1u), ld_q(c + 2u), ld_q(c + 3u));
        }
        qv[i] = v;
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        var v = vec4<f32>(0.0);
        if head < P.h_q {
            let c = qb + 512u + gg * 16u + 4u * i;
            v = vec4<f32>(ld_q(c), ld_q(c + 1u), ld_q(c + 2u), ld_q(c + 3u));
        }
        qv[32u + i] = v;
    }
    // Softmax state of head lid (lid < HT).
    var m = NEG_BIG;
    var l = 0.0;
    // Output role: channels 2·lid, 2·lid + 1 of every head.
    var acc: array<vec2<f32>, 8>;
    for (var h = 0u; h < HT; h = h + 1u) {
        acc[h] = vec2<f32>(0.0);
    }
    let ibase = bs * P.topk;
    for (var c0 = 0u; c0 < klen; c0 = c0 + T) {
        // The previous chunk's readers are done.
        workgroupBarrier();
        if lid < T {
            var slot = INVALID;
            let k = c0 + lid;
            if k < klen {
                let v = ldi_idx(ibase + k);
                if !i64_is_negative(v) && v.y == 0u && v.x < P.slots {
                    slot = v.x;
                }
            }
            Slot[lid] = slot;
        }
        workgroupBarrier();
        for (var t = 0u; t < T; t = t + 1u) {
            let slot = Slot[t];
            var w = 0u;
            if slot != INVALID {
                let word = b_kc[slot * TW + lid / 2u];
                w = e4m3_pair(word >> (16u * (lid % 2u)));
            }
            Kh[t * 256u + lid] = w;
        }
        {
            let t = lid / 32u;
            let slot = Slot[t];
            var w = 0u;
            if slot != INVALID {
                w = b_kc[slot * TW + 132u + lid % 32u];
            }
            Rp[lid] = w;
        }
        if lid < 32u {
            let slot = Slot[lid / 4u];
            var sc = 0.0;
            if slot != INVALID {
                sc = bitcast<f32>(b_kc[slot * TW + 128u + lid % 4u]);
            }
            Sc[lid] = sc;
        }
        workgroupBarrier();
        // Scores: partial dot of (head hh, key tt) over group gg.
        var part = 0.0;
        if Slot[tt] != INVALID {
            let kb = tt * 256u + gg * 64u;
            var a = 0.0;
            for (var i = 0u; i < 16u; i = i + 1u) {
                let w = kb + 4u * i;
                a = a + dot(qv[2u * i], h4(Kh[w], Kh[w + 1u])) + dot(qv[2u * i + 1u], h4(Kh[w + 2u], Kh[w + 3u]));
            }
            part = a * Sc[tt * 4u + gg];
            let rb = tt * 32u + gg * 8u;
            for (var i = 0u; i < 4u; i = i + 1u) {
                part = part + dot(qv[32u + i], r4(Rp[rb + 2u * i], Rp[rb + 2u * i + 1u]));
            }
        }
        Part[lid] = part;
        workgroupBarrier();
        if lid < HT {
            var sv: array<f32, 8>;
            var mc = m;
            for (var t = 0u; t < T; t = t + 1u) {
                let pb = lid * 32u + t;
                sv[t] = (Part[pb] + Part[pb + 8u] + Part[pb + 16u] + Part[pb + 24u]) * P.scale;
                if Slot[t] != INVALID {
                    mc = max(mc, sv[t]);
                }
            }
            var alpha = 1.0;
            if m != NEG_BIG {
                alpha = exp_f32(m - mc);
            }
            var sum = 0.0;
            for (var t = 0u; t < T; t = t + 1u) {
                var p = 0.0;
                if Slot[t] != INVALID {
                    p = exp_f32(sv[t] - mc);
                }
                Pr[lid * T + t] = p;
                sum = sum + p;
            }
            l = l * alpha + sum;
            m = mc;
            Al[lid] = alpha;
        }
        workgroupBarrier();
        let g = lid / 64u;
        for (var h = 0u; h < HT; h = h + 1u) {
            acc[h] = acc[h] * Al[h];
        }
        for (var t = 0u; t < T; t = t + 1u) {
            let v = unpack2x16float(Kh[t * 256u + lid]);
            let sc = Sc[t * 4u + g];
            for (var h = 0u; h < HT; h = h + 1u) {
                acc[h] = acc[h] + (Pr[h * T + t] * sc) * v;
            }
        }
    }
    if lid < HT {
        let hd = h0 + lid;
        var f = 0.0;
        var lse = f32_inf(false);
        if l > 0.0 {
            lse = m + ln_f32(l);
            f = 1.0 / l;
            if P.has_sink == 1u && hd < P.h_q {
                f = f / (1.0 + exp_f32(ld_sink(hd) - lse));
            }
        }
        Fac[lid] = f;
        if hd < P.h_q {
            stw_lse((b * P.h_q + hd) * P.s_q + s, bitcast<u32>(lse));
        }
    }
    workgroupBarrier();
    for (var h = 0u; h < HT; h = h + 1u) {
        let hd = h0 + h;
        if hd < P.h_q {
            let o = acc[h] * Fac[h];
            let e = (bs * P.h_q + hd) * 512u + 2u * lid;
            if OUT_PER == 1u {
                stw_out(e, enc_out(o.x));
                stw_out(e + 1u, enc_out(o.y));
            } else {
                stw_out(e / 2u, (enc_out(o.x) & 0xffffu) | (enc_out(o.y) << 16u));
            }
        }
    }
}
