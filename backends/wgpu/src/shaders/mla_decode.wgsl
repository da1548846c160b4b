// MLA attention over a paged cache, pass 1 of split-K flash decoding
// (SPEC §4). One workgroup per (batch, kv head, tile of HT = 8 query rows,
// split of the key range). The query rows of a kv head are (s, h) pairs with
// h in the head's group (row r → s = r / grp, h = kvh·grp + r % grp); each
// has its own visible length (causal: bottom-right aligned).
//
// Per chunk of T = 32 keys, all in f32:
// * scores S = q·k·scale: invocations 0..15 each own 4 rows × 4 keys and
//   run over the channels (q staged in workgroup memory — 16-bit q packed,
//   two channels a word — keys read through the block table);
// * online softmax: running max m, rescale factor α = e^(m_old − m_new),
//   probabilities p = e^(S − m), running sum l;
// * o = α·o + Σ p·v: every invocation owns a pair of V channels of all 8
//   rows.
// The partial (o, m, l) of each row and split goes to scratch;
// mla_combine.wgsl merges the splits. Workgroup data is laid out for vec4
// reads (CPU drivers pay per load, not per element).
//
// Only keys below a row's visible length are read (the caller's cache may
// hold NaN elsewhere); block ids are clamped into [0, num_blocks) and
// lengths into [0, capacity] (check kernels report bad values).
struct Params {
    s_q: u32,
    h_q: u32,
    h_kv: u32,
    grp: u32,        // h_q / h_kv
    d: u32,          // channels of q·k
    kstride: u32,    // channels per (slot, kv head) in the cache
    voff: u32,       // first V channel of a key row
    dv: u32,
    num_blocks: u32,
    block_size: u32,
    max_blocks: u32,
    capacity: u32,   // max_blocks · block_size
    rows_kv: u32,    // s_q · grp
    tiles: u32,      // ceil(rows_kv / HT)
    nsplit: u32,
    split_len: u32,  // a multiple of T
    causal: u32,
    scale: f32,
    total: u32,      // workgroups
}

const HT: u32 = 8u;
const T: u32 = 32u;
// vec4<u32> words of q per row: 8 channels each (16-bit q) or 4 (f32 q).
const QU: u32 = 72u;
const Q_PACKED: bool = Q_PER == 2u;
const CH: u32 = select(4u, 8u, Q_PACKED);
const QP: u32 = QU * CH; // channels staged at a time
const ACC: u32 = 4u * NJ;
// "No score yet": a finite sentinel (no arithmetic on infinities).
const NEG_BIG: f32 = -3.0e38;

var<workgroup> Qs: array<vec4<u32>, 576>; // [HT][QU]
var<workgroup> Ps: array<vec4<f32>, 64>;  // [T keys][2 row quads]: scores, then p
var<workgroup> Kb: array<u32, 32>;        // offset of each key row of the chunk
var<workgroup> Mx: array<vec4<f32>, 2>;
var<workgroup> Al: array<vec4<f32>, 2>;
var<workgroup> Ls: array<f32, 8>;
var<workgroup> Vis: array<u32, 8>;
var<workgroup> tile_vis_w: u32;

fn seqlen_of(b: u32) -> u32 {
    if P.num_blocks == 0u {
        return 0u;
    }
    let v = ldi_lens(b);
    if i64_is_negative(v) {
        return 0u;
    }
    if v.y != 0u || v.x > P.capacity {
        return P.capacity;
    }
    return v.x;
}

// Offset of key t (below the sequence length) of batch b, kv head kvh.
fn key_base(b: u32, kvh: u32, t: u32) -> u32 {
    let j = t / P.block_size;
    let blk = i64_clamp_index(ldi_bt(b * P.max_blocks + j), P.num_blocks);
    let slot = blk * P.block_size + t % P.block_size;
    return (slot * P.h_kv + kvh) * P.kstride;
}

fn k2w(w: u32) -> vec2<f32> {
    return vec2<f32>(dt_decode(K_DT, w & 0xffffu), dt_decode(K_DT, w >> 16u));
}

// Cache elements i, i + 1 (word loads for aligned 16-bit pairs).
fn ldk2(i: u32) -> vec2<f32> {
    if K_PER == 2u && (i & 1u) == 0u {
        return k2w(b_k[i / 2u]);
    }
    return vec2<f32>(ld_k(i), ld_k(i + 1u));
}

fn ldk4(i: u32) -> vec4<f32> {
    if K_PER == 2u && (i & 1u) == 0u {
        return vec4<f32>(k2w(b_k[i / 2u]), k2w(b_k[i / 2u + 1u]));
    }
    return vec4<f32>(ld_k(i), ld_k(i + 1u), ld_k(i + 2u), ld_k(i + 3u));
}

fn q2w(w: u32) -> vec2<f32> {
    return vec2<f32>(dt_decode(Q_DT, w & 0xffffu), dt_decode(Q_DT, w >> 16u));
}

// Channels 4·h .. 4·h + 3 of a staged vec4 word (h = 0, 1 when packed).
fn q4(w: vec4<u32>, h: u32) -> vec4<f32> {
    if Q_PACKED {
        if h == 0u {
            return vec4<f32>(q2w(w.x), q2w(w.y));
        }
        return vec4<f32>(q2w(w.z), q2w(w.w));
    }
    return bitcast<vec4<f32>>(w);
}

// Channel c (relative to the staged piece) of staged row i.
fn q_at(i: u32, c: u32) -> f32 {
    let w = Qs[i * QU + c / CH];
    if Q_PACKED {
        let word = w[(c % 8u) / 2u];
        return dt_decode(Q_DT, select(word & 0xffffu, word >> 16u, (c & 1u) == 1u));
    }
    return bitcast<f32>(w[c % 4u]);
}

// Raw bits of q element i (lane bits for 16-bit q).
fn q_bits(i: u32) -> u32 {
    return dt_lane(Q_DT, b_q[i / Q_PER], i);
}

fn per_workgroup(wg: u32, lid: u32) {
    if wg >= P.total {
        return;
    }
    let split = wg % P.nsplit;
    var rest = wg / P.nsplit;
    let tile = rest % P.tiles;
    rest = rest / P.tiles;
    let kvh = rest % P.h_kv;
    let b = rest / P.h_kv;
    let row0 = tile * HT;
    if lid < HT {
        let r = row0 + lid;
        var vis = 0u;
        if r < P.rows_kv {
            let s = r / P.grp;
            let len = seqlen_of(b);
            vis = len;
            if P.causal != 0u {
                let hide = P.s_q - 1u - s;
                vis = select(0u, len - hide, len > hide);
            }
        }
        Vis[lid] = vis;
        Ls[lid] = 0.0;
    }
    if lid < 2u {
        Mx[lid] = vec4<f32>(NEG_BIG);
        Al[lid] = vec4<f32>(1.0);
    }
    workgroupBarrier();
    if lid == 0u {
        var mv = 0u;
        for (var i = 0u; i < HT; i = i + 1u) {
            mv = max(mv, Vis[i]);
        }
        tile_vis_w = mv;
    }
    let tile_vis = workgroupUniformLoad(&tile_vis_w);
    let k_lo = split * P.split_len;
    let k_hi = min(k_lo + P.split_len, tile_vis);

    // Scores: invocation lid < 16 owns rows 4·rq.. and keys 4·kq..
    let rq = (lid / 8u) % 2u;
    let kq = lid % 8u;
    // PV: invocation owns channel pairs 2·lid + 512·j of all rows.
    var acc: array<vec4<f32>, ACC>; // [NJ][row quad 0 ch 0, quad 1 ch 0, quad 0 ch 1, quad 1 ch 1]
    for (var i = 0u; i < ACC; i = i + 1u) {
        acc[i] = vec4<f32>(0.0);
    }
    let q_once = P.d <= QP;
    for (var c0 = k_lo; c0 < k_hi; c0 = c0 + T) {
        var kbase: array<u32, 4>;
        var kok: array<bool, 4>;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let key = c0 + kq * 4u + j;
            kok[j] = lid < 16u && key < k_hi;
            kbase[j] = 0u;
            if kok[j] {
                kbase[j] = key_base(b, kvh, key);
            }
        }
        // The previous chunk's readers of Qs, Ps and Kb are done.
        workgroupBarrier();
        if lid < 8u {
            for (var j = 0u; j < 4u; j = j + 1u) {
                Kb[kq * 4u + j] = kbase[j];
            }
        }
        var s: array<vec4<f32>, 4>; // [key j] rows 4·rq ..
        for (var j = 0u; j < 4u; j = j + 1u) {
            s[j] = vec4<f32>(0.0);
        }
        for (var dq = 0u; dq < P.d; dq = dq + QP) {
            if !q_once || c0 == k_lo {
                if dq > 0u {
                    workgroupBarrier();
                }
                for (var e = lid; e < HT * QU; e = e + 256u) {
                    let i = e / QU;
                    let c = dq + (e % QU) * CH;
                    let r = row0 + i;
                    var w = vec4<u32>(0u);
                    if r < P.rows_kv {
                        let sq = r / P.grp;
                        let head = kvh * P.grp + r % P.grp;
                        let qb = ((b * P.s_q + sq) * P.h_q + head) * P.d;
                        for (var u = 0u; u < CH; u = u + 1u) {
                            if c + u < P.d {
                                let bits = q_bits(qb + c + u);
                                if Q_PACKED {
                                    w[u / 2u] = w[u / 2u] | (bits << (16u * (u % 2u)));
                                } else {
                                    w[u] = bits;
                                }
                            }
                        }
                    }
                    Qs[e] = w;
                }
                workgroupBarrier();
            }
            if lid < 16u {
                let n = min(QP, P.d - dq);
                let nw = n / CH;
                for (var u = 0u; u < nw; u = u + 1u) {
                    var qw: array<vec4<u32>, 4>;
                    for (var i = 0u; i < 4u; i = i + 1u) {
                        qw[i] = Qs[(rq * 4u + i) * QU + u];
                    }
                    for (var hh = 0u; hh < CH / 4u; hh = hh + 1u) {
                        let q0 = q4(qw[0], hh);
                        let q1 = q4(qw[1], hh);
                        let q2 = q4(qw[2], hh);
                        let q3 = q4(qw[3], hh);
                        let c = dq + u * CH + hh * 4u;
                        for (var j = 0u; j < 4u; j = j + 1u) {
                            if kok[j] {
                                let kv = ldk4(kbase[j] + c);
                                s[j] = s[j] + vec4<f32>(dot(q0, kv), dot(q1, kv), dot(q2, kv), dot(q3, kv));
                            }
                        }
                    }
                }
                // Channels past the last whole word.
                for (var c = nw * CH; c < n; c = c + 1u) {
                    let qv = vec4<f32>(
                        q_at(rq * 4u, c),
                        q_at(rq * 4u + 1u, c),
                        q_at(rq * 4u + 2u, c),
                        q_at(rq * 4u + 3u, c)
                    );
                    for (var j = 0u; j < 4u; j = j + 1u) {
                        if kok[j] {
                            s[j] = s[j] + qv * ld_k(kbase[j] + dq + c);
                        }
                    }
                }
            }
        }
        if lid < 16u {
            for (var j = 0u; j < 4u; j = j + 1u) {
                Ps[(kq * 4u + j) * 2u + rq] = s[j] * P.scale;
            }
        }
        workgroupBarrier();
        // Running max and rescale factor per row.
        if lid < HT {
            let vis = Vis[lid];
            let m_old = Mx[lid / 4u][lid % 4u];
            var mc = m_old;
            for (var tt = 0u; tt < T; tt = tt + 1u) {
                let kt = c0 + tt;
                if kt < k_hi && kt < vis {
                    mc = max(mc, Ps[tt * 2u + lid / 4u][lid % 4u]);
                }
            }
            var alpha = 1.0;
            if m_old != NEG_BIG {
                alpha = exp_f32(m_old - mc);
            }
            Al[lid / 4u][lid % 4u] = alpha;
            Mx[lid / 4u][lid % 4u] = mc;
        }
        workgroupBarrier();
        // Probabilities: invocation lid < 64 owns key lid / 2, row quad lid % 2.
        if lid < 64u {
            let tt = lid / 2u;
            let q = lid % 2u;
            let kt = c0 + tt;
            let sc = Ps[lid];
            let m = Mx[q];
            var p = vec4<f32>(0.0);
            for (var i = 0u; i < 4u; i = i + 1u) {
                if kt < k_hi && kt < Vis[q * 4u + i] {
                    p[i] = exp_f32(sc[i] - m[i]);
                }
            }
            Ps[lid] = p;
        }
        workgroupBarrier();
        if lid < HT {
            var sum = 0.0;
            for (var tt = 0u; tt < T; tt = tt + 1u) {
                sum = sum + Ps[tt * 2u + lid / 4u][lid % 4u];
            }
            Ls[lid] = Ls[lid] * Al[lid / 4u][lid % 4u] + sum;
        }
        let nk = min(T, k_hi - c0);
        let al0 = Al[0];
        let al1 = Al[1];
        for (var j = 0u; j < NJ; j = j + 1u) {
            let ch = 2u * lid + 512u * j;
            if ch < P.dv {
                let pair = ch + 1u < P.dv;
                var a0x = acc[4u * j] * al0;
                var a1x = acc[4u * j + 1u] * al1;
                var a0y = acc[4u * j + 2u] * al0;
                var a1y = acc[4u * j + 3u] * al1;
                for (var tt = 0u; tt < nk; tt = tt + 1u) {
                    let vb = Kb[tt] + P.voff + ch;
                    var v: vec2<f32>;
                    if pair {
                        v = ldk2(vb);
                    } else {
                        v = vec2<f32>(ld_k(vb), 0.0);
                    }
                    let p0 = Ps[tt * 2u];
                    let p1 = Ps[tt * 2u + 1u];
                    a0x = a0x + p0 * v.x;
                    a1x = a1x + p1 * v.x;
                    a0y = a0y + p0 * v.y;
                    a1y = a1y + p1 * v.y;
                }
                acc[4u * j] = a0x;
                acc[4u * j + 1u] = a1x;
                acc[4u * j + 2u] = a0y;
                acc[4u * j + 3u] = a1y;
            }
        }
    }
    workgroupBarrier();
    for (var i = 0u; i < HT; i = i + 1u) {
        let r = row0 + i;
        if r < P.rows_kv {
            let prow = (b * P.h_kv + kvh) * P.rows_kv + r;
            let pb = prow * P.nsplit + split;
            for (var j = 0u; j < NJ; j = j + 1u) {
                let ch = 2u * lid + 512u * j;
                if ch < P.dv {
                    b_part[pb * P.dv + ch] = bitcast<u32>(acc[4u * j + i / 4u][i % 4u]);
                    if ch + 1u < P.dv {
                        b_part[pb * P.dv + ch + 1u] = bitcast<u32>(acc[4u * j + 2u + i / 4u][i % 4u]);
                    }
                }
            }
            if lid == 0u {
                b_stat[pb * 2u] = bitcast<u32>(Mx[i / 4u][i % 4u]);
                b_stat[pb * 2u + 1u] = bitcast<u32>(Ls[i]);
            }
        }
    }
}
