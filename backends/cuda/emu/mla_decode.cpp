// mla_decode.cpp — runs mla_metadata, mla_decode_split and mla_combine
// (kernels/mla.cu, included unchanged) on the CPU through emu.h and compares against a
// double-precision reference: NaN in every unread cache slot, permuted block
// table with huge unused entries, varlen with zero lengths, causal, bf16 and
// f32, 1..66 parts, and the deferred index checks; and pins the metadata
// buffer to the one schedule::mla's `device_metadata_matches_plan` expects.
// Run by tests/emulate.rs; by hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/mla_decode.cpp -o /tmp/d && /tmp/d
// (add -DDP_HIP to run the same kernels with 64-wide wavefronts)
#include "extern_shared.h"
#include "../kernels/mla.cu"
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
EMU_DYN_SMEM(float, mla_ks);
EMU_DYN_SMEM(float, mla_pa);  // mla_prefill_attn (not run here)
typedef unsigned long long ull;
static u16 to_bf16(float x) { return dp_f32_to_bf16(x); }

// One decode run; returns status entries.
void run(int B, int s_q, int h_q, int h_kv, int d, int dv, int bs, int max_blocks, int num_blocks,
         std::vector<int> lens, int causal, int sms, int dtype, bool bad, unsigned seed) {
  auto t0 = std::chrono::steady_clock::now();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1, 1);
  int group = h_q / h_kv;
  // cache: NaN everywhere, valid slots filled
  size_t kel = (size_t)num_blocks * bs * h_kv * d;
  std::vector<float> kf(kel, NAN);
  std::vector<int> bt((size_t)B * max_blocks, 1000000000);
  std::vector<int> perm(num_blocks);
  for (int i = 0; i < num_blocks; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  int next = 0;
  for (int b = 0; b < B; ++b) {
    int used = (std::max(lens[b], 0) + bs - 1) / bs;
    if (used > max_blocks) used = max_blocks;
    for (int j = 0; j < used; ++j) bt[b * max_blocks + j] = perm[next++];
    for (int t = 0; t < std::min(lens[b], max_blocks * bs); ++t)
      for (int kh = 0; kh < h_kv; ++kh)
        for (int c = 0; c < d; ++c) {
          float v = U(rng);
          if (dtype == 1) v = dp_bf16_to_f32(to_bf16(v));
          kf[(((size_t)bt[b * max_blocks + t / bs] * bs + t % bs) * h_kv + kh) * d + c] = v;
        }
  }
  std::vector<float> qf((size_t)B * s_q * h_q * d);
  for (auto& v : qf) { v = U(rng); if (dtype == 1) v = dp_bf16_to_f32(to_bf16(v)); }
  if (bad) { bt[1 * max_blocks + 0] = -3; bt[2 * max_blocks + 1] = num_blocks; }
  float scale = 1.0f / std::sqrt((float)d);
  // device buffers
  std::vector<u16> qh(qf.size()), kh(kf.size());
  for (size_t i = 0; i < qf.size(); ++i) qh[i] = to_bf16(qf[i]);
  for (size_t i = 0; i < kf.size(); ++i) kh[i] = to_bf16(kf[i]);
  const void* qp = dtype == 1 ? (const void*)qh.data() : (const void*)qf.data();
  const void* kp = dtype == 1 ? (const void*)kh.data() : (const void*)kf.data();
  // geometry as schedule::mla::decode_geometry
  int rows = s_q * group, tile = 8, row_tiles = (rows + tile - 1) / tile;
  int parts = std::max(1, sms / (h_kv * row_tiles));
  int slots = B + parts;
  std::vector<int> meta(parts + 1 + B + 1 + 4 * slots, 0);
  std::vector<float> opart((size_t)slots * s_q * h_q * dv, 0), lpart((size_t)slots * s_q * h_q, 0);
  std::vector<float> out((size_t)B * s_q * h_q * dv, 12345), lse((size_t)B * h_q * s_q, 12345);
  ull st_len = 0, st_bt = 0;
  emu_launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
    mla_metadata(lens.data(), bt.data(), B, max_blocks, bs, num_blocks, parts, 5, meta.data(),
                 &st_len, &st_bt);
  });
  // metadata invariants: every block once, contiguous
  {
    std::vector<int> nxt(B, 0);
    int n = meta[parts];
    CHECK(meta[parts + 1 + B] == n, "split_ptr end");
    for (int k = 0; k < n; ++k) {
      int* sp = &meta[parts + 1 + B + 1 + 4 * k];
      CHECK(sp[1] == nxt[sp[0]] && sp[2] > sp[1], "split %d contiguous", k);
      nxt[sp[0]] = sp[2];
      CHECK(meta[parts + 1 + sp[0]] <= k && k < meta[parts + 1 + sp[0] + 1], "split_ptr %d", k);
    }
    for (int b = 0; b < B; ++b) {
      long cap = (long)max_blocks * bs;
      long len = std::min<long>(std::max(lens[b], 0), cap);
      CHECK(nxt[b] == (len + bs - 1) / bs, "batch %d covered %d", b, nxt[b]);
    }
  }
  // dynamic shared memory as ops/mla.rs: DECODE_CH (MLA_CH) · d floats
  emu_launch({(unsigned)parts, (unsigned)h_kv, (unsigned)row_tiles}, {256, 1, 1}, MLA_CH * d * 4, [&] {
    mla_decode_split(qp, kp, bt.data(), lens.data(), meta.data(), opart.data(), lpart.data(), B,
                     s_q, h_q, h_kv, d, dv, num_blocks, bs, max_blocks, parts, dtype, causal,
                     scale);
  });
  unsigned rows_total = B * s_q * h_q;
  emu_launch({(rows_total + 7) / 8, 1, 1}, {256, 1, 1}, 0, [&] {
    mla_combine(meta.data(), opart.data(), lpart.data(), out.data(), lse.data(), B, s_q, h_q, dv,
                parts, 0);
  });
  if (bad) {
    CHECK(st_bt != 0 && (unsigned)~(st_bt >> 32) == 1u * max_blocks, "bt flag idx %u",
          (unsigned)~(st_bt >> 32));
    CHECK((int)(unsigned)(st_bt & 0xffffffff) == -3, "bt flag value");
    return;
  }
  long cap = (long)max_blocks * bs;
  bool lens_bad = false;
  for (int b = 0; b < B; ++b) lens_bad |= lens[b] < 0 || lens[b] > cap;
  CHECK((st_len != 0) == lens_bad, "len flag %llx", st_len);
  CHECK(st_bt == 0, "bt flag set");
  if (lens_bad) return;
  // reference in double
  double maxerr = 0;
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < s_q; ++s)
      for (int h = 0; h < h_q; ++h) {
        int kvh = h / group;
        long len = lens[b];
        long vis = causal ? std::max<long>(len - (s_q - 1 - s), 0) : len;
        size_t orow = (((size_t)b * s_q + s) * h_q + h);
        float L = lse[((size_t)b * h_q + h) * s_q + s];
        if (vis == 0) {
          CHECK(std::isinf(L) && L > 0, "lse inf b%d s%d h%d got %g", b, s, h, L);
          for (int c = 0; c < dv; ++c) CHECK(out[orow * dv + c] == 0.0f, "out zero");
          continue;
        }
        std::vector<double> sc(vis);
        double m = -INFINITY;
        for (long t = 0; t < vis; ++t) {
          const float* kr = &kf[(((size_t)bt[b * max_blocks + t / bs] * bs + t % bs) * h_kv + kvh) * d];
          double acc = 0;
          for (int c = 0; c < d; ++c) acc += (double)qf[orow * d + c] * kr[c];
          sc[t] = acc * scale;
          m = std::max(m, sc[t]);
        }
        double sum = 0;
        for (auto x : sc) sum += std::exp(x - m);
        double lref = m + std::log(sum);
        CHECK(std::fabs(L - lref) < 1e-4, "lse b%d s%d h%d %g vs %g", b, s, h, L, lref);
        for (int c = 0; c < dv; ++c) {
          double o = 0;
          for (long t = 0; t < vis; ++t) {
            const float* kr = &kf[(((size_t)bt[b * max_blocks + t / bs] * bs + t % bs) * h_kv + kvh) * d];
            o += std::exp(sc[t] - m) / sum * kr[c];
          }
          double e = std::fabs(out[orow * dv + c] - o);
          maxerr = std::max(maxerr, e);
          CHECK(e < 1e-4, "out b%d s%d h%d c%d %g vs %g", b, s, h, c, out[orow * dv + c], o);
        }
      }
  printf("B=%d s_q=%d h_q=%d h_kv=%d d=%d dv=%d bs=%d parts=%d causal=%d dtype=%d: max err %.3g (%.1f s)\n",
         B, s_q, h_q, h_kv, d, dv, bs, parts, causal, dtype, maxerr,
         std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

// mla_metadata's buffer for the case schedule::mla's test
// `device_metadata_matches_plan` pins (7 batches, block 16, 13 parts): the
// expected vector is copied from that test, which checks it against plan().
void check_meta() {
  std::vector<int> lens = {100, 0, 8200, 1000, 1, 0, 3200};
  int B = 7, parts = 13, max_blocks = 600;
  std::vector<int> bt(B * max_blocks, 0);
  std::vector<int> meta(parts + 1 + B + 1 + 4 * (B + parts), 0);
  unsigned long long s1 = 0, s2 = 0;
  emu_launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
    mla_metadata(lens.data(), bt.data(), B, max_blocks, 16, 1, parts, 5, meta.data(), &s1, &s2);
  });
  const std::vector<int> expect = {
      0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 14, 15, 16, 17, 0, 1, 1, 10, 12, 13, 13, 17, 0, 0, 7, 0,
      2, 0, 46, 0, 2, 46, 109, 0, 2, 109, 172, 0, 2, 172, 235, 0, 2, 235, 298, 0, 2, 298,
      361, 0, 2, 361, 424, 0, 2, 424, 487, 0, 2, 487, 513, 0, 3, 0, 32, 0, 3, 32, 63, 0, 4,
      0, 1, 0, 6, 0, 16, 0, 6, 16, 79, 0, 6, 79, 142, 0, 6, 142, 200, 0, 0, 0, 0, 0, 0, 0, 0,
      0, 0, 0, 0, 0,
  };
  CHECK(meta == expect && s1 == 0 && s2 == 0, "metadata differs from schedule::mla's pinned buffer");
  if (meta != expect) {
    printf("meta:");
    for (int v : meta) printf(" %d,", v);
    printf("\n");
  }
}

int main() {
  check_meta();
  run(4, 2, 16, 2, 72, 40, 16, 8, 40, {0, 1, 37, 128}, 1, 12, 0, false, 1);
  run(4, 2, 16, 2, 72, 40, 16, 8, 40, {0, 1, 37, 128}, 0, 200, 0, false, 2);
  run(3, 1, 8, 1, 576, 512, 64, 4, 16, {200, 64, 5}, 0, 1, 1, false, 3);
  run(5, 4, 3, 1, 64, 64, 16, 6, 40, {3, 96, 0, 17, 50}, 1, 132, 1, false, 4);
  run(3, 1, 8, 1, 64, 64, 16, 4, 16, {20, 30, 40}, 0, 8, 0, true, 5);
  run(2, 1, 8, 1, 64, 64, 16, 4, 16, {65, 10}, 0, 8, 0, false, 6);   // len > capacity: flagged
  run(2, 1, 8, 1, 64, 64, 16, 4, 16, {-1, 10}, 0, 8, 0, false, 7);   // negative len: flagged
  return emu_summary("mla_decode");
}
