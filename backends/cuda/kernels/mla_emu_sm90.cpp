// mla_emu_sm90.cpp — runs mla_decode_sm90 (mla_sm90.cu with MLA_EMU: the
// wgmma/fence PTX helpers replaced by host models written from the PTX ISA's
// descriptions: no-swizzle canonical layouts, K-major element (r, k) at
// start + (r/8)·SBO + (r%8)·16 + (k/8)·LBO + (k%8)·2, MN-major element (k, n)
// at start + (n/8)·SBO + (n%8)·2 + (k/8)·LBO + (k%8)·16; accumulator and A
// register fragments as in the m64nNk16 figures) with mla_metadata and
// mla_combine, against a double-precision reference. It checks the kernel's
// logic (tiling, masking, softmax in the fragment layout, P fragments,
// partial writes), not the hardware's reading of the descriptors.
//   g++ -std=c++20 -O1 -pthread -I backends/cuda/kernels \
//       backends/cuda/kernels/mla_emu_sm90.cpp -o /tmp/s && /tmp/s
#define MLA_EMU 1
#include "mla_emu.h"
#include <cstdio>
#include <random>
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
#define __launch_bounds__(a, b)
#define __align__(x)
alignas(128) unsigned char mla90_smem[1 << 18];
inline unsigned long long __cvta_generic_to_shared(const void* p) {
  return (unsigned long long)((const unsigned char*)p - mla90_smem);
}
#include "port.cuh"
static float* g_d[256];
static const unsigned* g_a[256];
static std::barrier<>* g_wg[2];
static float bf(unsigned short h) { unsigned b = (unsigned)h << 16; float f; memcpy(&f, &b, 4); return f; }
static float smem_bf16(unsigned addr) { unsigned short h; memcpy(&h, mla90_smem + addr, 2); return bf(h); }
static void dec(unsigned long long d, unsigned& a, unsigned& lbo, unsigned& sbo) {
  a = (d & 0x3fff) << 4; lbo = ((d >> 16) & 0x3fff) << 4; sbo = ((d >> 32) & 0x3fff) << 4;
  if ((d >> 62) != 0) { printf("swizzle bits set\n"); abort(); }
}
// Thread lt of the warpgroup: fragment element (reg i) ↔ (row, col).
static void frag(int lt, int i, int& r, int& c) {
  int w = lt / 32, lane = lt % 32, g = lane / 4, t4 = lane % 4;
  r = 16 * w + g + 8 * ((i % 4) / 2);
  c = 8 * (i / 4) + 2 * t4 + (i % 2);
}
void mla90_fence() {}
void mla90_commit() {}
void mla90_wait0() {}
void mla90_proxy_fence() {}
void mla90_wgmma_qk(float* d, unsigned long long da, unsigned long long db) {
  int t = threadIdx.x, wg = t / 128, lt = t % 128;
  g_d[t] = d;
  g_wg[wg]->arrive_and_wait();
  if (lt == 0) {
    unsigned aa, al, as, ba, bl, bs;
    dec(da, aa, al, as); dec(db, ba, bl, bs);
    static thread_local float D[64][64];
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n) {
        float acc = 0;
        for (int k = 0; k < 16; ++k)
          acc += smem_bf16(aa + (m / 8) * as + (m % 8) * 16 + (k / 8) * al + (k % 8) * 2) *
                 smem_bf16(ba + (n / 8) * bs + (n % 8) * 16 + (k / 8) * bl + (k % 8) * 2);
        D[m][n] = acc;
      }
    for (int x = 0; x < 128; ++x)
      for (int i = 0; i < 32; ++i) { int r, c; frag(x, i, r, c); g_d[wg * 128 + x][i] += D[r][c]; }
  }
  g_wg[wg]->arrive_and_wait();
}
void mla90_wgmma_pv(float* d, const unsigned* a, unsigned long long db) {
  int t = threadIdx.x, wg = t / 128, lt = t % 128;
  g_d[t] = d; g_a[t] = a;
  g_wg[wg]->arrive_and_wait();
  if (lt == 0) {
    static thread_local float A[64][16];
    for (int x = 0; x < 128; ++x) {
      int w = x / 32, lane = x % 32, g = lane / 4, t4 = lane % 4;
      const unsigned* ax = g_a[wg * 128 + x];
      for (int q = 0; q < 4; ++q) {
        int r = 16 * w + g + 8 * (q % 2), k = 2 * t4 + 8 * (q / 2);
        A[r][k] = bf(ax[q] & 0xffff); A[r][k + 1] = bf(ax[q] >> 16);
      }
    }
    unsigned ba, bl, bs;
    dec(db, ba, bl, bs);
    static thread_local float D[64][256];
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 256; ++n) {
        float acc = 0;
        for (int k = 0; k < 16; ++k)
          acc += A[m][k] * smem_bf16(ba + (n / 8) * bs + (n % 8) * 2 + (k / 8) * bl + (k % 8) * 16);
        D[m][n] = acc;
      }
    for (int x = 0; x < 128; ++x)
      for (int i = 0; i < 128; ++i) { int r, c; frag(x, i, r, c); g_d[wg * 128 + x][i] += D[r][c]; }
  }
  g_wg[wg]->arrive_and_wait();
}
#include "mla.cu"
#include "mla_sm90.cu"

int fails = 0;
#define CHECK(c, ...) do { if (!(c)) { ++fails; if (fails < 20) { printf("FAIL: " __VA_ARGS__); printf("\n"); } } } while (0)

void run(int B, int s_q, int h_q, std::vector<int> lens, int causal, int sms, unsigned seed) {
  const int d = 576, dv = 512, bs = 64, h_kv = 1, max_blocks = 6, num_blocks = 20;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1, 1);
  std::vector<unsigned short> kh((size_t)num_blocks * bs * d, 0x7fc0);  // NaN
  std::vector<int> bt(B * max_blocks, 1000000000), perm(num_blocks);
  for (int i = 0; i < num_blocks; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  int nx = 0;
  for (int b = 0; b < B; ++b) {
    for (int j = 0; j < (lens[b] + bs - 1) / bs; ++j) bt[b * max_blocks + j] = perm[nx++];
    for (int t = 0; t < lens[b]; ++t)
      for (int c = 0; c < d; ++c)
        kh[((size_t)bt[b * max_blocks + t / bs] * bs + t % bs) * d + c] = dp_f32_to_bf16(U(rng));
  }
  std::vector<unsigned short> qh((size_t)B * s_q * h_q * d);
  for (auto& v : qh) v = dp_f32_to_bf16(U(rng));
  float scale = 1.0f / 24.0f;
  int rows = s_q * h_q, row_tiles = rows / 64, parts = std::max(1, sms / row_tiles), slots = B + parts;
  std::vector<int> meta(parts + 1 + B + 1 + 4 * slots, 0);
  std::vector<float> opart((size_t)slots * rows * dv, 0), lpart((size_t)slots * rows, 0);
  std::vector<float> out((size_t)B * rows * dv, 1234), lse((size_t)B * rows, 1234);
  unsigned long long st1 = 0, st2 = 0;
  launch({1, 1, 1}, {256, 1, 1}, [&] {
    mla_metadata(lens.data(), bt.data(), B, max_blocks, bs, num_blocks, parts, 5, meta.data(), &st1, &st2);
  });
  std::barrier<> w0(128), w1(128);
  g_wg[0] = &w0; g_wg[1] = &w1;
  launch({(unsigned)parts, 1, (unsigned)row_tiles}, {256, 1, 1}, [&] {
    mla_decode_sm90(qh.data(), kh.data(), bt.data(), lens.data(), meta.data(), opart.data(),
                    lpart.data(), B, s_q, h_q, h_kv, num_blocks, max_blocks, parts, causal, scale);
  });
  launch({(unsigned)(B * rows + 7) / 8, 1, 1}, {256, 1, 1}, [&] {
    mla_combine(meta.data(), opart.data(), lpart.data(), out.data(), lse.data(), B, s_q, h_q, dv, parts, 0);
  });
  CHECK(st1 == 0 && st2 == 0, "flags");
  double maxerr = 0, maxl = 0;
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < s_q; ++s)
      for (int h = 0; h < h_q; ++h) {
        long vis = causal ? std::max<long>(lens[b] - (s_q - 1 - s), 0) : lens[b];
        size_t orow = ((size_t)b * s_q + s) * h_q + h;
        float L = lse[((size_t)b * h_q + h) * s_q + s];
        if (vis == 0) {
          CHECK(std::isinf(L) && L > 0, "lse inf");
          for (int c = 0; c < dv; ++c) CHECK(out[orow * dv + c] == 0, "zero out");
          continue;
        }
        std::vector<double> sc(vis);
        double m = -INFINITY;
        auto key = [&](long t) { return &kh[((size_t)bt[b * max_blocks + t / bs] * bs + t % bs) * d]; };
        for (long t = 0; t < vis; ++t) {
          double acc = 0;
          for (int c = 0; c < d; ++c) acc += (double)bf(qh[orow * d + c]) * bf(key(t)[c]);
          sc[t] = acc * scale; m = std::max(m, sc[t]);
        }
        double sum = 0; for (auto x : sc) sum += std::exp(x - m);
        maxl = std::max(maxl, std::fabs(L - (m + std::log(sum))));
        for (int c = 0; c < dv; ++c) {
          double o = 0;
          for (long t = 0; t < vis; ++t) o += std::exp(sc[t] - m) / sum * bf(key(t)[c]);
          double e = std::fabs(out[orow * dv + c] - o);
          maxerr = std::max(maxerr, e);
          CHECK(e < 8e-4 + 2.01 / 128 * std::fabs(o), "out b%d s%d h%d c%d %g vs %g", b, s, h, c, out[orow * dv + c], o);
        }
      }
  CHECK(maxl < 1e-4, "lse err %g", maxl);
  printf("sm90 B=%d s_q=%d h_q=%d causal=%d parts=%d: out max err %.3g, lse max err %.3g\n", B, s_q,
         h_q, causal, parts, maxerr, maxl);
}
int main() {
  run(3, 2, 64, {130, 0, 1}, 1, 4, 1);
  run(2, 1, 128, {300, 64}, 0, 6, 2);
  run(1, 4, 64, {384}, 1, 24, 3);  // cut into several splits, 4 tiles (one per s)
  printf("%s (%d failures)\n", fails ? "FAILED" : "PASSED", fails);
  return fails != 0;
}
