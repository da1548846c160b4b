// MLA attention, pass 2 of split-K flash decoding: merges the per-split
// partials (o, m, l) of mla_decode.wgsl with the log-sum-exp rule,
//   M = max m_i,  L = Σ l_i·e^(m_i − M),  out = Σ o_i·e^(m_i − M) / L,
//   lse = M + ln L (natural log),
// in f32, rounding once to out's dtype. A row without visible keys (every
// l_i = 0) gives out = 0 and lse = +inf. One workgroup per output row
// (b, s, h); invocations own channel pairs.
struct Params {
    s_q: u32,
    h_q: u32,
    h_kv: u32,
    grp: u32,
    dv: u32,
    nsplit: u32,  // at most 256
    rows: u32,    // b · s_q · h_q
    write_lse: u32,
}

const NEG_BIG: f32 = -3.0e38;

var<workgroup> W: array<f32, 256>;

// ln x for finite x ≥ 2^-126, ≈1 ulp: x = 2^e·m with m in [√½, √2),
// ln m = 2·atanh((m − 1)/(m + 1)) by its series.
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

fn store_pair(e: u32, c: u32, v0: f32, v1: f32) {
    if OUT_PER == 1u {
        stw_out(e, enc_out(v0));
        if c + 1u < P.dv {
            stw_out(e + 1u, enc_out(v1));
        }
    } else if (e & 1u) == 0u && c + 1u < P.dv {
        stw_out(e / 2u, (enc_out(v0) & 0xffffu) | (enc_out(v1) << 16u));
    } else {
        st_out(e, v0);
        if c + 1u < P.dv {
            st_out(e + 1u, v1);
        }
    }
}

fn per_workgroup(row: u32, lid: u32) {
    if row >= P.rows {
        return;
    }
    let h = row % P.h_q;
    let s = (row / P.h_q) % P.s_q;
    let b = row / (P.h_q * P.s_q);
    let kvh = h / P.grp;
    let r = s * P.grp + h % P.grp;
    let prow = (b * P.h_kv + kvh) * (P.s_q * P.grp) + r;
    let pb = prow * P.nsplit;
    var mx = NEG_BIG;
    var any = false;
    for (var i = 0u; i < P.nsplit; i = i + 1u) {
        let l = bitcast<f32>(b_stat[(pb + i) * 2u + 1u]);
        if l != 0.0 {
            mx = max(mx, bitcast<f32>(b_stat[(pb + i) * 2u]));
            any = true;
        }
    }
    var total = 0.0;
    for (var i = 0u; i < P.nsplit; i = i + 1u) {
        let l = bitcast<f32>(b_stat[(pb + i) * 2u + 1u]);
        if l != 0.0 {
            total = total + l * exp_f32(bitcast<f32>(b_stat[(pb + i) * 2u]) - mx);
        }
    }
    if lid < P.nsplit {
        let l = bitcast<f32>(b_stat[(pb + lid) * 2u + 1u]);
        var wv = 0.0;
        if l != 0.0 {
            wv = exp_f32(bitcast<f32>(b_stat[(pb + lid) * 2u]) - mx);
        }
        W[lid] = wv;
    }
    workgroupBarrier();
    for (var c = 2u * lid; c < P.dv; c = c + 512u) {
        var o0 = 0.0;
        var o1 = 0.0;
        for (var i = 0u; i < P.nsplit; i = i + 1u) {
            let wi = W[i];
            let base = (pb + i) * P.dv + c;
            o0 = o0 + wi * bitcast<f32>(b_part[base]);
            if c + 1u < P.dv {
                o1 = o1 + wi * bitcast<f32>(b_part[base + 1u]);
            }
        }
        if any {
            o0 = o0 / total;
            o1 = o1 / total;
        } else {
            o0 = 0.0;
            o1 = 0.0;
        }
        store_pair(row * P.dv + c, c, o0, o1);
    }
    if lid == 0u && P.write_lse != 0u {
        var l = f32_inf(false);
        if any {
            l = mx + ln_f32(total);
        }
        stw_lse((b * P.h_q + h) * P.s_q + s, bitcast<u32>(l));
    }
}
