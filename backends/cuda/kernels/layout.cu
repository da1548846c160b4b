// layout.cu — get_dispatch_layout (SPEC.md §7): per-rank and per-expert
// token counts and the token × rank membership, from topk_idx [N, k]
// (i32/i64, −1 = none). Portable: port.cuh only. Counts use integer
// atomics, so they are exact whatever order threads run in.
//
// Launch order (one stream): ly_zero on each count array, then
// ly_expert_counts and ly_rank_membership (independent of each other).
#include "port.cuh"

DP_DEVICE i64 ly_index(const void* p, i64 i, int is64) {
  return is64 ? ((const i64*)p)[i] : (i64)((const i32*)p)[i];
}

extern "C" DP_GLOBAL void ly_zero(i32* p, i64 n) {
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = 0;
}

// One thread per (token, slot): checks the id (flags values outside
// [0, experts) other than −1) and counts each distinct expert of a token
// once (only its first slot counts).
extern "C" DP_GLOBAL void ly_expert_counts(const void* topk, int idx64, i64 tokens, i64 k,
                                            i64 experts, i32* per_expert, u64* status) {
  i64 n = tokens * k;
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    i64 e = ly_index(topk, i, idx64);
    if (e < 0 || e >= experts) {
      if (e != -1) dp_flag(status, i > 0xffffffffll ? 0xffffffffu : (u32)i, (u32)(u64)e);
      continue;
    }
    i64 t0 = i - i % k;
    bool first = true;
    for (i64 j = t0; j < i; ++j)
      if (ly_index(topk, j, idx64) == e) first = false;
    if (first) atomicAdd(&per_expert[e], 1);
  }
}

// One thread per (token, rank): is_token_in_rank[t, r] = whether any valid
// id of token t lies in [r·epr, (r+1)·epr); counts the token for rank r.
extern "C" DP_GLOBAL void ly_rank_membership(const void* topk, int idx64, i64 tokens, i64 k,
                                              i64 experts, i64 world, i64 epr,
                                              u8* in_rank, i32* per_rank) {
  i64 n = tokens * world;
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    i64 t = i / world, r = i - t * world;
    bool in = false;
    for (i64 j = 0; j < k; ++j) {
      i64 e = ly_index(topk, t * k + j, idx64);
      if (e >= 0 && e < experts && e / epr == r) in = true;
    }
    in_rank[i] = in ? 1 : 0;
    if (in) atomicAdd(&per_rank[r], 1);
  }
}
