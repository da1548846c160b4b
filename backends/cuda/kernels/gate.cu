// gate.cu — the DeepSeek-V3 "noaux_tc" MoE router (SPEC.md §6), with
// cpu-ref's arithmetic and tie-breaking. Portable: port.cuh only.
//
// One block per token (grid-stride over tokens), blockDim.x a multiple of
// DP_WARP. Dynamic shared memory (bytes, computed by the host):
//   gs[n_group] f64 | s[E] f32 | sb[E] f32 | gkeep[n_group] u8 | taken[E] u8
//
// 1. logits: each warp takes experts e = warp, warp + nwarps, …; lanes
//    accumulate x·w in f64 (exact products), a warp reduction sums them;
//    s = f32(sigmoid(logit)) computed in f64; s' = s + bias in f32.
// 2. thread 0 selects, as cpu-ref's sorts do: group score = the two largest
//    s' of the group summed in f64; the topk_group best groups (ties to the
//    lower group); among their experts the topk best s' (ties to the lower
//    expert), in that order; w = s / (Σ s + 1e-20) · route_scale in f64,
//    rounded to f32. Orders compare with total_cmp's key.
// Non-finite inputs are flagged by a separate check before this kernel.
#include "port.cuh"

// total_cmp order as an unsigned key.
DP_DEVICE u32 gt_key32(float v) {
  u32 b = dp_f32_bits(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
DP_DEVICE u64 gt_key64(double v) {
  u64 b = (u64)__double_as_longlong(v);
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

extern "C" DP_GLOBAL void gt_moe_gate(const void* x, int xdt, const void* w, int wdt,
                                       const float* bias, void* topk_idx, int idx64,
                                       float* topk_w, i64 tokens, i64 dim, int experts,
                                       int n_group, int topk_group, int topk,
                                       float route_scale) {
  extern __shared__ double gt_smem[];
  double* gs = gt_smem;
  float* s = (float*)(gs + n_group);
  float* sb = s + experts;
  u8* gkeep = (u8*)(sb + experts);
  u8* taken = gkeep + n_group;
  const int lane = threadIdx.x % DP_WARP, warp = threadIdx.x / DP_WARP;
  const int nwarps = blockDim.x / DP_WARP;
  const int gsz = experts / n_group;

  for (i64 tok = blockIdx.x; tok < tokens; tok += gridDim.x) {
    const i64 xb = tok * dim;
    for (int e = warp; e < experts; e += nwarps) {
      const i64 wb = (i64)e * dim;
      double acc = 0.0;
      for (i64 j = lane; j < dim; j += DP_WARP)
        acc += (double)dp_load(x, xb + j, xdt) * (double)dp_load(w, wb + j, wdt);
      for (int m = DP_WARP / 2; m > 0; m /= 2) acc += DP_SHFL_XOR(acc, m);
      if (lane == 0) {
        float se = (float)(1.0 / (1.0 + exp(-acc)));
        s[e] = se;
        sb[e] = se + (bias ? bias[e] : 0.0f);
        taken[e] = 0;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // group scores: the two largest s' of each group, summed in f64
      for (int g = 0; g < n_group; ++g) {
        int b0 = -1, b1 = -1;
        for (int e = g * gsz; e < (g + 1) * gsz; ++e) {
          u32 k = gt_key32(sb[e]);
          if (b0 < 0 || k > gt_key32(sb[b0])) {
            b1 = b0;
            b0 = e;
          } else if (b1 < 0 || k > gt_key32(sb[b1])) {
            b1 = e;
          }
        }
        gs[g] = (double)sb[b0] + (double)sb[b1];
        gkeep[g] = 0;
      }
      // keep topk_group groups: descending score, ties to the lower group
      for (int r = 0; r < topk_group; ++r) {
        int best = -1;
        for (int g = 0; g < n_group; ++g) {
          if (gkeep[g]) continue;
          if (best < 0 || gt_key64(gs[g]) > gt_key64(gs[best])) best = g;
        }
        gkeep[best] = 1;
      }
      // top-k experts of the kept groups: descending s', ties to the lower id
      double sum = 0.0;
      const i64 ob = tok * (i64)topk;
      for (int r = 0; r < topk; ++r) {
        int best = -1;
        for (int e = 0; e < experts; ++e) {
          if (taken[e] || !gkeep[e / gsz]) continue;
          if (best < 0 || gt_key32(sb[e]) > gt_key32(sb[best])) best = e;
        }
        taken[best] = 1;
        sum += (double)s[best];
        if (idx64) ((i64*)topk_idx)[ob + r] = best;
        else ((i32*)topk_idx)[ob + r] = best;
      }
      for (int r = 0; r < topk; ++r) {
        i64 e = idx64 ? ((i64*)topk_idx)[ob + r] : (i64)((i32*)topk_idx)[ob + r];
        topk_w[ob + r] = (float)((double)s[e] / (sum + 1e-20) * (double)route_scale);
      }
    }
    __syncthreads();  // shared arrays are reused by the next token
  }
}
