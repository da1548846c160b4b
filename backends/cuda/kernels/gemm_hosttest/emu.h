// Host emulation of the CUDA execution model for gemm.cu: each CTA runs as
// blockDim std::threads with a std::barrier for __syncthreads; CTAs run one
// after another, so function-static "__shared__" arrays are per CTA.
#include <barrier>
#include <thread>
#include <vector>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <algorithm>
struct dim3e { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3e threadIdx, blockIdx;
static dim3e blockDim, gridDim;
static std::barrier<>* g_bar;
static inline void __syncthreads() { g_bar->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)
#define __shfl_xor_sync(a, b, c) (b)
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static std::mutex g_atomic;
static inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> l(g_atomic); auto o = *p; if (v > o) *p = v; return o;
}
template <class F>
void launch(dim3e grid, dim3e block, F f) {
  gridDim = grid; blockDim = block;
  unsigned n = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(n); g_bar = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < n; ++t)
          ts.emplace_back([&, t] { blockIdx = {x, y, z}; threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)}; f(); });
        for (auto& th : ts) th.join();
      }
}
