// mfma.cuh — what the ROCm backend's matrix-core kernels share: the
// operand types of v_mfma_f32_32x32x8bf16_1k and `mf_mfma(a, b, c)`
// (D = A·B + C over the wavefront), and the arch gate. HIP only (hiprtc
// with -DDP_HIP, wavefront 64); under MF_EMU the host emulation
// (../emu/mfma_cdna.h) provides the types and a model of the instruction.
//
// Operand layout (32x32x8, 64 lanes; AMD's matrix instruction
// calculator): lane l holds A[l % 32][4 (l / 32) + i] and
// B[4 (l / 32) + i][l % 32] in item i = 0..3 of its bf16x4 operands;
// accumulator item v of lane l is D[8 (v / 4) + 4 (l / 32) + v % 4][l % 32].
#pragma once
#include "port.cuh"

#if !defined(MF_EMU) && !defined(__gfx90a__) && !defined(__gfx940__) && \
    !defined(__gfx941__) && !defined(__gfx942__) && !defined(__gfx950__)
#error "the MFMA kernels need v_mfma_f32_32x32x8bf16_1k (gfx90a, gfx940-942, gfx950)"
#endif

#ifndef MF_EMU
typedef short mf_bf16x4 __attribute__((ext_vector_type(4)));
typedef float mf_f32x16 __attribute__((ext_vector_type(16)));
#define mf_mfma(a, b, c) __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(a, b, c, 0, 0, 0)
#endif

// Row of accumulator item v in lane `lane` (its column is lane % 32).
DP_DEVICE int mf_acc_row(int v, int lane) { return 8 * (v / 4) + 4 * (lane / 32) + v % 4; }
