// Packs rows of a tensor into word-aligned records (the send buffer of an
// expert-parallel exchange): record r's field at word `off` receives the
// `row_bytes` bytes of source row rows[r], starting at lane 0 of its first
// word; the bytes past the row in its last word are zero. One invocation per
// record word. Works on raw bytes, so any dtype is carried bit-exact.
// `src` may be a window of source rows [base, base + count) (`rows` and
// `dst` a window of records): records whose row lies outside are skipped
// (another dispatch covers them). `rows` is bound from an aligned offset:
// record r's entry is rows[r + rows_sub].
struct Params {
    total: u32,
    words: u32,
    row_bytes: u32,
    stride: u32,
    off: u32,
    base: u32,
    count: u32,
    rows_sub: u32,
}

fn per_invocation(i: u32) {
    if i >= P.total {
        return;
    }
    let r = i / P.words;
    let w = i % P.words;
    // Unsigned wrap-around: rows below base land far above count.
    let row = b_rows[r + P.rows_sub] - P.base;
    if row >= P.count {
        return;
    }
    let b0 = row * P.row_bytes + w * 4u;
    var word = 0u;
    if (b0 & 3u) == 0u && w * 4u + 4u <= P.row_bytes {
        word = b_src[b0 / 4u];
    } else {
        for (var j = 0u; j < 4u; j = j + 1u) {
            if w * 4u + j < P.row_bytes {
                let b = b0 + j;
                let byte = (b_src[b / 4u] >> ((b % 4u) * 8u)) & 0xffu;
                word = word | (byte << (j * 8u));
            }
        }
    }
    b_dst[r * P.stride + P.off + w] = word;
}
