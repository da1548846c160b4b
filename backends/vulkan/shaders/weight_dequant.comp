#version 450
#extension GL_GOOGLE_include_directive : require
// out[i, j] = w[i, j] · s[i/128, j/128]: the f32 product, then one rounding
// to out's dtype. One invocation per output word.
#include "common.glsl"
layout(constant_id = 2) const uint W_DT = 3u;
layout(constant_id = 3) const uint S_DT = 0u;
layout(constant_id = 4) const uint OUT_DT = 0u;
layout(push_constant) uniform Push { uint total; uint k; uint kb; } P;
layout(std430, set = 0, binding = 0) readonly buffer W { uint w[]; };
layout(std430, set = 0, binding = 1) readonly buffer S { uint s[]; };
layout(std430, set = 0, binding = 2) buffer Out { uint o[]; };
uint lane(uint i) {
    uint r = i / P.k;
    uint c = i % P.k;
    return dt_encode(OUT_DT, LDF(w, W_DT, i) * LDF(s, S_DT, (r / 128u) * P.kb + c / 128u));
}
#define PW_TOTAL P.total
#include "per_word.glsl"
