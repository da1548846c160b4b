// emu.h — host emulation of the CUDA subset deepport's portable kernels use,
// so that the real kernels/*.cu files run on the CPU (see README.md).
//
// Model: blocks run one after another; the threads of a block are
// std::threads (threadIdx is thread_local), __syncthreads is a std::barrier
// over the block, warp shuffles exchange values through per-lane slots between
// two per-warp barriers. EMU_W is the warp width: 32, or 64 with -DDP_HIP
// (port.cuh's DP_WARP and __shfl_xor). Atomics take one global mutex.
//
// Shared memory:
// * `__shared__ T x[N];` in a kernel expands to `static T x[N];`: one copy
//   for the block, which is right because blocks never overlap.
// * `extern __shared__ T name[];` (dynamic) cannot be spelled with `static`.
//   A harness includes the kernel files that use it after
//   `#include "extern_shared.h"` (which makes __shared__ empty) and defines the
//   buffer with EMU_DYN_SMEM(T, name) at namespace scope: the block-scope
//   extern declaration then names that buffer. Mixing both forms in one kernel
//   file would not compile in either mode — or, for a static array under the
//   empty mode, turn it into a per-thread local, which the harnesses' checks
//   catch as wrong results.
// * Before every block each dynamic buffer is filled with 0xff bytes (NaN for
//   floats: reading shared memory nobody wrote shows up), and the bytes past
//   the launch's smem size are checked afterwards (a write beyond the
//   requested dynamic size aborts the run).
//
// A thread that skips a __syncthreads or a shuffle its block/warp performs
// deadlocks here (on a GPU it is undefined behaviour): the Rust driver
// (tests/emulate.rs) runs each harness under a timeout.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <barrier>
#include <cstddef>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__ static

#ifdef DP_HIP
#define EMU_W 64
#else
#define EMU_W 32
#endif
inline constexpr int warpSize = EMU_W;
#define EMU_MAX_THREADS 1024

// ---- block state -------------------------------------------------------------
inline std::barrier<>* emu_block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bar;
inline unsigned emu_nthreads = 0;
inline unsigned emu_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned long long = ~0ull) { emu_warp_bar[emu_tid() / EMU_W]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- warp shuffles -------------------------------------------------------------
// Every lane of the warp must take part (the kernels pass full masks); the
// source lane is computed within segments of `width` lanes, out-of-range
// sources return the caller's own value as on NVIDIA.
alignas(16) inline unsigned char emu_slot[EMU_MAX_THREADS][16];
template <typename T>
inline T emu_shfl(T v, int (*src_of)(int, int, int), int arg, int width) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  const unsigned t = emu_tid(), w = t / EMU_W;
  const int lane = (int)(t % EMU_W);
  memcpy(emu_slot[t], &v, sizeof(T));
  emu_warp_bar[w]->arrive_and_wait();
  const int s = src_of(lane, arg, width);
  const unsigned st = w * EMU_W + (unsigned)s;
  T r = v;
  if (s >= 0 && s < EMU_W && st < emu_nthreads) memcpy(&r, emu_slot[st], sizeof(T));
  emu_warp_bar[w]->arrive_and_wait();
  return r;
}
inline int emu_src_xor(int lane, int m, int width) {
  int s = lane ^ m;
  return (s / width == lane / width) ? s : lane;
}
inline int emu_src_idx(int lane, int src, int width) { return (lane / width) * width + ((src % width) + width) % width; }
inline int emu_src_down(int lane, int d, int width) { return (lane % width) + d < width ? lane + d : lane; }
inline int emu_src_up(int lane, int d, int width) { return (lane % width) - d >= 0 ? lane - d : lane; }

template <typename T, typename M>
T __shfl_xor_sync(M, T v, int m, int width = EMU_W) { return emu_shfl(v, emu_src_xor, m, width); }
template <typename T, typename M>
T __shfl_sync(M, T v, int src, int width = EMU_W) { return emu_shfl(v, emu_src_idx, src, width); }
template <typename T, typename M>
T __shfl_down_sync(M, T v, unsigned d, int width = EMU_W) { return emu_shfl(v, emu_src_down, (int)d, width); }
template <typename T, typename M>
T __shfl_up_sync(M, T v, unsigned d, int width = EMU_W) { return emu_shfl(v, emu_src_up, (int)d, width); }
// HIP spellings (no mask).
template <typename T>
T __shfl_xor(T v, int m, int width = EMU_W) { return emu_shfl(v, emu_src_xor, m, width); }
template <typename T>
T __shfl(T v, int src, int width = EMU_W) { return emu_shfl(v, emu_src_idx, src, width); }
template <typename T>
T __shfl_down(T v, unsigned d, int width = EMU_W) { return emu_shfl(v, emu_src_down, (int)d, width); }

// ---- atomics (one global mutex: exact, order-free like the hardware's) ------
inline std::mutex emu_atomic_mu;
template <typename T, typename F>
inline T emu_rmw(T* p, F f) {
  std::lock_guard<std::mutex> g(emu_atomic_mu);
  T o = *p;
  *p = f(o);
  return o;
}
inline int atomicAdd(int* p, int v) { return emu_rmw(p, [&](int o) { return (int)((unsigned)o + (unsigned)v); }); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu_rmw(p, [&](unsigned o) { return o + v; }); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return emu_rmw(p, [&](unsigned long long o) { return o + v; });
}
inline float atomicAdd(float* p, float v) { return emu_rmw(p, [&](float o) { return o + v; }); }
inline double atomicAdd(double* p, double v) { return emu_rmw(p, [&](double o) { return o + v; }); }
inline int atomicMax(int* p, int v) { return emu_rmw(p, [&](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return emu_rmw(p, [&](unsigned o) { return o > v ? o : v; }); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  return emu_rmw(p, [&](unsigned long long o) { return o > v ? o : v; });
}
inline int atomicMin(int* p, int v) { return emu_rmw(p, [&](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return emu_rmw(p, [&](unsigned o) { return o < v ? o : v; }); }
inline int atomicExch(int* p, int v) { return emu_rmw(p, [&](int) { return v; }); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return emu_rmw(p, [&](unsigned) { return v; }); }
inline int atomicCAS(int* p, int c, int v) { return emu_rmw(p, [&](int o) { return o == c ? v : o; }); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) {
  return emu_rmw(p, [&](unsigned o) { return o == c ? v : o; });
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) {
  return emu_rmw(p, [&](unsigned long long o) { return o == c ? v : o; });
}

// ---- bit casts -----------------------------------------------------------------
inline float __int_as_float(int b) { float f; memcpy(&f, &b, 4); return f; }
inline int __float_as_int(float f) { int b; memcpy(&b, &f, 4); return b; }
inline float __uint_as_float(unsigned b) { float f; memcpy(&f, &b, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned b; memcpy(&b, &f, 4); return b; }
inline double __longlong_as_double(long long b) { double d; memcpy(&d, &b, 8); return d; }
inline long long __double_as_longlong(double d) { long long b; memcpy(&b, &d, 8); return b; }

// ---- dynamic shared memory ---------------------------------------------------
#define EMU_SMEM_BYTES (227 * 1024)  // the sm_90 opt-in maximum
struct EmuSmem {
  unsigned char* base;
};
inline std::vector<EmuSmem>& emu_smem_list() {
  static std::vector<EmuSmem> l;
  return l;
}
struct EmuSmemReg {
  explicit EmuSmemReg(void* p) { emu_smem_list().push_back({(unsigned char*)p}); }
};
// Defines the namespace-scope buffer a kernel's `extern __shared__ T name[]`
// refers to.
#define EMU_DYN_SMEM(T, name)                                                  \
  alignas(256) T name[EMU_SMEM_BYTES / sizeof(T)];                             \
  static EmuSmemReg emu_smem_reg_##name(name)
// Offset of a pointer into a dynamic shared buffer (cvta.to.shared).
inline unsigned long long __cvta_generic_to_shared(const void* p) {
  for (auto& s : emu_smem_list()) {
    const unsigned char* c = (const unsigned char*)p;
    if (c >= s.base && c < s.base + EMU_SMEM_BYTES) return (unsigned long long)(c - s.base);
  }
  fprintf(stderr, "emu: __cvta_generic_to_shared of a non-shared pointer\n");
  abort();
}

// ---- launch ----------------------------------------------------------------------
// Runs f (a lambda calling the kernel) for every block of `grid` in turn,
// with block.x·block.y·block.z threads and `smem` bytes of dynamic shared
// memory. The threads are created once per launch and step through the blocks
// together.
inline void emu_check_smem(size_t smem) {
  for (auto& s : emu_smem_list())
    for (size_t i = smem; i < EMU_SMEM_BYTES; ++i)
      if (s.base[i] != 0xff) {
        fprintf(stderr, "emu: block (%u,%u,%u) wrote shared byte %zu past the %zu requested\n",
                blockIdx.x, blockIdx.y, blockIdx.z, i, smem);
        abort();
      }
}
template <class F>
void emu_launch(dim3 grid, dim3 block, size_t smem, F f) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > EMU_MAX_THREADS || smem > EMU_SMEM_BYTES) {
    fprintf(stderr, "emu: bad launch: %u threads, %zu bytes of shared memory\n", n, smem);
    abort();
  }
  blockDim = block;
  gridDim = grid;
  emu_nthreads = n;
  // `gate` separates blocks; the block and warp barriers are made afresh
  // for each block, and a thread that returns from the kernel drops out of
  // them (an exited thread no longer holds up __syncthreads, as on a GPU).
  std::barrier<> gate(n);
  std::unique_ptr<std::barrier<>> bar;
  const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
  std::vector<std::thread> th;
  th.reserve(n);
  for (unsigned t = 0; t < n; ++t)
    th.emplace_back([=, &gate, &bar] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned long long b = 0; b < blocks; ++b) {
        if (t == 0) {
          blockIdx = dim3((unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                          (unsigned)(b / ((unsigned long long)grid.x * grid.y)));
          for (auto& s : emu_smem_list()) memset(s.base, 0xff, EMU_SMEM_BYTES);
          bar.reset(new std::barrier<>(n));
          emu_block_bar = bar.get();
          emu_warp_bar.clear();
          for (unsigned w = 0; w * EMU_W < n; ++w) {
            const unsigned lanes = n - w * EMU_W < EMU_W ? n - w * EMU_W : EMU_W;
            emu_warp_bar.emplace_back(new std::barrier<>(lanes));
          }
        }
        gate.arrive_and_wait();
        f();
        emu_block_bar->arrive_and_drop();
        emu_warp_bar[t / EMU_W]->arrive_and_drop();
        gate.arrive_and_wait();
        if (t == 0) emu_check_smem(smem);
      }
    });
  for (auto& t : th) t.join();
}

// ---- checks ------------------------------------------------------------------------
inline int emu_fails = 0, emu_checks = 0;
#define CHECK(c, ...)                                                          \
  do {                                                                         \
    ++emu_checks;                                                              \
    if (!(c)) {                                                                \
      if (emu_fails++ < 30) {                                                  \
        printf("FAIL %s:%d: ", __FILE__, __LINE__);                            \
        printf(__VA_ARGS__);                                                   \
        printf("\n");                                                          \
      }                                                                        \
    }                                                                          \
  } while (0)
// Prints the summary line and returns main's exit status.
inline int emu_summary(const char* name) {
  printf("%s (warp %d): %d checks, %d failures: %s\n", name, EMU_W, emu_checks, emu_fails,
         emu_fails ? "FAILED" : "PASSED");
  return emu_fails != 0;
}
