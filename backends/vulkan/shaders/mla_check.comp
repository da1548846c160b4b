#version 450
#extension GL_GOOGLE_include_directive : require
// mla_decode's index checks, one invocation per (b, j): cache_seqlens[b]
// must lie in [0, cap] (entry `e_len`, flagged at b) and the block ids the
// length uses in [0, num_blocks) (entry `e_blk`, flagged at b·max_blocks + j).
#include "common.glsl"
layout(push_constant) uniform Push {
    uint batch; uint max_blocks; uint block_size; uint num_blocks; uint cap; uint e_len; uint e_blk;
} P;
layout(std430, set = 0, binding = 0) readonly buffer BT { uint bt[]; };
layout(std430, set = 0, binding = 1) readonly buffer SL { uint sl[]; };
layout(std430, set = 0, binding = 2) buffer Status { uint status[]; };
void main() {
    uint i = inv_lin();
    if (i >= P.batch * max(P.max_blocks, 1u)) return;
    uint b = i / max(P.max_blocks, 1u);
    uint j = i % max(P.max_blocks, 1u);
    int len = int(sl[b]);
    if (len < 0 || uint(len) > P.cap) {
        if (j == 0u) atomicMax(status[P.e_len * 4u], 0xffffffffu - b);
        return;
    }
    uint used = (uint(len) + P.block_size - 1u) / P.block_size;
    if (j < used && j < P.max_blocks) {
        int blk = int(bt[b * P.max_blocks + j]);
        if (blk < 0 || uint(blk) >= P.num_blocks) atomicMax(status[P.e_blk * 4u], 0xffffffffu - i);
    }
}
