// fp8_mfma.cpp — runs kernels/fp8_gemm_mfma.cu (the ROCm backend's FP8
// GEMM on CDNA matrix cores), included unchanged, on the CPU through the
// CUDA backend's emu.h with 64-wide wavefronts and the instruction model
// of mfma_cdna.h, against fp8_gemm_check.h's double reference (the check
// the portable kernel's harness uses): e4m3 and e4m3fnuz, dense with
// partial tiles and K not a multiple of 128, contiguous with groups
// changing inside a tile, -1 padding rows and out-of-range indices, masked
// with masked_m = 0 / partial / = m / out of range, f32 and bf16 outputs.
// Run by tests/emulate.rs; by hand (from the repository root):
//   g++ -std=c++20 -O1 -pthread -DDP_HIP -Ibackends/cuda/emu -Ibackends/cuda/kernels \
//       backends/rocm/emu/fp8_mfma.cpp -o /tmp/o && /tmp/o
// -DEMU_MUTATE=1 drops the kernel's __syncthreads (a race on the LDS
// tiles), which must fail.
#define MF_EMU 1
#include "emu.h"
#include "port.cuh"
#include "mfma_cdna.h"
#if EMU_MUTATE == 1
#define __syncthreads() ((void)0)
#endif
#include "../kernels/fp8_gemm_mfma.cu"
#undef __syncthreads
#include "fp8_gemm_check.h"

static void mfma(dim3 grid, Fp8GemmArgs x) {
  emu_launch(grid, dim3(256), 0, [&] {
    fp8_gemm_mfma(x.a, x.sa, x.b, x.sb, x.fnuz, x.d, x.d_dtype, x.idx, 1, x.mode, x.m, x.n, x.k, x.groups);
  });
}

int main() {
  printf("fp8_gemm_mfma:\n");
  fp8_case("dense m70 n130 k300 f32", GEMM_DENSE, 1, 70, 130, 300, {0}, DP_F32, 0, mfma);
  fp8_case("dense m1 n64 k128 bf16", GEMM_DENSE, 1, 1, 64, 128, {0}, DP_BF16, 0, mfma);
  fp8_case("dense fnuz m9 n40 k200 f32", GEMM_DENSE, 1, 9, 40, 200, {0}, DP_F32, 1, mfma);
  {
    // Mixed groups inside tiles, -1 padding, out-of-range (5 >= G, -4).
    const long m = 100;
    std::vector<long long> idx(m);
    for (long r = 0; r < m; ++r) idx[r] = r < 10 ? 2 : (r < 20 ? -1 : (r < 40 ? 0 : (r < 80 ? 1 : 3)));
    idx[77] = 5;
    idx[33] = -4;
    idx[70] = 3;
    fp8_case("contiguous mixed tiles, padding, bad indices k160", GEMM_CONTIGUOUS, 4, m, 96, 160, idx, DP_F32, 0,
             mfma);
  }
  {
    // DeepGEMM's layout: groups constant per 128-row block (one pass a tile).
    const long m = 256;
    std::vector<long long> idx(m);
    for (long r = 0; r < m; ++r) idx[r] = r < 128 ? 1 : (r < 200 ? 0 : -1);
    fp8_case("contiguous aligned fnuz k256 bf16", GEMM_CONTIGUOUS, 2, m, 128, 256, idx, DP_BF16, 1, mfma);
  }
  fp8_case("masked (0, m, 9) k200", GEMM_MASKED, 3, 70, 65, 200, {0, 70, 9}, DP_F32, 0, mfma);
  fp8_case("masked out of range (99, -3) k130 bf16", GEMM_MASKED, 2, 20, 40, 130, {99, -3}, DP_BF16, 0, mfma);
  return emu_summary("fp8_mfma");
}
