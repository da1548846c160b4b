// wgmma_sm90.h — host models of the PTX helpers mla_sm90.cu calls
// (mla90_fence/commit/wait0/proxy_fence, mla90_wgmma_qk: m64n64k16 bf16
// with A and B from shared-memory descriptors, mla90_wgmma_pv: m64n256k16
// with A from registers and B MN-major from a descriptor), written from the
// PTX ISA's descriptions: no-swizzle canonical layouts, K-major element
// (r, k) at start + (r/8)·SBO + (r%8)·16 + (k/8)·LBO + (k%8)·2, MN-major
// element (k, n) at start + (n/8)·SBO + (n%8)·2 + (k/8)·LBO + (k%8)·16;
// accumulator and A register fragments as in the m64nNk16 figures. One
// thread of each warpgroup computes the product (in f32, summing k in order)
// between two warpgroup barriers. Include after extern_shared.h and before
// kernels/mla_sm90.cu, with MLA_EMU defined (which drops the PTX versions).
// Models are no proof of the hardware's reading of descriptors: see README.md.
#pragma once
#include "extern_shared.h"
#include "../kernels/port.cuh"
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
// The dynamic shared buffer mla_sm90.cu's `extern __shared__` names; the
// descriptors' addresses are offsets into it (emu.h's __cvta_generic_to_shared).
EMU_DYN_SMEM(unsigned char, mla90_smem);
static float* g_d[256];
static const unsigned* g_a[256];
// A wgmma is warpgroup-collective: a barrier over the warpgroup's 128 threads.
static void wg_sync(int wg) { emu_bar_sync((unsigned)wg * 128, 128); }
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
  wg_sync(wg);
  if (lt == 0) {
    unsigned aa, al, as, ba, bl, bs;
    dec(da, aa, al, as); dec(db, ba, bl, bs);
    static float D[64][64];
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
  wg_sync(wg);
}
void mla90_wgmma_pv(float* d, const unsigned* a, unsigned long long db) {
  int t = threadIdx.x, wg = t / 128, lt = t % 128;
  g_d[t] = d; g_a[t] = a;
  wg_sync(wg);
  if (lt == 0) {
    static float A[64][16];
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
    static float D[64][256];
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
  wg_sync(wg);
}
