// The indexer's top-k (spec-v32 §9.2): per row, the k = min(topk, length)
// positions t < length with the largest logits, by descending logit, ties
// to the lower position, NaN after every number, −1 in the slots after k.
// One workgroup per row.
//
// Every position gets a distinct 64-bit key (hi = the logit's bits mapped
// to an unsigned order, −0 = +0, every NaN 0; lo = ~position), so the top k
// are exactly the keys ≥ the k-th largest key. That key is found by a radix
// select, 8 bits per pass over the row (8 passes, a 256-bin histogram in
// workgroup memory); the selected keys are compacted into scratch, padded
// with the smallest key to a power of two (kpad), sorted descending by a
// bitonic sort (storage barriers between steps) and written out.
struct Params {
    rows: u32,
    n: u32,
    topk: u32,
    kpad: u32,   // scratch entries per row (≥ min(topk, n), a power of two)
}

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> cnt: atomic<u32>;
var<workgroup> pre_hi: u32;
var<workgroup> pre_lo: u32;
var<workgroup> remaining: u32;
var<workgroup> k_w: u32;

fn key_of(v: f32) -> u32 {
    var u = bitcast<u32>(v);
    if (u & 0x7fffffffu) > 0x7f800000u {
        return 0u;
    }
    if u == 0x80000000u {
        u = 0u;
    }
    if (u >> 31u) == 1u {
        return ~u;
    }
    return u | 0x80000000u;
}

// a < b for 64-bit keys (hi, lo).
fn key_lt(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x < b.x || (a.x == b.x && a.y < b.y);
}

fn ld_key(e: u32) -> vec2<u32> {
    return vec2<u32>(b_sk[2u * e], b_sk[2u * e + 1u]);
}

fn st_key(e: u32, k: vec2<u32>) {
    b_sk[2u * e] = k.x;
    b_sk[2u * e + 1u] = k.y;
}

fn per_workgroup(row: u32, lid: u32) {
    if row >= P.rows {
        return;
    }
    if lid == 0u {
        let lv = ldi_lens(row);
        var len = lv.x;
        if i64_is_negative(lv) {
            len = 0u; // reported by the check kernel
        } else if lv.y != 0u || lv.x > P.n {
            len = P.n;
        }
        k_w = min(P.topk, len);
        pre_hi = 0u;
        pre_lo = 0u;
        remaining = min(P.topk, len);
        atomicStore(&cnt, 0u);
    }
    let k = workgroupUniformLoad(&k_w);
    // k = min(topk, len) and len ≥ k: the row's candidates are [0, len);
    // when k < topk, k = len.
    var len = P.n;
    let lv = ldi_lens(row);
    if i64_is_negative(lv) {
        len = 0u;
    } else if lv.y == 0u && lv.x <= P.n {
        len = lv.x;
    }
    let base = row * P.n;
    if k > 0u {
        for (var ps = 0u; ps < 8u; ps = ps + 1u) {
            atomicStore(&hist[lid], 0u);
            workgroupBarrier();
            let ph = pre_hi;
            let pl = pre_lo;
            var mh = 0u;
            var ml = 0u;
            if ps < 4u {
                mh = ~(0xffffffffu >> (8u * ps));
            } else {
                mh = 0xffffffffu;
                ml = ~(0xffffffffu >> (8u * (ps - 4u)));
            }
            let sh = 24u - 8u * (ps % 4u);
            for (var i = lid; i < len; i = i + 256u) {
                let kh = key_of(ld_logits(base + i));
                let kl = ~i;
                if (kh & mh) == ph && (kl & ml) == pl {
                    var digit: u32;
                    if ps < 4u {
                        digit = (kh >> sh) & 0xffu;
                    } else {
                        digit = (kl >> sh) & 0xffu;
                    }
                    atomicAdd(&hist[digit], 1u);
                }
            }
            workgroupBarrier();
            if lid == 0u {
                var cum = 0u;
                var sel = 0u;
                let want = remaining;
                for (var dg = 255i; dg >= 0i; dg = dg - 1i) {
                    let c = atomicLoad(&hist[u32(dg)]);
                    if cum + c >= want {
                        sel = u32(dg);
                        break;
                    }
                    cum = cum + c;
                }
                remaining = want - cum;
                if ps < 4u {
                    pre_hi = ph | (sel << sh);
                } else {
                    pre_lo = pl | (sel << sh);
                }
            }
            workgroupBarrier();
        }
        // The k-th largest key; compact every key ≥ it.
        let th = vec2<u32>(pre_hi, pre_lo);
        let sb = row * P.kpad;
        for (var i = lid; i < len; i = i + 256u) {
            let key = vec2<u32>(key_of(ld_logits(base + i)), ~i);
            if !key_lt(key, th) {
                let slot = atomicAdd(&cnt, 1u);
                if slot < P.kpad {
                    st_key(sb + slot, key);
                }
            }
        }
        for (var e = k + lid; e < P.kpad; e = e + 256u) {
            st_key(sb + e, vec2<u32>(0u, 0u));
        }
        storageBarrier();
        // Bitonic sort of the kpad entries, descending.
        let npairs = P.kpad / 2u;
        for (var size = 2u; size <= P.kpad; size = size << 1u) {
            for (var stride = size / 2u; stride > 0u; stride = stride >> 1u) {
                for (var i = lid; i < npairs; i = i + 256u) {
                    let lo = 2u * stride * (i / stride) + i % stride;
                    let hi = lo + stride;
                    let a = ld_key(sb + lo);
                    let b = ld_key(sb + hi);
                    let down = (lo & size) == 0u;
                    if (down && key_lt(a, b)) || (!down && key_lt(b, a)) {
                        st_key(sb + lo, b);
                        st_key(sb + hi, a);
                    }
                }
                storageBarrier();
            }
        }
    }
    for (var s = lid; s < P.topk; s = s + 256u) {
        var v = vec2<u32>(0xffffffffu, 0xffffffffu);
        if s < k {
            v = vec2<u32>(~b_sk[2u * (row * P.kpad + s) + 1u], 0u);
        }
        sti_out(row * P.topk + s, v);
    }
}
