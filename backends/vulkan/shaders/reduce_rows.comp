#version 450
#extension GL_GOOGLE_include_directive : require
// reduce_rows: out[t, c] = Σ_j w[t, j] · src[index[t, j], c], accumulated in
// f32 in j order (−1 and out-of-range ids skipped; the range check reports
// the latter), rounded once to out's dtype. Without WEIGHTED every weight
// is 1 (the weights binding is a placeholder). `src_sub`, `idx_sub` and
// `w_sub` are the elements the data of views start at in their bindings.
#include "common.glsl"
layout(constant_id = 2) const uint SRC_DT = 0u;
layout(constant_id = 3) const uint IDX_DT = 5u;
layout(constant_id = 4) const uint OUT_DT = 0u;
layout(constant_id = 5) const uint WEIGHTED = 0u;
layout(push_constant) uniform Push {
    uint total; uint hidden; uint k; uint src_rows; uint src_sub; uint idx_sub; uint w_sub;
} P;
layout(std430, set = 0, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, set = 0, binding = 1) readonly buffer Idx { uint idx[]; };
layout(std430, set = 0, binding = 2) readonly buffer Wts { uint wts[]; };
layout(std430, set = 0, binding = 3) buffer Out { uint o[]; };
uint lane(uint i) {
    uint t = i / P.hidden;
    uint c = i % P.hidden;
    float acc = 0.0;
    for (uint j = 0u; j < P.k; j++) {
        uint e = t * P.k + j;
        uvec2 id = LDI(idx, IDX_DT, P.idx_sub + e);
        if (id.y != 0u || id.x >= P.src_rows) continue;
        float y = LDF(src, SRC_DT, P.src_sub + id.x * P.hidden + c);
        if (WEIGHTED == 1u) {
            acc = acc + uintBitsToFloat(wts[P.w_sub + e]) * y;
        } else {
            acc = acc + y;
        }
    }
    return dt_encode(OUT_DT, acc);
}
#define PW_TOTAL P.total
#include "per_word.glsl"
