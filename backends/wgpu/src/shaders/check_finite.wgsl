// Flags the first NaN or ±inf of the float tensor x. One invocation per
// element of the window; `base` is the window's first element in the tensor.
struct Params {
    n: u32,
    entry: u32,
    base: u32,
}

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = wg_lin(wid, nwg) * 256u + lid;
    if i >= P.n {
        return;
    }
    if !is_finite_f32(ld_x(i)) {
        flag(P.entry, P.base + i);
    }
}
