// rows.cu — row movement: embedding, copy_window, gather_rows, and the
// weighted row sum reduce_rows (SPEC.md §7, §8). Portable: port.cuh only.
//
// Copies are bit-exact: same-dtype moves copy raw elements, conversions go
// through f32 with one rounding (dp_store). Bad indices are never
// dereferenced: they are flagged in the op's status entry (dp_flag, the
// smallest flat position wins) and their rows are zero-filled or skipped.
#include "port.cuh"

DP_DEVICE i64 rw_index(const void* p, i64 i, int is64) {
  return is64 ? ((const i64*)p)[i] : (i64)((const i32*)p)[i];
}
DP_DEVICE u32 rw_pos(i64 i) { return i > 0xffffffffll ? 0xffffffffu : (u32)i; }

// Copies element `si` of src to element `di` of dst: raw bits when the
// dtypes agree (bytes = element size), else through f32.
DP_DEVICE void rw_move(const void* src, i64 si, int sdt, void* dst, i64 di, int ddt,
                       int same_bytes) {
  switch (same_bytes) {
    case 1: ((u8*)dst)[di] = ((const u8*)src)[si]; break;
    case 2: ((u16*)dst)[di] = ((const u16*)src)[si]; break;
    case 4: ((u32*)dst)[di] = ((const u32*)src)[si]; break;
    case 8: ((u64*)dst)[di] = ((const u64*)src)[si]; break;
    default: dp_store(dst, di, ddt, dp_load(src, si, sdt));
  }
}

// ---- index check -------------------------------------------------------------
// Flags the first entry of index[0..n) outside [lo, hi) that is not `allow`
// (when has_allow). For ops whose main kernel visits no index (empty rows).
extern "C" DP_GLOBAL void rw_check_index(const void* index, int idx64, i64 n, i64 lo, i64 hi,
                                          int has_allow, i64 allow, u64* status) {
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    i64 v = rw_index(index, i, idx64);
    if ((v < lo || v >= hi) && !(has_allow && v == allow)) dp_flag(status, rw_pos(i), (u32)(u64)v);
  }
}

// ---- embedding ----------------------------------------------------------------
// out[t, :] = table[ids[t], :]. Grid-stride over tokens (blockIdx.x) and
// columns (threads). An id outside [0, vocab) is flagged; its row of out is
// left untouched. `same` = element size when table and out share a dtype,
// else 0 (convert through f32).
extern "C" DP_GLOBAL void rw_embedding(const void* table, int tdt, const void* ids, int ids64,
                                        void* out, int odt, int same, i64 vocab, i64 dim,
                                        i64 tokens, u64* status) {
  for (i64 t = blockIdx.x; t < tokens; t += gridDim.x) {
    i64 id = rw_index(ids, t, ids64);
    if (id < 0 || id >= vocab) {
      if (threadIdx.x == 0) dp_flag(status, rw_pos(t), (u32)(u64)id);
      continue;
    }
    for (i64 j = threadIdx.x; j < dim; j += blockDim.x)
      rw_move(table, id * dim + j, tdt, out, t * dim + j, odt, same);
  }
}

// ---- copy_window ---------------------------------------------------------------
// dst[r * dst_ld + c] = src[r * src_ld + c] for r < rows, c < cols; the
// pointers already point at the window origins. Grid-stride over the
// window's flat index.
extern "C" DP_GLOBAL void rw_copy_window(const void* src, int sdt, i64 src_ld, void* dst,
                                          int ddt, i64 dst_ld, int same, i64 rows, i64 cols) {
  i64 n = rows * cols;
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    i64 r = i / cols, c = i - r * cols;
    rw_move(src, r * src_ld + c, sdt, dst, r * dst_ld + c, ddt, same);
  }
}

// ---- gather_rows ---------------------------------------------------------------
// dst[i] = src[index[i]] for rows of `row` units of `width` bytes (16, 8,
// 4, 2 or 1; the host picks the widest that divides the row's bytes and
// both addresses). index −1, or a flagged bad index, writes zeros.
// Grid-stride over the flat unit index of dst.
template <typename U>
DP_DEVICE void rw_gather(const U* src, const void* index, int idx64, U* dst, i64 src_rows,
                         i64 rows, i64 row, u64* status, U zero) {
  i64 n = rows * row;
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    i64 r = i / row, c = i - r * row;
    i64 s = rw_index(index, r, idx64);
    bool ok = s >= 0 && s < src_rows;
    if (!ok && s != -1 && c == 0) dp_flag(status, rw_pos(r), (u32)(u64)s);
    dst[i] = ok ? src[s * row + c] : zero;
  }
}

struct alignas(16) rw_u128 {
  u64 lo, hi;
};

extern "C" DP_GLOBAL void rw_gather_rows(const void* src, const void* index, int idx64,
                                          void* dst, i64 src_rows, i64 rows, i64 row,
                                          int width, u64* status) {
  switch (width) {
    case 16: {
      rw_u128 z = {0, 0};
      rw_gather((const rw_u128*)src, index, idx64, (rw_u128*)dst, src_rows, rows, row, status,
                z);
      break;
    }
    case 8: rw_gather((const u64*)src, index, idx64, (u64*)dst, src_rows, rows, row, status, (u64)0); break;
    case 4: rw_gather((const u32*)src, index, idx64, (u32*)dst, src_rows, rows, row, status, (u32)0); break;
    case 2: rw_gather((const u16*)src, index, idx64, (u16*)dst, src_rows, rows, row, status, (u16)0); break;
    default: rw_gather((const u8*)src, index, idx64, (u8*)dst, src_rows, rows, row, status, (u8)0);
  }
}

// ---- reduce_rows ---------------------------------------------------------------
// out[t, c] = round(Σ_{j<k} w[t,j] · src[index[t,j], c]) with the sum in
// f64 in j order (each product of two f32 values is exact in f64, so this
// is cpu-ref's arithmetic bit for bit), −1 (and flagged bad indices)
// skipped, rounded once to out's dtype (round-to-odd f32, then bf16).
// `weights` may be null (every weight 1). Grid-stride over out's flat index.
DP_DEVICE float rw_round_odd_f32(double v) {
  float t = (float)v;
  if ((double)t == v || v != v) return t;
  u32 b = dp_f32_bits(t);
  if (fabs((double)t) > fabs(v)) b -= 1u;
  return dp_bits_f32(b | 1u);
}

extern "C" DP_GLOBAL void rw_reduce_rows(const void* src, int sdt, const void* index, int idx64,
                                          const float* weights, void* out, int odt,
                                          i64 src_rows, i64 tokens, i64 k, i64 hidden,
                                          u64* status) {
  i64 n = tokens * hidden;
  i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    i64 t = i / hidden, c = i - t * hidden;
    double acc = 0.0;
    for (i64 j = 0; j < k; ++j) {
      i64 s = rw_index(index, t * k + j, idx64);
      if (s < 0 || s >= src_rows) {
        if (s != -1 && c == 0) dp_flag(status, rw_pos(t * k + j), (u32)(u64)s);
        continue;
      }
      double wt = weights ? (double)weights[t * k + j] : 1.0;
      acc += wt * (double)dp_load(src, s * hidden + c, sdt);
    }
    if (odt == DP_F32) ((float*)out)[i] = (float)acc;
    else dp_store(out, i, odt, rw_round_odd_f32(acc));
  }
}
