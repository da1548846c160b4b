#version 450
#extension GL_GOOGLE_include_directive : require
// MLA prefill (SPEC §5), both forms computed in the absorbed order (the
// forms are equal in exact arithmetic), in five stages (spec constant
// STAGE), f32 accumulation, scratch rows between them:
//   0. q_lat[t,h,c] = Σ_i q_nope[t,h,i] · W[h,i,c]            (i < dn)
//   1. sc[t,h,s] = (q_lat·latent[s] + q_pe[t,h]·k_pe[s]) · scale, s ≤ pos(t)
//   2. softmax of each row (one workgroup per (t,h)): sc ← p
//   3. o_lat[t,h,c] = Σ_{s ≤ pos} p[s] · latent[s,c]
//   4. out[t,h,i] = Σ_c W[h,dn+i,c] · o_lat[t,h,c]             (i < dv)
// pos(t) = S - T + t (bottom-right causal).
#include "common.glsl"
layout(constant_id = 2) const uint STAGE = 0u;
layout(constant_id = 3) const uint QN_DT = 0u;
layout(constant_id = 4) const uint QP_DT = 0u;
layout(constant_id = 5) const uint LAT_DT = 0u;
layout(constant_id = 6) const uint KP_DT = 0u;
layout(constant_id = 7) const uint W_DT = 0u;
layout(constant_id = 8) const uint OUT_DT = 0u;
layout(push_constant) uniform Push {
    uint t; uint s; uint heads; uint dn; uint dr; uint dc; uint dv; float scale;
} P;
layout(std430, set = 0, binding = 0) readonly buffer QN { uint qn[]; };
layout(std430, set = 0, binding = 1) readonly buffer QP { uint qp[]; };
layout(std430, set = 0, binding = 2) readonly buffer LAT { uint lat[]; };
layout(std430, set = 0, binding = 3) readonly buffer KP { uint kp[]; };
layout(std430, set = 0, binding = 4) readonly buffer W { uint w[]; };
layout(std430, set = 0, binding = 5) buffer QL { float ql[]; };
layout(std430, set = 0, binding = 6) buffer SC { float sc[]; };
layout(std430, set = 0, binding = 7) buffer O { uint o[]; };
shared float red[256];

// Row r of head h of W (r < dn: W_UK, else W_UV), element c.
float wv(uint h, uint r, uint c) { return LDF(w, W_DT, (h * (P.dn + P.dv) + r) * P.dc + c); }

void store_out(uint i, float v) {
    if (dt_per_word(OUT_DT) == 1u) {
        o[i] = dt_encode(OUT_DT, v);
        return;
    }
    uint sh = (i % 2u) * 16u;
    atomicAnd(o[i / 2u], ~(0xffffu << sh));
    atomicOr(o[i / 2u], (dt_encode(OUT_DT, v) & 0xffffu) << sh);
}

void main() {
    uint th_n = P.t * P.heads;
    if (STAGE == 0u) {
        uint i = inv_lin();
        if (i >= th_n * P.dc) return;
        uint th = i / P.dc;
        uint c = i % P.dc;
        uint h = th % P.heads;
        float acc = 0.0;
        for (uint k = 0u; k < P.dn; k++) acc += LDF(qn, QN_DT, th * P.dn + k) * wv(h, k, c);
        ql[i] = acc;
    } else if (STAGE == 1u) {
        uint i = inv_lin();
        if (i >= th_n * P.s) return;
        uint th = i / P.s;
        uint s = i % P.s;
        uint t = th / P.heads;
        uint pos = P.s - P.t + t;
        if (s > pos) {
            sc[i] = 0.0;
            return;
        }
        float acc = 0.0;
        for (uint c = 0u; c < P.dc; c++) acc += ql[th * P.dc + c] * LDF(lat, LAT_DT, s * P.dc + c);
        float pe = 0.0;
        for (uint c = 0u; c < P.dr; c++) pe += LDF(qp, QP_DT, th * P.dr + c) * LDF(kp, KP_DT, s * P.dr + c);
        sc[i] = (acc + pe) * P.scale;
    } else if (STAGE == 2u) {
        uint th = wg_lin();
        uint lid = gl_LocalInvocationID.x;
        if (th >= th_n) return;
        uint t = th / P.heads;
        uint n = P.s - P.t + t + 1u;
        uint row = th * P.s;
        float mx = f32_inf(true);
        for (uint s = lid; s < n; s += 256u) mx = max(mx, sc[row + s]);
        red[lid] = mx;
        barrier();
        for (uint k = 128u; k > 0u; k >>= 1u) {
            if (lid < k) red[lid] = max(red[lid], red[lid + k]);
            barrier();
        }
        float m = red[0];
        barrier();
        float sum = 0.0;
        for (uint s = lid; s < n; s += 256u) {
            float e = exp_f32(sc[row + s] - m);
            sc[row + s] = e;
            sum += e;
        }
        red[lid] = sum;
        barrier();
        for (uint k = 128u; k > 0u; k >>= 1u) {
            if (lid < k) red[lid] = red[lid] + red[lid + k];
            barrier();
        }
        float total = red[0];
        for (uint s = lid; s < n; s += 256u) sc[row + s] = div_rn(sc[row + s], total);
    } else if (STAGE == 3u) {
        uint i = inv_lin();
        if (i >= th_n * P.dc) return;
        uint th = i / P.dc;
        uint c = i % P.dc;
        uint t = th / P.heads;
        uint n = P.s - P.t + t + 1u;
        float acc = 0.0;
        for (uint s = 0u; s < n; s++) acc += sc[th * P.s + s] * LDF(lat, LAT_DT, s * P.dc + c);
        ql[i] = acc;
    } else {
        uint i = inv_lin();
        if (i >= th_n * P.dv) return;
        uint th = i / P.dv;
        uint c = i % P.dv;
        uint h = th % P.heads;
        float acc = 0.0;
        for (uint k = 0u; k < P.dc; k++) acc += wv(h, P.dn + c, k) * ql[th * P.dc + k];
        store_out(i, acc);
    }
}
