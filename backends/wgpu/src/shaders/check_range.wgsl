// Flags the first element of the index tensor x outside [lo, hi) (unless it
// equals `allow`). One invocation per element of the window; `base` is the
// window's first element in the tensor.
struct Params {
    n: u32,
    entry: u32,
    lo_l: u32,
    lo_h: u32,
    hi_l: u32,
    hi_h: u32,
    allow_l: u32,
    allow_h: u32,
    has_allow: u32,
    base: u32,
}

fn per_invocation(i: u32) {
    if i >= P.n {
        return;
    }
    let v = ldi_x(i);
    let lo = vec2<u32>(P.lo_l, P.lo_h);
    let hi = vec2<u32>(P.hi_l, P.hi_h);
    let allowed = P.has_allow == 1u && i64_eq(v, vec2<u32>(P.allow_l, P.allow_h));
    if !allowed && (i64_lt(v, lo) || !i64_lt(v, hi)) {
        flag(P.entry, P.base + i);
    }
}
