// Copies a rows × cols window of src (as a matrix) into dst, converting
// dtype. One invocation per (window row, dst word): a word is written by the
// invocation of the window row that owns its first in-window element, which
// reads the word, replaces the in-window lanes and writes it back, so
// elements outside the window keep their bits and no word has two writers.
// Large tensors are bound as windows: indices are global, minus `src_base`
// (elements) and `dst_wbase` (words), the windows' first element / word.
struct Params {
    rows: u32,
    cols: u32,
    src_cols: u32,
    dst_cols: u32,
    src_row: u32,
    src_col: u32,
    dst_row: u32,
    dst_col: u32,
    words_per_row: u32,
    src_base: u32,
    dst_wbase: u32,
}

fn in_window(e: u32) -> vec2<u32> {
    // (window row + 1, window col) of dst element e, or (0, 0) outside.
    let r = e / P.dst_cols;
    let c = e % P.dst_cols;
    if r >= P.dst_row && r < P.dst_row + P.rows && c >= P.dst_col && c < P.dst_col + P.cols {
        return vec2<u32>(r - P.dst_row + 1u, c - P.dst_col);
    }
    return vec2<u32>(0u, 0u);
}

fn per_invocation(t: u32) {
    let r = t / P.words_per_row;
    let wi = t % P.words_per_row;
    if r >= P.rows {
        return;
    }
    let row_start = (P.dst_row + r) * P.dst_cols + P.dst_col;
    let w = row_start / DST_PER + wi;
    let first = w * DST_PER;
    if first >= row_start + P.cols {
        return;
    }
    // Ownership: the first in-window lane of this word must be in row r.
    var owner = 0u;
    var full = true;
    for (var l = 0u; l < DST_PER; l = l + 1u) {
        let win = in_window(first + l);
        if win.x == 0u {
            full = false;
        } else if owner == 0u {
            owner = win.x;
        }
    }
    if owner != r + 1u {
        return;
    }
    let bits = 32u / DST_PER;
    let mask = dt_lane_mask(DST_DT);
    var word = 0u;
    if !full {
        word = ldw_dst(w - P.dst_wbase);
    }
    for (var l = 0u; l < DST_PER; l = l + 1u) {
        let win = in_window(first + l);
        if win.x != 0u {
            let sr = P.src_row + win.x - 1u;
            let sc = P.src_col + win.y;
            let v = ld_src(sr * P.src_cols + sc - P.src_base);
            let sh = l * bits;
            word = (word & ~(mask << sh)) | ((enc_dst(v) & mask) << sh);
        }
    }
    stw_dst(w - P.dst_wbase, word);
}
