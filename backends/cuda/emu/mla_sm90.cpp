// mla_sm90.cpp — runs mla_decode_sm90 (kernels/mla_sm90.cu with MLA_EMU: the
// wgmma/fence PTX helpers replaced by the host models of wgmma_sm90.h) with
// mla_metadata and mla_combine, against a double-precision reference. It checks the kernel's
// logic (tiling, masking, softmax in the fragment layout, P fragments,
// partial writes), not the hardware's reading of the descriptors.
// 32-wide warps only (sm_90a). Run by tests/emulate.rs; by hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/mla_sm90.cpp -o /tmp/s && /tmp/s
#define MLA_EMU 1
#include "extern_shared.h"
#include <algorithm>
#include <cstdio>
#include <random>
#include "wgmma_sm90.h"
#include "../kernels/mla.cu"
#include "../kernels/mla_sm90.cu"
#include "mla_decode_check.h"
EMU_DYN_SMEM(float, mla_ks);  // mla_decode_split (not run here)
EMU_DYN_SMEM(float, mla_pa);  // mla_prefill_attn (not run here)
// SM90_SMEM in ops/mla.rs: two 64×576 bf16 tiles (Q and the key block).
#define SM90_SMEM (64 * 576 * 2 * 2)


// The split kernel under test: 64-row tiles, the Q and key tiles in dynamic smem.
static void sm90(MlaSplitArgs x) {
  const int row_tiles = x.s_q * x.h_q / 64;
  emu_launch({(unsigned)x.parts, 1, (unsigned)row_tiles}, {256, 1, 1}, SM90_SMEM, [&] {
    mla_decode_sm90(x.q, x.kcache, x.block_table, x.seqlens, x.meta, x.opart, x.lpart, x.batch, x.s_q, x.h_q,
                    x.h_kv, x.num_blocks, x.max_blocks, x.parts, x.causal, x.scale);
  });
}

int main() {
  // parts = max(1, SMs / row tiles) with 4, 6 and 24 SMs.
  mla_check("sm90", 3, 2, 64, {130, 0, 1}, 1, 2, 1, sm90);
  mla_check("sm90", 2, 1, 128, {300, 64}, 0, 3, 2, sm90);
  mla_check("sm90", 1, 4, 64, {384}, 1, 6, 3, sm90);  // cut into several splits, 4 tiles (one per s)
  return emu_summary("mla_sm90");
}
