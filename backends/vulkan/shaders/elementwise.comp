#version 450
#extension GL_GOOGLE_include_directive : require
// add (OP = 0) and silu_mul (OP = 1): one invocation per output word, so
// packed 16-bit outputs need no atomics. `add` rounds the exact sum once;
// silu_mul computes g·sigmoid(g) as one correctly rounded division, then ·u.
#include "common.glsl"
layout(constant_id = 2) const uint OP = 0u;
layout(constant_id = 3) const uint A_DT = 0u;
layout(constant_id = 4) const uint B_DT = 0u;
layout(constant_id = 5) const uint OUT_DT = 0u;
layout(push_constant) uniform Push { uint n; } P;
layout(std430, set = 0, binding = 0) readonly buffer A { uint a[]; };
layout(std430, set = 0, binding = 1) readonly buffer B { uint b[]; };
layout(std430, set = 0, binding = 2) buffer Out { uint o[]; };

uint lane(uint i) {
    float x = LDF(a, A_DT, i);
    float y = LDF(b, B_DT, i);
    if (OP == 0u) return add_round(x, y, OUT_DT);
    return dt_encode(OUT_DT, div_rn(x, 1.0 + exp_f32(-x)) * y);
}

#define PW_TOTAL P.n
#include "per_word.glsl"
