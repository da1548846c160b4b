// Grouped plain "NT" GEMM (f32/bf16 operands), MODE 1 contiguous, 2 masked:
//   d[r, j] = Σ_k a[r, k] · b[g(r), j, k]
// f32 accumulation, one rounding to d's dtype. The tiles of `gemm.wgsl`
// (64×64 outputs, 16-deep K slices staged as f32 in workgroup memory, 4×4
// outputs per invocation) with a group per row, as in `fp8_gemm.wgsl`:
// a tile computes each distinct group of its rows in turn (one pass when
// groups are constant over 64-row blocks), staging only the rows of the
// current group (other rows read as 0: padding rows may hold NaN) and
// storing only them.
//
// Rows: masked → group g (= G0 + tile / (tiles_m·tiles_n)) for rows <
// masked_m[g] (clamped into [0, m_max]; a check kernel reports bad values);
// contiguous → m_indices[R0 + r] when it lies in [G0, G1) (-1, bad values
// and groups of another window are skipped). Windows: b holds groups
// [G0, G1); masked a and d hold the same groups; contiguous a and d hold
// rows [R0, R0 + m). Rows not computed are not written.
struct Params {
    m: u32,       // rows: of the window (contiguous) or m_max (masked)
    n: u32,
    k: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,   // all tiles, groups included
    g0: u32,      // first group in the b (masked: and a, d) window
    g1: u32,      // one past the last
    r0: u32,      // contiguous: global row of the window's first row
}

const NONE: u32 = 0xffffffffu;

var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;
var<workgroup> row_grp: array<u32, 64>;
var<workgroup> next_grp: atomic<u32>;
var<workgroup> cur_grp: u32;

// The group of a row, or NONE. `g`: the tile's group (masked), `r_local`:
// the row inside its group (masked), `r`: the row of the window.
fn group_of(g: u32, r_local: u32, r: u32) -> u32 {
    if MODE == 2u {
        let mm = ldi_idx(g);
        var rows = mm.x;
        if i64_is_negative(mm) {
            rows = 0u;
        } else if mm.y != 0u || mm.x > P.m {
            rows = P.m;
        }
        return select(NONE, g, r_local < rows);
    }
    if r >= P.m {
        return NONE;
    }
    let v = ldi_idx(P.r0 + r);
    if i64_is_negative(v) || v.y != 0u || v.x < P.g0 || v.x >= P.g1 {
        return NONE;
    }
    return v.x;
}

fn per_workgroup(tile: u32, lid: u32) {
    if tile >= P.tiles {
        return;
    }
    let per_group = P.tiles_m * P.tiles_n;
    var gl = 0u; // masked: group inside the window
    if MODE == 2u {
        gl = tile / per_group;
    }
    let t = tile % per_group;
    let tm = t / P.tiles_n;
    let tn = t % P.tiles_n;
    // First row of the tile in the a / d windows.
    var row_base = tm * 64u;
    if MODE == 2u {
        row_base = gl * P.m + tm * 64u;
    }
    let col0 = tn * 64u;
    if lid < 64u {
        row_grp[lid] = group_of(P.g0 + gl, tm * 64u + lid, row_base + lid);
    }
    let tx = lid % 16u;
    let ty = lid / 16u;
    var prev = NONE;
    loop {
        // Next group of this tile: the smallest one above the previous.
        if lid == 0u {
            atomicStore(&next_grp, NONE);
        }
        workgroupBarrier();
        if lid < 64u {
            let rg = row_grp[lid];
            if rg != NONE && (prev == NONE || rg > prev) {
                atomicMin(&next_grp, rg);
            }
        }
        workgroupBarrier();
        if lid == 0u {
            cur_grp = atomicLoad(&next_grp);
        }
        let cur = workgroupUniformLoad(&cur_grp);
        if cur == NONE {
            break;
        }
        prev = cur;
        // First row of this group's [n, k] in the b window.
        let brow = (cur - P.g0) * P.n;
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
                if row_grp[r] == cur && gk < P.k {
                    va = ld_a((row_base + r) * P.k + gk);
                }
                As[kk * 64u + r] = va;
                var vb = 0.0;
                if col0 + r < P.n && gk < P.k {
                    vb = ld_b((brow + col0 + r) * P.k + gk);
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
        let rr = ty * 4u;
        let cc = col0 + tx * 4u;
        if cc < P.n {
            if row_grp[rr] == cur {
                store4_d((row_base + rr) * P.n, cc, P.n, c0);
            }
            if row_grp[rr + 1u] == cur {
                store4_d((row_base + rr + 1u) * P.n, cc, P.n, c1);
            }
            if row_grp[rr + 2u] == cur {
                store4_d((row_base + rr + 2u) * P.n, cc, P.n, c2);
            }
            if row_grp[rr + 3u] == cur {
                store4_d((row_base + rr + 3u) * P.n, cc, P.n, c3);
            }
        }
    }
}
