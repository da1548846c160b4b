#version 450
#extension GL_GOOGLE_include_directive : require
// Flags the first element of the index tensor x outside [lo, hi) (unless it
// equals `allow`) in status entry `entry`: atomicMax of ~index, so the
// lowest index wins. `first` is the element the data starts at in the binding (views).
#include "common.glsl"
layout(constant_id = 2) const uint X_DT = 5u;
layout(push_constant) uniform Push {
    uint n; uint entry; uint lo_l; uint lo_h; uint hi_l; uint hi_h;
    uint allow_l; uint allow_h; uint has_allow; uint first;
} P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) buffer Status { uint status[]; };
void main() {
    uint i = inv_lin();
    if (i >= P.n) return;
    uvec2 v = LDI(x, X_DT, P.first + i);
    bool allowed = P.has_allow == 1u && i64_eq(v, uvec2(P.allow_l, P.allow_h));
    if (!allowed && (i64_lt(v, uvec2(P.lo_l, P.lo_h)) || !i64_lt(v, uvec2(P.hi_l, P.hi_h)))) {
        atomicMax(status[P.entry * 4u], 0xffffffffu - i);
    }
}
