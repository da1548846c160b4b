// small_ops.cpp — runs the small kernels (kernels/small.cu: add, silu_mul,
// rms_norm, check_finite; rows.cu: check_index, embedding, copy_window,
// gather_rows, reduce_rows; gate.cu: moe_gate; layout.cu: dispatch layout), included
// unchanged, on the CPU through emu.h against independent references: exact
// encodings (cpu-ref's f64 rounding) where the op is exact, ulp bounds where
// it is not; ties in the gate (equal scores across experts and groups),
// out-of-range and negative indices (skipped and flagged at the first bad
// flat position), NaN/inf detection, several dtypes and index widths.
// Run by tests/emulate.rs; by hand:
//   g++ -std=c++20 -O1 -pthread backends/cuda/emu/small_ops.cpp -o /tmp/o && /tmp/o
// (add -DDP_HIP for 64-wide wavefronts). -DEMU_MUTATE=1 shifts every
// flagged index by one (a kernel-level bug through port.cuh's dp_flag) and
// -DEMU_MUTATE=2 flips one bit of one add result, -DEMU_MUTATE=3 drops
// small.cu's __syncthreads (a race in rms_norm's block reduction, which the
// fiber order exposes): each must make it fail.
#include "emu.h"
#include "../kernels/port.cuh"
#if EMU_MUTATE == 1
#define dp_flag(s, i, v) (dp_flag)((s), (u32)(i) + 1u, (v))
#endif
#if EMU_MUTATE == 3
#define __syncthreads() ((void)0)
#endif
#include "../kernels/small.cu"  // static __shared__ arrays
#undef __syncthreads
#include "../kernels/rows.cu"
#include "../kernels/layout.cu"
#include "extern_shared.h"      // gate.cu's extern __shared__ gt_smem
#include "../kernels/gate.cu"
EMU_DYN_SMEM(double, gt_smem);
#include <algorithm>
#include <cstdio>
#include <random>
#define checks emu_checks
#define fails emu_fails
// As gate_smem in ops/small.rs.
static size_t gate_smem(int experts, int n_group) { return (size_t)n_group * 8 + (size_t)experts * 8 + n_group + experts; }
std::mt19937_64 rng(7);
double urand() { return std::uniform_real_distribution<double>(-1, 1)(rng); }
int irand(int n) { return (int)(rng() % (u64)n); }
int esize(int dt) { return dt == DP_F32 ? 4 : dt == DP_E4M3 ? 1 : 2; }
struct Buf {
  std::vector<u8> b; int dt; i64 n;
  Buf(int dt_, i64 n_) : b(n_ * esize(dt_)), dt(dt_), n(n_) {}
  void set(i64 i, float v) { dp_store(b.data(), i, dt, v); }
  float get(i64 i) const { return dp_load(b.data(), i, dt); }
  void* p() { return b.data(); }
};
// cpu-ref's round_f64 (the quantum method), independent of round-to-odd.
float ref_round(int dt, double x) {
  if (dt == DP_F32) return (float)x;
  int man = dt == DP_BF16 ? 7 : 10, min_exp = dt == DP_BF16 ? -126 : -14;
  double mx = dt == DP_BF16 ? 3.3895313892515355e38 : 65504.0;
  if (!isfinite(x) || x == 0) return (float)x;
  double a = fabs(x); u64 bits; memcpy(&bits, &a, 8);
  int e = std::max((int)((bits >> 52) & 0x7ff) - 1023, min_exp);
  double q = ldexp(1.0, e - man);
  double r = nearbyint(a / q) * q;
  if (r > mx) r = INFINITY;
  return x < 0 ? -(float)r : (float)r;
}
u32 enc(int dt, float v) { Buf t(dt, 1); t.set(0, v); u32 r = 0; memcpy(&r, t.b.data(), esize(dt)); return r; }
u32 raw(const Buf& b, i64 i) { u32 r = 0; memcpy(&r, b.b.data() + i * esize(b.dt), esize(b.dt)); return r; }
float val(double scale_exp_range) { return (float)(urand() * ldexp(1.0, irand((int)scale_exp_range) - (int)scale_exp_range / 2)); }
u32 st_index(u64 s) { return ~(u32)(s >> 32); }

void test_add() {
  int combos[][3] = {{DP_BF16, DP_F32, DP_BF16}, {DP_F32, DP_F32, DP_F32}, {DP_F16, DP_BF16, DP_F16}, {DP_BF16, DP_BF16, DP_BF16}};
  for (auto& c : combos) {
    i64 n = 1000; Buf a(c[0], n), b(c[1], n), o(c[2], n);
    for (i64 i = 0; i < n; ++i) { a.set(i, val(40)); b.set(i, i % 7 == 0 ? -a.get(i) * 1.0001f : val(40)); }
    emu_launch(3, 64, 0, [&] { sm_add(a.p(), c[0], b.p(), c[1], o.p(), c[2], n); });
#if EMU_MUTATE == 2
    if (c[2] == DP_BF16) ((u16*)o.p())[n / 2] ^= 1;
#endif
    int bad = 0;
    for (i64 i = 0; i < n; ++i) bad += raw(o, i) != enc(c[2], ref_round(c[2], (double)a.get(i) + (double)b.get(i)));
    CHECK(bad == 0, "add %d %d %d: %d mismatches", c[0], c[1], c[2], bad);
  }
}
void test_silu() {
  for (int dt : {DP_BF16, DP_F32}) {
    i64 n = 777; Buf g(dt, n), u(dt, n), o(dt, n);
    for (i64 i = 0; i < n; ++i) { g.set(i, (float)(urand() * (i % 3 ? 8 : 120))); u.set(i, val(10)); }
    emu_launch(2, 64, 0, [&] { sm_silu_mul(g.p(), dt, u.p(), dt, o.p(), dt, n); });
    double rms = 0; std::vector<double> ex(n);
    for (i64 i = 0; i < n; ++i) { double gg = g.get(i); ex[i] = gg / (1 + exp(-gg)) * u.get(i); rms += ex[i] * ex[i]; }
    rms = sqrt(rms / n);
    int bad = 0;
    for (i64 i = 0; i < n; ++i) {
      double ulp = fabs(ex[i]) * (dt == DP_BF16 ? 0x1p-7 : 0x1p-23);
      bad += fabs(o.get(i) - ex[i]) > ulp + 1e-6 * rms;
    }
    CHECK(bad == 0, "silu dt %d: %d outside 1 ulp + 1e-6 rms", dt, bad);
  }
}
void test_rms_norm(i64 rows = 5, i64 dim = 300, int xdt = DP_BF16, int wdt = DP_F32, unsigned block = 64) {
  Buf x(xdt, rows * dim), w(wdt, dim), y(xdt, rows * dim);
  for (i64 i = 0; i < rows * dim; ++i) x.set(i, i / dim == 1 ? 0.0f : (float)(urand() * 0.003));
  for (i64 j = 0; j < dim; ++j) w.set(j, (float)(1 + urand()));
  float eps = 1e-6f;
  emu_launch(2, block, 0, [&] { sm_rms_norm(x.p(), xdt, w.p(), wdt, y.p(), xdt, rows, dim, eps); });
  int bad = 0, off1 = 0;
  for (i64 r = 0; r < rows; ++r) {
    double ss = 0; for (i64 j = 0; j < dim; ++j) ss += (double)x.get(r * dim + j) * x.get(r * dim + j);
    double inv = 1.0 / sqrt(ss / dim + (double)eps);
    for (i64 j = 0; j < dim; ++j) {
      u32 e = enc(xdt, ref_round(xdt, (double)x.get(r * dim + j) * inv * (double)w.get(j)));
      u32 g = raw(y, r * dim + j);
      if (g != e) { ++off1; bad += (g > e ? g - e : e - g) > 1; }
    }
  }
  CHECK(bad == 0, "rms_norm: %d beyond 1 ulp", bad);
  printf("rms_norm dt %d dim %lld: %d of %lld elements 1 ulp off cpu-ref's f64 (sum order)\n", xdt, (long long)dim, off1, (long long)(rows * dim));
}
struct GateRef { std::vector<i64> idx; std::vector<float> w; };
GateRef gate_ref(const Buf& x, const Buf& w, const std::vector<float>& bias, int T, int dim, int E, int ng, int tg, int topk, float scale) {
  GateRef r; int gsz = E / ng;
  for (int t = 0; t < T; ++t) {
    std::vector<float> s(E), sb(E);
    for (int e = 0; e < E; ++e) {
      double l = 0; for (int j = 0; j < dim; ++j) l += (double)x.get((i64)t * dim + j) * (double)w.get((i64)e * dim + j);
      s[e] = (float)(1.0 / (1.0 + exp(-l))); sb[e] = s[e] + bias[e];
    }
    std::vector<std::pair<double, int>> gs;
    for (int g = 0; g < ng; ++g) {
      std::vector<float> v(sb.begin() + g * gsz, sb.begin() + (g + 1) * gsz);
      std::sort(v.begin(), v.end(), [](float a, float b) { return a > b; });
      gs.push_back({(double)v[0] + (double)v[1], g});
    }
    std::stable_sort(gs.begin(), gs.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
    std::vector<int> kept;
    for (int i = 0; i < tg; ++i) for (int e = gs[i].second * gsz; e < (gs[i].second + 1) * gsz; ++e) kept.push_back(e);
    std::sort(kept.begin(), kept.end(), [&](int p, int q) { return sb[p] > sb[q] || (sb[p] == sb[q] && p < q); });
    double sum = 0; for (int i = 0; i < topk; ++i) sum += s[kept[i]];
    for (int i = 0; i < topk; ++i) { r.idx.push_back(kept[i]); r.w.push_back((float)(s[kept[i]] / (sum + 1e-20) * scale)); }
  }
  return r;
}
void test_gate(bool ties, int idx64, int T = 6, int dim = 96, int E = 64, int ng = 8, int tg = 4, int topk = 8, float scale = 2.5f, int block = 64) {
  Buf x(DP_BF16, T * dim), w(DP_BF16, (i64)E * dim);
  for (i64 i = 0; i < T * dim; ++i) x.set(i, (float)urand());
  for (int e = 0; e < E; ++e) for (int j = 0; j < dim; ++j) {
    int src = ties ? (e / 2) * 2 % 16 : e; if (E < 16) src = e;  // ties: experts repeat across pairs and groups
    w.set((i64)e * dim + j, ties ? w.get((i64)src * dim + j) * (e == src) + (e != src ? w.get((i64)src * dim + j) : 0) : (float)(urand() * 0.2));
    if (ties && e == src) w.set((i64)e * dim + j, (float)(urand() * 0.2));
  }
  std::vector<float> bias(E);
  for (int e = 0; e < E; ++e) bias[e] = ties ? 0.0f : (float)(urand() * 0.01);
  Buf ti(idx64 ? DP_F32 : DP_F32, 0); std::vector<i64> idx(T * topk, -7); std::vector<i32> idx32(T * topk, -7);
  std::vector<float> tw(T * topk);
  emu_launch(4, block, gate_smem(E, ng), [&] { gt_moe_gate(x.p(), DP_BF16, w.p(), DP_BF16, bias.data(), idx64 ? (void*)idx.data() : (void*)idx32.data(), idx64, tw.data(), T, dim, E, ng, tg, topk, scale); });
  GateRef r = gate_ref(x, w, bias, T, dim, E, ng, tg, topk, scale);
  int bad_i = 0, bad_w = 0;
  for (int i = 0; i < T * topk; ++i) {
    i64 got = idx64 ? idx[i] : idx32[i];
    bad_i += got != r.idx[i];
    bad_w += fabs(tw[i] - r.w[i]) > 1e-6;
  }
  CHECK(bad_i == 0 && bad_w == 0, "gate ties=%d idx64=%d: %d idx, %d weight mismatches", ties, idx64, bad_i, bad_w);
}
void test_check_finite() {
  Buf x(DP_BF16, 500); for (int i = 0; i < 500; ++i) x.set(i, 1.0f);
  x.set(300, NAN); x.set(123, -INFINITY); x.set(400, INFINITY);
  u64 st = 0; emu_launch(3, 64, 0, [&] { sm_check_finite(x.p(), 500, DP_BF16, &st); });
  CHECK(st && st_index(st) == 123 && (u32)st == 0xff800000u, "finite: status %llx", st);
  Buf y(DP_F32, 100); for (int i = 0; i < 100; ++i) y.set(i, 2.0f);
  u64 s2 = 0; emu_launch(1, 64, 0, [&] { sm_check_finite(y.p(), 100, DP_F32, &s2); });
  CHECK(s2 == 0, "finite: clean input flagged %llx", s2);
}
void test_embedding() {
  for (int ids64 : {0, 1}) for (int odt : {DP_BF16, DP_F32}) {
    i64 V = 50, dim = 40, T = 12; Buf tab(DP_BF16, V * dim), out(odt, T * dim);
    for (i64 i = 0; i < V * dim; ++i) tab.set(i, (float)urand());
    std::vector<i64> id64(T); std::vector<i32> id32(T);
    for (i64 t = 0; t < T; ++t) { id64[t] = t == 0 ? 0 : t == 1 ? V - 1 : irand((int)V); if (t == 9) id64[t] = V; if (t == 5) id64[t] = -3; id32[t] = (i32)id64[t]; }
    for (i64 i = 0; i < T * dim; ++i) out.set(i, 77.0f);
    u64 st = 0; int same = odt == DP_BF16 ? 2 : 0;
    emu_launch(5, 64, 0, [&] { rw_embedding(tab.p(), DP_BF16, ids64 ? (void*)id64.data() : (void*)id32.data(), ids64, out.p(), odt, same, V, dim, T, &st); });
    int bad = 0;
    for (i64 t = 0; t < T; ++t) for (i64 j = 0; j < dim; ++j) {
      if (t == 5 || t == 9) bad += out.get(t * dim + j) != 77.0f;
      else bad += raw(out, t * dim + j) != enc(odt, tab.get(id64[t] * dim + j));
    }
    CHECK(bad == 0 && st_index(st) == 5 && (u32)st == (u32)-3, "embedding ids64=%d odt=%d: %d bad, status %llx", ids64, odt, bad, st);
  }
}
void test_copy_window() {
  i64 sr = 6, sc = 10, dr = 16, dc = 4; Buf src(DP_F32, sr * sc), dst(DP_BF16, dr * dc);
  for (i64 i = 0; i < sr * sc; ++i) src.set(i, (float)urand() * 3);
  for (i64 i = 0; i < dr * dc; ++i) dst.set(i, -5.0f);
  i64 rows = 3, cols = 3, r0 = 2, c0 = 4, q0 = 4, d0 = 1;
  u8* sp = src.b.data() + (r0 * sc + c0) * 4; u8* dp = dst.b.data() + (q0 * dc + d0) * 2;
  emu_launch(1, 64, 0, [&] { rw_copy_window(sp, DP_F32, sc, dp, DP_BF16, dc, 0, rows, cols); });
  int bad = 0;
  for (i64 r = 0; r < dr; ++r) for (i64 c = 0; c < dc; ++c) {
    bool in = r >= q0 && r < q0 + rows && c >= d0 && c < d0 + cols;
    float e = in ? ref_round(DP_BF16, src.get((r - q0 + r0) * sc + c - d0 + c0)) : -5.0f;
    bad += raw(dst, r * dc + c) != enc(DP_BF16, e);
  }
  CHECK(bad == 0, "copy_window: %d bad", bad);
}
void test_gather() {
  i64 S = 10, rowb = 48, M = 7;
  std::vector<u8> src(S * rowb + 16); for (auto& v : src) v = (u8)rng();
  std::vector<i32> index = {3, -1, 9, 0, 12, 3, -1};
  for (int width : {16, 8, 4, 2, 1}) {
    std::vector<u8> dst(M * rowb + 16, 0xAB);
    u8* s = src.data() + (16 - ((uintptr_t)src.data() & 15)) % 16; u8* d = dst.data() + (16 - ((uintptr_t)dst.data() & 15)) % 16;
    u64 st = 0;
    emu_launch(2, 64, 0, [&] { rw_gather_rows(s, index.data(), 0, d, S, M, rowb / width, width, &st); });
    int bad = 0;
    for (i64 i = 0; i < M; ++i) for (i64 b = 0; b < rowb; ++b) {
      u8 e = (index[i] >= 0 && index[i] < S) ? s[index[i] * rowb + b] : 0;
      bad += d[i * rowb + b] != e;
    }
    CHECK(bad == 0 && st_index(st) == 4 && (u32)st == 12, "gather width %d: %d bad, status %llx", width, bad, st);
  }
}
void test_reduce() {
  for (int odt : {DP_BF16, DP_F32}) for (int weighted : {0, 1}) {
    i64 S = 9, h = 33, N = 5, K = 4; Buf src(DP_BF16, S * h), out(odt, N * h);
    for (i64 i = 0; i < S * h; ++i) src.set(i, (float)(urand() * ldexp(1.0, irand(20) - 10)));
    std::vector<i64> idx(N * K); std::vector<float> w(N * K);
    for (i64 i = 0; i < N * K; ++i) { idx[i] = irand(10) - 1; if (idx[i] == 8 && i % 3 == 0) idx[i] = -1; w[i] = (float)urand(); }
    for (i64 j = 0; j < K; ++j) idx[3 * K + j] = -1;  // an all-skipped row
    idx[2 * K + 1] = 9;  // out of range: flagged
    u64 st = 0;
    emu_launch(3, 64, 0, [&] { rw_reduce_rows(src.p(), DP_BF16, idx.data(), 1, weighted ? w.data() : nullptr, out.p(), odt, S, N, K, h, &st); });
    int bad = 0;
    for (i64 t = 0; t < N; ++t) for (i64 c = 0; c < h; ++c) {
      double acc = 0;
      for (i64 j = 0; j < K; ++j) { i64 r = idx[t * K + j]; if (r < 0 || r >= S) continue; acc += (weighted ? (double)w[t * K + j] : 1.0) * src.get(r * h + c); }
      bad += raw(out, t * h + c) != enc(odt, ref_round(odt, acc));
    }
    CHECK(bad == 0 && st_index(st) == 2 * K + 1 && (u32)st == 9, "reduce odt=%d w=%d: %d bad, status %llx", odt, weighted, bad, st);
  }
}
void test_layout() {
  for (int is64 : {0, 1}) {
    i64 N = 12, k = 4, E = 16, R = 4, epr = E / R;
    std::vector<i64> ids(N * k); std::vector<i32> ids32(N * k);
    for (i64 t = 0; t < N; ++t) for (i64 j = 0; j < k; ++j) ids[t * k + j] = irand(17) - 1;
    for (i64 j = 0; j < k; ++j) ids[(N - 1) * k + j] = -1;
    ids[2 * k + 3] = ids[2 * k + 1];  // a repeated expert counts once
    ids[7 * k + 2] = 16;              // out of range
    for (i64 i = 0; i < N * k; ++i) ids32[i] = (i32)ids[i];
    std::vector<i32> pr(R, 99), pe(E, 99); std::vector<u8> in(N * R, 7); u64 st = 0;
    void* ip = is64 ? (void*)ids.data() : (void*)ids32.data();
    emu_launch(1, 64, 0, [&] { ly_zero(pr.data(), R); });
    emu_launch(1, 64, 0, [&] { ly_zero(pe.data(), E); });
    emu_launch(1, 64, 0, [&] { ly_expert_counts(ip, is64, N, k, E, pe.data(), &st); });
    emu_launch(1, 64, 0, [&] { ly_rank_membership(ip, is64, N, k, E, R, epr, in.data(), pr.data()); });
    std::vector<i32> epr_(R, 0), epe(E, 0); std::vector<u8> ein(N * R, 0);
    for (i64 t = 0; t < N; ++t) {
      std::vector<bool> seen(E, false);
      for (i64 j = 0; j < k; ++j) { i64 x = ids[t * k + j]; if (x >= 0 && x < E) seen[x] = true; }
      for (i64 e = 0; e < E; ++e) if (seen[e]) { epe[e]++; ein[t * R + e / epr] = 1; }
      for (i64 r = 0; r < R; ++r) epr_[r] += ein[t * R + r];
    }
    CHECK(pr == epr_ && pe == epe && in == ein && st_index(st) == 7 * k + 2 && (u32)st == 16, "layout is64=%d status %llx", is64, st);
  }
}
void test_check_index() {
  // [lo, hi) = [0, 10) with -1 allowed: the first bad flat position wins
  // whatever order the threads run in; 64-bit values keep their low 32 bits.
  for (int is64 : {0, 1}) for (int allow : {0, 1}) {
    const i64 n = 300;
    std::vector<i64> v64(n); std::vector<i32> v32(n);
    for (i64 i = 0; i < n; ++i) v64[i] = irand(10);
    v64[20] = -1; v64[150] = 10; v64[250] = -5;
    if (is64) v64[299] = (i64)1 << 40;
    for (i64 i = 0; i < n; ++i) v32[i] = (i32)v64[i];
    u64 st = 0;
    emu_launch(2, 64, 0, [&] { rw_check_index(is64 ? (void*)v64.data() : (void*)v32.data(), is64, n, 0, 10, allow, -1, &st); });
    const u32 first = allow ? 150 : 20, val = allow ? 10u : (u32)-1;
    CHECK(st && st_index(st) == first && (u32)st == val, "check_index is64=%d allow=%d: status %llx", is64, allow, st);
    std::vector<i64> ok(n, 3); u64 s2 = 0;
    emu_launch(1, 64, 0, [&] { rw_check_index(ok.data(), 1, n, 0, 10, 0, 0, &s2); });
    CHECK(s2 == 0, "check_index: clean input flagged %llx", s2);
  }
}
int main() {
  test_add(); test_silu(); test_rms_norm();
  test_rms_norm(3, 7168, DP_F32, DP_BF16, 256); test_rms_norm(4, 1536, DP_F16, DP_F16, 128);
  test_gate(false, 1); test_gate(true, 0); test_gate(true, 1);
  test_gate(false, 1, 3, 512, 256, 8, 4, 8, 2.5f, 256);   // V3 routing shape
  test_gate(false, 0, 5, 64, 64, 1, 1, 8, 1.0f, 64);      // no groups
  test_gate(false, 1, 4, 64, 32, 4, 2, 6, 1.0f, 128);
  test_check_finite(); test_check_index(); test_embedding(); test_copy_window(); test_gather(); test_reduce(); test_layout();
  return emu_summary("small_ops");
}
