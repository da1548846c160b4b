// gather_rows: dst row i = src row index[i] (−1: a row of zero bytes), on
// raw bytes, so any dtype is carried bit-exact (FP8 and 16-bit rows packed
// in words included). One invocation per dst word: rows that share a word
// (odd byte sizes) need no atomics. An index outside [0, S) is written as a
// zero row (the op's range check reports it); nothing is read out of
// bounds.
//
// Windows: `dst` (and `index`) hold rows [t0, t0 + total_bytes / row_bytes)
// from an aligned offset; `src` is bound from the aligned offset at or
// below the data of its row v0 (which starts `src_sub` bytes in) and holds
// rows [v0, v0 + count). Bytes whose row lies outside the window are zero
// in the first pass (`merge` = 0) and left as they are in later passes
// (`merge` = 1), which fill them in from their own window.
struct Params {
    total_words: u32,
    total_bytes: u32,
    row_bytes: u32,
    src_sub: u32,
    v0: u32,
    count: u32,
    merge: u32,
}

// The window-relative source row of dst row `r`, or a value ≥ count (−1,
// out of range, or a row outside the window: unsigned wrap-around puts rows
// below v0 high).
fn source_row(r: u32) -> u32 {
    let id = ldi_index(r);
    if id.y != 0u {
        return 0xffffffffu;
    }
    return id.x - P.v0;
}

fn per_invocation(w: u32) {
    if w >= P.total_words {
        return;
    }
    var word = 0u;
    if P.merge == 1u {
        word = b_dst[w];
    }
    let b0 = w * 4u;
    if (P.row_bytes & 3u) == 0u && (P.src_sub & 3u) == 0u {
        let rel = source_row(b0 / P.row_bytes);
        if rel < P.count {
            word = b_src[(P.src_sub + rel * P.row_bytes + b0 % P.row_bytes) / 4u];
        }
    } else {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let b = b0 + j;
            if b < P.total_bytes {
                let rel = source_row(b / P.row_bytes);
                if rel < P.count {
                    let s = P.src_sub + rel * P.row_bytes + b % P.row_bytes;
                    let byte = (b_src[s / 4u] >> ((s % 4u) * 8u)) & 0xffu;
                    word = (word & ~(0xffu << (j * 8u))) | (byte << (j * 8u));
                }
            }
        }
    }
    b_dst[w] = word;
}
