// small.cu — elementwise ops, RMSNorm and the finite-value check
// (SPEC.md §8). Portable: includes port.cuh only, warp width DP_WARP.
//
// Arithmetic follows cpu-ref: where cpu-ref computes in f64 and rounds
// once (add, rms_norm), so do these kernels (f64 products of f32 values
// are exact, and the final f64 -> bf16/f16 rounding goes through
// round-to-odd f32, a single rounding). silu_mul computes in f32 (its
// tolerance is 1 ulp + 1e-6·rms).
#include "port.cuh"

// Rounds an f64 once to the dtype `dt` (f32/bf16/f16) and stores it:
// round-to-odd to f32 keeps enough bits that the following nearest-even
// rounding to bf16/f16 equals one rounding of the f64.
DP_DEVICE float sm_round_odd_f32(double v) {
  float t = (float)v;
  if ((double)t == v || v != v) return t;
  u32 b = dp_f32_bits(t);
  if (fabs((double)t) > fabs(v)) b -= 1u;  // rounded away from zero: step back
  return dp_bits_f32(b | 1u);
}
DP_DEVICE void sm_store_f64(void* p, i64 i, int dt, double v) {
  if (dt == DP_F32) ((float*)p)[i] = (float)v;
  else dp_store(p, i, dt, sm_round_odd_f32(v));
}

// ---- finite check ------------------------------------------------------------
// Flags the first non-finite element of x[0..n) (dtype dt) in `status`.
extern "C" DP_GLOBAL void sm_check_finite(const void* x, i64 n, int dt, u64* status) {
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float v = dp_load(x, i, dt);
    if (!isfinite(v)) {
      u32 pos = i > 0xffffffffll ? 0xffffffffu : (u32)i;
      dp_flag(status, pos, dp_f32_bits(v));
    }
  }
}

// ---- elementwise -------------------------------------------------------------
// out = a + b, in f64 (exact for two f32 values unless their exponents are
// 29+ apart), rounded once to out's dtype.
extern "C" DP_GLOBAL void sm_add(const void* a, int adt, const void* b, int bdt, void* out,
                                  int odt, i64 n) {
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    double s = (double)dp_load(a, i, adt) + (double)dp_load(b, i, bdt);
    sm_store_f64(out, i, odt, s);
  }
}

// out = silu(gate) · up = gate / (1 + exp(-gate)) · up, in f32.
extern "C" DP_GLOBAL void sm_silu_mul(const void* gate, int gdt, const void* up, int udt,
                                       void* out, int odt, i64 n) {
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    float g = dp_load(gate, i, gdt);
    float u = dp_load(up, i, udt);
    float v = g / (1.0f + expf(-g)) * u;
    dp_store(out, i, odt, v);
  }
}

// ---- RMSNorm -----------------------------------------------------------------
// One block per row (grid-stride over rows); blockDim.x is a multiple of
// DP_WARP, at most 1024. Sum of squares in f64 (each square exact), then
// y = x · (1 / sqrt(ss / dim + eps)) · w in f64, rounded once.
extern "C" DP_GLOBAL void sm_rms_norm(const void* x, int xdt, const void* w, int wdt, void* y,
                                       int ydt, i64 rows, i64 dim, float eps) {
  __shared__ double part[1024 / 32];
  __shared__ double inv_s;
  const int lane = threadIdx.x % DP_WARP, warp = threadIdx.x / DP_WARP;
  const int nwarps = blockDim.x / DP_WARP;
  for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
    i64 base = r * dim;
    double ss = 0.0;
    for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
      double v = (double)dp_load(x, base + j, xdt);
      ss += v * v;
    }
    for (int m = DP_WARP / 2; m > 0; m /= 2) ss += DP_SHFL_XOR(ss, m);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
      double t = 0.0;
      for (int k = 0; k < nwarps; ++k) t += part[k];
      inv_s = 1.0 / sqrt(t / (double)dim + (double)eps);
    }
    __syncthreads();
    double inv = inv_s;
    for (i64 j = threadIdx.x; j < dim; j += blockDim.x) {
      double v = (double)dp_load(x, base + j, xdt) * inv * (double)dp_load(w, j, wdt);
      sm_store_f64(y, base + j, ydt, v);
    }
    __syncthreads();  // part/inv_s are reused by the next row
  }
}
