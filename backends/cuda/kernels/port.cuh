// port.cuh — the portability header of deepport's GPU kernels.
//
// Every portable kernel source includes this header and nothing else, so
// that the same .cu file compiles under NVRTC (CUDA, sm_80+) and hiprtc
// (HIP, gfx9xx): the ROCm backend compiles these sources with
// DP_HIP defined. No CUDA toolkit header is used: number formats are
// decoded and encoded by bit manipulation here, with exactly the rounding
// of deepport-core's `formats` module (SPEC.md §1).
//
// Conventions:
// * Kernels are `extern "C" DP_GLOBAL`, take scalars and pointers only.
// * Index checks never read out of bounds: a bad index is clamped or the
//   element skipped, and `dp_flag` records the first bad flat position in
//   the op's status entry; the host reports it at the next synchronize.
// * Wavefront/warp width is DP_WARP (32 on NVIDIA, 64 on AMD CDNA): never
//   hard-code 32 in portable code.
#pragma once

#if defined(DP_HIP)
#define DP_WARP 64
#define DP_SHFL_XOR(v, m) __shfl_xor((v), (m))
#define DP_FULL_MASK 0xffffffffffffffffull
#else
#define DP_WARP 32
#define DP_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define DP_FULL_MASK 0xffffffffu
#endif

#define DP_GLOBAL __global__
#define DP_DEVICE __device__ __forceinline__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

// ---- bit casts -----------------------------------------------------------
DP_DEVICE float dp_bits_f32(u32 b) { return __int_as_float((int)b); }
DP_DEVICE u32 dp_f32_bits(float x) { return (u32)__float_as_int(x); }

// ---- bf16 / f16 -----------------------------------------------------------
DP_DEVICE float dp_bf16_to_f32(u16 h) { return dp_bits_f32(((u32)h) << 16); }
// Round to nearest even; NaN stays NaN (quiet).
DP_DEVICE u16 dp_f32_to_bf16(float x) {
  u32 b = dp_f32_bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return (u16)(b >> 16);
}
DP_DEVICE float dp_f16_to_f32(u16 h) {
  u32 s = (u32)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return dp_bits_f32(s | 0x7f800000u | (m << 13));
  if (e == 0) {  // subnormal or zero: m * 2^-24
    float v = (float)m * 5.9604644775390625e-8f;
    return s ? -v : v;
  }
  return dp_bits_f32(s | ((e + 112u) << 23) | (m << 13));
}
// Round to nearest even, overflow to inf, NaN stays NaN.
DP_DEVICE u16 dp_f32_to_f16(float x) {
  u32 b = dp_f32_bits(x), s = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return (u16)(s | 0x7e00u);
  if (a >= 0x477ff000u) return (u16)(s | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                            // below 2^-14: subnormal
    float v = dp_bits_f32(a) * 16777216.0f;         // exact: times 2^24
    float r = rintf(v);                             // ties to even
    return (u16)(s | (u32)r);
  }
  u32 e = (a >> 23) - 112u, m = a & 0x7fffffu;
  u32 h = (e << 10) | (m >> 13);
  u32 rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;
  return (u16)(s | h);
}

// ---- FP8 (OCP e4m3: bias 7, max 448, 0x7f/0xff NaN, no inf) --------------
DP_DEVICE float dp_e4m3_to_f32(u8 c) {
  u32 s = c & 0x80u, e = (c >> 3) & 0xfu, m = c & 7u;
  float v;
  if (e == 0xf && m == 7) v = __int_as_float(0x7fc00000);
  else if (e == 0) v = (float)m * 0.001953125f;  // m * 2^-9
  else v = dp_bits_f32(((e + 120u) << 23) | (m << 20));
  return s ? -v : v;
}
// Round to nearest even, saturate to ±448, NaN -> 0x7f with the sign.
DP_DEVICE u8 dp_f32_to_e4m3(float x) {
  u32 b = dp_f32_bits(x), s = (b >> 24) & 0x80u, a = b & 0x7fffffffu;
  if (a > 0x7f800000u) return (u8)(s | 0x7fu);
  float f = dp_bits_f32(a);
  if (f >= 464.0f) return (u8)(s | 0x7eu);  // 448 + half a step and beyond
  if (f < 0.015625f) {                       // below 2^-6: subnormal, step 2^-9
    float r = rintf(f * 512.0f);             // exact scaling, ties to even
    return (u8)(s | (u32)r);                 // r == 8 is the smallest normal
  }
  u32 e = (a >> 23) - 120u, m = a & 0x7fffffu;
  u32 h = (e << 3) | (m >> 20);
  u32 rest = m & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (h & 1u))) h += 1u;
  if (h > 0x7eu) h = 0x7eu;
  return (u8)(s | h);
}

// ---- FP8 e4m3fnuz (bias 8, max 240, 0x80 NaN, no -0) ----------------------
DP_DEVICE float dp_e4m3fnuz_to_f32(u8 c) {
  if (c == 0x80u) return __int_as_float(0x7fc00000);
  u32 s = c & 0x80u, e = (c >> 3) & 0xfu, m = c & 7u;
  float v = (e == 0) ? (float)m * 0.0009765625f  // m * 2^-10
                     : dp_bits_f32(((e + 119u) << 23) | (m << 20));
  return s ? -v : v;
}

// ---- UE8M0 scales: 2^(c-127), 0xff NaN -----------------------------------
DP_DEVICE float dp_ue8m0_to_f32(u8 c) {
  if (c == 0xffu) return __int_as_float(0x7fc00000);
  if (c == 0) return 5.877471754111438e-39f;  // 2^-127 (subnormal)
  return dp_bits_f32(((u32)c) << 23);
}

// ---- dtype codes shared with the host (`src/launch.rs`) ------------------
// Kernels that accept several dtypes take a code and branch uniformly.
#define DP_F32 0
#define DP_BF16 1
#define DP_F16 2
#define DP_E4M3 3

DP_DEVICE float dp_load(const void* p, i64 i, int dtype) {
  switch (dtype) {
    case DP_BF16: return dp_bf16_to_f32(((const u16*)p)[i]);
    case DP_F16: return dp_f16_to_f32(((const u16*)p)[i]);
    case DP_E4M3: return dp_e4m3_to_f32(((const u8*)p)[i]);
    default: return ((const float*)p)[i];
  }
}
DP_DEVICE void dp_store(void* p, i64 i, int dtype, float v) {
  switch (dtype) {
    case DP_BF16: ((u16*)p)[i] = dp_f32_to_bf16(v); break;
    case DP_F16: ((u16*)p)[i] = dp_f32_to_f16(v); break;
    case DP_E4M3: ((u8*)p)[i] = dp_f32_to_e4m3(v); break;
    default: ((float*)p)[i] = v;
  }
}

// ---- deferred checks -------------------------------------------------------
// A status entry is one u64: (~index << 32) | value bits (low 32 bits of
// an integer value, or the f32 bits of a non-finite value). atomicMax
// keeps the smallest flagged index, whatever the order threads run in.
DP_DEVICE void dp_flag(u64* status, u32 index, u32 value_bits) {
  if (status) atomicMax(status, ((u64)(~index) << 32) | (u64)value_bits);
}
