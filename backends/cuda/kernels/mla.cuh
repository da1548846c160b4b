// mla.cuh — shared pieces of the MLA decode kernels (portable and sm_90a).
//
// Split-K metadata layout (i32 elements; `src/schedule/mla.rs`, MetaLayout):
//   part_ptr[parts + 1] | split_ptr[batch + 1] | splits[batch + parts][4]
// A split is (batch, blk_lo, blk_hi, 0); its index in `splits` is its
// partial slot. Partials: opart[slot][s_q][h_q][dv] f32 (normalised by
// the split's own sum), lpart[slot][s_q][h_q] f32 (natural-log LSE of the
// split; -inf when the split saw no key of that row).
#pragma once
#include "port.cuh"

#define MLA_NEG_INF __int_as_float(0xff800000)
#define MLA_POS_INF __int_as_float(0x7f800000)

DP_DEVICE int mla_meta_split_ptr(int parts) { return parts + 1; }
DP_DEVICE int mla_meta_splits(int parts, int batch) { return parts + 1 + batch + 1; }

// A sequence length clamped into [0, capacity] (a bad one is flagged by
// mla_metadata; the kernels never read past the block table row).
DP_DEVICE i64 mla_clamp_len(i32 raw, i64 capacity) {
  i64 v = (i64)raw;
  if (v < 0) return 0;
  return v > capacity ? capacity : v;
}

// Keys visible to query row s of s_q for a sequence of len tokens (SPEC
// §4: bottom-right aligned causal mask).
DP_DEVICE i64 mla_visible(i64 len, int s, int s_q, int causal) {
  if (!causal) return len;
  i64 v = len - (i64)(s_q - 1 - s);
  return v > 0 ? v : 0;
}

DP_DEVICE float mla_warp_sum(float v) {
#pragma unroll
  for (int m = DP_WARP / 2; m > 0; m >>= 1) v += DP_SHFL_XOR(v, m);
  return v;
}

// Device address of element (token t, channel 0) of kv head kvh of batch
// b, or -1 when the block-table entry is out of range (never read then).
DP_DEVICE i64 mla_token_offset(const i32* block_table, int b, i64 t, int block_size,
                               int max_blocks, int num_blocks, int h_kv, int kvh, int d) {
  i32 blk = block_table[(i64)b * max_blocks + t / block_size];
  if (blk < 0 || blk >= num_blocks) return -1;
  return (((i64)blk * block_size + t % block_size) * h_kv + kvh) * (i64)d;
}
