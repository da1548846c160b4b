// Host emulation test (see run.sh) of ../fp8_gemm_sm90.cu: the kernel's own
// code (persistent tile walk, contiguous passes, masked skips, mbarrier
// pipeline bookkeeping, promotion, fragment -> output indexing) runs with
// the PTX helpers replaced by models: TMA = a synchronous box copy into the
// 128-byte swizzle pattern (16-byte chunk index XOR row % 8 within each
// 1024-byte atom) completing the barrier's transaction count; mbarrier =
// phase counter with parity waits; wgmma = each thread computes its D
// fragment (row = 16 warp + lane/4 + 8 ((i>>1)&1), col = 8 (i>>2) +
// 2 (lane%4) + (i&1)) from shared memory through the descriptor (start,
// SBO, 128B swizzle). It checks the kernel against these models of the
// hardware, not the hardware itself.
#include "emu.h"
#include <atomic>
#include <cstdio>
#include <random>
#define GEMM_SM90_HOST_EMU 1
#define __align__(x) alignas(x)
#define __grid_constant__
typedef unsigned char u8e;
alignas(1024) static u8e g_smem[256 * 1024];
static u8e* h_smem = g_smem;

#include "../port.cuh"

struct TmaModel {  // what v[0] of an emulated descriptor points to
  const u8e* base;
  long rows, cols, stride;  // dims (cols = inner), row stride in bytes
  int box_cols, box_rows;
};

static std::atomic<int> g_err{0};
struct Bar { std::atomic<long> phase{0}; std::atomic<long> pending{0}; std::atomic<long> tx{0}; long count = 1; };
static void bar_try_complete(Bar* b) {
  if (b->pending == 0 && b->tx == 0) { b->pending = b->count; b->phase++; }
}
static u32 h_smem_addr(const void* p) { return (u32)((const u8e*)p - g_smem); }
// The kernel gives each barrier 8 bytes of shared memory; the model keeps
// its state in a side table keyed by that address.
static std::mutex g_bars_mu;
static Bar g_bars[64];
static Bar* model_bar(u32 bar) { return &g_bars[(bar / 8) % 64]; }
static void h_mbar_init(u32 bar, u32 count) {
  std::lock_guard<std::mutex> l(g_bars_mu);
  Bar* b = model_bar(bar);
  b->phase = 0; b->pending = count; b->count = count; b->tx = 0;
}
static void h_mbar_init_fence() {}
static void h_mbar_expect_tx(u32 bar, u32 bytes) {
  std::lock_guard<std::mutex> l(g_bars_mu);
  Bar* b = model_bar(bar);
  b->pending--; b->tx += bytes;
  bar_try_complete(b);
}
static void h_mbar_wait(u32 bar, u32 parity) {
  // try_wait.parity(P) succeeds once the phase with parity P has completed:
  // the current (incomplete) phase number's parity differs from P.
  for (;;) {
    { std::lock_guard<std::mutex> l(g_bars_mu); if (((u32)model_bar(bar)->phase & 1u) != parity) return; }
    std::this_thread::yield();
  }
}
static u32 swz(u32 L) { return L ^ (((L >> 7) & 7u) << 4); }
struct GemmTmaDesc;
static void h_tma_load_impl(u32 dst, const TmaModel* t, u32 bar, int c0, int c1) {
  if (dst % 1024) g_err++;
  for (int r = 0; r < t->box_rows; ++r)
    for (int c = 0; c < t->box_cols; ++c) {
      long gr = (long)c1 + r, gc = (long)c0 + c;
      u8e v = (gr < t->rows && gc < t->cols) ? t->base[gr * t->stride + gc] : 0;
      g_smem[swz(dst + r * 128 + c)] = v;
    }
  std::lock_guard<std::mutex> l(g_bars_mu);
  Bar* b = model_bar(bar);
  b->tx -= (long)t->box_rows * t->box_cols;
  bar_try_complete(b);
}
#define h_tma_load(dst, desc, bar, c0, c1) h_tma_load_impl((dst), (const TmaModel*)(desc)->v[0], (bar), (c0), (c1))
static void h_wg_fence() {}
static void h_wg_commit() {}
static void h_wg_wait0() {}
static void h_reg_fence(float&) {}
// One byte of a K-major SW128 tile through its descriptor.
static u8e desc_byte(u64 d, int row, int kb) {
  u32 start = (u32)(d & 0x3fff) << 4, sbo = (u32)((d >> 32) & 0x3fff) << 4;
  if ((d >> 62) != 1) g_err++;
  u32 L = start + (row / 8) * sbo + (row % 8) * 128 + kb;
  return g_smem[swz(L)];
}
template <int N>
static void wgmma_model(float* d, u64 da, u64 db, int scale_d) {
  int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int i = 0; i < N / 2; ++i) {
    int row = warp * 16 + lane / 4 + 8 * ((i >> 1) & 1);
    int col = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
    float s = 0;
    for (int kk = 0; kk < 32; ++kk)
      s += dp_e4m3_to_f32(desc_byte(da, row, kk)) * dp_e4m3_to_f32(desc_byte(db, col, kk));
    d[i] = scale_d ? d[i] + s : s;
  }
}
static void h_wgmma_n128(float* d, u64 da, u64 db, int s) { wgmma_model<128>(d, da, db, s); }
static void h_wgmma_n64(float* d, u64 da, u64 db, int s) { wgmma_model<64>(d, da, db, s); }

#include "../fp8_gemm_sm90.cu"

static std::mt19937 rng(11);
static int fails = 0;
static uint8_t rnd_fp8() { uint8_t c; do { c = rng() & 0xff; } while ((c & 0x7f) == 0x7f); return c; }

// mode, G, m (per group if masked), n, k, idx (m_indices or masked_m), ctas
static void run_case(const char* name, int mode, long G, long m, long n, long k,
                     std::vector<long long> idx, int ctas, int out_dt) {
  long kb = k / 128, nb = (n + 127) / 128;
  long rows = mode == GEMM_MASKED ? G * m : m;
  long bG = mode == GEMM_DENSE ? 1 : G;
  std::vector<uint8_t> a(rows * k), b(bG * n * k);
  std::vector<float> sa(rows * kb), sb(bG * nb * kb);
  for (auto& v : a) v = rnd_fp8();
  for (auto& v : b) v = rnd_fp8();
  for (auto& v : sa) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  for (auto& v : sb) v = std::ldexp(1.0f + (rng() % 100) / 100.0f, -(int)(rng() % 6));
  const int BN = n % 128 == 0 ? 128 : 64;  // schedule::gemm::choose_fp8_path
  int tiles_m = (int)((m + 63) / 64), tiles_n = (int)(n / BN);
  int tiles = tiles_m * tiles_n * (mode == GEMM_MASKED ? (int)G : 1);
  TmaModel ma{a.data(), rows, k, k, 128, 64}, mb{b.data(), bG * n, k, k, 128, BN};
  GemmTmaDesc ta{}, tb{};
  ta.v[0] = (u64)&ma; tb.v[0] = (u64)&mb;
  std::vector<float> d(rows * n, 12345.0f);
  std::vector<uint16_t> dh(rows * n, 0x7fc1);
  void* dp = out_dt == DP_F32 ? (void*)d.data() : (void*)dh.data();
  launch({(unsigned)std::min(ctas, tiles), 1, 1}, {128, 1, 1}, [&] {
    if (BN == 128)
      fp8_gemm_sm90_n128(ta, tb, sa.data(), sb.data(), dp, out_dt, idx.data(), 1, mode, (int)m, (int)n, (int)k, (int)G, tiles_m, tiles_n, tiles);
    else
      fp8_gemm_sm90_n64(ta, tb, sa.data(), sb.data(), dp, out_dt, idx.data(), 1, mode, (int)m, (int)n, (int)k, (int)G, tiles_m, tiles_n, tiles);
  });
  int before = fails;
  for (long r = 0; r < rows; ++r) {
    long g = 0, live = 1;
    if (mode == GEMM_CONTIGUOUS) g = idx[r];
    if (mode == GEMM_MASKED) { g = r / m; long mm = std::clamp<long long>(idx[g], 0, m); live = (r % m) < mm; }
    for (long c = 0; c < n; ++c) {
      bool untouched = out_dt == DP_F32 ? d[r * n + c] == 12345.0f : dh[r * n + c] == 0x7fc1;
      double got = out_dt == DP_F32 ? d[r * n + c] : dp_bf16_to_f32(dh[r * n + c]);
      auto bad = [&](const char* what, double want) { if (fails++ - before < 5) printf("  %s: %s at row %ld col %ld: got %g want %g\n", name, what, r, c, got, want); };
      if (!live) { if (!untouched) bad("masked row written", 0); continue; }
      if (mode == GEMM_CONTIGUOUS && g == -1) { if (got != 0.0) bad("padding row", 0); continue; }
      if (mode == GEMM_CONTIGUOUS && (g < -1 || g >= G)) { if (!untouched) bad("bad-index row written", 0); continue; }
      double want = 0, abs_sum = 0;
      for (long q = 0; q < kb; ++q) {
        double inner = 0, ia = 0;
        for (long kk = q * 128; kk < q * 128 + 128; ++kk) {
          double p = (double)dp_e4m3_to_f32(a[r * k + kk]) * dp_e4m3_to_f32(b[(g * n + c) * k + kk]);
          inner += p; ia += std::fabs(p);
        }
        double sc = (double)sa[r * kb + q] * sb[(g * nb + c / 128) * kb + q];
        want += inner * sc; abs_sum += ia * sc;
      }
      double tol = 140 * 6e-8 * abs_sum + (out_dt == DP_F32 ? 0 : std::fabs(want) / 256) + 1e-30;
      if (!(std::fabs(got - want) <= tol)) bad("value", want);
    }
  }
  printf("%-40s %s\n", name, fails == before ? "ok" : "FAILED");
  fflush(stdout);
}

int main() {
  run_case("dense n128 m70 k384 (2 CTAs)", GEMM_DENSE, 1, 70, 256, 384, {0}, 2, DP_F32);
  run_case("dense n64 m5 k640 (k blocks > stages)", GEMM_DENSE, 1, 5, 192, 640, {0}, 3, DP_BF16);
  {
    std::vector<long long> idx;  // DeepGEMM layout: groups padded to 128 rows
    for (int g : {1, 0, 2}) { int s = g == 1 ? 100 : (g == 0 ? 128 : 60); for (int i = 0; i < 128; ++i) idx.push_back(i < s ? g : -1); }
    run_case("contiguous aligned", GEMM_CONTIGUOUS, 3, (long)idx.size(), 128, 256, idx, 4, DP_BF16);
    std::vector<long long> mixed(150);
    for (int r = 0; r < 150; ++r) mixed[r] = std::vector<int>{0, 2, -1, 2, 0, 0}[r % 6];
    mixed[77] = 9;
    run_case("contiguous groups changing inside tiles", GEMM_CONTIGUOUS, 4, 150, 64, 256, mixed, 2, DP_F32);
  }
  run_case("masked (0, partial, full, bad)", GEMM_MASKED, 4, 100, 128, 256, {0, 70, 100, 999}, 3, DP_F32);
  printf("model errors %d\n", g_err.load());
  if (g_err) fails++;
  printf("%s (%d failures)\n", fails ? "FAILED" : "all ok", fails);
  return fails != 0;
}
