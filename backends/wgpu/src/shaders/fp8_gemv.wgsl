// FP8 block-scaled GEMM for few rows (dense fp8_gemm with small m, e.g.
// decode): same math as fp8_gemm.wgsl. Each invocation owns two adjacent
// output columns and reads their B rows straight from memory; the A rows
// (four at a time) of each 128-wide K block are decoded into workgroup
// memory (MR = 1, 2 or 4 rows per pass, read as vec4s). Inner products per
// K block in f32, then scaled by sa·sb and added to the f32 accumulator.
struct Params {
    m: u32,
    n: u32,
    k: u32,
    kb: u32,
    nb: u32,
    groups: u32, // workgroups (512 columns each)
}

var<workgroup> As: array<vec4<f32>, 128>; // [4 rows][32 k-quads]

fn fp8(c: u32) -> f32 {
    return e4m3_to_f32_sel(c, FNUZ);
}

fn fp8x4(w: u32) -> vec4<f32> {
    return vec4<f32>(fp8(w & 0xffu), fp8((w >> 8u) & 0xffu), fp8((w >> 16u) & 0xffu), fp8(w >> 24u));
}

fn byte_a(e: u32) -> f32 {
    return fp8((b_a[e / 4u] >> ((e % 4u) * 8u)) & 0xffu);
}

fn byte_b(e: u32) -> f32 {
    return fp8((b_b[e / 4u] >> ((e % 4u) * 8u)) & 0xffu);
}

fn store(r: u32, c: u32, v: vec2<f32>) {
    let e = r * P.n + c;
    if D_PER == 1u {
        stw_d(e, enc_d(v.x));
        if c + 1u < P.n {
            stw_d(e + 1u, enc_d(v.y));
        }
    } else if (e & 1u) == 0u && c + 1u < P.n {
        stw_d(e / 2u, (enc_d(v.x) & 0xffffu) | (enc_d(v.y) << 16u));
    } else {
        st_d(e, v.x);
        if c + 1u < P.n {
            st_d(e + 1u, v.y);
        }
    }
}

fn per_workgroup(wg: u32, lid: u32) {
    if wg >= P.groups {
        return;
    }
    let c0 = (wg * 256u + lid) * 2u;
    let ok0 = c0 < P.n;
    let ok1 = c0 + 1u < P.n;
    // Both columns lie in the same 128-row block of sb (c0 is even).
    let sb_row = min(c0 / 128u, P.nb - 1u) * P.kb;
    for (var r0 = 0u; r0 < P.m; r0 = r0 + MR) {
        var acc: array<vec2<f32>, 4>;
        for (var i = 0u; i < MR; i = i + 1u) {
            acc[i] = vec2<f32>(0.0);
        }
        for (var blk = 0u; blk < P.kb; blk = blk + 1u) {
            let k0 = blk * 128u;
            let kn = min(128u, P.k - k0);
            workgroupBarrier();
            for (var e = lid; e < MR * 128u; e = e + 256u) {
                let rr = r0 + e / 128u;
                let kk = e % 128u;
                var v = 0.0;
                if rr < P.m && kk < kn {
                    v = byte_a(rr * P.k + k0 + kk);
                }
                As[e / 4u][e % 4u] = v;
            }
            workgroupBarrier();
            var inner: array<vec2<f32>, 4>;
            for (var i = 0u; i < MR; i = i + 1u) {
                inner[i] = vec2<f32>(0.0);
            }
            if ok0 {
                let e0 = c0 * P.k + k0;
                let e1 = e0 + P.k;
                if K_ALIGNED {
                    for (var w = 0u; w < kn / 4u; w = w + 1u) {
                        let b0 = fp8x4(b_b[e0 / 4u + w]);
                        var b1 = vec4<f32>(0.0);
                        if ok1 {
                            b1 = fp8x4(b_b[e1 / 4u + w]);
                        }
                        for (var i = 0u; i < MR; i = i + 1u) {
                            let ab = i * 128u + w * 4u;
                            let a4 = As[ab / 4u];
                            inner[i] = inner[i] + vec2<f32>(dot(a4, b0), dot(a4, b1));
                        }
                    }
                } else {
                    for (var kk = 0u; kk < kn; kk = kk + 1u) {
                        let b0 = byte_b(e0 + kk);
                        var b1 = 0.0;
                        if ok1 {
                            b1 = byte_b(e1 + kk);
                        }
                        for (var i = 0u; i < MR; i = i + 1u) {
                            let a = As[(i * 128u + kk) / 4u][kk % 4u];
                            inner[i] = inner[i] + vec2<f32>(a * b0, a * b1);
                        }
                    }
                }
            }
            let sbv = ld_sb(sb_row + blk);
            for (var i = 0u; i < MR; i = i + 1u) {
                if r0 + i < P.m {
                    acc[i] = acc[i] + inner[i] * (ld_sa((r0 + i) * P.kb + blk) * sbv);
                }
            }
        }
        if ok0 {
            for (var i = 0u; i < MR; i = i + 1u) {
                if r0 + i < P.m {
                    store(r0 + i, c0, acc[i]);
                }
            }
        }
    }
}
