#version 450
#extension GL_GOOGLE_include_directive : require
// Flags the first non-finite element of the float tensor x.
#include "common.glsl"
layout(constant_id = 2) const uint X_DT = 0u;
layout(push_constant) uniform Push { uint n; uint entry; uint first; } P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) buffer Status { uint status[]; };
void main() {
    uint i = inv_lin();
    if (i >= P.n) return;
    if (!is_finite_f32(LDF(x, X_DT, P.first + i))) {
        atomicMax(status[P.entry * 4u], 0xffffffffu - i);
    }
}
