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
  fp8_standard_cases(mfma);
  {
    // DeepGEMM's layout: groups constant per 128-row block (one pass a tile).
    const long m = 256;
    std::vector<long long> idx(m);
    for (long r = 0; r < m; ++r) idx[r] = r < 128 ? 1 : (r < 200 ? 0 : -1);
    fp8_case("contiguous aligned fnuz k256 bf16", GEMM_CONTIGUOUS, 2, m, 128, 256, idx, DP_BF16, 1, mfma);
  }
  return emu_summary("fp8_mfma");
}
