// tma_sm90.h — host models of the PTX helpers of fp8_gemm_sm90.cu (TMA
// box loads, mbarriers, wgmma m64nNk32 e4m3 x e4m3 -> f32, fences), written
// from the PTX ISA's descriptions; the kernel file compiles its own versions
// out under GEMM_SM90_HOST_EMU, which a harness defines before including it
// after this header. Models, not the hardware: see README.md.
//
// * Shared memory: the kernel's `extern __shared__ u8 h_smem[]` is replaced
//   (under GEMM_SM90_HOST_EMU) by `h_smem` below, which lies 16 bytes into
//   the dynamic buffer gemm90_smem (emu.h's EMU_DYN_SMEM: 0xff-filled before
//   every block, writes past the launch's size abort), so the kernel's
//   1024-byte alignment of its base (the host's 1024 bytes of slack) is
//   exercised. Shared addresses are offsets into gemm90_smem.
// * mbarrier: its state lives in the barrier's own 8 bytes of shared memory
//   (a TMA or store that overwrites it, or a wait on one never initialized,
//   aborts): phase parity, pending arrivals, the arrival count, and the
//   transaction count. arrive.expect_tx adds bytes and arrives; a TMA load's
//   complete_tx subtracts them; the phase completes when no arrival and no
//   byte is pending. try_wait.parity(P) succeeds once the current phase's
//   parity differs from P; h_mbar_wait spins with emu_yield (so other
//   threads run; a wait nobody satisfies is reported as a deadlock).
// * TMA (cp.async.bulk.tensor.2d, 128-byte swizzle): the box (elements
//   outside the tensor read as 0) is written into the 128-byte-swizzled
//   layout (the 16-byte chunk index of each 128-byte row XORed with address
//   bits 7..9), then complete_tx. Two modes (tma90_deferred): at issue
//   (a stage refilled while some thread may still read it shows), or
//   deferred until a thread waits on the barrier and finds its phase
//   incomplete (shared memory read without that wait holds stale bytes or
//   the 0xff fill). Loads never waited for are counted (tma90_dropped). The
//   descriptor's v[0] points to a Tma90Map the harness fills (what
//   cuTensorMapEncodeTiled would encode), v[1] holds TMA90_MAGIC.
// * wgmma m64nNk32 e4m3: warpgroup-collective (a barrier over the 128
//   threads before and after); between them thread 0 of the warpgroup reads
//   A (64 x 32 bytes) and B (N x 32 bytes) through their descriptors (K-major,
//   128-byte swizzle: byte (r, k) at start + (r/8)·SBO + (r%8)·128 + k, then
//   swizzled; the layout-type bits must say 128B), computes the product in
//   f32 summing k in order, and adds it to (scale_d) or writes it over each
//   thread's D fragment (register i of lane l in warp w: row 16w + l/4 +
//   8·((i>>1)&1), column 8·(i>>2) + 2·(l%4) + (i&1)).
#pragma once
#include "emu.h"
#include "../kernels/port.cuh"
#include <vector>

#define __grid_constant__
#define GEMM_SM90_HOST_EMU 1

EMU_DYN_SMEM(unsigned char, gemm90_smem);
static unsigned char* const h_smem = gemm90_smem + 16;

[[noreturn]] static void tma90_fail(const char* what, unsigned long long a, unsigned long long b) {
  fprintf(stderr, "tma_sm90 model: %s (%llu, %llu) in block %u thread %u\n", what, a, b, blockIdx.x,
          threadIdx.x);
  fflush(stdout);
  abort();
}

static u32 h_smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
static u32 tma90_swz(u32 addr) { return addr ^ (((addr >> 7) & 7u) << 4); }

// ---- mbarrier ------------------------------------------------------------------
// Word layout: bits 0..11 pending arrivals, 12..23 arrival count, 24..47 the
// transaction count (two's complement), 48 the phase parity, 56..63 0x5a.
struct Mbar90 {
  u32 pending, count, phase;
  long tx;
};
static Mbar90 mbar90_get(u32 bar) {
  if (bar % 8 || bar + 8 > EMU_SMEM_BYTES) tma90_fail("misaligned mbarrier", bar, 0);
  u64 w;
  memcpy(&w, gemm90_smem + bar, 8);
  if ((w >> 56) != 0x5a) tma90_fail("mbarrier used before init (or overwritten)", bar, w);
  Mbar90 m;
  m.pending = (u32)(w & 0xfff);
  m.count = (u32)((w >> 12) & 0xfff);
  long tx = (long)((w >> 24) & 0xffffff);
  m.tx = tx >= 0x800000 ? tx - 0x1000000 : tx;
  m.phase = (u32)((w >> 48) & 1);
  return m;
}
static void mbar90_put(u32 bar, Mbar90 m) {
  if (m.pending == 0 && m.tx == 0) {  // the phase completes
    m.phase ^= 1u;
    m.pending = m.count;
  }
  if (m.tx <= -0x800000 || m.tx >= 0x800000) tma90_fail("mbarrier transaction count overflow", bar, 0);
  const u64 w = (u64)m.pending | ((u64)m.count << 12) | ((u64)(m.tx & 0xffffff) << 24) |
                ((u64)m.phase << 48) | (0x5aull << 56);
  memcpy(gemm90_smem + bar, &w, 8);
}
static int tma90_flush_unwaited();
static void h_mbar_init(u32 bar, u32 count) {
  tma90_flush_unwaited();
  if (count == 0 || count > 0xfff) tma90_fail("mbarrier count", bar, count);
  if (bar % 8 || bar + 8 > EMU_SMEM_BYTES) tma90_fail("misaligned mbarrier", bar, 0);
  const u64 w = (u64)count | ((u64)count << 12) | (0x5aull << 56);
  memcpy(gemm90_smem + bar, &w, 8);
}
static void h_mbar_init_fence() {}
static void h_mbar_expect_tx(u32 bar, u32 bytes) {
  Mbar90 m = mbar90_get(bar);
  if (m.pending == 0) tma90_fail("mbarrier arrival with none pending", bar, 0);
  m.tx += bytes;
  m.pending -= 1;
  mbar90_put(bar, m);
}

// ---- TMA -------------------------------------------------------------------------
#define TMA90_MAGIC 0x544d413930ull
struct Tma90Map {  // a 2-D row-major tensor of bytes and the box
  const u8* base;
  long rows, cols, stride;  // cols: the inner dimension; stride in bytes
  int box_cols, box_rows;   // box_cols = 128 (the swizzle span)
};
// A load in flight (deferred mode).
struct Tma90Load {
  u32 dst, bar;
  const Tma90Map* map;
  int c0, c1;
};
// Deferred mode (the harness sets it): a load's bytes land, and its
// complete_tx happens, only when a thread waits on its barrier and finds the
// phase incomplete (in issue order), so shared memory read without waiting
// on the barrier holds stale data or the 0xff fill; otherwise loads complete
// at issue, so a stage refilled while other threads may still read it shows.
inline bool tma90_deferred = false;
inline std::vector<Tma90Load> tma90_inflight;
inline int tma90_dropped = 0;  // loads never waited for (counted at the next init or launch end)
static void tma90_complete(const Tma90Load& l) {
  const Tma90Map* t = l.map;
  for (int r = 0; r < t->box_rows; ++r)
    for (int c = 0; c < t->box_cols; ++c) {
      const long gr = (long)l.c1 + r, gc = (long)l.c0 + c;
      const bool in = gr >= 0 && gc >= 0 && gr < t->rows && gc < t->cols;
      gemm90_smem[tma90_swz(l.dst + (u32)(r * 128 + c))] = in ? t->base[gr * t->stride + gc] : 0;
    }
  Mbar90 m = mbar90_get(l.bar);  // complete_tx
  m.tx -= (long)t->box_rows * t->box_cols;
  mbar90_put(l.bar, m);
}
template <class Desc>
static void h_tma_load(u32 dst, const Desc* desc, u32 bar, int c0, int c1) {
  if (desc->v[1] != TMA90_MAGIC) tma90_fail("TMA descriptor not made by the harness", 0, 0);
  const Tma90Map* t = (const Tma90Map*)desc->v[0];
  if (dst % 1024) tma90_fail("128B-swizzled TMA destination not 1024-byte aligned", dst, 0);
  if (t->box_cols != 128) tma90_fail("inner box is not the 128-byte swizzle span", t->box_cols, 0);
  const u32 bytes = (u32)(t->box_rows * t->box_cols);
  if ((u64)dst + bytes > EMU_SMEM_BYTES) tma90_fail("TMA box past shared memory", dst, bytes);
  mbar90_get(bar);  // initialized
  const Tma90Load l{dst, bar, t, c0, c1};
  if (tma90_deferred) tma90_inflight.push_back(l);
  else tma90_complete(l);
}
// Counts (and forgets) loads nobody waited for; a harness calls it after
// each launch (h_mbar_init calls it too: a new block's barriers).
static int tma90_flush_unwaited() {
  const int n = (int)tma90_inflight.size();
  tma90_inflight.clear();
  tma90_dropped += n;
  return n;
}
static void h_mbar_wait(u32 bar, u32 parity) {
  while (mbar90_get(bar).phase == (parity & 1u)) {
    bool landed = false;
    for (size_t i = 0; i < tma90_inflight.size();) {
      if (tma90_inflight[i].bar == bar) {
        const Tma90Load l = tma90_inflight[i];
        tma90_inflight.erase(tma90_inflight.begin() + (long)i);
        tma90_complete(l);
        landed = true;
      } else {
        ++i;
      }
    }
    if (!landed) emu_yield();
  }
}

// ---- wgmma -----------------------------------------------------------------------
static void h_wg_fence() {}
static void h_wg_commit() {}
static void h_wg_wait0() {}
static void h_reg_fence(float&) {}
static float* wg90_d[EMU_MAX_THREADS];
static void wg90_sync() { emu_bar_sync(threadIdx.x / 128 * 128, 128); }
// Byte (r, k) of a K-major 128B-swizzled tile through its descriptor.
static u8 wg90_byte(u64 d, int r, int k) {
  const u32 start = (u32)(d & 0x3fff) << 4, sbo = (u32)((d >> 32) & 0x3fff) << 4;
  if ((d >> 62) != 1) tma90_fail("wgmma descriptor: layout type is not 128B swizzle", d >> 62, 0);
  if (((d >> 49) & 7) != 0) tma90_fail("wgmma descriptor: base offset set", d, 0);
  const u32 addr = start + (u32)(r / 8) * sbo + (u32)(r % 8) * 128 + (u32)k;
  if (addr >= EMU_SMEM_BYTES) tma90_fail("wgmma operand past shared memory", addr, 0);
  return gemm90_smem[tma90_swz(addr)];
}
template <int N>
static void wg90_mma(float* d, u64 da, u64 db, int scale_d) {
  const int lt = threadIdx.x % 128, wg0 = threadIdx.x / 128 * 128;
  wg90_d[threadIdx.x] = d;
  wg90_sync();
  if (lt == 0) {
    static float A[64][32], B[N][32];
    for (int r = 0; r < 64; ++r)
      for (int k = 0; k < 32; ++k) A[r][k] = dp_e4m3_to_f32(wg90_byte(da, r, k));
    for (int c = 0; c < N; ++c)
      for (int k = 0; k < 32; ++k) B[c][k] = dp_e4m3_to_f32(wg90_byte(db, c, k));
    for (int x = 0; x < 128; ++x) {
      const int w = x / 32, lane = x % 32;
      float* dx = wg90_d[wg0 + x];
      for (int i = 0; i < N / 2; ++i) {
        const int row = 16 * w + lane / 4 + 8 * ((i >> 1) & 1);
        const int col = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
        float s = 0.0f;
        for (int k = 0; k < 32; ++k) s += A[row][k] * B[col][k];
        dx[i] = scale_d ? dx[i] + s : s;
      }
    }
  }
  wg90_sync();
}
static void h_wgmma_n128(float* d, u64 da, u64 db, int s) { wg90_mma<128>(d, da, db, s); }
static void h_wgmma_n64(float* d, u64 da, u64 db, int s) { wg90_mma<64>(d, da, db, s); }
