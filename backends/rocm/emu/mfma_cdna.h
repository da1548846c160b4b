// mfma_cdna.h — a host model of CDNA's v_mfma_f32_32x32x8bf16_1k for the
// emulation harnesses (emu.h from backends/cuda/emu, 64-wide wavefronts:
// compile with -DDP_HIP). Include before the kernel, with MF_EMU defined.
//
// The instruction is wavefront-wide: D = A·B + C with A 32x8, B 8x32 and
// C, D 32x32, spread over the 64 lanes as AMD's matrix instruction
// calculator gives it (and the kernel's comment repeats):
//   lane l holds A[l % 32][4 (l / 32) + i] and B[4 (l / 32) + i][l % 32] in
//   item i = 0..3 of its bf16x4 operands, and D[8 (v / 4) + 4 (l / 32) +
//   v % 4][l % 32] in item v = 0..15 of its f32x16 accumulator.
// Each lane deposits its operands in a slot, the wavefront meets at a
// barrier, each lane computes its 16 outputs from everyone's slots, and
// the wavefront meets again before the slots are reused. Products of bf16
// values are exact in f32; the model adds the 8 products to C in k order
// in f32 (the hardware's internal order is not documented; the harness's
// tolerance allows any order).
//
// What it cannot prove: that the layout above is the hardware's — it is
// the same statement the kernel is written against; a run on a CDNA GPU
// (ci/gpu/run.sh rocm) checks that.
#pragma once
#ifndef MF_EMU
#error "define MF_EMU before including mfma_cdna.h"
#endif
#if EMU_W != 64
#error "the MFMA model needs 64-wide wavefronts: compile with -DDP_HIP"
#endif

// GCC notes that 64-byte vectors change the calling convention without
// AVX-512: irrelevant for these inline host functions.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef short mf_bf16x4 __attribute__((vector_size(8)));
typedef float mf_f32x16 __attribute__((vector_size(64)));

struct MfSlot {
  mf_bf16x4 a, b;
};
inline MfSlot mf_slots[EMU_MAX_THREADS];

inline float mf_bf16_value(short h) {
  const unsigned bits = (unsigned)(unsigned short)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline mf_f32x16 mf_mfma(mf_bf16x4 a, mf_bf16x4 b, mf_f32x16 c) {
  const unsigned t = emu_tid();
  const unsigned lane = t % 64, base = t - lane;
  mf_slots[t] = MfSlot{a, b};
  emu_warp_sync();  // every lane's operands are in place
  mf_f32x16 d = c;
  const unsigned col = lane % 32;
  for (int v = 0; v < 16; ++v) {
    const unsigned row = 8 * (v / 4) + 4 * (lane / 32) + v % 4;
    float acc = c[v];
    for (int k = 0; k < 8; ++k) {
      const unsigned half = (unsigned)k / 4, item = (unsigned)k % 4;
      const float x = mf_bf16_value(mf_slots[base + row + 32 * half].a[item]);
      const float y = mf_bf16_value(mf_slots[base + col + 32 * half].b[item]);
      acc += x * y;
    }
    d[v] = acc;
  }
  emu_warp_sync();  // every lane has read the slots
  return d;
}
