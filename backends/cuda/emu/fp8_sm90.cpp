// fp8_sm90.cpp — runs kernels/fp8_gemm_sm90.cu (the Hopper FP8 GEMM),
// included unchanged, on the CPU with its PTX helpers (TMA, mbarrier,
// wgmma) replaced by the models of tma_sm90.h: the kernel's own persistent
// tile walk, contiguous passes (one per group present in a tile), masked
// skips, mbarrier pipeline bookkeeping (4 stages, phase parities across
// tiles and passes), per-128-K promotion, and fragment -> output indexing,
// against a double reference. sm_90a only: 32-wide warps. Run by
// tests/emulate.rs. Every case runs with the TMA loads landing at issue and
// deferred to the barrier wait (tma_sm90.h). -DEMU_MUTATE=1 makes the
// kernel skip its mbarrier waits, which must fail. By hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/fp8_sm90.cpp -o /tmp/o && /tmp/o
#include "tma_sm90.h"
#if EMU_MUTATE == 1
#define h_mbar_wait(bar, parity) ((void)0)  // the kernel never waits for its loads
#endif
#include "../kernels/fp8_gemm_sm90.cu"
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

static std::mt19937 rng(11);
static uint8_t rnd_fp8() { uint8_t c; do { c = rng() & 0xff; } while ((c & 0x7f) == 0x7f); return c; }

// As schedule::gemm (Sm90Plan::smem_bytes).
static size_t smem_bytes(int bn) { return 4 * (size_t)(64 * 128 + bn * 128) + 4 * 8 + 1024; }

// mode, G, m (per group if masked), n, k, idx (m_indices or masked_m), CTAs.
static void run_case(const char* name, int mode, long G, long m, long n, long k,
                     std::vector<long long> idx, int ctas, int out_dt) {
  const int before = emu_fails;
  const long kb = k / 128, nb = (n + 127) / 128;
  const long rows = mode == GEMM_MASKED ? G * m : m;
  const long bG = mode == GEMM_DENSE ? 1 : G;
  std::vector<uint8_t> a(rows * k), b(bG * n * k);
  std::vector<float> sa(rows * kb), sb(bG * nb * kb);
  for (auto& v : a) v = rnd_fp8();
  for (auto& v : b) v = rnd_fp8();
  for (auto& v : sa) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  for (auto& v : sb) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  const int BN = n % 128 == 0 ? 128 : 64;  // schedule::gemm::choose_fp8_path
  const int tiles_m = (int)((m + 63) / 64), tiles_n = (int)(n / BN);
  const int tiles = tiles_m * tiles_n * (mode == GEMM_MASKED ? (int)G : 1);
  Tma90Map ma{a.data(), rows, k, k, 128, 64}, mb{b.data(), bG * n, k, k, 128, BN};
  GemmTmaDesc ta{}, tb{};
  ta.v[0] = (u64)&ma; tb.v[0] = (u64)&mb;
  ta.v[1] = tb.v[1] = TMA90_MAGIC;
  std::vector<float> d(rows * n, 12345.0f);
  std::vector<uint16_t> dh(rows * n, 0x7fc1);
  void* dp = out_dt == DP_F32 ? (void*)d.data() : (void*)dh.data();
  tma90_dropped = 0;
  emu_launch(dim3((unsigned)std::min(ctas, tiles)), dim3(128), smem_bytes(BN), [&] {
    if (BN == 128)
      fp8_gemm_sm90_n128(ta, tb, sa.data(), sb.data(), dp, out_dt, idx.data(), 1, mode, (int)m, (int)n,
                         (int)k, (int)G, tiles_m, tiles_n, tiles);
    else
      fp8_gemm_sm90_n64(ta, tb, sa.data(), sb.data(), dp, out_dt, idx.data(), 1, mode, (int)m, (int)n,
                        (int)k, (int)G, tiles_m, tiles_n, tiles);
  });
  tma90_flush_unwaited();
  CHECK(tma90_dropped == 0, "%s: %d TMA loads never waited for", name, tma90_dropped);
  for (long r = 0; r < rows; ++r) {
    long g = 0, live = 1;
    if (mode == GEMM_CONTIGUOUS) g = idx[r];
    if (mode == GEMM_MASKED) { g = r / m; long mm = std::clamp<long long>(idx[g], 0, m); live = (r % m) < mm; }
    for (long c = 0; c < n; ++c) {
      const bool untouched = out_dt == DP_F32 ? d[r * n + c] == 12345.0f : dh[r * n + c] == 0x7fc1;
      const double got = out_dt == DP_F32 ? d[r * n + c] : dp_bf16_to_f32(dh[r * n + c]);
      if (!live) { CHECK(untouched, "%s: masked row %ld col %ld written", name, r, c); continue; }
      if (mode == GEMM_CONTIGUOUS && g == -1) { CHECK(got == 0.0, "%s: padding row %ld col %ld = %g", name, r, c, got); continue; }
      if (mode == GEMM_CONTIGUOUS && (g < -1 || g >= G)) { CHECK(untouched, "%s: bad-index row %ld col %ld written", name, r, c); continue; }
      double want = 0, abs_sum = 0;
      for (long q = 0; q < kb; ++q) {
        double inner = 0, ia = 0;
        for (long kk = q * 128; kk < q * 128 + 128; ++kk) {
          const double p = (double)dp_e4m3_to_f32(a[r * k + kk]) * dp_e4m3_to_f32(b[(g * n + c) * k + kk]);
          inner += p; ia += std::fabs(p);
        }
        const double sc = (double)sa[r * kb + q] * sb[(g * nb + c / 128) * kb + q];
        want += inner * sc; abs_sum += ia * sc;
      }
      // f32 sums of 128 terms per block, then the promotions (+ bf16 rounding).
      const double tol = 140 * 6e-8 * abs_sum + (out_dt == DP_F32 ? 0 : std::fabs(want) / 256) + 1e-30;
      CHECK(std::fabs(got - want) <= tol, "%s: row %ld col %ld: got %g want %g", name, r, c, got, want);
    }
  }
  printf("  %-48s %s\n", name, emu_fails == before ? "ok" : "FAILED");
}

static void all_cases() {
  // Dense: two CTAs walking tiles persistently; k blocks more than the stages
  // (the pipeline's refills and parities wrap), n % 128 != 0 (the n64 kernel).
  run_case("dense n128 m70 k384, 2 CTAs", GEMM_DENSE, 1, 70, 256, 384, {0}, 2, DP_F32);
  run_case("dense n64 m5 k640 (kb > stages), 3 CTAs", GEMM_DENSE, 1, 5, 192, 640, {0}, 3, DP_BF16);
  {
    // DeepGEMM's layout: groups padded to 128 rows with -1 rows (a whole
    // padding tile among them).
    std::vector<long long> idx;
    for (int g : {1, 0, 2}) {
      const int s = g == 1 ? 100 : (g == 0 ? 128 : 60);
      for (int i = 0; i < 128; ++i) idx.push_back(i < s ? g : -1);
    }
    run_case("contiguous aligned (-1 padding rows)", GEMM_CONTIGUOUS, 3, (long)idx.size(), 128, 256, idx, 2, DP_BF16);
    // Groups changing inside tiles (several passes per tile), padding, an
    // out-of-range index (row 77: 9 >= G, skipped), a partial last tile,
    // one CTA so passes and tiles follow each other on the same barriers.
    std::vector<long long> mixed(100);
    for (int r = 0; r < 100; ++r) mixed[r] = std::vector<int>{0, 2, -1, 2, 0, 0}[r % 6];
    mixed[77] = 9;
    mixed[5] = -5;
    run_case("contiguous mixed-group tiles, bad indices", GEMM_CONTIGUOUS, 4, 100, 64, 640, mixed, 1, DP_F32);
  }
  // masked_m = 0, partial, = m, out of range (clamped to m); 3 CTAs walk
  // the groups' tiles, skipping the empty ones.
  run_case("masked (0, partial, m, 999)", GEMM_MASKED, 4, 100, 128, 256, {0, 70, 100, 999}, 3, DP_F32);
}

int main() {
  printf("TMA loads land at issue:\n");
  all_cases();
  printf("TMA loads land at the barrier wait:\n");
  tma90_deferred = true;
  rng.seed(12);
  all_cases();
  return emu_summary("fp8_sm90");
}
