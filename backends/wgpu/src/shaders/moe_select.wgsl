// DeepSeek-V3 "noaux_tc" routing after the logits GEMM (SPEC §6). One
// workgroup per token:
//   0. s = sigmoid(logit) (f32, correctly rounded division), stored in place
//      of the logit; s' = s + bias is recomputed where needed (one add).
//   1. group score = top1 + top2 of s' in the group, kept exactly as a
//      two-term f32 sum (so comparisons equal cpu-ref's exact f64 sums);
//   2. a group is kept when fewer than topk_group groups beat it (higher
//      score, ties to the lower index);
//   3. an expert of a kept group with rank r < topk among kept experts
//      (higher s', ties to the lower index) goes to slot r: the output is
//      ordered by descending s' without any sorting;
//   4. w = s / (Σ s + 1e-20) · route_scale.
// Every step is parallel over groups or experts; nothing depends on a
// subgroup size.
struct Params {
    experts: u32,
    n_group: u32,
    gsz: u32,
    topk_group: u32,
    topk: u32,
    has_bias: u32,
    route_scale: f32,
    tokens: u32,
}

var<workgroup> denom: f32;

fn biased(t: u32, e: u32) -> f32 {
    let s = bitcast<f32>(b_logits[t * P.experts + e]);
    if P.has_bias == 1u {
        return s + ld_bias(e);
    }
    return s;
}

fn gscore(t: u32, g: u32) -> vec2<f32> {
    let o = (t * P.n_group + g) * 4u;
    return vec2<f32>(bitcast<f32>(b_groups[o]), bitcast<f32>(b_groups[o + 1u]));
}

fn better(a: vec2<f32>, b: vec2<f32>) -> bool {
    // a > b for exact two-term sums (hi, lo) with |lo| ≤ ulp(hi)/2.
    return a.x > b.x || (a.x == b.x && a.y > b.y);
}

fn per_workgroup(t: u32, lid: u32) {
    if t >= P.tokens {
        return;
    }
    // 0. scores
    for (var e = lid; e < P.experts; e = e + 256u) {
        let i = t * P.experts + e;
        b_logits[i] = bitcast<u32>(sigmoid_f32(bitcast<f32>(b_logits[i])));
    }
    storageBarrier();
    // 1. group scores
    for (var g = lid; g < P.n_group; g = g + 256u) {
        var top1 = f32_inf(true);
        var top2 = f32_inf(true);
        for (var j = 0u; j < P.gsz; j = j + 1u) {
            let v = biased(t, g * P.gsz + j);
            if v > top1 {
                top2 = top1;
                top1 = v;
            } else if v > top2 {
                top2 = v;
            }
        }
        let s = two_sum(top1, top2);
        let o = (t * P.n_group + g) * 4u;
        b_groups[o] = bitcast<u32>(s.x);
        b_groups[o + 1u] = bitcast<u32>(s.y);
    }
    storageBarrier();
    // 2. kept groups
    for (var g = lid; g < P.n_group; g = g + 256u) {
        let mine = gscore(t, g);
        var rank = 0u;
        for (var h = 0u; h < P.n_group; h = h + 1u) {
            let other = gscore(t, h);
            if better(other, mine) || (h < g && other.x == mine.x && other.y == mine.y) {
                rank = rank + 1u;
            }
        }
        b_groups[(t * P.n_group + g) * 4u + 2u] = select(0u, 1u, rank < P.topk_group);
    }
    storageBarrier();
    // 3. top-k among the kept experts, by rank
    for (var e = lid; e < P.experts; e = e + 256u) {
        let g = e / P.gsz;
        if b_groups[(t * P.n_group + g) * 4u + 2u] == 0u {
            continue;
        }
        let mine = biased(t, e);
        var rank = 0u;
        for (var h = 0u; h < P.n_group; h = h + 1u) {
            if b_groups[(t * P.n_group + h) * 4u + 2u] == 0u {
                continue;
            }
            for (var j = 0u; j < P.gsz; j = j + 1u) {
                let f = h * P.gsz + j;
                let other = biased(t, f);
                if other > mine || (other == mine && f < e) {
                    rank = rank + 1u;
                }
            }
        }
        if rank < P.topk {
            let slot = t * P.topk + rank;
            sti_topk_idx(slot, vec2<u32>(e, 0u));
            stw_topk_weights(slot, b_logits[t * P.experts + e]);
        }
    }
    storageBarrier();
    // 4. normalize
    if lid == 0u {
        var s = 0.0;
        var c = 0.0;
        for (var j = 0u; j < P.topk; j = j + 1u) {
            let r = two_sum(s, bitcast<f32>(ldw_topk_weights(t * P.topk + j)));
            s = r.x;
            c = c + r.y;
        }
        denom = (s + c) + 1e-20;
    }
    workgroupBarrier();
    let d = denom;
    for (var j = lid; j < P.topk; j = j + 256u) {
        let i = t * P.topk + j;
        let v = div_rn(bitcast<f32>(ldw_topk_weights(i)), d) * P.route_scale;
        stw_topk_weights(i, bitcast<u32>(v));
    }
}
