// emu.h — host emulation of the CUDA subset deepport's portable kernels use,
// so that the real kernels/*.cu files run on the CPU (see README.md).
//
// Model: blocks run one after another; the threads of a block are fibers
// (ucontext) on one OS thread, each running until it reaches a barrier.
// __syncthreads is a barrier over the block, warp shuffles exchange values
// through per-lane slots between two per-warp barriers. The scheduler runs
// the fibers in ascending thread order in even rounds and descending in odd
// ones, so a missing barrier between a write and a read of shared memory
// shows up whichever thread writes. A thread that returns from the kernel
// drops out of every barrier (as an exited thread on a GPU). EMU_W is the
// warp width: 32, or 64 with -DDP_HIP (port.cuh's DP_WARP and __shfl_xor).
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
// A thread that waits at a barrier the rest of its group never reaches (a
// __syncthreads or shuffle in divergent code: undefined behaviour on a GPU)
// is a deadlock: the scheduler reports it and aborts.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <functional>
#include <ucontext.h>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx;  // of the running fiber
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

// ---- fibers and barriers ---------------------------------------------------------
// A barrier is over the threads [lo, lo + count) of the block: the block, a
// warp, or (wgmma_sm90.h) a warpgroup. A fiber at a barrier waits until
// every thread of that range either waits at the same range or has exited.
struct EmuFiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool done = false;
  bool waiting = false;
  bool yielded = false;  // stopped in emu_yield (a spin-wait), not at a barrier
  unsigned lo = 0, count = 0;
};
#define EMU_STACK (256 * 1024)
inline std::vector<EmuFiber> emu_fibers;
inline ucontext_t emu_sched_ctx;
inline unsigned emu_cur = 0, emu_nthreads = 0;
inline unsigned emu_tid() { return emu_cur; }
inline void emu_bar_sync(unsigned lo, unsigned count) {
  EmuFiber& f = emu_fibers[emu_cur];
  f.waiting = true;
  f.lo = lo;
  f.count = count;
  swapcontext(&f.ctx, &emu_sched_ctx);
}
inline void __syncthreads() { emu_bar_sync(0, emu_nthreads); }
// One iteration of a spin-wait (a model's mbarrier try_wait loop): the fiber
// stops and resumes in the next round, after every other runnable fiber ran.
// EMU_SPIN_ROUNDS rounds in a row in which no barrier opened and some fiber
// only spun are reported as a deadlock (a wait nobody will satisfy).
#define EMU_SPIN_ROUNDS 10000
inline void emu_yield() {
  EmuFiber& f = emu_fibers[emu_cur];
  f.yielded = true;
  swapcontext(&f.ctx, &emu_sched_ctx);
}
inline unsigned emu_warp_lanes(unsigned w) {
  return emu_nthreads - w * EMU_W < (unsigned)EMU_W ? emu_nthreads - w * EMU_W : EMU_W;
}
inline void emu_warp_sync() {
  const unsigned w = emu_tid() / EMU_W;
  emu_bar_sync(w * EMU_W, emu_warp_lanes(w));
}
inline void __syncwarp(unsigned long long = ~0ull) { emu_warp_sync(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

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
  emu_warp_sync();
  const int s = src_of(lane, arg, width);
  const unsigned st = w * EMU_W + (unsigned)s;
  T r = v;
  if (s >= 0 && s < EMU_W && st < emu_nthreads) memcpy(&r, emu_slot[st], sizeof(T));
  emu_warp_sync();
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

// ---- atomics (fibers never interleave inside one: exact) ---------------------
template <typename T, typename F>
inline T emu_rmw(T* p, F f) {
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

// ---- round-to-nearest intrinsics (the host's IEEE operations) ---------------
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

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
  fflush(stdout);
  abort();
}

// ---- launch ----------------------------------------------------------------------
// Runs f (a lambda calling the kernel) for every block of `grid` in turn,
// with block.x·block.y·block.z threads and `smem` bytes of dynamic shared
// memory.
inline void emu_check_smem(size_t smem) {
  for (auto& s : emu_smem_list())
    for (size_t i = smem; i < EMU_SMEM_BYTES; ++i)
      if (s.base[i] != 0xff) {
        fprintf(stderr, "emu: block (%u,%u,%u) wrote shared byte %zu past the %zu requested\n",
                blockIdx.x, blockIdx.y, blockIdx.z, i, smem);
        fflush(stdout);
        abort();
      }
}
inline std::function<void()> emu_kernel;
inline void emu_fiber_main() {
  emu_kernel();
  emu_fibers[emu_cur].done = true;
  // returns to uc_link (the scheduler)
}
// Runs one block: every fiber from the kernel's start to its end.
inline void emu_run_block() {
  const unsigned n = emu_nthreads;
  for (unsigned t = 0; t < n; ++t) {
    EmuFiber& f = emu_fibers[t];
    if (!f.stack) f.stack.reset(new char[EMU_STACK]);
    f.done = f.waiting = f.yielded = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = EMU_STACK;
    f.ctx.uc_link = &emu_sched_ctx;
    makecontext(&f.ctx, emu_fiber_main, 0);
  }
  std::vector<char> checked(n);  // fibers whose barrier was examined this round
  unsigned spin_rounds = 0;
  for (unsigned round = 0;; ++round) {
    // run every runnable fiber to its next barrier (or its end, or emu_yield)
    bool spun = false;
    for (unsigned i = 0; i < n; ++i) {
      const unsigned t = round % 2 ? n - 1 - i : i;
      EmuFiber& f = emu_fibers[t];
      if (f.done || f.waiting) continue;
      emu_cur = t;
      threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
      f.yielded = false;
      swapcontext(&emu_sched_ctx, &f.ctx);
      spun |= f.yielded;
    }
    // release every barrier whose range is complete
    bool live = false, released = false;
    for (unsigned t = 0; t < n; ++t) live |= !emu_fibers[t].done;
    if (!live) return;
    std::fill(checked.begin(), checked.end(), 0);
    for (unsigned t = 0; t < n; ++t) {
      EmuFiber& f = emu_fibers[t];
      if (!f.waiting || checked[t]) continue;
      bool complete = true;
      for (unsigned u = f.lo; u < f.lo + f.count && u < n; ++u) {
        const EmuFiber& g = emu_fibers[u];
        const bool same = g.waiting && g.lo == f.lo && g.count == f.count;
        if (same) checked[u] = 1;
        complete = complete && (g.done || same);
      }
      if (complete) {
        const unsigned lo = f.lo, count = f.count;
        for (unsigned u = lo; u < lo + count && u < n; ++u)
          if (emu_fibers[u].waiting) emu_fibers[u].waiting = false;
        released = true;
      }
    }
    if (released || (spun && ++spin_rounds < EMU_SPIN_ROUNDS)) {
      if (released) spin_rounds = 0;
    } else {
      fprintf(stderr, "emu: deadlock in block (%u,%u,%u):", blockIdx.x, blockIdx.y, blockIdx.z);
      for (unsigned t = 0; t < n; ++t)
        if (emu_fibers[t].waiting)
          fprintf(stderr, " t%u@[%u,+%u)", t, emu_fibers[t].lo, emu_fibers[t].count);
        else if (emu_fibers[t].yielded)
          fprintf(stderr, " t%u@spin", t);
      fprintf(stderr, "\n");
      fflush(stdout);
      abort();
    }
  }
}
template <class F>
void emu_launch(dim3 grid, dim3 block, size_t smem, F f) {
  const unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > EMU_MAX_THREADS || smem > EMU_SMEM_BYTES) {
    fprintf(stderr, "emu: bad launch: %u threads, %zu bytes of shared memory\n", n, smem);
    fflush(stdout);
    abort();
  }
  blockDim = block;
  gridDim = grid;
  emu_nthreads = n;
  if (emu_fibers.size() < n) emu_fibers.resize(n);
  emu_kernel = f;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        for (auto& s : emu_smem_list()) memset(s.base, 0xff, EMU_SMEM_BYTES);
        emu_run_block();
        emu_check_smem(smem);
      }
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
