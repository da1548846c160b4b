// gemm.cu — the portable (sm_80+, HIP-compilable) GEMM family:
//   gemm_fp8_tiled:   fp8_gemm, fp8_grouped_contiguous, fp8_grouped_masked
//                     (SPEC.md §3, §3.1, §3.2; DeepGEMM semantics: an f32
//                     partial sum per 128-wide K block, promoted into the
//                     f32 accumulator times sa[row, kb] * sb[col/128, kb]);
//   gemm_plain_tiled: gemm, gemm_grouped_contiguous, gemm_grouped_masked
//                     (f32 accumulation, one rounding to d's dtype);
//   gemm_check_index: the deferred range check of m_indices / masked_m.
//
// One CTA of 256 threads computes a 64 x 64 output tile through shared
// memory tiles of 64 x 32 (A) and 64 x 32 (B), each thread 4 x 4 outputs
// (rows ty + 16 i, columns tx + 16 j). Grid: x = row tiles (per group when
// masked), y = column tiles, z = groups when masked
// (`schedule::gemm::portable_grid`).
//
// Layouts (`mode`):
// * dense: rows [0, m) of a, b.
// * contiguous: row r uses group idx[r]; -1 = padding (written 0, as
//   cpu-ref does); values outside [-1, G) are skipped (never read out of
//   bounds) and reported by gemm_check_index. A tile whose rows span
//   several groups is computed once per group present (ascending).
// * masked: group blockIdx.z computes rows [0, masked_m[g]) (clamped to
//   [0, m]; bad values reported by gemm_check_index); other rows are not
//   written.
#include "gemm.cuh"

#define GT_BM 64
#define GT_BN 64
#define GT_BK 32
#define GT_THREADS 256
#define GT_NONE 0x7fffffff

// Range check: idx[i] must lie in [lo, hi) or equal `allow` (when has_allow).
extern "C" DP_GLOBAL void gemm_check_index(const void* idx, int is64, i64 count, i64 lo,
                                           i64 hi, i64 allow, int has_allow, u64* status) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (i64)gridDim.x * blockDim.x) {
    const i64 v = gemm_index(idx, i, is64);
    const bool ok = (v >= lo && v < hi) || (has_allow && v == allow);
    if (!ok) dp_flag(status, gemm_pos32(i), (u32)(u64)v);
  }
}

// FP8: a/b are bytes, `a_code` = fnuz flag, scales used. Plain: a/b are
// f32/bf16/f16 by dtype code, no scales, K is a single block.
template <bool FP8>
DP_DEVICE float gt_load(const void* p, i64 i, int code) {
  if (FP8) return gemm_fp8(((const u8*)p)[i], code);
  return dp_load(p, i, code);
}

template <bool FP8>
DP_DEVICE void gemm_tiled(const void* a, int a_code, const float* sa, const void* b, int b_code,
                          const float* sb, void* d, int d_dtype, const void* idx, int idx64,
                          int mode, i64 m, i64 n, i64 k, i64 groups) {
  __shared__ float As[GT_BK][GT_BM + 1];
  __shared__ float Bs[GT_BK][GT_BN + 1];
  __shared__ int rowg[GT_BM];
  __shared__ int next_g;

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const i64 m0 = (i64)blockIdx.x * GT_BM, n0 = (i64)blockIdx.y * GT_BN;
  const i64 kb_n = (k + 127) / 128, nb = (n + 127) / 128;
  // The K block the promotion works on: 128 (FP8) or all of K (plain).
  const i64 kblock = FP8 ? 128 : (k > 0 ? k : 1);

  i64 rows = m, a_off = 0, d_off = 0, sa_off = 0;
  int group = 0;
  if (mode == GEMM_MASKED) {
    group = blockIdx.z;
    i64 mm = gemm_index(idx, group, idx64);
    mm = mm < 0 ? 0 : (mm > m ? m : mm);  // bad values: flagged elsewhere
    rows = mm;
    a_off = (i64)group * m * k;
    d_off = (i64)group * m * n;
    sa_off = (i64)group * m * kb_n;
  }
  if (m0 >= rows) return;  // uniform over the CTA

  if (mode == GEMM_CONTIGUOUS) {
    if (tid < GT_BM) rowg[tid] = gemm_row_group(idx, idx64, m0 + tid, m, groups);
    __syncthreads();
    // Padding rows: 0, as the reference writes.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int lr = ty + 16 * i;
      if (rowg[lr] != -1) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const i64 c = n0 + tx + 16 * j;
        if (c < n) gemm_store(d, (m0 + lr) * n + c, d_dtype, 0.0f);
      }
    }
  }

  int prev = -1;
  for (;;) {
    if (mode == GEMM_CONTIGUOUS) {
      // The smallest group above `prev` present in this tile.
      if (tid == 0) next_g = gemm_next_group(rowg, GT_BM, prev, GT_NONE);
      __syncthreads();
      group = next_g;
      __syncthreads();  // next_g is rewritten by the next pass
      if (group == GT_NONE) return;
      prev = group;
    }
    const i64 b_off = (mode == GEMM_DENSE) ? 0 : (i64)group * n * k;
    const i64 sb_off = (mode == GEMM_DENSE) ? 0 : (i64)group * nb * kb_n;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (i64 k0 = 0; k0 < k; k0 += kblock) {
      const i64 k1 = (k0 + kblock < k) ? k0 + kblock : k;
      float part[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = 0.0f;

      for (i64 kt = k0; kt < k1; kt += GT_BK) {
        // 64 x 32 elements of each operand, 8 per thread; consecutive
        // threads read consecutive k (coalesced for row-major [rows, k]).
        // Not unrolled: each load decodes a dtype (keeps registers and
        // code size down).
#pragma unroll 1
        for (int t = 0; t < (GT_BM * GT_BK) / GT_THREADS; ++t) {
          const int e = tid + GT_THREADS * t;
          const int r = e / GT_BK, c = e % GT_BK;
          const i64 gk = kt + c;
          const i64 ar = m0 + r, bc = n0 + r;
          As[c][r] = (ar < rows && gk < k1) ? gt_load<FP8>(a, a_off + ar * k + gk, a_code) : 0.0f;
          Bs[c][r] = (bc < n && gk < k1) ? gt_load<FP8>(b, b_off + bc * k + gk, b_code) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < GT_BK; ++kk) {
          float av[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
        }
        __syncthreads();
      }

      if (FP8) {
        // Promotion: acc += part * sa[row, kb] * sb[col / 128, kb].
        const i64 kb = k0 / 128;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const i64 r = m0 + ty + 16 * i;
          const float s_a = r < rows ? sa[sa_off + r * kb_n + kb] : 0.0f;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const i64 c = n0 + tx + 16 * j;
            const float s_b = c < n ? sb[sb_off + (c / 128) * kb_n + kb] : 0.0f;
            acc[i][j] = fmaf(part[i][j], s_a * s_b, acc[i][j]);
          }
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
      }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int lr = ty + 16 * i;
      const i64 r = m0 + lr;
      const bool mine = (mode == GEMM_CONTIGUOUS) ? (rowg[lr] == group) : (r < rows);
      if (!mine) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const i64 c = n0 + tx + 16 * j;
        if (c < n) gemm_store(d, d_off + r * n + c, d_dtype, acc[i][j]);
      }
    }
    if (mode != GEMM_CONTIGUOUS) return;
  }
}

// a [rows, k], b [(G,) n, k] e4m3 (fnuz = 1: e4m3fnuz); sa [rows, kb],
// sb [(G,) nb, kb] f32; d in d_dtype (DP_F32 / DP_BF16).
extern "C" DP_GLOBAL void __launch_bounds__(GT_THREADS)
    gemm_fp8_tiled(const u8* a, const float* sa, const u8* b, const float* sb, int fnuz,
                   void* d, int d_dtype, const void* idx, int idx64, int mode, i64 m, i64 n,
                   i64 k, i64 groups) {
  gemm_tiled<true>(a, fnuz, sa, b, fnuz, sb, d, d_dtype, idx, idx64, mode, m, n, k, groups);
}

// a [rows, k] in a_dtype, b [(G,) n, k] in b_dtype (DP_F32/DP_BF16/DP_F16).
extern "C" DP_GLOBAL void __launch_bounds__(GT_THREADS)
    gemm_plain_tiled(const void* a, int a_dtype, const void* b, int b_dtype, void* d,
                     int d_dtype, const void* idx, int idx64, int mode, i64 m, i64 n, i64 k,
                     i64 groups) {
  gemm_tiled<false>(a, a_dtype, (const float*)0, b, b_dtype, (const float*)0, d, d_dtype, idx,
                    idx64, mode, m, n, k, groups);
}
