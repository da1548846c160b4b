// Unpacks a record field into a dense tensor of rows of `row_bytes` bytes:
// row i comes from record map[i] (or record row0 + i when `identity`), a row
// whose map entry is NONE is zero. One invocation per output word, so rows
// that share a word (odd 16-bit rows) need no atomics. Raw bytes: bit-exact
// for any dtype.
//
// Windows: `dst` (and `map`) may hold rows [row0, row0 + rows) of the
// tensor and `recs` records [rec_base, rec_base + rec_count). Bytes whose
// record lies outside the records' window are zero in the first pass
// (`merge` = 0) and left as they are in later passes (`merge` = 1), which
// fill them in from their own window of records. `map` is bound from an
// aligned offset: row i's entry is map[i + map_sub].
struct Params {
    total_words: u32,
    total_bytes: u32,
    row_bytes: u32,
    stride: u32,
    off: u32,
    identity: u32,
    row0: u32,
    rec_base: u32,
    rec_count: u32,
    merge: u32,
    map_sub: u32,
}

// The window-relative record of a row, or a value ≥ rec_count (NONE, or a
// record outside the window: unsigned wrap-around puts those below it high).
fn source_record(row: u32) -> u32 {
    var rec = 0u;
    if P.identity == 1u {
        rec = P.row0 + row;
    } else {
        rec = b_map[row + P.map_sub];
        if rec == NONE {
            return NONE;
        }
    }
    return rec - P.rec_base;
}

const NONE: u32 = 0xffffffffu;

fn per_invocation(w: u32) {
    if w >= P.total_words {
        return;
    }
    var word = 0u;
    if P.merge == 1u {
        word = b_dst[w];
    }
    if (P.row_bytes & 3u) == 0u {
        let b = w * 4u;
        let rec = source_record(b / P.row_bytes);
        if rec < P.rec_count {
            word = b_recs[rec * P.stride + P.off + (b % P.row_bytes) / 4u];
        }
    } else {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let b = w * 4u + j;
            if b < P.total_bytes {
                let rec = source_record(b / P.row_bytes);
                if rec < P.rec_count {
                    let o = b % P.row_bytes;
                    let src = b_recs[rec * P.stride + P.off + o / 4u];
                    let byte = (src >> ((o % 4u) * 8u)) & 0xffu;
                    word = (word & ~(0xffu << (j * 8u))) | (byte << (j * 8u));
                }
            }
        }
    }
    b_dst[w] = word;
}
