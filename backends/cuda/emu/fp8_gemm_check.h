// fp8_gemm_check.h — the FP8 GEMM check shared by the emulation harnesses
// of every FP8 GEMM kernel with gemm.cu's argument order and layout codes
// (gemm_tiled.cpp: gemm_fp8_tiled; ../../rocm/emu/fp8_mfma.cpp: the MFMA
// kernel): random e4m3 / e4m3fnuz operands and power-of-two-ish scales,
// one launch through the harness's `launch`, and a double reference with
// DeepGEMM's per-128-K promotion (SPEC.md §3) for every row the layout
// computes; padding rows (-1) must be 0, rows past masked_m and rows of an
// out-of-range group must be untouched. Include after emu.h and gemm.cuh.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

static std::mt19937 rng(7);
static float fp8(uint8_t c, int fnuz) { return fnuz ? dp_e4m3fnuz_to_f32(c) : dp_e4m3_to_f32(c); }
static uint8_t rnd_fp8(int fnuz) {
  uint8_t c;
  do { c = rng() & 0xff; } while (fnuz ? c == 0x80 : (c & 0x7f) == 0x7f);  // no NaN codes
  return c;
}
static dim3 grid_of(int mode, long G, long m, long n) {
  return dim3((unsigned)((m + 63) / 64), (unsigned)((n + 63) / 64), (unsigned)(mode == GEMM_MASKED ? G : 1));
}

// The kernel arguments of one launch, in gemm.cu's order.
struct Fp8GemmArgs {
  const uint8_t* a;
  const float* sa;
  const uint8_t* b;
  const float* sb;
  int fnuz;
  void* d;
  int d_dtype;
  const long long* idx;  // i64 (idx64 = 1)
  int mode;
  long m, n, k, groups;
};

// FP8 GEMM: mode, G, m (per group if masked), n, k, idx (i64 m_indices or
// masked_m), output dtype, fnuz; `launch(grid, args)` runs the kernel.
template <class Launch>
static void fp8_case(const char* name, int mode, long G, long m, long n, long k, std::vector<long long> idx,
                     int out_dt, int fnuz, Launch launch) {
  const int before = emu_fails;
  const long kb = (k + 127) / 128, nb = (n + 127) / 128;
  const long rows = mode == GEMM_MASKED ? G * m : m;
  const long bG = mode == GEMM_DENSE ? 1 : G;
  std::vector<uint8_t> a(rows * k), b(bG * n * k);
  std::vector<float> sa(rows * kb), sb(bG * nb * kb);
  for (auto& v : a) v = rnd_fp8(fnuz);
  for (auto& v : b) v = rnd_fp8(fnuz);
  for (auto& v : sa) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  for (auto& v : sb) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  const float SENT = 12345.0f;
  std::vector<float> d(rows * n, SENT);
  std::vector<uint16_t> dh(rows * n, 0x7fc1);
  void* dp = out_dt == DP_F32 ? (void*)d.data() : (void*)dh.data();
  launch(grid_of(mode, G, m, n),
         Fp8GemmArgs{a.data(), sa.data(), b.data(), sb.data(), fnuz, dp, out_dt, idx.data(), mode, m, n, k, G});
  for (long r = 0; r < rows; ++r) {
    long g = 0, live = 1;
    if (mode == GEMM_CONTIGUOUS) g = idx[r];
    if (mode == GEMM_MASKED) { g = r / m; live = (r % m) < std::clamp<long long>(idx[g], 0, m); }
    for (long c = 0; c < n; ++c) {
      const double got = out_dt == DP_F32 ? d[r * n + c] : dp_bf16_to_f32(dh[r * n + c]);
      const bool untouched = out_dt == DP_F32 ? d[r * n + c] == SENT : dh[r * n + c] == 0x7fc1;
      if (!live) { CHECK(untouched, "%s: masked row %ld col %ld written", name, r, c); continue; }
      if (mode == GEMM_CONTIGUOUS && g == -1) { CHECK(got == 0.0, "%s: padding row %ld col %ld = %g", name, r, c, got); continue; }
      if (mode == GEMM_CONTIGUOUS && (g < -1 || g >= G)) { CHECK(untouched, "%s: bad-index row %ld col %ld written", name, r, c); continue; }
      double want = 0, abs_sum = 0;
      for (long q = 0; q < kb; ++q) {
        double inner = 0, inner_abs = 0;
        for (long kk = q * 128; kk < std::min(k, q * 128 + 128); ++kk) {
          const double p = (double)fp8(a[r * k + kk], fnuz) * fp8(b[(g * n + c) * k + kk], fnuz);
          inner += p; inner_abs += std::fabs(p);
        }
        const double sc = (double)sa[r * kb + q] * sb[(g * nb + c / 128) * kb + q];
        want += inner * sc; abs_sum += inner_abs * sc;
      }
      // f32 sums of at most 128 terms per block, then the promotions.
      const double tol = 140 * 6e-8 * abs_sum + (out_dt == DP_F32 ? 0 : std::fabs(want) / 256) + 1e-30;
      CHECK(std::fabs(got - want) <= tol, "%s: row %ld col %ld: got %g want %g", name, r, c, got, want);
    }
  }
  printf("  %-52s %s\n", name, emu_fails == before ? "ok" : "FAILED");
}


// The cases every FP8 GEMM harness runs through `launch`: dense (partial
// tiles, K not a multiple of 128, e4m3fnuz, bf16 and f32 out), contiguous
// with groups changing inside tiles, -1 padding and out-of-range indices,
// masked with masked_m = 0 / m / partial and out of range.
template <class Launch>
static void fp8_standard_cases(Launch launch) {
  fp8_case("dense m70 n130 k300 f32", GEMM_DENSE, 1, 70, 130, 300, {0}, DP_F32, 0, launch);
  fp8_case("dense m1 n64 k128 bf16", GEMM_DENSE, 1, 1, 64, 128, {0}, DP_BF16, 0, launch);
  fp8_case("dense fnuz m9 n40 k200 f32", GEMM_DENSE, 1, 9, 40, 200, {0}, DP_F32, 1, launch);
  {
    // Mixed groups inside tiles, -1 padding, out-of-range (5 >= G, -4).
    const long m = 100;
    std::vector<long long> idx(m);
    for (long r = 0; r < m; ++r) idx[r] = r < 10 ? 2 : (r < 20 ? -1 : (r < 40 ? 0 : (r < 80 ? 1 : 3)));
    idx[77] = 5;
    idx[33] = -4;
    idx[70] = 3;
    fp8_case("contiguous mixed tiles, padding, bad indices k160", GEMM_CONTIGUOUS, 4, m, 96, 160, idx, DP_F32, 0,
             launch);
  }
  fp8_case("masked (0, m, 9) k200", GEMM_MASKED, 3, 70, 65, 200, {0, 70, 9}, DP_F32, 0, launch);
  fp8_case("masked out of range (99, -3) k130 bf16", GEMM_MASKED, 2, 20, 40, 130, {99, -3}, DP_BF16, 0, launch);
}
