// Per-token, 128-group FP8 quantization, bit-exact with cpu-ref: one
// workgroup of 128 invocations per group (spec constant 1 = 128); amax by a
// workgroup max (reduce.glsl; exact in any order), s = amax / fp8_max and
// q = x / s as correctly rounded divisions, UE8M0 rounds s up to a power of
// two, the FP8 encode rounds to nearest even, saturating.
#include "common.glsl"
#define WG_RED 128u
#include "reduce.glsl"
layout(constant_id = 2) const uint X_DT = 0u;
layout(constant_id = 3) const uint Q_DT = 3u;
layout(push_constant) uniform Push { uint total; float fp8_max; uint ue8m0; } P;
layout(std430, set = 0, binding = 0) readonly buffer X { uint x[]; };
layout(std430, set = 0, binding = 1) buffer Q { uint q[]; };
layout(std430, set = 0, binding = 2) buffer S { uint s[]; };
shared uint codes[128];
void main() {
    uint g = wg_lin();
    uint lid = gl_LocalInvocationID.x;
    if (g >= P.total) return;
    float v = LDF(x, X_DT, g * 128u + lid);
    float amax = max(dp_max(abs(v)), 1e-4);
    float scale = div_rn(amax, P.fp8_max);
    if (P.ue8m0 == 1u) {
        uint b = floatBitsToUint(scale);
        if ((b & 0x7fffffu) != 0u) scale = uintBitsToFloat(((b >> 23u) + 1u) << 23u);
    }
    codes[lid] = f32_to_e4m3(div_rn(v, scale), Q_DT == DT_E4M3FNUZ);
    barrier();
    if (lid < 32u) {
        uint c = lid * 4u;
        q[g * 32u + lid] = codes[c] | (codes[c + 1u] << 8u) | (codes[c + 2u] << 16u) | (codes[c + 3u] << 24u);
    }
    if (lid == 0u) s[g] = floatBitsToUint(scale);
}
