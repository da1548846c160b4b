// After a check: copies the flagged element (if any) into words 1 and 2 of
// the status entry, so that the error names the value. Index dtypes give
// (lo, hi) of the i64 value, float dtypes the f32 bits. `src` is the window
// of elements [base, base + len); a flagged index elsewhere is left alone.
struct Params {
    entry: u32,
    dt: u32,
    base: u32,
    len: u32,
}

@compute @workgroup_size(1)
fn main() {
    let w0 = atomicLoad(&b_status[P.entry * 4u]);
    if w0 == 0u {
        return;
    }
    let gidx = 0xffffffffu - w0;
    if gidx < P.base || gidx - P.base >= P.len {
        return;
    }
    let idx = gidx - P.base;
    var lo = 0u;
    var hi = 0u;
    switch P.dt {
        case 6u: {
            lo = b_src[2u * idx];
            hi = b_src[2u * idx + 1u];
        }
        case 5u: {
            lo = b_src[idx];
            hi = select(0u, 0xffffffffu, (lo >> 31u) == 1u);
        }
        default: {
            let per = dt_per_word(P.dt);
            lo = bitcast<u32>(dt_decode(P.dt, dt_lane(P.dt, b_src[idx / per], idx)));
        }
    }
    atomicStore(&b_status[P.entry * 4u + 1u], lo);
    atomicStore(&b_status[P.entry * 4u + 2u], hi);
}
