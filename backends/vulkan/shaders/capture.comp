#version 450
#extension GL_GOOGLE_include_directive : require
// After a check: copies the flagged element (if any) into words 1 and 2 of
// its status entry, so the error names the value. Index dtypes give the
// i64 (lo, hi), float dtypes the f32 bits. One invocation.
#include "common.glsl"
layout(constant_id = 2) const uint X_DT = 5u;
layout(push_constant) uniform Push { uint entry; uint first; uint len; } P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) buffer Status { uint status[]; };
void main() {
    if (gl_GlobalInvocationID.x != 0u) return;
    uint w0 = status[P.entry * 4u];
    if (w0 == 0u) return;
    uint g = 0xffffffffu - w0;
    if (g >= P.len) return;
    uint idx = P.first + g;
    uvec2 v;
    if (X_DT == DT_I64 || X_DT == DT_I32) {
        v = LDI(x, X_DT, idx);
    } else {
        v = uvec2(floatBitsToUint(LDF(x, X_DT, idx)), 0u);
    }
    status[P.entry * 4u + 1u] = v.x;
    status[P.entry * 4u + 2u] = v.y;
}
