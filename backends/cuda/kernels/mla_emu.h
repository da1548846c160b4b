// mla_emu.h — host emulation of the CUDA subset the portable MLA/RoPE kernels
// use (one std::thread per CUDA thread, std::barrier for __syncthreads and
// warp shuffles). Dev check only, not embedded: see mla_emu_decode.cpp.
#pragma once
// Host emulation of the CUDA subset the portable kernels use: one std::thread
// per CUDA thread, std::barrier for __syncthreads and warp shuffles.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__
// -DDP_HIP emulates 64-wide wavefronts (port.cuh's DP_WARP 64, __shfl_xor).
#ifdef DP_HIP
#define EMU_W 64
#else
#define EMU_W 32
#endif
static std::barrier<>* g_bar;
static std::vector<std::unique_ptr<std::barrier<>>> g_wbar;
static float g_xch[1024 / EMU_W][EMU_W];
inline void __syncthreads() { g_bar->arrive_and_wait(); }
inline float emu_shfl_xor(float v, int m) {
  int w = threadIdx.x / EMU_W, l = threadIdx.x % EMU_W;
  g_xch[w][l] = v;
  g_wbar[w]->arrive_and_wait();
  float r = g_xch[w][l ^ m];
  g_wbar[w]->arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu_shfl_xor(v, m); }
inline float __shfl_xor(float v, int m) { return emu_shfl_xor(v, m); }
inline float __int_as_float(int b) { float f; memcpy(&f, &b, 4); return f; }
inline int __float_as_int(float f) { int b; memcpy(&b, &f, 4); return b; }
static std::mutex g_atom;
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> g(g_atom);
  auto o = *p; if (v > o) *p = v; return o;
}
inline double __longlong_as_double(long long b) { double d; memcpy(&d, &b, 8); return d; }
inline long long __double_as_longlong(double d) { long long b; memcpy(&b, &d, 8); return b; }
alignas(16) float mla_ks[1 << 16];
alignas(16) float mla_pa[1 << 16];
template <class F>
void launch(dim3 grid, dim3 block, F f) {
  blockDim = block; gridDim = grid;
  unsigned n = block.x;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(n);
        g_bar = &bar;
        g_wbar.clear();
        for (unsigned w = 0; w < (n + EMU_W - 1) / EMU_W; ++w)
          g_wbar.emplace_back(new std::barrier<>(EMU_W));
        std::vector<std::thread> th;
        for (unsigned t = 0; t < n; ++t)
          th.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {x, y, z}; f(); });
        for (auto& t : th) t.join();
      }
}
