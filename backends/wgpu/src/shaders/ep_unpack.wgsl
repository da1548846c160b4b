// Unpacks a record field into a dense tensor of rows of `row_bytes` bytes:
// row i comes from record map[i] (or record i when `identity`), a row whose
// map entry is NONE is zero. One invocation per output word, so rows that
// share a word (odd 16-bit rows) need no atomics. Raw bytes: bit-exact for
// any dtype.
struct Params {
    total_words: u32,
    total_bytes: u32,
    row_bytes: u32,
    stride: u32,
    off: u32,
    identity: u32,
}

const NONE: u32 = 0xffffffffu;

fn source_record(row: u32) -> u32 {
    if P.identity == 1u {
        return row;
    }
    return b_map[row];
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wg_lin(wid, nwg) * 256u + lid;
    if w >= P.total_words {
        return;
    }
    var word = 0u;
    if (P.row_bytes & 3u) == 0u {
        let b = w * 4u;
        let rec = source_record(b / P.row_bytes);
        if rec != NONE {
            word = b_recs[rec * P.stride + P.off + (b % P.row_bytes) / 4u];
        }
    } else {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let b = w * 4u + j;
            if b < P.total_bytes {
                let rec = source_record(b / P.row_bytes);
                if rec != NONE {
                    let o = b % P.row_bytes;
                    let src = b_recs[rec * P.stride + P.off + o / 4u];
                    word = word | (((src >> ((o % 4u) * 8u)) & 0xffu) << (j * 8u));
                }
            }
        }
    }
    b_dst[w] = word;
}
