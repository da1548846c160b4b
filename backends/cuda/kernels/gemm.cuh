// gemm.cuh — helpers of the GEMM family and quantization kernels
// (quant.cu, gemm.cu, fp8_gemm_sm90.cu). Portable: port.cuh only.
#pragma once
#include "port.cuh"

// Layout codes (`schedule::gemm::Layout::code`).
#define GEMM_DENSE 0
#define GEMM_CONTIGUOUS 1
#define GEMM_MASKED 2

// f32 -> e4m3fnuz (bias 8, max 240, NaN -> 0x80, no negative zero), round
// to nearest even, saturating; the rounding of deepport-core's
// `formats::f32_to_e4m3fnuz`.
DP_DEVICE u8 gemm_f32_to_e4m3fnuz(float x) {
  u32 b = dp_f32_bits(x), s = (b >> 24) & 0x80u, a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return (u8)0x80u;
  float f = dp_bits_f32(a);
  u32 h;
  if (f >= 248.0f) {  // 240 + half a step and beyond (the tie goes to 256)
    h = 0x7fu;
  } else if (f < 0.0078125f) {  // below 2^-7: subnormal, step 2^-10
    h = (u32)rintf(f * 1024.0f);  // exact scaling, ties to even; 8 = min normal
  } else {
    u32 e = (a >> 23) - 119u, m = a & 0x7fffffu;
    h = (e << 3) | (m >> 20);
    u32 rest = m & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (h & 1u))) h += 1u;
    if (h > 0x7fu) h = 0x7fu;
  }
  return h == 0 ? (u8)0 : (u8)(s | h);
}

// An FP8 operand byte as f32 (`fnuz`: e4m3fnuz, else OCP e4m3).
DP_DEVICE float gemm_fp8(u8 c, int fnuz) {
  return fnuz ? dp_e4m3fnuz_to_f32(c) : dp_e4m3_to_f32(c);
}

// An index tensor element (i32 or i64).
DP_DEVICE i64 gemm_index(const void* p, i64 i, int is64) {
  return is64 ? ((const i64*)p)[i] : (i64)((const i32*)p)[i];
}

// Contiguous layout: the group of row r (of m) for a tile's row table —
// its m_indices entry, -1 for padding, -2 for a row past m or an index out
// of [-1, groups) (skipped; the index check flags it).
DP_DEVICE int gemm_row_group(const void* idx, int idx64, i64 r, i64 m, i64 groups) {
  i64 v = r < m ? gemm_index(idx, r, idx64) : -2;
  if (v < -1 || v >= groups) v = -2;
  return (int)v;
}

// The smallest group above `prev` in a tile's row table `rowg[0..n)`, or
// `none`: a contiguous tile runs one pass per group among its rows, in
// ascending order.
DP_DEVICE int gemm_next_group(const int* rowg, int n, int prev, int none) {
  int best = none;
  for (int r = 0; r < n; ++r) {
    const int v = rowg[r];
    if (v > prev && v < best) best = v;
  }
  return best;
}

// The flat position of a flagged element, saturated to 32 bits.
DP_DEVICE u32 gemm_pos32(i64 i) {
  return i > (i64)0xffffffffll ? 0xffffffffu : (u32)i;
}

// Stores an output element in f32 / bf16 / f16 (the GEMM outputs); out of
// line: the tiles store 16-64 values each and one copy keeps code small.
__device__ __noinline__ void gemm_store(void* d, i64 i, int dtype, float v) {
  switch (dtype) {
    case DP_BF16: ((u16*)d)[i] = dp_f32_to_bf16(v); break;
    case DP_F16: ((u16*)d)[i] = dp_f32_to_f16(v); break;
    default: ((float*)d)[i] = v;
  }
}
