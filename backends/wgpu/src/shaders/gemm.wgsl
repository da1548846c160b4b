// Plain "NT" GEMM, d[m, n] = Σ_k a[m, k] · b[n, k], f32 accumulation, one
// rounding to d's dtype. 64×64 output tiles, 16-deep K slices staged (decoded
// to f32) in workgroup memory, 4×4 outputs per invocation. Partial tiles are
// zero-padded; nothing is read out of bounds. 16-bit outputs are stored a
// word at a time where the invocation owns both elements, with per-element
// atomics otherwise (odd n puts row boundaries inside words). Operands
// beyond the storage binding limit come as windows: rows of a and d, rows of
// b (n columns of d starting at `dcol`, d rows `ldd` elements long).
struct Params {
    m: u32,
    n: u32,
    k: u32,
    tiles_n: u32,
    tiles: u32,
    ldd: u32,
    dcol: u32,
}

var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;

// Row r of the tile (rows past m are padding).
fn store_row(r: u32, c0: u32, v: vec4<f32>) {
    if r < P.m {
        store4_d(r * P.ldd + P.dcol, c0, P.n, v);
    }
}

fn per_workgroup(tile: u32, lid: u32) {
    if tile >= P.tiles {
        return;
    }
    let row0 = (tile / P.tiles_n) * 64u;
    let col0 = (tile % P.tiles_n) * 64u;
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
                va = ld_a((row0 + r) * P.k + gk);
            }
            As[kk * 64u + r] = va;
            var vb = 0.0;
            if col0 + r < P.n && gk < P.k {
                vb = ld_b((col0 + r) * P.k + gk);
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
    store_row(r0, cc, c0);
    store_row(r0 + 1u, cc, c1);
    store_row(r0 + 2u, cc, c2);
    store_row(r0 + 3u, cc, c3);
}
