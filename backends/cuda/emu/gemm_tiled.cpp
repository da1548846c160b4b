// gemm_tiled.cpp — runs kernels/gemm.cu (the portable tiled GEMMs:
// gemm_fp8_tiled, gemm_plain_tiled, gemm_check_index), included unchanged,
// on the CPU through emu.h against a double reference: FP8 (e4m3 and
// e4m3fnuz) with per-128-K promotion, K not a multiple of 128 or of the
// 32-wide K tile; the dense, contiguous (groups changing inside a tile, -1
// padding rows written 0, out-of-range indices skipped) and masked
// (masked_m = 0, partial, = m, and out of range: clamped) layouts; f32 and
// bf16 outputs; plain GEMMs in bf16/f16/f32 with k = 0; the index check's
// first-bad-position flag. Run by tests/emulate.rs; by hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/gemm_tiled.cpp -o /tmp/o && /tmp/o
// (add -DDP_HIP for 64-wide wavefronts). -DEMU_MUTATE=1 drops gemm.cu's
// __syncthreads (a race on the shared tiles), which must fail.
#include "emu.h"
#include "../kernels/port.cuh"
#if EMU_MUTATE == 1
#define __syncthreads() ((void)0)
#endif
#include "../kernels/gemm.cu"
#undef __syncthreads
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "fp8_gemm_check.h"

// The portable FP8 GEMM through fp8_gemm_check.h.
static void tiled(dim3 grid, Fp8GemmArgs x) {
  emu_launch(grid, dim3(256), 0, [&] {
    gemm_fp8_tiled(x.a, x.sa, x.b, x.sb, x.fnuz, x.d, x.d_dtype, x.idx, 1, x.mode, x.m, x.n, x.k, x.groups);
  });
}

// Plain GEMM: a bf16 or f16, b f32 or bf16, d f32 (k = 0: zeros).
static void plain_case(const char* name, int mode, long G, long m, long n, long k, std::vector<long long> idx,
                       int a_dt, int b_dt) {
  const int before = emu_fails;
  const long rows = mode == GEMM_MASKED ? G * m : m;
  const long bG = mode == GEMM_DENSE ? 1 : G;
  std::vector<uint16_t> a(rows * k + 1), bh(bG * n * k + 1);
  std::vector<float> bf(bG * n * k + 1), d(rows * n, -7.0f);
  for (auto& v : a) {
    const float x = (float)((int)(rng() % 200) - 100) / 37.0f;
    v = a_dt == DP_BF16 ? dp_f32_to_bf16(x) : dp_f32_to_f16(x);
  }
  for (size_t i = 0; i < bf.size(); ++i) {
    bf[i] = (float)((int)(rng() % 200) - 100) / 53.0f;
    bh[i] = dp_f32_to_bf16(bf[i]);
  }
  const void* bp = b_dt == DP_F32 ? (const void*)bf.data() : (const void*)bh.data();
  emu_launch(grid_of(mode, G, m, n), dim3(256), 0, [&] {
    gemm_plain_tiled(a.data(), a_dt, bp, b_dt, d.data(), DP_F32, idx.data(), 1, mode, m, n, k, G);
  });
  for (long r = 0; r < rows; ++r) {
    long g = 0, live = 1;
    if (mode == GEMM_CONTIGUOUS) g = idx[r];
    if (mode == GEMM_MASKED) { g = r / m; live = (r % m) < std::clamp<long long>(idx[g], 0, m); }
    for (long c = 0; c < n; ++c) {
      const double got = d[r * n + c];
      if (!live) { CHECK(got == -7.0, "%s: masked row %ld col %ld written", name, r, c); continue; }
      if (g == -1) { CHECK(got == 0.0, "%s: padding row %ld col %ld = %g", name, r, c, got); continue; }
      if (g < -1 || g >= G) { CHECK(got == -7.0, "%s: bad-index row %ld col %ld written", name, r, c); continue; }
      double want = 0, abs_sum = 0;
      for (long kk = 0; kk < k; ++kk) {
        const double x = a_dt == DP_BF16 ? dp_bf16_to_f32(a[r * k + kk]) : dp_f16_to_f32(a[r * k + kk]);
        const double y = b_dt == DP_F32 ? bf[(g * n + c) * k + kk] : dp_bf16_to_f32(bh[(g * n + c) * k + kk]);
        want += x * y; abs_sum += std::fabs(x * y);
      }
      CHECK(std::fabs(got - want) <= 1e-6 * (double)(k + 2) * abs_sum + 1e-30, "%s: row %ld col %ld: got %g want %g",
            name, r, c, got, want);
    }
  }
  printf("  %-52s %s\n", name, emu_fails == before ? "ok" : "FAILED");
}

int main() {
  printf("gemm_fp8_tiled:\n");
  fp8_standard_cases(tiled);
  printf("gemm_plain_tiled:\n");
  plain_case("dense bf16 x f32 m65 n33 k77", GEMM_DENSE, 1, 65, 33, 77, {0}, DP_BF16, DP_F32);
  plain_case("contiguous f16 x bf16 m90 n70 k40 (padding, bad)", GEMM_CONTIGUOUS, 3, 90, 70, 40,
             [] { std::vector<long long> v(90); for (int i = 0; i < 90; ++i) v[i] = i % 4 == 3 ? -1 : (i == 50 ? 7 : i % 3); return v; }(),
             DP_F16, DP_BF16);
  plain_case("masked (m, 1, 0) k5", GEMM_MASKED, 3, 66, 20, 5, {66, 1, 0}, DP_BF16, DP_F32);
  plain_case("dense k = 0", GEMM_DENSE, 1, 3, 5, 0, {0}, DP_BF16, DP_F32);
  printf("gemm_check_index:\n");
  {
    // i32 m_indices in [0, 4) or -1; first bad at position 3 (value 4).
    std::vector<int> ix = {0, 3, -1, 4, -2, 1, 9, 2, 0, 0, 0};
    unsigned long long st = 0;
    emu_launch(dim3(2), dim3(4), 0, [&] { gemm_check_index(ix.data(), 0, (i64)ix.size(), 0, 4, -1, 1, &st); });
    CHECK(st == ((((unsigned long long)(~3u)) << 32) | 4u), "check_index i32: status %llx", st);
    // i64 masked_m in [0, m] (no allowance): first bad at 1 (value -1).
    std::vector<long long> mm = {5, -1, 6, 7};
    st = 0;
    emu_launch(dim3(1), dim3(8), 0, [&] { gemm_check_index(mm.data(), 1, 4, 0, 7, 0, 0, &st); });
    CHECK(st == ((((unsigned long long)(~1u)) << 32) | 0xffffffffu), "check_index i64: status %llx", st);
    std::vector<long long> good = {0, 3, 2};
    st = 0;
    emu_launch(dim3(1), dim3(8), 0, [&] { gemm_check_index(good.data(), 1, 3, 0, 4, 0, 0, &st); });
    CHECK(st == 0, "check_index all good: status %llx", st);
  }
  return emu_summary("gemm_tiled");
}
