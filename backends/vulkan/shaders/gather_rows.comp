#version 450
#extension GL_GOOGLE_include_directive : require
// gather_rows: dst row i = src row index[i] (-1 or out of range: a row of
// zero bytes; the range check reports bad ids), on raw bytes so any dtype
// is carried bit-exact. One invocation per dst word (rows that share a
// word need no atomics). `src_sub`/`dst_sub` are the byte offsets of the
// data inside the bound ranges (views).
#include "common.glsl"
layout(constant_id = 2) const uint IDX_DT = 5u;
layout(push_constant) uniform Push {
    uint total_words; uint total_bytes; uint row_bytes; uint src_sub;
    uint src_rows; uint dst_sub; uint idx_sub;
} P;
layout(std430, set = 0, binding = 0) readonly buffer Src { uint src[]; };
layout(std430, set = 0, binding = 1) readonly buffer Idx { uint idx[]; };
layout(std430, set = 0, binding = 2) buffer Dst { uint dst[]; };

uint source_row(uint r) {
    uint e = P.idx_sub / (IDX_DT == DT_I64 ? 8u : 4u) + r;
    uvec2 v = LDI(idx, IDX_DT, e);
    if (v.y != 0u || v.x >= P.src_rows) return 0xffffffffu;
    return v.x;
}

uint src_byte(uint s) { return (src[s / 4u] >> ((s % 4u) * 8u)) & 0xffu; }

void main() {
    uint w = inv_lin();
    // Output words, counted from the aligned start of the dst binding.
    uint first = P.dst_sub / 4u;
    if (w >= P.total_words) return;
    uint ww = first + w;
    uint word = dst[ww];
    for (uint j = 0u; j < 4u; j++) {
        uint gb = ww * 4u + j; // byte in the binding
        if (gb < P.dst_sub || gb - P.dst_sub >= P.total_bytes) continue;
        uint b = gb - P.dst_sub;
        uint r = source_row(b / P.row_bytes);
        uint byte = 0u;
        if (r != 0xffffffffu) byte = src_byte(P.src_sub + r * P.row_bytes + b % P.row_bytes);
        word = (word & ~(0xffu << (j * 8u))) | (byte << (j * 8u));
    }
    dst[ww] = word;
}
