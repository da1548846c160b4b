// RMSNorm, pass 1: one workgroup (256) per row computes
// inv = 1 / sqrt(mean(x²) + eps) in f32: per-invocation compensated sums,
// then a workgroup sum (reduce.glsl: subgroupAdd or a shared-memory tree). TwoSum is kept
// exact with `precise` (drivers may not fold the error term away).
#include "common.glsl"
#define WG_RED 256u
#include "reduce.glsl"
layout(constant_id = 2) const uint X_DT = 0u;
layout(push_constant) uniform Push { uint rows; uint dim; float eps; } P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) buffer Inv { uint inv[]; };
void main() {
    uint row = wg_lin();
    uint lid = gl_LocalInvocationID.x;
    if (row >= P.rows) return;
    uint base = row * P.dim;
    precise float s = 0.0;
    precise float c = 0.0;
    for (uint j = lid; j < P.dim; j += 256u) {
        float v = LDF(x, X_DT, base + j);
        precise float y = v * v;
        precise float t = s + y;
        precise float bb = t - s;
        precise float err = (s - (t - bb)) + (y - bb);
        // The error term of an overflowed sum is NaN: drop it (the sum is
        // +inf and inv becomes 0, as in the reference).
        if (is_finite_f32(err)) c = c + err;
        s = t;
    }
    float total = dp_sum(s + c);
    if (lid == 0u) {
        float ms = div_rn(total, float(P.dim));
        inv[row] = floatBitsToUint(div_rn(1.0, sqrt(ms + P.eps)));
    }
}
