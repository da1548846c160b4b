#version 450
#extension GL_GOOGLE_include_directive : require
// out[t, j] = table[ids[t], j]: one invocation per output word. Ids are
// clamped into the table (the check kernel reports bad ones); nothing is
// read out of bounds.
#include "common.glsl"
layout(constant_id = 2) const uint T_DT = 0u;
layout(constant_id = 3) const uint IDS_DT = 5u;
layout(constant_id = 4) const uint OUT_DT = 0u;
layout(push_constant) uniform Push { uint total; uint dim; uint vocab; } P;
layout(std430, set = 0, binding = 0) readonly buffer T { uint table[]; };
layout(std430, set = 0, binding = 1) readonly buffer I { uint ids[]; };
layout(std430, set = 0, binding = 2) buffer Out { uint o[]; };
uint lane(uint i) {
    if (P.vocab == 0u) return dt_encode(OUT_DT, 0.0);
    uint t = i / P.dim;
    uint j = i % P.dim;
    uint id = i64_clamp_index(LDI(ids, IDS_DT, t), P.vocab);
    if (T_DT == OUT_DT) {
        // Same dtype: copy the lane bits (exact for NaN payloads too).
        uint per = dt_per_word(T_DT);
        uint e = id * P.dim + j;
        return dt_lane(T_DT, table[e / per], e);
    }
    return dt_encode(OUT_DT, LDF(table, T_DT, id * P.dim + j));
}
#define PW_TOTAL P.total
#include "per_word.glsl"
