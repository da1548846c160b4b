#version 450
#extension GL_GOOGLE_include_directive : require
// RMSNorm, pass 2: y = x · inv[row] · weight, one invocation per output word.
#include "common.glsl"
layout(constant_id = 2) const uint X_DT = 0u;
layout(constant_id = 3) const uint W_DT = 0u;
layout(constant_id = 4) const uint OUT_DT = 0u;
layout(push_constant) uniform Push { uint total; uint dim; } P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) readonly buffer Inv { uint inv[]; };
layout(std430, set = 0, binding = 2) readonly buffer Wt { uint wt[]; };
layout(std430, set = 0, binding = 3) buffer Out { uint o[]; };
uint lane(uint i) {
    uint row = i / P.dim;
    uint j = i % P.dim;
    return dt_encode(OUT_DT, LDF(x, X_DT, i) * uintBitsToFloat(inv[row]) * LDF(wt, W_DT, j));
}
#define PW_TOTAL P.total
#include "per_word.glsl"
