// mla_decode_check.h — the MLA decode check shared by the harnesses of
// every split kernel with mla_decode_sm90's arguments (mla_sm90.cpp, and
// the ROCm backend's MFMA kernel in ../../rocm/emu/mla_mfma.cpp): a paged
// bf16 cache with NaN in every unused slot and a permuted block table,
// mla_metadata (kernels/mla.cu) for the split plan, the harness's split
// kernel through `split(grid_parts, args)`, mla_combine, and a
// double-precision reference of every output row and LSE. Include after
// emu.h and kernels/mla.cu.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

static float mla_check_bf(unsigned short h) { unsigned b = (unsigned)h << 16; float f; memcpy(&f, &b, 4); return f; }

// The split kernel's arguments (mla_decode_sm90's order).
struct MlaSplitArgs {
  const unsigned short* q;
  const unsigned short* kcache;
  const int* block_table;
  const int* seqlens;
  const int* meta;
  float* opart;
  float* lpart;
  int batch, s_q, h_q, h_kv, num_blocks, max_blocks, parts, causal;
  float scale;
};

// B sequences of `lens` tokens, s_q query rows of h_q heads (one kv head),
// `parts` parts; `split(args)` launches the split kernel.
template <class Split>
static void mla_check(const char* tag, int B, int s_q, int h_q, std::vector<int> lens, int causal, int parts, unsigned seed,
                      Split split) {
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
  int rows = s_q * h_q, slots = B + parts;
  std::vector<int> meta(parts + 1 + B + 1 + 4 * slots, 0);
  std::vector<float> opart((size_t)slots * rows * dv, 0), lpart((size_t)slots * rows, 0);
  std::vector<float> out((size_t)B * rows * dv, 1234), lse((size_t)B * rows, 1234);
  unsigned long long st1 = 0, st2 = 0;
  emu_launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
    mla_metadata(lens.data(), bt.data(), B, max_blocks, bs, num_blocks, parts, 5, meta.data(), &st1, &st2);
  });
  split(MlaSplitArgs{qh.data(), kh.data(), bt.data(), lens.data(), meta.data(), opart.data(), lpart.data(), B, s_q,
                     h_q, h_kv, num_blocks, max_blocks, parts, causal, scale});
  emu_launch({(unsigned)(B * rows + 7) / 8, 1, 1}, {256, 1, 1}, 0, [&] {
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
          for (int c = 0; c < d; ++c) acc += (double)mla_check_bf(qh[orow * d + c]) * mla_check_bf(key(t)[c]);
          sc[t] = acc * scale; m = std::max(m, sc[t]);
        }
        double sum = 0; for (auto x : sc) sum += std::exp(x - m);
        maxl = std::max(maxl, std::fabs(L - (m + std::log(sum))));
        for (int c = 0; c < dv; ++c) {
          double o = 0;
          for (long t = 0; t < vis; ++t) o += std::exp(sc[t] - m) / sum * mla_check_bf(key(t)[c]);
          double e = std::fabs(out[orow * dv + c] - o);
          maxerr = std::max(maxerr, e);
          CHECK(e < 8e-4 + 2.01 / 128 * std::fabs(o), "out b%d s%d h%d c%d %g vs %g", b, s, h, c, out[orow * dv + c], o);
        }
      }
  CHECK(maxl < 1e-4, "lse err %g", maxl);
  printf("%s B=%d s_q=%d h_q=%d causal=%d parts=%d: out max err %.3g, lse max err %.3g\n", tag, B, s_q,
         h_q, causal, parts, maxerr, maxl);
}
