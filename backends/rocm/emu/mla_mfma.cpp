// mla_mfma.cpp — runs kernels/mla_decode_mfma.cu (the ROCm backend's MLA
// decode split kernel on CDNA matrix cores), included unchanged, with the
// CUDA kernels' mla_metadata and mla_combine (kernels/mla.cu), on the CPU
// through the CUDA backend's emu.h with 64-wide wavefronts and the
// instruction model of mfma_cdna.h, against mla_decode_check.h's double
// reference (the check of the Hopper kernel's harness): causal and not,
// empty sequences, several splits per sequence, 32/64/128 heads, NaN in
// every unused cache slot. Run by tests/emulate.rs; by hand (from the
// repository root):
//   g++ -std=c++20 -O1 -pthread -DDP_HIP -Ibackends/cuda/emu -Ibackends/cuda/kernels \
//       backends/rocm/emu/mla_mfma.cpp -o /tmp/o && /tmp/o
// -DEMU_MUTATE=1 drops the kernel's __syncthreads (races on the key tile
// and the S partials), which must fail.
#define MF_EMU 1
#include "extern_shared.h"  // mla.cu's dynamic shared buffers
#include "mla.cu"
EMU_DYN_SMEM(float, mla_ks);  // mla_decode_split (not run here)
EMU_DYN_SMEM(float, mla_pa);  // mla_prefill_attn (not run here)
#undef __shared__
#define __shared__ static  // the MFMA kernel's static LDS arrays (emu.h's form)
#include "mfma_cdna.h"
#if EMU_MUTATE == 1
#define __syncthreads() ((void)0)
#endif
#include "../kernels/mla_decode_mfma.cu"
#undef __syncthreads
#include "mla_decode_check.h"

// The split kernel under test: 32-row tiles, static LDS.
static void mfma(MlaSplitArgs x) {
  const int row_tiles = x.s_q * x.h_q / 32;
  emu_launch({(unsigned)x.parts, 1, (unsigned)row_tiles}, {256, 1, 1}, 0, [&] {
    mla_decode_mfma(x.q, x.kcache, x.block_table, x.seqlens, x.meta, x.opart, x.lpart, x.batch, x.s_q, x.h_q,
                    x.h_kv, x.num_blocks, x.max_blocks, x.parts, x.causal, x.scale);
  });
}

int main() {
  mla_check("mfma", 3, 2, 64, {130, 0, 1}, 1, 2, 1, mfma);
  mla_check("mfma", 2, 1, 128, {300, 64}, 0, 3, 2, mfma);
  mla_check("mfma", 1, 4, 32, {384}, 1, 6, 3, mfma);  // several splits, 4 tiles (one per s)
  mla_check("mfma", 2, 1, 32, {33, 95}, 0, 1, 4, mfma);  // partial steps of 32 tokens
  return emu_summary("mla_mfma");
}
