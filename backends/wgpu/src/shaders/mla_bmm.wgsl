// Strided batched GEMM for mla_prefill's projections:
//   d[d0 + z·ds_b + i·ds_m + j] = Σ_l a[a0 + z·as_b + i·as_m + l·as_k]
//                                   · b[b0 + z·bs_b + l·bs_k + j·bs_n]
// f32 accumulation, one rounding to d's dtype. 64×64 tiles per batch entry,
// 16-deep K slices staged (decoded to f32) in workgroup memory, 4×4 outputs
// per invocation; partial tiles zero-padded, nothing read out of bounds.
struct Params {
    batch: u32,
    m: u32,
    n: u32,
    k: u32,
    a0: u32,
    as_b: u32,
    as_m: u32,
    as_k: u32,
    b0: u32,
    bs_b: u32,
    bs_k: u32,
    bs_n: u32,
    d0: u32,
    ds_b: u32,
    ds_m: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,
}

var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;

fn per_workgroup(tile: u32, lid: u32) {
    if tile >= P.tiles {
        return;
    }
    let per = P.tiles_m * P.tiles_n;
    let z = tile / per;
    let t = tile % per;
    let row0 = (t / P.tiles_n) * 64u;
    let col0 = (t % P.tiles_n) * 64u;
    let abase = P.a0 + z * P.as_b;
    let bbase = P.b0 + z * P.bs_b;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < P.k; k0 = k0 + 16u) {
        for (var q = 0u; q < 4u; q = q + 1u) {
            let e = lid + q * 256u;
            let r = e / 16u;
            let kk = e % 16u;
            let gk = k0 + kk;
            var va = 0.0;
            if row0 + r < P.m && gk < P.k {
                va = ld_a(abase + (row0 + r) * P.as_m + gk * P.as_k);
            }
            As[kk * 64u + r] = va;
            var vb = 0.0;
            if col0 + r < P.n && gk < P.k {
                vb = ld_b(bbase + gk * P.bs_k + (col0 + r) * P.bs_n);
            }
            Bs[kk * 64u + r] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk = kk + 1u) {
            let ab = kk * 64u + ty * 4u;
            let bb = kk * 64u + tx * 4u;
            let a = vec4<f32>(As[ab], As[ab + 1u], As[ab + 2u], As[ab + 3u]);
            let b = vec4<f32>(Bs[bb], Bs[bb + 1u], Bs[bb + 2u], Bs[bb + 3u]);
            c0 = c0 + a.x * b;
            c1 = c1 + a.y * b;
            c2 = c2 + a.z * b;
            c3 = c3 + a.w * b;
        }
        workgroupBarrier();
    }
    let r0 = row0 + ty * 4u;
    let cc = col0 + tx * 4u;
    let dbase = P.d0 + z * P.ds_b;
    if r0 < P.m {
        store4_d(dbase + r0 * P.ds_m, cc, P.n, c0);
    }
    if r0 + 1u < P.m {
        store4_d(dbase + (r0 + 1u) * P.ds_m, cc, P.n, c1);
    }
    if r0 + 2u < P.m {
        store4_d(dbase + (r0 + 2u) * P.ds_m, cc, P.n, c2);
    }
    if r0 + 3u < P.m {
        store4_d(dbase + (r0 + 3u) * P.ds_m, cc, P.n, c3);
    }
}
