#version 450
#extension GL_GOOGLE_include_directive : require
// Writes `value` into words [0, n) of `dst` (also the kernel of the
// validation-misuse test).
#include "common.glsl"
layout(push_constant) uniform Push { uint n; uint value; } P;
layout(std430, set = 0, binding = 0) buffer Dst { uint dst[]; };
void main() {
    uint i = inv_lin();
    if (i < P.n) dst[i] = P.value;
}
