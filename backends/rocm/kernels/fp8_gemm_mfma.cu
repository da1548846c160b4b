// fp8_gemm_mfma.cu — the dense FP8 GEMM (SPEC.md §3: d = a·bᵀ, DeepGEMM
// semantics) on AMD CDNA matrix cores, where the CUDA backend uses wgmma
// (fp8_gemm_sm90.cu). HIP only (hiprtc, -DDP_HIP, wavefront 64), compiled
// for gfx90a and later CDNA (gfx940/941/942, gfx950); `#error` elsewhere.
//
//   fp8_gemm_mfma: a [m, k] e4m3 (or e4m3fnuz, `fnuz`), sa [m, ceil(k/128)]
//                  f32 (1x128 activation scales), b [n, k] same format,
//                  sb [ceil(n/128), ceil(k/128)] f32 (128x128 weight
//                  scales), d [m, n] f32/bf16/f16 (`d_dtype`, DP_* codes).
//                  `mode` (gemm.cuh's GEMM_* codes) adds the grouped
//                  layouts of SPEC.md §3.1/§3.2 with `b [G, n, k]`,
//                  `sb [G, nb, kb]` and `idx` (i32, or i64 when `idx64`):
//   * contiguous: `idx` = m_indices [m]; a tile runs one pass (the K loop)
//     per distinct group among its 64 rows, ascending, and stores that
//     group's rows; DeepGEMM's layout (groups constant per 128-row block)
//     always has one pass. Rows of index -1 are written 0 (as cpu-ref);
//     out-of-range indices are skipped (the glue's deferred check reports
//     them). The same passes as the portable kernel (gemm.cu).
//   * masked: `a [G, m, k]`, `sa [G, m, kb]`, `d [G, m, n]`, `idx` =
//     masked_m [G]; workgroup z is the group; tiles at or past
//     masked_m[g] (clamped to [0, m]) return at once, rows at or past it
//     are not written.
//
// One workgroup of 256 threads (4 wavefronts) computes a 64 x 64 tile of
// d; wavefront w owns the 32 x 32 quarter (w / 2, w % 2) and runs
// v_mfma_f32_32x32x8bf16_1k. Per 128-wide K block: both 64 x 128 byte
// tiles are staged in LDS (zero past m, n, k), each lane decodes 4 FP8
// bytes of its A row and 4 of its B column into bf16 in registers (exact:
// every e4m3 and e4m3fnuz value is a bf16), 16 MFMAs sum the block into
// an f32 partial, and the partial is promoted into the f32 accumulator as
// acc = fma(part, sa[row, kb] * sb[col / 128, kb], acc) — the order of the
// portable kernel (gemm.cu). One rounding to d's dtype at the store.
//
// The MFMA operand layout is in mfma.cuh.
#include "gemm.cuh"
#include "mfma.cuh"

#define MF_BM 64
#define MF_BN 64
#define MF_BK 128
#define MF_LD (MF_BK + 4)
#define MF_THREADS 256
#define MF_NONE 0x7fffffff

// An FP8 byte as bf16 bits (exact, so truncating the f32 loses nothing).
DP_DEVICE short mf_fp8_bf16(u8 c, int fnuz) {
  return (short)(__float_as_uint(gemm_fp8(c, fnuz)) >> 16);
}

// Four consecutive FP8 bytes of an LDS row as a bf16x4 operand.
DP_DEVICE mf_bf16x4 mf_operand(const u8* p, int fnuz) {
  mf_bf16x4 v;
  v[0] = mf_fp8_bf16(p[0], fnuz);
  v[1] = mf_fp8_bf16(p[1], fnuz);
  v[2] = mf_fp8_bf16(p[2], fnuz);
  v[3] = mf_fp8_bf16(p[3], fnuz);
  return v;
}

extern "C" DP_GLOBAL void __launch_bounds__(MF_THREADS)
    fp8_gemm_mfma(const u8* a, const float* sa, const u8* b, const float* sb, int fnuz, void* d,
                  int d_dtype, const void* idx, int idx64, int mode, i64 m, i64 n, i64 k,
                  i64 groups) {
  __shared__ u8 as[MF_BM * MF_LD];
  __shared__ u8 bs[MF_BN * MF_LD];
  __shared__ int rowg[MF_BM];  // contiguous: the group of each tile row
  __shared__ int next_g;
  const int tid = threadIdx.x;
  const int lane = tid % 64;
  const int wave = tid / 64;
  const i64 row0 = (i64)blockIdx.x * MF_BM;
  const i64 col0 = (i64)blockIdx.y * MF_BN;
  const int wr = (wave / 2) * 32;  // the wavefront's rows in the tile
  const int wc = (wave % 2) * 32;  // and columns
  const int li = lane % 32;
  const int lk = (lane / 32) * 4;
  const i64 kb_n = (k + MF_BK - 1) / MF_BK, nb = (n + 127) / 128;
  const i64 col = col0 + wc + li;  // this lane's output column

  // Rows of this tile's problem, and where A, sa and d start.
  i64 rows = m, a_off = 0, sa_off = 0, d_off = 0;
  int group = 0;
  if (mode == GEMM_MASKED) {
    group = blockIdx.z;
    i64 mm = gemm_index(idx, group, idx64);
    mm = mm < 0 ? 0 : (mm > m ? m : mm);  // bad values: flagged elsewhere
    rows = mm;
    a_off = (i64)group * m * k;
    sa_off = (i64)group * m * kb_n;
    d_off = (i64)group * m * n;
  }
  if (row0 >= rows) return;  // uniform over the workgroup

  if (mode == GEMM_CONTIGUOUS) {
    if (tid < MF_BM) rowg[tid] = gemm_row_group(idx, idx64, row0 + tid, m, groups);
    __syncthreads();
    // Padding rows: 0, as the reference writes (one column per lane).
    if (col < n) {
      for (int v = 0; v < 16; ++v) {
        const int lr = wr + mf_acc_row(v, lane);
        if (rowg[lr] == -1) gemm_store(d, (row0 + lr) * n + col, d_dtype, 0.0f);
      }
    }
  }

  int prev = -1;
  for (;;) {
    if (mode == GEMM_CONTIGUOUS) {
      // The smallest group above `prev` present in this tile.
      if (tid == 0) next_g = gemm_next_group(rowg, MF_BM, prev, MF_NONE);
      __syncthreads();
      group = next_g;
      __syncthreads();  // next_g is rewritten by the next pass
      if (group == MF_NONE) return;
      prev = group;
    }
    const i64 b_off = (mode == GEMM_DENSE) ? 0 : (i64)group * n * k;
    const i64 sb_off = (mode == GEMM_DENSE) ? 0 : (i64)group * nb * kb_n;
    mf_f32x16 acc;
    for (int v = 0; v < 16; ++v) acc[v] = 0.0f;

    for (i64 kb = 0; kb < kb_n; ++kb) {
      const i64 k0 = kb * MF_BK;
      __syncthreads();  // the previous block's tiles are no longer read
      for (int e = tid; e < MF_BM * MF_BK; e += MF_THREADS) {
        const int r = e / MF_BK, c = e % MF_BK;
        const i64 kk = k0 + c;
        const i64 ar = row0 + r, br = col0 + r;
        as[r * MF_LD + c] = (ar < rows && kk < k) ? a[a_off + ar * k + kk] : (u8)0;
        bs[r * MF_LD + c] = (br < n && kk < k) ? b[b_off + br * k + kk] : (u8)0;
      }
      __syncthreads();
      mf_f32x16 part;
      for (int v = 0; v < 16; ++v) part[v] = 0.0f;
      const u8* arow = as + (wr + li) * MF_LD + lk;
      const u8* bcol = bs + (wc + li) * MF_LD + lk;
#pragma unroll 4
      for (int ks = 0; ks < MF_BK; ks += 8) {
        const mf_bf16x4 av = mf_operand(arow + ks, fnuz);
        const mf_bf16x4 bv = mf_operand(bcol + ks, fnuz);
        part = mf_mfma(av, bv, part);
      }
      // Promotion with the block's scales (zero past rows / n: never stored).
      const float s_b = col < n ? sb[sb_off + (col / 128) * kb_n + kb] : 0.0f;
      for (int v = 0; v < 16; ++v) {
        const i64 r = row0 + wr + mf_acc_row(v, lane);
        const float s_a = r < rows ? sa[sa_off + r * kb_n + kb] : 0.0f;
        acc[v] = fmaf(part[v], s_a * s_b, acc[v]);
      }
    }
    if (col < n) {
      for (int v = 0; v < 16; ++v) {
        const int lr = wr + mf_acc_row(v, lane);
        const i64 r = row0 + lr;
        const bool mine = (mode == GEMM_CONTIGUOUS) ? (rowg[lr] == group) : (r < rows);
        if (mine) gemm_store(d, d_off + r * n + col, d_dtype, acc[v]);
      }
    }
    if (mode != GEMM_CONTIGUOUS) return;
  }
}
