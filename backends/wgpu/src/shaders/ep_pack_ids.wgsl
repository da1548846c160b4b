// Packs the top-k expert ids of the tokens rows[r] into records as i32 words
// (−1 stays 0xffffffff). One invocation per (record, k) entry. `topk` may
// be a window of tokens [base, base + count); other records are skipped.
// Record r's entry is rows[r + rows_sub] (`rows` starts at an aligned offset).
struct Params {
    total: u32,
    k: u32,
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
    let r = i / P.k;
    let j = i % P.k;
    let row = b_rows[r + P.rows_sub] - P.base;
    if row >= P.count {
        return;
    }
    let v = ldi_topk(row * P.k + j);
    b_dst[r * P.stride + P.off + j] = v.x;
}
