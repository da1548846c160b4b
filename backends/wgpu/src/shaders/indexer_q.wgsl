// indexer_logits, pass 1: q (e4m3) decoded to f32 words, so that the
// logits kernel reads each value with one load.
struct Params {
    n: u32,
}

fn per_invocation(i: u32) {
    if i >= P.n {
        return;
    }
    b_qf[i] = bitcast<u32>(ld_q(i));
}
