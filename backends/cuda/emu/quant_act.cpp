// quant_act.cpp — runs kernels/quant.cu (quant_act: act_quant, SPEC.md §2;
// quant_weight_dequant), included unchanged, on the CPU through emu.h:
// bf16/f32/f16 input, e4m3 and e4m3fnuz, f32 and UE8M0 (power-of-two) scales,
// the 1e-4 amax clamp (tiny and all-zero groups), a grid-stride over more
// groups than CTAs, NaN and inf inputs flagged at the first bad flat
// position; weight_dequant in f32/bf16 with partial 128-blocks. Bit-exact
// against an independent reference (formats.rs rounding re-implemented in
// f64, not the kernel's encoders). Run by tests/emulate.rs; by hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/quant_act.cpp -o /tmp/o && /tmp/o
// (add -DDP_HIP for 64-wide wavefronts: the warp reduction and the
// per-warp partials change shape).
#include "emu.h"
#include "../kernels/port.cuh"
using std::isfinite;
#include "../kernels/quant.cu"
#include "fp8_ref.h"
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

static void act_case(int x_dt, int fnuz, int ue8m0, long rows, long k, unsigned ctas, long bad_at, float bad) {
  std::mt19937 rng(3 + fnuz * 2 + ue8m0 + x_dt * 4);
  const int before = emu_fails;
  const long G = rows * k / 128;
  std::vector<float> xf(rows * k);
  for (long i = 0; i < rows * k; ++i) {
    float v = std::ldexp((float)((int)(rng() % 2000) - 1000), (int)(rng() % 20) - 15);
    if (i / 128 == 3) v = 1e-7f * (float)(i % 3);  // a group below the 1e-4 clamp
    if (i / 128 == 4) v = 0.0f;                     // an all-zero group
    if (i / 128 == 5 && i % 128 == 9) v = 448.0f * 8;  // a large value
    xf[i] = v;
  }
  if (bad_at >= 0) xf[bad_at] = bad;
  std::vector<uint16_t> xh(rows * k);
  for (long i = 0; i < rows * k; ++i) {
    if (x_dt == DP_BF16) { xh[i] = dp_f32_to_bf16(xf[i]); xf[i] = dp_bf16_to_f32(xh[i]); }
    if (x_dt == DP_F16) { xh[i] = dp_f32_to_f16(xf[i]); xf[i] = dp_f16_to_f32(xh[i]); }
  }
  const void* xp = x_dt == DP_F32 ? (const void*)xf.data() : (const void*)xh.data();
  std::vector<uint8_t> q(rows * k, 0x55);
  std::vector<float> s(G, -1.0f);
  unsigned long long st = 0;
  const float fmax = fnuz ? 240.0f : 448.0f;
  emu_launch(dim3(ctas), dim3(128), 0, [&] { quant_act(xp, x_dt, q.data(), fnuz, s.data(), fmax, ue8m0, G, &st); });
  for (long g = 0; g < G; ++g) {
    if (bad_at >= 0 && g == bad_at / 128) continue;  // undefined values (flagged)
    float amax = 0;
    for (int j = 0; j < 128; ++j) amax = std::max(amax, std::fabs(xf[g * 128 + j]));
    amax = std::max(amax, 1e-4f);
    float sc = amax / fmax;
    if (ue8m0) {
      int e;
      const double fr = std::frexp((double)sc, &e);
      if (fr != 0.5) sc = (float)std::ldexp(1.0, e);  // round up to a power of two
    }
    CHECK(s[g] == sc, "act_quant dt%d fnuz%d ue%d: scale %ld: %g vs %g", x_dt, fnuz, ue8m0, g, s[g], sc);
    for (int j = 0; j < 128; ++j) {
      const uint8_t want = ref_fp8(xf[g * 128 + j] / sc, fnuz);
      CHECK(q[g * 128 + j] == want, "act_quant dt%d fnuz%d ue%d: q[%ld] = %02x want %02x", x_dt, fnuz, ue8m0,
            g * 128 + j, q[g * 128 + j], want);
    }
  }
  unsigned long long want_st = 0;
  if (bad_at >= 0) {
    uint32_t bits;
    memcpy(&bits, &xf[bad_at], 4);
    want_st = ((unsigned long long)(~(uint32_t)bad_at) << 32) | bits;
  }
  CHECK(st == want_st, "act_quant dt%d fnuz%d ue%d: status %llx want %llx", x_dt, fnuz, ue8m0, st, want_st);
  printf("  act_quant dtype %d fnuz %d ue8m0 %d: %s\n", x_dt, fnuz, ue8m0, emu_fails == before ? "ok" : "FAILED");
}

static void dequant_case(int fnuz, int out_dt, long n, long k) {
  std::mt19937 rng(5 + fnuz);
  const int before = emu_fails;
  const long kb = (k + 127) / 128, nbk = (n + 127) / 128;
  std::vector<uint8_t> w(n * k);
  for (auto& v : w) do { v = rng() & 0xff; } while (fnuz ? v == 0x80 : (v & 0x7f) == 0x7f);
  std::vector<float> s(nbk * kb);
  for (auto& v : s) v = std::ldexp(1.0f + (rng() % 64) / 64.0f, (int)(rng() % 8) - 4);
  std::vector<float> of(n * k, -9.0f);
  std::vector<uint16_t> oh(n * k, 0x7fc1);
  void* op = out_dt == DP_F32 ? (void*)of.data() : (void*)oh.data();
  emu_launch(dim3(3), dim3(128), 0, [&] { quant_weight_dequant(w.data(), fnuz, s.data(), op, out_dt, n, k); });
  for (long r = 0; r < n; ++r)
    for (long c = 0; c < k; ++c) {
      const float v = (fnuz ? dp_e4m3fnuz_to_f32(w[r * k + c]) : dp_e4m3_to_f32(w[r * k + c])) * s[(r / 128) * kb + c / 128];
      if (out_dt == DP_F32) CHECK(of[r * k + c] == v, "dequant [%ld,%ld]: %g want %g", r, c, of[r * k + c], v);
      else CHECK(oh[r * k + c] == dp_f32_to_bf16(v), "dequant bf16 [%ld,%ld]", r, c);
    }
  printf("  weight_dequant fnuz %d out %d n%ld k%ld: %s\n", fnuz, out_dt, n, k, emu_fails == before ? "ok" : "FAILED");
}

int main() {
  const float nan = __int_as_float(0x7fc00000), inf = __int_as_float(0x7f800000);
  for (int fnuz = 0; fnuz < 2; ++fnuz)
    for (int ue = 0; ue < 2; ++ue) act_case(DP_BF16, fnuz, ue, 5, 384, 4, 700, nan);  // 15 groups, 4 CTAs
  act_case(DP_F32, 0, 0, 3, 256, 2, 257, -inf);
  act_case(DP_F16, 1, 1, 2, 128, 1, -1, 0.0f);
  dequant_case(0, DP_F32, 130, 200);
  dequant_case(1, DP_BF16, 70, 256);
  return emu_summary("quant_act");
}
