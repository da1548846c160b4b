// reduce_rows, last step of the windowed path: out = the f32 accumulator
// rounded once to the output dtype. One invocation per output word.
struct Params {
    total: u32,
}

fn lane(i: u32) -> u32 {
    return enc_out(bitcast<f32>(b_acc[i]));
}
