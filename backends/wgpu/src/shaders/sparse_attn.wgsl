// Sparse MLA attention over selected keys, shared by `sparse_mla_decode`
// (spec-v32 §9.3: keys from FlashMLA's 656-byte FP8 latent cache, FP8 =
// true) and `sparse_mla_prefill` (§9.7: keys from a plain [s_kv, 1, D]
// tensor of dtype KV_DT, D = 576 or 512). One workgroup per (query row,
// tile of HT = 8 heads); the heads of a tile share the keys. The selected
// keys are walked in chunks of T = 8, all in f32 with an online softmax:
// * staging: the chunk's keys are decoded once into workgroup memory as f32
//   (FP8: e4m3 · its group's scale); an invalid slot stages zeros and is
//   never read;
// * scores: invocation (head hh, group gg, key tt) owns 128 latent channels
//   of group gg and 16 rope channels (D = 576), its q slice in registers;
//   the 4 partials are summed per (head, key);
// * softmax: running max m, rescale α = e^(m_old − m_new), p = e^(S − m),
//   running sum l (one invocation per head);
// * o = α·o + Σ p·V: invocation j owns channels 2j, 2j + 1 of all 8 heads.
// Finally out = o / l · 1/(1 + e^(sink − lse)), lse = m + ln l, max_logits
// = m; a row with no valid key gives out = 0, lse = +inf, max_logits = −inf.
//
// Keys beyond the storage binding limit are bound in windows [lo, hi) of
// key rows, one dispatch each: a dispatch attends to the valid keys inside
// its window and carries (o, m, l) per (row, head) in `st` (514 words:
// o[512], m, l) to the next; the first starts empty, the last writes out,
// lse (and max_logits). A single window does neither.
struct Params {
    h_q: u32,
    s_q: u32,      // decode: query rows per sequence (prefill: 1)
    topk: u32,
    tiles: u32,    // ceil(h_q / HT)
    total: u32,    // workgroups = rows · tiles
    has_len: u32,
    has_sink: u32,
    lo: u32,       // the window of key rows bound as `kv`
    hi: u32,
    first: u32,    // 1: start from an empty state (else read `st`)
    last: u32,     // 1: write the outputs (else write `st`)
    scale: f32,
}

const NEG_BIG: f32 = -3.0e38;
const INVALID: u32 = 0xffffffffu;
const HT: u32 = 8u;
const T: u32 = 8u;
const KN: u32 = T * D4;
// Rope vec4s per group (4 with D = 576, none with D = 512).
const RG: u32 = (D4 - 128u) / 4u;

var<workgroup> Kf: array<vec4<f32>, KN>; // [T][D4] staged keys
// Small tables as vec4s: llvmpipe loads a vec4 for the price of a scalar.
var<workgroup> Slot: array<vec4<u32>, 2>; // window-relative slot or INVALID
var<workgroup> Part: array<vec4<f32>, 64>; // [HT][4 groups][T]
var<workgroup> Pr: array<vec4<f32>, 16>;   // [HT][T]
var<workgroup> Al: array<vec4<f32>, 2>;    // [HT]
var<workgroup> Fac: array<vec4<f32>, 2>;   // [HT]
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

fn bf2(w: u32) -> vec2<f32> {
    return vec2<f32>(bf16_to_f32(w & 0xffffu), bf16_to_f32(w >> 16u));
}

fn f162(w: u32) -> vec2<f32> {
    return vec2<f32>(f16_to_f32(w & 0xffffu), f16_to_f32(w >> 16u));
}

// Channels 4i … 4i + 3 of key row `slot` (window-relative).
fn key4(slot: u32, i: u32) -> vec4<f32> {
    if FP8 {
        let base = slot * 164u;
        if i < 128u {
            let w = b_kv[base + i];
            let s = bitcast<f32>(b_kv[base + 128u + i / 32u]);
            return vec4<f32>(
                e4m3_to_f32_sel(w & 0xffu, false),
                e4m3_to_f32_sel((w >> 8u) & 0xffu, false),
                e4m3_to_f32_sel((w >> 16u) & 0xffu, false),
                e4m3_to_f32_sel(w >> 24u, false)
            ) * s;
        }
        let r = base + 132u + 2u * (i - 128u);
        return vec4<f32>(bf2(b_kv[r]), bf2(b_kv[r + 1u]));
    }
    if KV_DT == DT_F32 {
        let e = slot * (4u * D4) + 4u * i;
        return bitcast<vec4<f32>>(vec4<u32>(b_kv[e], b_kv[e + 1u], b_kv[e + 2u], b_kv[e + 3u]));
    }
    let w = slot * (2u * D4) + 2u * i;
    if KV_DT == DT_F16 {
        return vec4<f32>(f162(b_kv[w]), f162(b_kv[w + 1u]));
    }
    return vec4<f32>(bf2(b_kv[w]), bf2(b_kv[w + 1u]));
}

fn load_q4(e: u32) -> vec4<f32> {
    return vec4<f32>(ld_q(e), ld_q(e + 1u), ld_q(e + 2u), ld_q(e + 3u));
}

// Stores channels e, e + 1 of `out` (o already scaled) for head h0 + h.
fn put_out2(row: u32, hd: u32, lid: u32, o: vec2<f32>) {
    if hd >= P.h_q {
        return;
    }
    let e = (row * P.h_q + hd) * 512u + 2u * lid;
    if OUT_PER == 1u {
        stw_out(e, enc_out(o.x));
        stw_out(e + 1u, enc_out(o.y));
    } else {
        stw_out(e / 2u, (enc_out(o.x) & 0xffffu) | (enc_out(o.y) << 16u));
    }
}

// Saves a head's channels 2·lid, 2·lid + 1 into the carried state.
fn put_st2(row: u32, hd: u32, lid: u32, o: vec2<f32>) {
    if hd >= P.h_q {
        return;
    }
    let sb = (row * P.h_q + hd) * 514u;
    b_st[sb + 2u * lid] = bitcast<u32>(o.x);
    b_st[sb + 2u * lid + 1u] = bitcast<u32>(o.y);
}

fn get_st2(row: u32, hd: u32, lid: u32) -> vec2<f32> {
    let sb = (row * P.h_q + min(hd, P.h_q - 1u)) * 514u;
    return bitcast<vec2<f32>>(vec2<u32>(b_st[sb + 2u * lid], b_st[sb + 2u * lid + 1u]));
}

fn per_workgroup(wg: u32, lid: u32) {
    if wg >= P.total {
        return;
    }
    let tile = wg % P.tiles;
    let row = wg / P.tiles;
    let h0 = tile * HT;
    if lid == 0u {
        var klen = P.topk;
        if P.has_len == 1u {
            let l = ldi_tl(row / P.s_q);
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
    let head = h0 + hh;
    let qb = (row * P.h_q + min(head, P.h_q - 1u)) * D;
    // q of head hh, group gg: latent channels gg·128 …, rope gg·16 … (q0 …).
{Q}
    // Softmax state of head lid (lid < HT).
    var m = NEG_BIG;
    var l = 0.0;
    // Output role: channels 2·lid, 2·lid + 1 of every head.
    // a0 … a7: named, not an array (a dynamically indexed array would be
    // gathered lane by lane).
{A_DECL}
    if P.first == 0u {
{A_LOAD}
        if lid < HT {
            let sb = (row * P.h_q + min(h0 + lid, P.h_q - 1u)) * 514u;
            m = bitcast<f32>(b_st[sb + 512u]);
            l = bitcast<f32>(b_st[sb + 513u]);
        }
    }
    let ibase = row * P.topk;
    for (var c0 = 0u; c0 < klen; c0 = c0 + T) {
        // The previous chunk's readers are done.
        workgroupBarrier();
        if lid < T {
            var slot = INVALID;
            let k = c0 + lid;
            if k < klen {
                let v = ldi_idx(ibase + k);
                if !i64_is_negative(v) && v.y == 0u && v.x >= P.lo && v.x < P.hi {
                    slot = v.x - P.lo;
                }
            }
            Slot[lid / 4u][lid % 4u] = slot;
        }
        workgroupBarrier();
        for (var e = lid; e < KN; e = e + 256u) {
            let t = e / D4;
            let slot = Slot[t / 4u][t % 4u];
            var v = vec4<f32>(0.0);
            if slot != INVALID {
                v = key4(slot, e % D4);
            }
            Kf[e] = v;
        }
        workgroupBarrier();
        // Scores: partial dot of (head hh, key tt) over group gg.
        var part = 0.0;
        let kb = tt * D4 + gg * 32u;
        let rb = tt * D4 + 128u + gg * RG;
{SCORE}
        part = select(0.0, part, Slot[tt / 4u][tt % 4u] != INVALID);
        Part[lid / 4u][lid % 4u] = part;
        workgroupBarrier();
        if lid < HT {
            // Part[h][g][t]: vec4s 8h + 2g (t < 4) and 8h + 2g + 1.
            let pb = lid * 8u;
            let s_lo = (Part[pb] + Part[pb + 2u] + Part[pb + 4u] + Part[pb + 6u]) * P.scale;
            let s_hi = (Part[pb + 1u] + Part[pb + 3u] + Part[pb + 5u] + Part[pb + 7u]) * P.scale;
            let v_lo = Slot[0] != vec4<u32>(INVALID);
            let v_hi = Slot[1] != vec4<u32>(INVALID);
            let n_lo = select(vec4<f32>(NEG_BIG), s_lo, v_lo);
            let n_hi = select(vec4<f32>(NEG_BIG), s_hi, v_hi);
            let mx4 = max(n_lo, n_hi);
            let mc = max(m, max(max(mx4.x, mx4.y), max(mx4.z, mx4.w)));
            var alpha = 1.0;
            if m != NEG_BIG {
                alpha = exp_f32(m - mc);
            }
            let d_lo = s_lo - mc;
            let d_hi = s_hi - mc;
            let p_lo = select(vec4<f32>(0.0), vec4<f32>(exp_f32(d_lo.x), exp_f32(d_lo.y), exp_f32(d_lo.z), exp_f32(d_lo.w)), v_lo);
            let p_hi = select(vec4<f32>(0.0), vec4<f32>(exp_f32(d_hi.x), exp_f32(d_hi.y), exp_f32(d_hi.z), exp_f32(d_hi.w)), v_hi);
            Pr[2u * lid] = p_lo;
            Pr[2u * lid + 1u] = p_hi;
            let ps = p_lo + p_hi;
            l = l * alpha + ((ps.x + ps.y) + (ps.z + ps.w));
            m = mc;
            Al[lid / 4u][lid % 4u] = alpha;
        }
        workgroupBarrier();
        let al0 = Al[0];
        let al1 = Al[1];
{PV}
    }
    if P.last == 0u {
        // Carry the state to the next window.
        if lid < HT && h0 + lid < P.h_q {
            let sb = (row * P.h_q + h0 + lid) * 514u;
            b_st[sb + 512u] = bitcast<u32>(m);
            b_st[sb + 513u] = bitcast<u32>(l);
        }
{A_SAVE}
        return;
    }
    if lid < HT {
        let hd = h0 + lid;
        var f = 0.0;
        var lse = f32_inf(false);
        var mx = f32_inf(true);
        if l > 0.0 {
            lse = m + ln_f32(l);
            mx = m;
            f = 1.0 / l;
            if P.has_sink == 1u && hd < P.h_q {
                f = f / (1.0 + exp_f32(ld_sink(hd) - lse));
            }
        }
        Fac[lid / 4u][lid % 4u] = f;
        if hd < P.h_q {
            let b = row / P.s_q;
            let s = row % P.s_q;
            let item = row * P.h_q + hd;
            stw_lse((b * P.h_q + hd) * P.s_q + s, bitcast<u32>(lse));
{MAXL}
        }
    }
    workgroupBarrier();
    let f0 = Fac[0];
    let f1 = Fac[1];
{A_OUT}
}
