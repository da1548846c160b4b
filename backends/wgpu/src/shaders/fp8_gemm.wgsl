// FP8 block-scaled GEMM, DeepGEMM "NT" semantics (SPEC §3), dense and
// grouped (MODE 0 dense, 1 contiguous, 2 masked):
//   d[r, j] = Σ_kb (Σ_{k ∈ kb} a[r, k] · b[g, j, k]) · sa[r, kb] · sb[g, j/128, kb]
// 64×64 output tiles, 256 invocations, 4×4 outputs each. Every 128-wide K
// block is staged in 16-deep slices of A and B (e4m3 bytes decoded to f32 in
// workgroup memory); its inner products accumulate in f32 (products of two
// FP8 values are exact in f32), then the block sum is scaled by
// sa·sb and added to the f32 accumulator ("promotion"). Partial tiles in M,
// N and K are zero-padded; nothing is read out of bounds.
//
// Rows: each tile row gets a group (or NONE = not computed, not written):
// dense → group 0 for rows < m; masked → group g for rows < masked_m[g]
// (clamped into [0, m_max]; a check kernel reports bad values);
// contiguous → m_indices[r] when it lies in [0, G) (-1 and bad values are
// skipped; a check kernel reports bad values). A tile computes each distinct
// group of its rows in turn (one pass when the layout keeps groups
// constant over 128-row blocks, as DeepGEMM requires).
struct Params {
    m: u32,       // rows: total (dense, contiguous) or m_max (masked)
    n: u32,
    k: u32,
    kb: u32,      // ceil(k / 128)
    nb: u32,      // ceil(n / 128)
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,   // all tiles, groups included
    groups: u32,
}

const NONE: u32 = 0xffffffffu;

// [16 k][16 quads of rows / cols]: an invocation reads its 4 rows and 4
// columns as two vec4 loads (cheaper than scalar loads on CPU drivers).
var<workgroup> As: array<vec4<f32>, 256>;
var<workgroup> Bs: array<vec4<f32>, 256>;
var<workgroup> row_grp: array<u32, 64>;
var<workgroup> next_grp: atomic<u32>;
var<workgroup> cur_grp: u32;

// e4m3 (OCP) or e4m3fnuz byte → f32, exact.
fn fp8(c: u32) -> f32 {
    return e4m3_to_f32_sel(c, FNUZ);
}

// Four FP8 elements starting at element e (K_ALIGNED: e % 4 == 0 and whole
// words), those at or past `limit` read as 0.
fn load4_a(e: u32, avail: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if K_ALIGNED && avail >= 4u {
        let w = b_a[e / 4u];
        v = vec4<f32>(fp8(w & 0xffu), fp8((w >> 8u) & 0xffu), fp8((w >> 16u) & 0xffu), fp8(w >> 24u));
    } else {
        for (var i = 0u; i < min(avail, 4u); i = i + 1u) {
            let x = e + i;
            v[i] = fp8((b_a[x / 4u] >> ((x % 4u) * 8u)) & 0xffu);
        }
    }
    return v;
}

fn load4_b(e: u32, avail: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if K_ALIGNED && avail >= 4u {
        let w = b_b[e / 4u];
        v = vec4<f32>(fp8(w & 0xffu), fp8((w >> 8u) & 0xffu), fp8((w >> 16u) & 0xffu), fp8(w >> 24u));
    } else {
        for (var i = 0u; i < min(avail, 4u); i = i + 1u) {
            let x = e + i;
            v[i] = fp8((b_b[x / 4u] >> ((x % 4u) * 8u)) & 0xffu);
        }
    }
    return v;
}

// The group of row `r` (global row index), or NONE.
fn group_of(g: u32, r_local: u32, r: u32) -> u32 {
    if MODE == 0u {
        return select(NONE, 0u, r < P.m);
    }
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
    let v = ldi_idx(r);
    if i64_is_negative(v) || v.y != 0u || v.x >= P.groups {
        return NONE;
    }
    return v.x;
}

fn per_workgroup(tile: u32, lid: u32) {
    if tile >= P.tiles {
        return;
    }
    let per_group = P.tiles_m * P.tiles_n;
    var g = 0u;
    if MODE == 2u {
        g = tile / per_group;
    }
    let t = tile % per_group;
    let tm = t / P.tiles_n;
    let tn = t % P.tiles_n;
    // First row of the tile in a / sa / d (masked: inside group g).
    var row_base = tm * 64u;
    if MODE == 2u {
        row_base = g * P.m + tm * 64u;
    }
    let col0 = tn * 64u;
    if lid < 64u {
        row_grp[lid] = group_of(g, tm * 64u + lid, row_base + lid);
    }
    let tx = lid % 16u;
    let ty = lid / 16u;
    // Staging: invocations 0..63 load a 4×4 block of A (rows 4·sq.., K
    // 4·sk..), 64..127 one of B, and store it transposed as 4 vec4s.
    let stage_b = lid >= 64u;
    let sq = (lid % 64u) % 16u;
    let sk = (lid % 64u) / 16u;
    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i = i + 1u) {
        acc[i] = vec4<f32>(0.0);
    }
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
        var ok: array<bool, 4>;
        var first: array<u32, 4>; // first element of each staged row
        for (var i = 0u; i < 4u; i = i + 1u) {
            let r = sq * 4u + i;
            if stage_b {
                ok[i] = lid < 128u && col0 + r < P.n;
                first[i] = (cur * P.n + col0 + r) * P.k;
            } else {
                ok[i] = row_grp[r] == cur;
                first[i] = (row_base + r) * P.k;
            }
        }
        let sb_row = (cur * P.nb + col0 / 128u) * P.kb;
        var my_rows: array<bool, 4>;
        var any_row = false;
        for (var i = 0u; i < 4u; i = i + 1u) {
            my_rows[i] = row_grp[ty * 4u + i] == cur;
            any_row = any_row || my_rows[i];
        }
        // Invocations without rows of this group skip the arithmetic (whole
        // SIMD groups of them on CPU drivers, e.g. masked rows).
        let live = any_row && col0 + tx * 4u < P.n;
        for (var blk = 0u; blk < P.kb; blk = blk + 1u) {
            var inner: array<vec4<f32>, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                inner[i] = vec4<f32>(0.0);
            }
            let kend = min(P.k, blk * 128u + 128u);
            for (var k0 = blk * 128u; k0 < kend; k0 = k0 + 16u) {
                if lid < 128u {
                    let gk = k0 + sk * 4u;
                    var avail = 0u;
                    if gk < P.k {
                        avail = P.k - gk;
                    }
                    var v: array<vec4<f32>, 4>;
                    for (var i = 0u; i < 4u; i = i + 1u) {
                        v[i] = vec4<f32>(0.0);
                        if ok[i] && avail > 0u {
                            if stage_b {
                                v[i] = load4_b(first[i] + gk, avail);
                            } else {
                                v[i] = load4_a(first[i] + gk, avail);
                            }
                        }
                    }
                    for (var j = 0u; j < 4u; j = j + 1u) {
                        let q = vec4<f32>(v[0][j], v[1][j], v[2][j], v[3][j]);
                        let at = (sk * 4u + j) * 16u + sq;
                        if stage_b {
                            Bs[at] = q;
                        } else {
                            As[at] = q;
                        }
                    }
                }
                workgroupBarrier();
                if live {
                    for (var kk = 0u; kk < 16u; kk = kk + 1u) {
                        let a = As[kk * 16u + ty];
                        let b = Bs[kk * 16u + tx];
                        inner[0] = inner[0] + a.x * b;
                        inner[1] = inner[1] + a.y * b;
                        inner[2] = inner[2] + a.z * b;
                        inner[3] = inner[3] + a.w * b;
                    }
                }
                workgroupBarrier();
            }
            let sbv = ld_sb(sb_row + blk);
            for (var i = 0u; i < 4u; i = i + 1u) {
                if my_rows[i] {
                    let sav = ld_sa((row_base + ty * 4u + i) * P.kb + blk);
                    acc[i] = acc[i] + inner[i] * (sav * sbv);
                }
            }
        }
        for (var i = 0u; i < 4u; i = i + 1u) {
            if my_rows[i] {
                store4_d((row_base + ty * 4u + i) * P.n, col0 + tx * 4u, P.n, acc[i]);
            }
            acc[i] = vec4<f32>(0.0);
        }
    }
}
