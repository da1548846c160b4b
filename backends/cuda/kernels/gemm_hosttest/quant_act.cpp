// Host emulation test (see run.sh): quant_act of ../quant.cu (bf16 input, e4m3 and
// e4m3fnuz, float and UE8M0 scales, the 1e-4 clamp, a NaN flagged).
#include "emu.h"
#include <mutex>
#include <cstdio>
#include <random>
static float g_shfl[1024];
static float emu_shfl_xor(float v, int m) {
  g_shfl[threadIdx.x] = v; __syncthreads();
  float r = g_shfl[threadIdx.x ^ m]; __syncthreads();
  return r;
}
#undef __shfl_xor_sync
#define __shfl_xor_sync(mask, v, m) emu_shfl_xor((v), (m))
using std::isfinite;
#include "../quant.cu"
int main() {
  std::mt19937 rng(3);
  int fails = 0;
  for (int fnuz = 0; fnuz < 2; ++fnuz)
  for (int ue = 0; ue < 2; ++ue) {
    long m = 5, k = 384, G = m * k / 128;
    std::vector<uint16_t> x(m * k);
    for (long i = 0; i < m * k; ++i) {
      float v = std::ldexp((float)((int)(rng() % 2000) - 1000), (int)(rng() % 20) - 15);
      if (i / 128 == 3) v = 1e-7f * (i % 3);  // a group below the 1e-4 clamp
      if (i / 128 == 4) v = 0.0f;             // an all-zero group
      x[i] = dp_f32_to_bf16(v);
    }
    x[700] = 0x7fc0;  // a NaN: flagged
    std::vector<uint8_t> q(m * k);
    std::vector<float> s(G);
    unsigned long long st = 0;
    float fmax = fnuz ? 240.0f : 448.0f;
    launch({4, 1, 1}, {128, 1, 1}, [&] {
      quant_act(x.data(), DP_BF16, q.data(), fnuz, s.data(), fmax, ue, G, &st);
    });
    for (long g = 0; g < G; ++g) {
      if (g == 700 / 128) continue;
      float amax = 0;
      for (int j = 0; j < 128; ++j) amax = std::max(amax, std::fabs(dp_bf16_to_f32(x[g * 128 + j])));
      amax = std::max(amax, 1e-4f);
      float sc = amax / fmax;
      if (ue) { uint32_t b; memcpy(&b, &sc, 4); if (b & 0x7fffff) { b = ((b >> 23) + 1) << 23; memcpy(&sc, &b, 4); } }
      if (s[g] != sc) { fails++; printf("scale %ld: %g vs %g\n", g, s[g], sc); }
      for (int j = 0; j < 128; ++j) {
        float y = dp_bf16_to_f32(x[g * 128 + j]) / sc;
        uint8_t want = fnuz ? gemm_f32_to_e4m3fnuz(y) : dp_f32_to_e4m3(y);
        if (q[g * 128 + j] != want && fails++ < 10) printf("q %ld: %02x vs %02x\n", g * 128 + j, q[g * 128 + j], want);
      }
    }
    unsigned long long want_st = ((unsigned long long)(~700u) << 32) | 0x7fc00000u;
    if (st != want_st) { fails++; printf("status %llx want %llx\n", st, want_st); }
  }
  printf("%s (%d failures)\n", fails ? "FAILED" : "all ok", fails);
  return fails != 0;
}
