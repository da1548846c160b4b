// fp8_gemm_sm90.cu — the Hopper (sm_90a) FP8 GEMM, DeepGEMM's design:
// TMA loads (cp.async.bulk.tensor + mbarrier) of 64 x 128 A and
// BLOCK_N x 128 B e4m3 tiles into 128-byte-swizzled shared memory, a
// 4-stage pipeline, `wgmma.mma_async m64nNk32 .f32.e4m3.e4m3` with f32
// accumulators, and per 128-wide K block a promotion of the accumulator
// into a second set of f32 registers times sa[row, kb] * sb[n0/128, kb].
// Persistent: gridDim.x CTAs (<= SMs) walk the tiles t = blockIdx.x,
// blockIdx.x + gridDim.x, ... exactly as `schedule::gemm::Sm90Plan::tile`
// numbers them (tn-major over tm; groups outermost when masked).
//
// Preconditions (checked by the host, `choose_fp8_path`): OCP e4m3
// operands, k % 128 == 0, n % BLOCK_N == 0 (BLOCK_N = 128 or 64), 16-byte
// aligned operand bases, 32-bit dims. Layouts as in gemm.cu:
// * contiguous: each row uses its own m_indices entry. A tile runs one
//   pass (the K loop) per distinct group among its 64 rows, ascending, and
//   stores the rows of that group; DeepGEMM's layout (groups constant per
//   128-row block) always has one pass. Rows whose index is -1 are written
//   0 (as cpu-ref); out-of-range indices are skipped (gemm_check_index
//   reports them).
// * masked: tiles at or past masked_m[g] (clamped to [0, m]) are skipped,
//   rows at or past it are not written.
//
// One warpgroup (128 threads) per CTA; thread 0 issues the TMA loads.
#include "gemm.cuh"

#define H_BM 64
#define H_BK 128
#define H_STAGES 4
#define H_THREADS 128

// The 128 opaque bytes of a CUtensorMap (no toolkit header).
struct __align__(64) GemmTmaDesc {
  u64 v[16];
};

// Shared memory matrix descriptor of a K-major tile with the 128-byte
// swizzle: rows of 128 bytes, 8-row core groups 1024 bytes apart (SBO),
// LBO unused for swizzled K-major layouts, base 1024-byte aligned (the
// k-step advances the start address by 32 bytes inside the swizzle atom).
DP_DEVICE u64 h_desc(u32 saddr) {
  u64 d = (u64)((saddr & 0x3ffffu) >> 4);
  d |= (u64)1 << 16;
  d |= (u64)(1024 >> 4) << 32;
  d |= (u64)1 << 62;
  return d;
}

#ifndef GEMM_SM90_HOST_EMU  // the host emulation (emu/tma_sm90.h) supplies these
DP_DEVICE u32 h_smem_addr(const void* p) {
  u32 r;
  asm volatile("{\n.reg .u64 t;\ncvta.to.shared.u64 t, %1;\ncvt.u32.u64 %0, t;\n}\n"
               : "=r"(r)
               : "l"(p));
  return r;
}

DP_DEVICE void h_mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

DP_DEVICE void h_mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrives once and expects `bytes` of transactions (the TMA loads).
DP_DEVICE void h_mbar_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

DP_DEVICE void h_mbar_wait(u32 bar, u32 parity) {
  u32 done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// A 2-D TMA box load: coordinates (c0 = innermost = k, c1 = row).
DP_DEVICE void h_tma_load(u32 dst, const GemmTmaDesc* desc, u32 bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(dst),
      "l"((u64)desc), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}

DP_DEVICE void h_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DP_DEVICE void h_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
DP_DEVICE void h_wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving accumulator reads/writes across the
// asynchronous wgmma boundary.
DP_DEVICE void h_reg_fence(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// D[64 x 128] (+)= A[64 x 32] * B[128 x 32]^T, e4m3 x e4m3 -> f32; A and B
// from shared memory descriptors; scale_d = 0 overwrites D.
DP_DEVICE void h_wgmma_n128(float* d, u64 da, u64 db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}

// D[64 x 64] (+)= A[64 x 32] * B[64 x 32]^T, e4m3 x e4m3 -> f32; A and B
// from shared memory descriptors; scale_d = 0 overwrites D.
DP_DEVICE void h_wgmma_n64(float* d, u64 da, u64 db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, %32, %33, p, 1, 1;\n}\n"
      :
        "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(scale_d));
}
#endif  // GEMM_SM90_HOST_EMU

template <int BN>
struct HMma;
template <>
struct HMma<128> {
  static DP_DEVICE void run(float* d, u64 da, u64 db, int s) { h_wgmma_n128(d, da, db, s); }
};
template <>
struct HMma<64> {
  static DP_DEVICE void run(float* d, u64 da, u64 db, int s) { h_wgmma_n64(d, da, db, s); }
};

template <int BN>
DP_DEVICE void fp8_sm90_body(const GemmTmaDesc* ta, const GemmTmaDesc* tb, const float* sa,
                             const float* sb, void* d, int d_dtype, const void* idx, int idx64,
                             int mode, int m, int n, int k, int groups, int tiles_m, int tiles_n,
                             int num_tiles) {
#ifndef GEMM_SM90_HOST_EMU
  extern __shared__ __align__(1024) u8 h_smem[];
#endif
  __shared__ int h_rowg[H_BM];  // contiguous: each tile row's group (-1 pad, -2 skip)
  constexpr u32 A_BYTES = H_BM * H_BK;
  constexpr u32 B_BYTES = BN * H_BK;
  constexpr u32 STAGE = A_BYTES + B_BYTES;  // a multiple of 1024
  constexpr int NACC = BN / 2;
  // The host reserves 1024 bytes of slack for this alignment.
  const u32 base = (h_smem_addr(h_smem) + 1023u) & ~1023u;
  const u32 bars = base + H_STAGES * STAGE;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  if (tid == 0) {
    for (int s = 0; s < H_STAGES; ++s) h_mbar_init(bars + 8 * s, 1);
    h_mbar_init_fence();
  }
  __syncthreads();

  const int kbn = k / H_BK;
  const i64 nb = (n + 127) / 128;
  const int per_group = tiles_m * tiles_n;
  u32 it = 0;  // K blocks this CTA consumed: stage it % S, parity (it / S) & 1
  float acc[NACC], fin[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.0f;

  // Contiguous tiles take one pass per group present among their rows:
  // `prev` is the group of the pass just done (-1: none yet); `t` advances
  // when no group is left. Other layouts take one pass per tile. (One flat
  // loop: a nested pass loop makes ptxas spill the accumulators.)
  int t = blockIdx.x, prev = -1;
  while (t < num_tiles) {
    int g = 0, r = t;
    if (mode == GEMM_MASKED) {
      g = t / per_group;
      r = t - g * per_group;
    }
    const int tm = r % tiles_m, tn = r / tiles_m;
    const int m0 = tm * H_BM, n0 = tn * BN;
    i64 rows = m;                    // valid rows of this group
    i64 a_row = m0;                  // A's TMA row (and d's row) of the tile's first row
    if (mode == GEMM_MASKED) {
      i64 mm = gemm_index(idx, g, idx64);
      mm = mm < 0 ? 0 : (mm > m ? m : mm);
      rows = mm;
      if (m0 >= rows) {  // uniform: skipped tile
        t += gridDim.x;
        continue;
      }
      a_row = (i64)g * m + m0;
    }
    const int row0 = m0 + warp * 16 + lane / 4, row1 = row0 + 8;
    if (mode == GEMM_CONTIGUOUS && prev == -1) {
      __syncthreads();  // every thread is done with the previous tile's h_rowg
      if (tid < H_BM) h_rowg[tid] = gemm_row_group(idx, idx64, (i64)m0 + tid, m, groups);
      __syncthreads();
      // Padding rows: 0, as cpu-ref writes.
      for (int i = 0; i < NACC; ++i) {
        const bool hi = (i >> 1) & 1;
        const int col = n0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
        if (h_rowg[(hi ? row1 : row0) - m0] == -1) gemm_store(d, (i64)(hi ? row1 : row0) * n + col, d_dtype, 0.0f);
      }
    }
    const i64 ar0 = a_row + (row0 - m0), ar1 = a_row + (row1 - m0);
    int gi0 = 0, gi1 = 0;  // contiguous: the group of each of this thread's rows
    if (mode == GEMM_CONTIGUOUS) {
      gi0 = h_rowg[row0 - m0];
      gi1 = h_rowg[row1 - m0];
      const int best = gemm_next_group(h_rowg, H_BM, prev, 0x7fffffff);  // uniform
      if (best == 0x7fffffff) {  // no group left: the next tile
        prev = -1;
        t += gridDim.x;
        continue;
      }
      g = best;
      prev = best;
    }
    {
      const i64 b_row = (i64)g * n + n0;  // dense: g == 0
      const i64 sb_base = ((i64)g * nb + n0 / 128) * kbn;

      // Prologue: the first stages of this pass (every stage is free here:
      // all loads issued so far were consumed, and the last K block ended
      // with a CTA barrier).
      if (tid == 0) {
        const int pro = kbn < H_STAGES ? kbn : H_STAGES;
        for (int p = 0; p < pro; ++p) {
          const u32 s = (it + p) % H_STAGES;
          const u32 bar = bars + 8 * s;
          h_mbar_expect_tx(bar, STAGE);
          h_tma_load(base + s * STAGE, ta, bar, p * H_BK, (int)a_row);
          h_tma_load(base + s * STAGE + A_BYTES, tb, bar, p * H_BK, (int)b_row);
        }
      }
#pragma unroll
      for (int i = 0; i < NACC; ++i) fin[i] = 0.0f;

      for (int kb = 0; kb < kbn; ++kb, ++it) {
        const u32 s = it % H_STAGES;
        h_mbar_wait(bars + 8 * s, (it / H_STAGES) & 1u);
        const u32 sa_addr = base + s * STAGE, sb_addr = sa_addr + A_BYTES;
#pragma unroll
        for (int i = 0; i < NACC; ++i) h_reg_fence(acc[i]);
        h_wg_fence();
#pragma unroll
        for (int kk = 0; kk < H_BK / 32; ++kk) {
          HMma<BN>::run(acc, h_desc(sa_addr + kk * 32), h_desc(sb_addr + kk * 32), kk > 0);
        }
        h_wg_commit();
        h_wg_wait0();
#pragma unroll
        for (int i = 0; i < NACC; ++i) h_reg_fence(acc[i]);

        // Promotion of this K block's f32 partial sums.
        const float sbv = sb[sb_base + kb];
        const float s0 = (row0 < rows ? sa[ar0 * kbn + kb] : 0.0f) * sbv;
        const float s1 = (row1 < rows ? sa[ar1 * kbn + kb] : 0.0f) * sbv;
#pragma unroll
        for (int i = 0; i < NACC; ++i) fin[i] = fmaf(acc[i], ((i >> 1) & 1) ? s1 : s0, fin[i]);

        __syncthreads();  // every warp's wgmma has read stage s
        if (tid == 0 && kb + H_STAGES < kbn) {
          const u32 bar = bars + 8 * s;
          h_mbar_expect_tx(bar, STAGE);
          h_tma_load(base + s * STAGE, ta, bar, (kb + H_STAGES) * H_BK, (int)a_row);
          h_tma_load(base + s * STAGE + A_BYTES, tb, bar, (kb + H_STAGES) * H_BK, (int)b_row);
        }
      }

      // Store: register i holds row (i >> 1) & 1 ? row1 : row0, column
      // n0 + 8 (i >> 2) + 2 (lane % 4) + (i & 1) (the wgmma D fragment).
#pragma unroll
      for (int i = 0; i < NACC; ++i) {
        const bool hi = (i >> 1) & 1;
        const int row = hi ? row1 : row0;
        if (row >= rows) continue;
        if (mode == GEMM_CONTIGUOUS && (hi ? gi1 : gi0) != g) continue;  // another pass's row
        const int col = n0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
        gemm_store(d, (a_row + (row - m0)) * (i64)n + col, d_dtype, fin[i]);
      }
    }
    if (mode != GEMM_CONTIGUOUS) t += gridDim.x;
  }
}

#define H_ENTRY(NAME, BN)                                                                    \
  extern "C" __global__ void __launch_bounds__(H_THREADS, 1)                               \
      NAME(const __grid_constant__ GemmTmaDesc ta, const __grid_constant__ GemmTmaDesc tb, \
           const float* sa, const float* sb, void* d, int d_dtype, const void* idx,         \
           int idx64, int mode, int m, int n, int k, int groups, int tiles_m, int tiles_n,  \
           int num_tiles) {                                                                  \
    fp8_sm90_body<BN>(&ta, &tb, sa, sb, d, d_dtype, idx, idx64, mode, m, n, k, groups,      \
                      tiles_m, tiles_n, num_tiles);                                          \
  }

// a [rows, k] / b [(G ·) n, k] through the descriptors (`tma_a`, `tma_b`);
// sa [rows, k/128], sb [(G,) ceil(n/128), k/128] f32; d [rows, n] f32/bf16.
H_ENTRY(fp8_gemm_sm90_n128, 128)
H_ENTRY(fp8_gemm_sm90_n64, 64)
