// Flags the first NaN or ±inf of the float tensor x. One invocation per
// element of the window; `base` is the window's first element in the tensor.
struct Params {
    n: u32,
    entry: u32,
    base: u32,
}

fn per_invocation(i: u32) {
    if i >= P.n {
        return;
    }
    if !is_finite_f32(ld_x(i)) {
        flag(P.entry, P.base + i);
    }
}
