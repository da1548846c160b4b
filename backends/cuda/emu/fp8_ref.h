// fp8_ref.h — an independent f32 -> FP8 (e4m3 / e4m3fnuz) encoder for the
// harnesses' references, written from deepport-core's formats.rs rule in f64
// (no bit tricks shared with port.cuh / gemm.cuh).
#pragma once
#include <math.h>
#include <stdint.h>
#include <algorithm>
#include <cmath>
// f32 -> FP8 by formats.rs's rule in f64: nearest even on the format's grid,
// saturating at the max, NaN to the NaN code (e4m3: 0x7f with the sign,
// fnuz: 0x80), fnuz has no negative zero.
static uint8_t ref_fp8(float x, int fnuz) {
  const double maxv = fnuz ? 240.0 : 448.0;
  const int emin = fnuz ? -7 : -6, bias = fnuz ? 8 : 7;
  const uint8_t sb = std::signbit(x) ? 0x80 : 0;
  if (std::isnan(x)) return fnuz ? 0x80 : (uint8_t)(sb | 0x7f);
  double a = std::fabs((double)x);
  double q;
  if (std::isinf(a)) {
    q = maxv;
  } else {
    int e;
    std::frexp(a, &e);
    e = std::max(e - 1, emin);
    const double quantum = std::ldexp(1.0, e - 3);
    q = std::nearbyint(a / quantum) * quantum;
    q = std::min(q, maxv);
  }
  if (q == 0) return fnuz ? 0 : sb;
  int e;
  std::frexp(q, &e);
  e -= 1;
  uint8_t mag;
  if (e < emin) mag = (uint8_t)(q / std::ldexp(1.0, emin - 3));
  else mag = (uint8_t)(((e + bias) << 3) | (int)(q / std::ldexp(1.0, e - 3) - 8));
  return (uint8_t)(sb | mag);
}
