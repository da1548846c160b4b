// rope.cu — rotary embedding on interleaved pairs, optional YaRN (SPEC §8),
// portable (sm_80+, HIP through port.cuh).
//
// The frequency table is RopeConfig::inv_freq, computed per pair in f64
// and rounded once to f32: theta^(-2i/d), blended by the YaRN ramp with
// (low, span, factor) computed on the host in f64 and passed as f64 bits.
// The angle is f32(pos) · freq in f32; cos/sin in f64, times cs_scale,
// products and sums in f64, one rounding to y's dtype: to f32 directly, or
// for bf16/f16 through an f32 rounded to odd (as cpu-ref's put_f64), which
// makes the second rounding equal to a single correct one.
#include "port.cuh"

DP_DEVICE double rope_bits_f64(u64 b) { return __longlong_as_double((long long)b); }

// f64 → f32 rounded to odd (the result's last bit set when inexact).
DP_DEVICE float rope_f32_odd(double x) {
  float f = (float)x;
  u64 xb = (u64)__double_as_longlong(x);
  bool x_finite = (xb & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
  bool f_inf = (dp_f32_bits(f) & 0x7fffffffu) == 0x7f800000u;
  if (!x_finite || (double)f == x || f_inf) return f;
  float tz = fabs((double)f) > fabs(x) ? dp_bits_f32(dp_f32_bits(f) - 1u) : f;
  return dp_bits_f32(dp_f32_bits(tz) | 1u);
}

DP_DEVICE void rope_store(void* y, i64 i, int dtype, double v) {
  dp_store(y, i, dtype, dtype == DP_F32 ? (float)v : rope_f32_odd(v));
}

// grid ceil(T·(d/2) / 256), block 256: one thread per (token, pair), looping
// over the rotated vectors (heads) of the token.
// pos_dt: 0 = i32, 1 = i64. yarn: 0 = plain, 1 = the ramp applies.
extern "C" DP_GLOBAL void rope_kernel(const void* __restrict__ x, const void* __restrict__ pos,
                                      void* __restrict__ y, int dtype, int pos_dt, int tokens,
                                      int heads, int d, u64 theta_bits, int yarn, u64 low_bits,
                                      u64 span_bits, u64 factor_bits, float cs_scale,
                                      u64* st_positions) {
  const int half = d / 2;
  const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= (i64)tokens * half) return;
  const int tok = (int)(e / half), i = (int)(e % half);
  i64 p = pos_dt == 1 ? ((const i64*)pos)[tok] : (i64)((const i32*)pos)[tok];
  if (p < 0) {
    if (i == 0) dp_flag(st_positions, (u32)tok, (u32)p);
    p = 0;
  }
  const double theta = rope_bits_f64(theta_bits);
  double f = pow(theta, -2.0 * (double)i / (double)d);
  if (yarn) {
    const double low = rope_bits_f64(low_bits), span = rope_bits_f64(span_bits);
    const double factor = rope_bits_f64(factor_bits);
    double ramp = ((double)i - low) / span;
    ramp = ramp < 0.0 ? 0.0 : (ramp > 1.0 ? 1.0 : ramp);
    f = f * (1.0 - ramp) + f / factor * ramp;
  }
  const float freq = (float)f;
  const float angle = (float)p * freq;  // in f32, as SPEC §8 fixes
  const double c = cos((double)angle) * (double)cs_scale;
  const double s = sin((double)angle) * (double)cs_scale;
  for (int h = 0; h < heads; ++h) {
    const i64 base = ((i64)tok * heads + h) * d + 2 * i;
    const double x0 = dp_load(x, base, dtype), x1 = dp_load(x, base + 1, dtype);
    rope_store(y, base, dtype, x0 * c - x1 * s);
    rope_store(y, base + 1, dtype, x0 * s + x1 * c);
  }
}
