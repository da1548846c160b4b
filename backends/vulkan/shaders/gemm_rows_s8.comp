#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_shader_8bit_storage : require
#extension GL_EXT_shader_explicit_arithmetic_types_int8 : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
// gemm_rows for FP8 operands on a device with 8-bit storage, int8 and f16
// arithmetic (f8.glsl): a and b are read as uint8_t[] and decoded exactly
// to f16 with int8 arithmetic; products and sums stay in f32, so the
// result is bit-identical to gemm_rows.
#define DP_STORAGE8 1
#include "gemm_rows.glsl"
