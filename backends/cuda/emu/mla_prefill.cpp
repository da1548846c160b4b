// mla_prefill.cpp — runs the prefill launches of ops/mla.rs (naive and
// absorbed: mla_bmm, mla_prefill_attn) and rope_kernel (kernels/mla.cu and
// rope.cu, included unchanged) on the CPU through emu.h against a
// double-precision reference. Run by tests/emulate.rs; by hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/mla_prefill.cpp -o /tmp/p && /tmp/p
// (add -DDP_HIP to run the same kernels with 64-wide wavefronts)
#include "extern_shared.h"
#include "../kernels/mla.cu"
#include "../kernels/rope.cu"
#include <algorithm>
#include <cstdio>
#include <random>
EMU_DYN_SMEM(float, mla_ks);  // mla_decode_split (not run here)
EMU_DYN_SMEM(float, mla_pa);

struct View { const void* p; int dt; long off, sz, s1, s2; };
void bmm(View a, View b, float* d, long dz, long di, long dj, int Z, int I, int J, int L) {
  emu_launch({(unsigned)((I * J + 255) / 256), (unsigned)Z, 1}, {256, 1, 1}, 0, [&] {
    mla_bmm(a.p, a.dt, a.off, a.sz, a.s1, a.s2, b.p, b.dt, b.off, b.sz, b.s1, b.s2, d, 0, dz, di, dj, I, J, L);
  });
}
void attn(const void* q1, const void* q2, const void* k1, long k1s, long k1h, const void* k2,
          const void* v, long vs, long vh, float* out, int T, int S, int H, int d1, int d2, int dv,
          float scale) {
  unsigned nw = std::min<unsigned>(8, 12288 / (d1 + d2 + dv));
  // as ops/mla.rs: nw rows a CTA, nw·(d1 + d2 + dv) floats of shared memory
  emu_launch({(unsigned)((T * H + nw - 1) / nw), 1, 1}, {nw * 32, 1, 1}, nw * (d1 + d2 + dv) * 4, [&] {
    mla_prefill_attn(q1, 0, q2, 0, k1, 0, k1s, k1h, k2, 0, v, 0, vs, vh, out, 0, T, S, H, d1, d2,
                     dv, scale);
  });
}

int main() {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> U(-1, 1);
  int T = 3, S = 7, H = 4, dn = 16, dr = 8, dc = 40, dv = 12;
  auto vec = [&](size_t n) { std::vector<float> v(n); for (auto& x : v) x = U(rng); return v; };
  auto qn = vec(T * H * dn), qp = vec(T * H * dr), lat = vec(S * dc), kpe = vec(S * dr),
       w = vec((size_t)H * (dn + dv) * dc);
  float scale = 0.3f;
  long hs = dn + dv, wrow = dc, head_w = hs * wrow;
  // reference (absorbed == naive in exact arithmetic): naive in double
  std::vector<double> ref(T * H * dv);
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < T; ++t) {
      int pos = S - T + t;
      std::vector<double> sc(pos + 1);
      double m = -INFINITY;
      for (int s = 0; s <= pos; ++s) {
        double acc = 0;
        for (int i = 0; i < dn; ++i) {
          double kn = 0;
          for (int c = 0; c < dc; ++c) kn += (double)w[(h * hs + i) * dc + c] * lat[s * dc + c];
          acc += qn[(t * H + h) * dn + i] * kn;
        }
        for (int i = 0; i < dr; ++i) acc += (double)qp[(t * H + h) * dr + i] * kpe[s * dr + i];
        sc[s] = acc * scale; m = std::max(m, sc[s]);
      }
      double sum = 0; for (auto x : sc) sum += std::exp(x - m);
      for (int i = 0; i < dv; ++i) {
        double o = 0;
        for (int s = 0; s <= pos; ++s) {
          double vv = 0;
          for (int c = 0; c < dc; ++c) vv += (double)w[(h * hs + dn + i) * dc + c] * lat[s * dc + c];
          o += std::exp(sc[s] - m) / sum * vv;
        }
        ref[(t * H + h) * dv + i] = o;
      }
    }
  // naive, as ops/mla.rs launches it
  {
    std::vector<float> kn(S * H * dn), vv(S * H * dv), out(T * H * dv);
    View w_uk{w.data(), 0, 0, head_w, wrow, 1}, lat_t{lat.data(), 0, 0, 0, 1, wrow};
    bmm(w_uk, lat_t, kn.data(), dn, 1, (long)H * dn, H, dn, S, dc);
    View w_uv{w.data(), 0, (long)dn * wrow, head_w, wrow, 1};
    bmm(w_uv, lat_t, vv.data(), dv, 1, (long)H * dv, H, dv, S, dc);
    attn(qn.data(), qp.data(), kn.data(), (long)H * dn, dn, kpe.data(), vv.data(), (long)H * dv, dv,
         out.data(), T, S, H, dn, dr, dv, scale);
    double e = 0; for (size_t i = 0; i < out.size(); ++i) e = std::max(e, std::fabs(out[i] - ref[i]));
    CHECK(e < 1e-5, "naive err %g", e);
    printf("naive max err %.3g\n", e);
  }
  // absorbed
  {
    std::vector<float> ql(T * H * dc), ol(T * H * dc), out(T * H * dv);
    View qn_v{qn.data(), 0, 0, dn, (long)H * dn, 1}, w_uk{w.data(), 0, 0, head_w, wrow, 1};
    bmm(qn_v, w_uk, ql.data(), dc, (long)H * dc, 1, H, T, dc, dn);
    attn(ql.data(), qp.data(), lat.data(), wrow, 0, kpe.data(), lat.data(), wrow, 0, ol.data(), T, S,
         H, dc, dr, dc, scale);
    View ol_v{ol.data(), 0, 0, dc, (long)H * dc, 1}, w_uv_t{w.data(), 0, (long)dn * wrow, head_w, 1, wrow};
    bmm(ol_v, w_uv_t, out.data(), dv, (long)H * dv, 1, H, T, dv, dc);
    double e = 0; for (size_t i = 0; i < out.size(); ++i) e = std::max(e, std::fabs(out[i] - ref[i]));
    CHECK(e < 1e-5, "absorbed err %g", e);
    printf("absorbed max err %.3g\n", e);
  }
  // rope (plain and YaRN), f32, i64 positions, one negative position flagged
  {
    int Tk = 4, heads = 3, d = 64;
    auto x = vec(Tk * heads * d);
    std::vector<long long> pos = {0, 5, 4000, 163839};
    for (int yarn = 0; yarn < 2; ++yarn) {
      double theta = 10000, low = 10, span = 13, factor = 40;
      float cs = yarn ? 1.0f : 1.0f;
      std::vector<float> y(x.size());
      unsigned long long st = 0;
      auto bits = [](double v) { unsigned long long b; memcpy(&b, &v, 8); return b; };
      emu_launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
        rope_kernel(x.data(), pos.data(), y.data(), 0, 1, Tk, heads, d, bits(theta), yarn, bits(low),
                    bits(span), bits(factor), cs, &st);
      });
      double e = 0;
      for (int t = 0; t < Tk; ++t)
        for (int i = 0; i < d / 2; ++i) {
          double f = std::pow(theta, -2.0 * i / d);
          if (yarn) { double r = std::clamp((i - low) / span, 0.0, 1.0); f = f * (1 - r) + f / factor * r; }
          float ang = (float)pos[t] * (float)f;
          double c = std::cos((double)ang), s = std::sin((double)ang);
          for (int h = 0; h < heads; ++h) {
            size_t b = ((size_t)t * heads + h) * d + 2 * i;
            e = std::max(e, std::fabs(y[b] - (x[b] * c - x[b + 1] * s)));
            e = std::max(e, std::fabs(y[b + 1] - (x[b] * s + x[b + 1] * c)));
          }
        }
      CHECK(e < 1e-6 && st == 0, "rope err %g", e);
      printf("rope yarn=%d max err %.3g\n", yarn, e);
    }
    {  // bf16: one correct rounding of the f64 result (round-to-odd via f32)
      std::vector<unsigned short> xb(x.size()), yb(x.size());
      for (size_t i = 0; i < x.size(); ++i) xb[i] = dp_f32_to_bf16(x[i] * 1000.0f);
      unsigned long long st = 0;
      emu_launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
        rope_kernel(xb.data(), pos.data(), yb.data(), 1, 1, Tk, heads, d, 0x40c3880000000000ull, 0,
                    0, 0, 0, 1.0f, &st);
      });
      int bad = 0;
      for (int t = 0; t < Tk; ++t)
        for (int i = 0; i < d / 2; ++i) {
          float f = (float)std::pow(10000.0, -2.0 * i / d);
          float ang = (float)pos[t] * f;
          double c = std::cos((double)ang), sn = std::sin((double)ang);
          for (int h = 0; h < heads; ++h) {
            size_t b = ((size_t)t * heads + h) * d + 2 * i;
            double x0 = dp_bf16_to_f32(xb[b]), x1 = dp_bf16_to_f32(xb[b + 1]);
            double want[2] = {x0 * c - x1 * sn, x0 * sn + x1 * c};
            for (int e = 0; e < 2; ++e) {
              unsigned short got = yb[b + e];
              double err = std::fabs(dp_bf16_to_f32(got) - want[e]);
              // no neighbour of the result may be strictly closer
              for (int dlt : {-1, 1}) {
                double nb = dp_bf16_to_f32((unsigned short)(got + dlt));
                if (std::fabs(nb - want[e]) < err) ++bad;
              }
            }
          }
        }
      CHECK(bad == 0, "rope bf16: %d results not correctly rounded", bad);
      printf("rope bf16: %d misrounded\n", bad);
    }
    pos[2] = -7;
    std::vector<float> y(x.size());
    unsigned long long st = 0;
    emu_launch({1, 1, 1}, {256, 1, 1}, 0, [&] {
      rope_kernel(x.data(), pos.data(), y.data(), 0, 1, Tk, heads, d, 0x40c3880000000000ull, 0, 0, 0, 0, 1.0f, &st);
    });
    CHECK((unsigned)~(st >> 32) == 2u && (int)(st & 0xffffffff) == -7, "rope flag %llx", st);
  }
  return emu_summary("mla_prefill");
}
