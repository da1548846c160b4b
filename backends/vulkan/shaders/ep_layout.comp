#version 450
#extension GL_GOOGLE_include_directive : require
// get_dispatch_layout (SPEC §7): one invocation per token, counting with
// atomics (outputs zeroed by the host with vkCmdFillBuffer first): each
// distinct valid expert of the token once in num_tokens_per_expert, each
// distinct rank once in num_tokens_per_rank and is_token_in_rank. Ids
// outside [0, E) are skipped (−1 means none; others are reported by the
// op's range check).
#include "common.glsl"
layout(constant_id = 2) const uint TOPK_DT = 6u;
layout(push_constant) uniform Push { uint n; uint k; uint experts; uint world; uint epr; } P;
layout(std430, set = 0, binding = 0) readonly buffer T { uint topk[]; };
layout(std430, set = 0, binding = 1) buffer R { uint per_rank[]; };
layout(std430, set = 0, binding = 2) buffer E { uint per_expert[]; };
layout(std430, set = 0, binding = 3) buffer IR { uint in_rank[]; };

bool valid_id(uvec2 v) { return v.y == 0u && v.x < P.experts; }

void main() {
    uint t = inv_lin();
    if (t >= P.n) return;
    uint base = t * P.k;
    for (uint j = 0u; j < P.k; j++) {
        uvec2 v = LDI(topk, TOPK_DT, base + j);
        if (!valid_id(v)) continue;
        uint r = v.x / P.epr;
        bool seen_expert = false;
        bool seen_rank = false;
        for (uint q = 0u; q < j; q++) {
            uvec2 u = LDI(topk, TOPK_DT, base + q);
            if (valid_id(u)) {
                if (u.x == v.x) seen_expert = true;
                if (u.x / P.epr == r) seen_rank = true;
            }
        }
        if (!seen_expert) atomicAdd(per_expert[v.x], 1u);
        if (!seen_rank) {
            atomicAdd(per_rank[r], 1u);
            uint b = t * P.world + r;
            atomicOr(in_rank[b / 4u], 1u << ((b % 4u) * 8u));
        }
    }
}
