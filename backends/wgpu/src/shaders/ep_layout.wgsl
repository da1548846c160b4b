// get_dispatch_layout (SPEC.md §7). PHASE 0 zeroes the three outputs (one
// invocation per word); PHASE 1 runs one invocation per token and counts
// with atomics: each distinct valid expert of the token once in
// num_tokens_per_expert, each distinct rank once in num_tokens_per_rank and
// is_token_in_rank. Ids outside [0, E) are skipped here (−1 means "none";
// anything else is reported by the op's range check).
struct Params {
    n: u32,
    k: u32,
    experts: u32,
    world: u32,
    epr: u32,
    in_rank_words: u32,
}

fn valid_id(v: vec2<u32>) -> bool {
    return v.y == 0u && v.x < P.experts;
}

fn per_invocation(i: u32) {
    if PHASE == 0u {
        if i < P.world {
            atomicStore(&b_per_rank[i], 0u);
        }
        if i < P.experts {
            atomicStore(&b_per_expert[i], 0u);
        }
        if i < P.in_rank_words {
            atomicStore(&b_in_rank[i], 0u);
        }
        return;
    }
    let t = i;
    if t >= P.n {
        return;
    }
    let base = t * P.k;
    for (var j = 0u; j < P.k; j = j + 1u) {
        let v = ldi_topk(base + j);
        if !valid_id(v) {
            continue;
        }
        let r = v.x / P.epr;
        var seen_expert = false;
        var seen_rank = false;
        for (var q = 0u; q < j; q = q + 1u) {
            let u = ldi_topk(base + q);
            if valid_id(u) {
                if u.x == v.x {
                    seen_expert = true;
                }
                if u.x / P.epr == r {
                    seen_rank = true;
                }
            }
        }
        if !seen_expert {
            atomicAdd(&b_per_expert[v.x], 1u);
        }
        if !seen_rank {
            atomicAdd(&b_per_rank[r], 1u);
            let b = t * P.world + r;
            atomicOr(&b_in_rank[b / 4u], 1u << ((b % 4u) * 8u));
        }
    }
}
