// Host emulation test (see run.sh): the portable FP8 and plain tiled GEMMs of
// ../gemm.cu in all three layouts, and gemm_check_index, against a double reference.
#include "emu.h"
#include <mutex>
#include <cstdio>
#include <random>
#include <cstdlib>
#include "../gemm.cu"

static std::mt19937 rng(7);
static float e4(uint8_t c) { return dp_e4m3_to_f32(c); }
static uint8_t rnd_fp8() { uint8_t c; do { c = rng() & 0xff; } while ((c & 0x7f) == 0x7f); return c; }
static int fails = 0;
static void expect(bool ok, const char* what, long i, double got, double want) {
  if (!ok && fails++ < 10) printf("FAIL %s at %ld: got %g want %g\n", what, i, got, want);
}

// FP8 GEMM in all three layouts vs a double reference.
static void fp8_case(int mode, long G, long m, long n, long k, std::vector<long long> idx, int out_dt) {
  long kb = (k + 127) / 128, nb = (n + 127) / 128;
  long rows = mode == GEMM_MASKED ? G * m : m;
  long bG = mode == GEMM_DENSE ? 1 : G;
  std::vector<uint8_t> a(rows * k), b(bG * n * k);
  std::vector<float> sa(rows * kb), sb(bG * nb * kb);
  for (auto& v : a) v = rnd_fp8();
  for (auto& v : b) v = rnd_fp8();
  for (auto& v : sa) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  for (auto& v : sb) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  const float SENT = 12345.0f;
  std::vector<float> d(rows * n, SENT);
  std::vector<uint16_t> dh(rows * n, 0x7fc1);
  void* dp = out_dt == DP_F32 ? (void*)d.data() : (void*)dh.data();
  dim3e grid{(unsigned)((m + 63) / 64), (unsigned)((n + 63) / 64), (unsigned)(mode == GEMM_MASKED ? G : 1)};
  launch(grid, {256, 1, 1}, [&] {
    gemm_fp8_tiled(a.data(), sa.data(), b.data(), sb.data(), 0, dp, out_dt, idx.data(), 1, mode, m, n, k, G);
  });
  for (long r = 0; r < rows; ++r) {
    long g = 0, ar = r, lim_ok = 1;
    if (mode == GEMM_CONTIGUOUS) { g = idx[r]; }
    if (mode == GEMM_MASKED) { g = r / m; long mm = idx[g]; mm = mm < 0 ? 0 : (mm > m ? m : mm); lim_ok = (r % m) < mm; }
    for (long c = 0; c < n; ++c) {
      double got = out_dt == DP_F32 ? d[r * n + c] : dp_bf16_to_f32(dh[r * n + c]);
      bool untouched = out_dt == DP_F32 ? d[r * n + c] == SENT : dh[r * n + c] == 0x7fc1;
      if (mode == GEMM_MASKED && !lim_ok) { expect(untouched, "masked row written", r, got, 0); continue; }
      if (mode == GEMM_CONTIGUOUS && g == -1) { expect(got == 0.0, "padding row", r, got, 0); continue; }
      if (mode == GEMM_CONTIGUOUS && (g < -1 || g >= G)) { expect(untouched, "bad-index row written", r, got, 0); continue; }
      double want = 0, abs_sum = 0;
      for (long q = 0; q < kb; ++q) {
        double inner = 0, inner_abs = 0;
        for (long kk = q * 128; kk < std::min(k, q * 128 + 128); ++kk) {
          double p = (double)e4(a[ar * k + kk]) * e4(b[(g * n + c) * k + kk]);
          inner += p; inner_abs += std::fabs(p);
        }
        want += inner * sa[ar * kb + q] * sb[(g * nb + c / 128) * kb + q];
        abs_sum += inner_abs * sa[ar * kb + q] * sb[(g * nb + c / 128) * kb + q];
      }
      // f32 summation bound (128 terms per block, then the promotions).
      double tol = 140 * 6e-8 * abs_sum + (out_dt == DP_F32 ? 0 : std::fabs(want) / 256) + 1e-30;
      expect(std::fabs(got - want) <= tol, "fp8 value", r * n + c, got, want);
    }
  }
}

static void plain_case(int mode, long G, long m, long n, long k, std::vector<long long> idx) {
  long rows = mode == GEMM_MASKED ? G * m : m;
  long bG = mode == GEMM_DENSE ? 1 : G;
  std::vector<uint16_t> a(rows * k);  // bf16
  std::vector<float> b(bG * n * k), d(rows * n, -7.0f);
  for (auto& v : a) v = dp_f32_to_bf16((float)((int)(rng() % 200) - 100) / 37.0f);
  for (auto& v : b) v = (float)((int)(rng() % 200) - 100) / 53.0f;
  dim3e grid{(unsigned)((m + 63) / 64), (unsigned)((n + 63) / 64), (unsigned)(mode == GEMM_MASKED ? G : 1)};
  launch(grid, {256, 1, 1}, [&] {
    gemm_plain_tiled(a.data(), DP_BF16, b.data(), DP_F32, d.data(), DP_F32, idx.data(), 1, mode, m, n, k, G);
  });
  for (long r = 0; r < rows; ++r) {
    long g = 0, ok = 1;
    if (mode == GEMM_CONTIGUOUS) g = idx[r];
    if (mode == GEMM_MASKED) { g = r / m; ok = (r % m) < idx[g]; }
    for (long c = 0; c < n; ++c) {
      double got = d[r * n + c];
      if (!ok) { expect(got == -7.0, "masked plain", r, got, -7); continue; }
      if (g == -1) { expect(got == 0.0, "padding plain", r, got, 0); continue; }
      double want = 0;
      for (long kk = 0; kk < k; ++kk) want += (double)dp_bf16_to_f32(a[r * k + kk]) * b[(g * n + c) * k + kk];
      expect(std::fabs(got - want) <= 1e-5 * std::fabs(want) + 1e-4, "plain value", r * n + c, got, want);
    }
  }
}

int main() {
  fp8_case(GEMM_DENSE, 1, 70, 130, 300, {0}, DP_F32);
  fp8_case(GEMM_DENSE, 1, 1, 64, 128, {0}, DP_BF16);
  // contiguous: mixed groups inside a tile, padding, an invalid index (5 >= G)
  {
    long m = 150; std::vector<long long> idx(m);
    for (long r = 0; r < m; ++r) idx[r] = (r < 10) ? 2 : (r < 20 ? -1 : (r < 40 ? 0 : (r == 77 ? 5 : (r < 130 ? 1 : 3))));
    fp8_case(GEMM_CONTIGUOUS, 4, m, 96, 256, idx, DP_F32);
  }
  fp8_case(GEMM_MASKED, 3, 70, 65, 200, {0, 70, 9}, DP_F32);
  fp8_case(GEMM_MASKED, 2, 20, 40, 130, {99, -3}, DP_BF16);  // out-of-range: clamped
  plain_case(GEMM_DENSE, 1, 65, 33, 77, {0});
  plain_case(GEMM_CONTIGUOUS, 3, 90, 70, 40, [] { std::vector<long long> v(90); for (int i = 0; i < 90; ++i) v[i] = i % 4 == 3 ? -1 : i % 3; return v; }());
  plain_case(GEMM_MASKED, 2, 66, 20, 5, {66, 1});
  plain_case(GEMM_DENSE, 1, 3, 5, 0, {0});
  // the index check
  std::vector<int> ix = {0, 3, -1, 4, -2, 1};
  unsigned long long st = 0;
  launch({1, 1, 1}, {8, 1, 1}, [&] { gemm_check_index(ix.data(), 0, 6, 0, 4, -1, 1, &st); });
  printf("status %llx (want first bad index 3: ~3 << 32 | 4)\n", st);
  if (st != ((((unsigned long long)(~3u)) << 32) | 4u)) fails++;
  printf("%s (%d failures)\n", fails ? "FAILED" : "all ok", fails);
  return fails != 0;
}
