#version 450
#extension GL_GOOGLE_include_directive : require
// DeepSeek-V3 "noaux_tc" routing after the logits GEMM (SPEC §6), one
// workgroup (256) per token, a port of the wgpu backend's moe_select:
//   0. s = sigmoid(logit) (correctly rounded division), in place of the logit;
//      s' = s + bias recomputed where needed;
//   1. group score = top1 + top2 of s' in the group, kept as an exact
//      two-term sum (`precise`), so comparisons equal cpu-ref's f64 sums;
//   2. a group is kept when fewer than topk_group groups beat it (ties to
//      the lower index);
//   3. an expert of a kept group with rank r < topk among kept experts goes
//      to slot r (descending s', ties to the lower index);
//   4. w = s / (Σ s + 1e-20) · route_scale.
// Nothing depends on a subgroup size.
#include "common.glsl"
layout(constant_id = 2) const uint IDX_DT = 5u;
layout(push_constant) uniform Push {
    uint experts; uint n_group; uint gsz; uint topk_group; uint topk; uint has_bias;
    float route_scale; uint tokens;
} P;
layout(std430, set = 0, binding = 0) coherent buffer L { uint logits[]; };
layout(std430, set = 0, binding = 1) coherent buffer G { uint groups[]; };
layout(std430, set = 0, binding = 2) readonly buffer Bias { uint bias[]; };
layout(std430, set = 0, binding = 3) buffer Idx { uint topk_idx[]; };
layout(std430, set = 0, binding = 4) coherent buffer W { uint topk_w[]; };
shared float denom;

float biased(uint t, uint e) {
    float s = uintBitsToFloat(logits[t * P.experts + e]);
    if (P.has_bias == 1u) return s + uintBitsToFloat(bias[e]);
    return s;
}

vec2 gscore(uint t, uint g) {
    uint o = (t * P.n_group + g) * 4u;
    return vec2(uintBitsToFloat(groups[o]), uintBitsToFloat(groups[o + 1u]));
}

bool better(vec2 a, vec2 b) { return a.x > b.x || (a.x == b.x && a.y > b.y); }

void sync_all() {
    memoryBarrierBuffer();
    barrier();
}

void main() {
    uint t = wg_lin();
    uint lid = gl_LocalInvocationID.x;
    if (t >= P.tokens) return;
    for (uint e = lid; e < P.experts; e += 256u) {
        uint i = t * P.experts + e;
        logits[i] = floatBitsToUint(sigmoid_f32(uintBitsToFloat(logits[i])));
    }
    sync_all();
    for (uint g = lid; g < P.n_group; g += 256u) {
        float top1 = f32_inf(true);
        float top2 = f32_inf(true);
        for (uint j = 0u; j < P.gsz; j++) {
            float v = biased(t, g * P.gsz + j);
            if (v > top1) {
                top2 = top1;
                top1 = v;
            } else if (v > top2) {
                top2 = v;
            }
        }
        precise float s = top1 + top2;
        precise float bb = s - top1;
        precise float err = (top1 - (s - bb)) + (top2 - bb);
        if (!is_finite_f32(err)) err = 0.0;
        uint o = (t * P.n_group + g) * 4u;
        groups[o] = floatBitsToUint(s);
        groups[o + 1u] = floatBitsToUint(err);
    }
    sync_all();
    for (uint g = lid; g < P.n_group; g += 256u) {
        vec2 mine = gscore(t, g);
        uint rank = 0u;
        for (uint h = 0u; h < P.n_group; h++) {
            vec2 other = gscore(t, h);
            if (better(other, mine) || (h < g && other.x == mine.x && other.y == mine.y)) rank++;
        }
        groups[(t * P.n_group + g) * 4u + 2u] = rank < P.topk_group ? 1u : 0u;
    }
    sync_all();
    for (uint e = lid; e < P.experts; e += 256u) {
        uint g = e / P.gsz;
        if (groups[(t * P.n_group + g) * 4u + 2u] == 0u) continue;
        float mine = biased(t, e);
        uint rank = 0u;
        for (uint h = 0u; h < P.n_group; h++) {
            if (groups[(t * P.n_group + h) * 4u + 2u] == 0u) continue;
            for (uint j = 0u; j < P.gsz; j++) {
                uint f = h * P.gsz + j;
                float other = biased(t, f);
                if (other > mine || (other == mine && f < e)) rank++;
            }
        }
        if (rank < P.topk) {
            uint slot = t * P.topk + rank;
            if (IDX_DT == DT_I64) {
                topk_idx[2u * slot] = e;
                topk_idx[2u * slot + 1u] = 0u;
            } else {
                topk_idx[slot] = e;
            }
            topk_w[slot] = logits[t * P.experts + e];
        }
    }
    sync_all();
    if (lid == 0u) {
        precise float s = 0.0;
        precise float c = 0.0;
        for (uint j = 0u; j < P.topk; j++) {
            precise float y = uintBitsToFloat(topk_w[t * P.topk + j]);
            precise float sum = s + y;
            precise float bb = sum - s;
            precise float err = (s - (sum - bb)) + (y - bb);
            if (is_finite_f32(err)) c = c + err;
            s = sum;
        }
        denom = (s + c) + 1e-20;
    }
    sync_all();
    float dn = denom;
    for (uint j = lid; j < P.topk; j += 256u) {
        uint i = t * P.topk + j;
        topk_w[i] = floatBitsToUint(div_rn(uintBitsToFloat(topk_w[i]), dn) * P.route_scale);
    }
}
