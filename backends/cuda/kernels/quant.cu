// quant.cu — act_quant (SPEC.md §2) and weight_dequant, bit-exact with
// the CPU reference (backends/cpu/src/scalar/dense.rs):
//   amax = max(max|x|, 1e-4) (f32), s = amax / fp8_max (f32 division,
//   rounded up to a power of two for UE8M0), q = fp8(x / s) (f32 division,
//   nearest even, saturating);  out = f32(w) * s (f32), rounded once.
#include "gemm.cuh"

#define QUANT_GROUP 128

// One CTA of 128 threads per 128-element group (grid-stride over groups).
// x: [groups_total * 128] in x_dtype; q: same count of FP8 bytes;
// s: [groups_total] f32. status: NaN/inf in x (nullable).
extern "C" DP_GLOBAL void quant_act(const void* x, int x_dtype, u8* q, int fnuz,
                                    float* s, float fp8_max, int ue8m0,
                                    i64 groups_total, u64* status) {
  __shared__ float red[QUANT_GROUP / DP_WARP];
  const int tid = threadIdx.x;
  for (i64 g = blockIdx.x; g < groups_total; g += gridDim.x) {
    const i64 i = g * QUANT_GROUP + tid;
    const float v = dp_load(x, i, x_dtype);
    if (!isfinite(v)) dp_flag(status, gemm_pos32(i), dp_f32_bits(v));
    float a = fabsf(v);
    // max is exact and order-independent: any reduction order gives the
    // reference's amax.
#pragma unroll
    for (int off = DP_WARP / 2; off > 0; off >>= 1) a = fmaxf(a, DP_SHFL_XOR(a, off));
    if (tid % DP_WARP == 0) red[tid / DP_WARP] = a;
    __syncthreads();
    float amax = red[0];
#pragma unroll
    for (int w = 1; w < QUANT_GROUP / DP_WARP; ++w) amax = fmaxf(amax, red[w]);
    amax = fmaxf(amax, 1e-4f);
    float scale = __fdiv_rn(amax, fp8_max);
    if (ue8m0) {
      // Round up to a power of two (formats::ue8m0_round_up; scale is a
      // positive normal here: amax >= 1e-4).
      u32 b = dp_f32_bits(scale);
      if ((b & 0x7fffffu) != 0 && (b >> 23) < 0xffu) scale = dp_bits_f32(((b >> 23) + 1u) << 23);
    }
    if (tid == 0) s[g] = scale;
    const float y = __fdiv_rn(v, scale);
    q[i] = fnuz ? gemm_f32_to_e4m3fnuz(y) : dp_f32_to_e4m3(y);
    __syncthreads();  // red is reused by the next group
  }
}

// out[i, j] = w[i, j] * s[i / 128, j / 128], grid-stride over n * k.
extern "C" DP_GLOBAL void quant_weight_dequant(const u8* w, int fnuz, const float* s,
                                               void* out, int out_dtype, i64 n, i64 k) {
  const i64 kb = (k + 127) / 128;
  const i64 total = n * k;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (i64)gridDim.x * blockDim.x) {
    const i64 r = i / k, c = i - r * k;
    const float v = __fmul_rn(gemm_fp8(w[i], fnuz), s[(r / 128) * kb + c / 128]);
    dp_store(out, i, out_dtype, v);
  }
}
