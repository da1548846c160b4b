// mla.cu — MLA decode (split-K over the paged latent cache) and MLA
// prefill, portable (sm_80+, HIP through port.cuh).
//
// Decode runs three kernels:
//   mla_metadata      one CTA: checks cache_seqlens and the used block-table
//                     entries (dp_flag), then writes the split plan (the
//                     rule of src/schedule/mla.rs, transcribed).
//   mla_decode_split  grid (parts, h_kv, row_tiles), blockDim/32 query rows
//                     (s, h) of one kv head a CTA; walks its part's splits, stages
//                     CH keys at a time in shared memory (converted to f32),
//                     online softmax in f32; writes partial out + LSE.
//   mla_combine       one warp per output row: merges the row's splits in
//                     slot order (deterministic), writes out and lse.
// Prefill runs mla_bmm (strided batched matmul, f32 accumulation) and
// mla_prefill_attn (causal attention with a two-part key, one warp per row).
// Row kernels take blockDim.x / 32 rows a CTA on every target (the host
// computes grids without knowing the warp width).
#include "mla.cuh"

// Channels per lane held in registers: head dims up to 1024.
#define MLA_MAXC (1024 / DP_WARP)
// Keys staged in shared memory per step of the split kernel.
#define MLA_CH 8

// ---- metadata ----------------------------------------------------------------
// block 256 threads, grid 1. meta: the i32 buffer (zero-filled scratch).
extern "C" DP_GLOBAL void mla_metadata(const i32* __restrict__ seqlens,
                                       const i32* __restrict__ block_table, int batch,
                                       int max_blocks, int block_size, int num_blocks,
                                       int parts, int overhead, i32* __restrict__ meta,
                                       u64* st_seqlens, u64* st_block_table) {
  const i64 capacity = (i64)max_blocks * block_size;
  // Checks, all threads.
  for (int i = threadIdx.x; i < batch; i += blockDim.x) {
    i32 v = seqlens[i];
    if (v < 0 || (i64)v > capacity) dp_flag(st_seqlens, (u32)i, (u32)v);
  }
  const i64 entries = (i64)batch * max_blocks;
  for (i64 e = threadIdx.x; e < entries; e += blockDim.x) {
    int b = (int)(e / max_blocks);
    i64 j = e % max_blocks;
    i64 len = mla_clamp_len(seqlens[b], capacity);
    i64 used = (len + block_size - 1) / block_size;
    if (j < used) {
      i32 v = block_table[e];
      if (v < 0 || v >= num_blocks) dp_flag(st_block_table, (u32)e, (u32)v);
    }
  }
  if (threadIdx.x != 0) return;
  // The sweep (schedule::mla::plan), one thread.
  i32* part_ptr = meta;
  i32* split_ptr = meta + mla_meta_split_ptr(parts);
  i32* splits = meta + mla_meta_splits(parts, batch);
  const u64 ov = (u64)overhead;
  u64 total = 0;
  for (int i = 0; i < batch; ++i) {
    i64 len = mla_clamp_len(seqlens[i], capacity);
    total += (u64)((len + block_size - 1) / block_size) + ov;
  }
  const u64 payload = (total + (u64)parts - 1) / (u64)parts + ov;
  int i = 0, n = 0;
  i64 cur = 0;
  for (int p = 0; p < parts; ++p) {
    part_ptr[p] = n;
    const bool last = p + 1 == parts;
    u64 cap = payload;
    while (i < batch) {
      if (cur == 0) split_ptr[i] = n;
      i64 nb = (mla_clamp_len(seqlens[i], capacity) + block_size - 1) / block_size;
      u64 rem = (u64)(nb - cur);
      if (last || rem + ov <= cap) {
        if (rem > 0) {
          splits[4 * n] = i;
          splits[4 * n + 1] = (i32)cur;
          splits[4 * n + 2] = (i32)nb;
          ++n;
        }
        cap = cap > rem + ov ? cap - (rem + ov) : 0;
        ++i;
        cur = 0;
      } else {
        if (cap > ov) {
          i64 take = (i64)(cap - ov);
          splits[4 * n] = i;
          splits[4 * n + 1] = (i32)cur;
          splits[4 * n + 2] = (i32)(cur + take);
          ++n;
          cur += take;
        }
        break;
      }
    }
  }
  part_ptr[parts] = n;
  split_ptr[batch] = n;
}

// ---- split kernel --------------------------------------------------------------
// grid (parts, h_kv, row_tiles), block 256 threads; a tile is blockDim.x / 32
// query rows on every target: MLA_RPW rows per warp (1 on 32-wide warps, 2
// on 64-wide wavefronts, with half the channels per lane, so the register
// footprint is the same). Dynamic shared memory MLA_CH·d floats. dtype: the
// code of q and kcache.
#define MLA_RPW (DP_WARP / 32)
extern "C" DP_GLOBAL void mla_decode_split(
    const void* __restrict__ q, const void* __restrict__ kcache,
    const i32* __restrict__ block_table, const i32* __restrict__ seqlens,
    const i32* __restrict__ meta, float* __restrict__ opart, float* __restrict__ lpart,
    int batch, int s_q, int h_q, int h_kv, int d, int dv, int num_blocks, int block_size,
    int max_blocks, int parts, int dtype, int causal, float scale) {
  extern __shared__ float mla_ks[];  // [MLA_CH][d]
  const int lane = threadIdx.x % DP_WARP, warp = threadIdx.x / DP_WARP;
  const int part = blockIdx.x, kvh = blockIdx.y;
  const int group = h_q / h_kv;
  const int rows = s_q * group;
  const int tile_rows = blockDim.x / 32;
  int srow[MLA_RPW], hrow[MLA_RPW];
  bool act[MLA_RPW];
#pragma unroll
  for (int rr = 0; rr < MLA_RPW; ++rr) {
    const int row = blockIdx.z * tile_rows + warp * MLA_RPW + rr;
    act[rr] = row < rows;
    srow[rr] = act[rr] ? row / group : 0;
    hrow[rr] = kvh * group + (act[rr] ? row % group : 0);
  }
  const i64 capacity = (i64)max_blocks * block_size;
  const i32* splits = meta + mla_meta_splits(parts, batch);
  const int k0 = meta[part], k1 = meta[part + 1];

  for (int k = k0; k < k1; ++k) {
    const int b = splits[4 * k];
    const i64 len = mla_clamp_len(seqlens[b], capacity);
    const i64 tok_lo = (i64)splits[4 * k + 1] * block_size;
    i64 tok_hi = (i64)splits[4 * k + 2] * block_size;
    if (tok_hi > len) tok_hi = len;

    float qr[MLA_RPW][MLA_MAXC], o[MLA_RPW][MLA_MAXC];
    float m[MLA_RPW], l[MLA_RPW];
    i64 row_hi[MLA_RPW];  // keys each row uses: [tok_lo, row_hi)
#pragma unroll
    for (int rr = 0; rr < MLA_RPW; ++rr) {
      const i64 vis = mla_visible(len, srow[rr], s_q, causal);
      row_hi[rr] = act[rr] ? (vis < tok_hi ? vis : tok_hi) : 0;
      const i64 qbase = (((i64)b * s_q + srow[rr]) * h_q + hrow[rr]) * d;
#pragma unroll
      for (int j = 0; j < MLA_MAXC; ++j) {
        int c = lane + j * DP_WARP;
        qr[rr][j] = (act[rr] && c < d) ? dp_load(q, qbase + c, dtype) : 0.0f;
        o[rr][j] = 0.0f;
      }
      m[rr] = MLA_NEG_INF;
      l[rr] = 0.0f;
    }

    for (i64 t0 = tok_lo; t0 < tok_hi; t0 += MLA_CH) {
      __syncthreads();  // the previous chunk is consumed
      for (int e = threadIdx.x; e < MLA_CH * d; e += blockDim.x) {
        int i = e / d, c = e % d;
        i64 t = t0 + i;
        float v = 0.0f;
        if (t < tok_hi) {
          i64 off = mla_token_offset(block_table, b, t, block_size, max_blocks, num_blocks,
                                     h_kv, kvh, d);
          if (off >= 0) v = dp_load(kcache, off + c, dtype);
        }
        mla_ks[e] = v;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < MLA_RPW; ++rr) {
        const i64 nv64 = row_hi[rr] - t0;  // uniform over the warp
        const int nvalid = nv64 <= 0 ? 0 : (nv64 > MLA_CH ? MLA_CH : (int)nv64);
        if (nvalid == 0) continue;
        float sc[MLA_CH];
        float mc = MLA_NEG_INF;
#pragma unroll
        for (int i = 0; i < MLA_CH; ++i) {
          float acc = 0.0f;
          if (i < nvalid) {
#pragma unroll
            for (int j = 0; j < MLA_MAXC; ++j) {
              int c = lane + j * DP_WARP;
              if (c < d) acc += qr[rr][j] * mla_ks[i * d + c];
            }
          }
          acc = mla_warp_sum(acc) * scale;  // every lane joins the shuffle
          sc[i] = acc;
          if (i < nvalid) mc = fmaxf(mc, acc);
        }
        const float mn = fmaxf(m[rr], mc);
        const float alpha = (m[rr] == MLA_NEG_INF) ? 0.0f : expf(m[rr] - mn);
        l[rr] *= alpha;
#pragma unroll
        for (int j = 0; j < MLA_MAXC; ++j) o[rr][j] *= alpha;
#pragma unroll
        for (int i = 0; i < MLA_CH; ++i) {
          if (i < nvalid) {
            float p = expf(sc[i] - mn);
            l[rr] += p;
#pragma unroll
            for (int j = 0; j < MLA_MAXC; ++j) {
              int c = lane + j * DP_WARP;
              if (c < dv) o[rr][j] += p * mla_ks[i * d + c];
            }
          }
        }
        m[rr] = mn;
      }
    }
#pragma unroll
    for (int rr = 0; rr < MLA_RPW; ++rr) {
      if (!act[rr]) continue;
      const i64 prow = ((i64)k * s_q + srow[rr]) * h_q + hrow[rr];
      const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
#pragma unroll
      for (int j = 0; j < MLA_MAXC; ++j) {
        int c = lane + j * DP_WARP;
        if (c < dv) opart[prow * dv + c] = o[rr][j] * inv;
      }
      if (lane == 0) lpart[prow] = l[rr] > 0.0f ? m[rr] + logf(l[rr]) : MLA_NEG_INF;
    }
  }
}

// ---- combine ---------------------------------------------------------------------
// grid ceil(batch·s_q·h_q / (blockDim.x/32)), block 256: blockDim.x / 32 rows a
// CTA on every target, one warp per row at a time.
extern "C" DP_GLOBAL void mla_combine(const i32* __restrict__ meta,
                                      const float* __restrict__ opart,
                                      const float* __restrict__ lpart, void* __restrict__ out,
                                      float* __restrict__ lse, int batch, int s_q, int h_q,
                                      int dv, int parts, int out_dtype) {
  const int lane = threadIdx.x % DP_WARP;
  const int nw = blockDim.x / DP_WARP;
  const i64 per_b = (i64)s_q * h_q;
  const i64 r_end0 = ((i64)blockIdx.x + 1) * (blockDim.x / 32), total = (i64)batch * per_b;
  const i64 r_end = r_end0 < total ? r_end0 : total;
  const i32* split_ptr = meta + mla_meta_split_ptr(parts);
  for (i64 r = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / DP_WARP; r < r_end; r += nw) {
    const int b = (int)(r / per_b);
    const i64 rem = r % per_b;  // s·h_q + h
    const int s = (int)(rem / h_q), h = (int)(rem % h_q);
    const int k0 = split_ptr[b], k1 = split_ptr[b + 1];
    float m = MLA_NEG_INF;
    for (int k = k0; k < k1; ++k) m = fmaxf(m, lpart[k * per_b + rem]);
    const i64 obase = r * dv;
    if (m == MLA_NEG_INF) {  // no split, or no visible key
      for (int c = lane; c < dv; c += DP_WARP) dp_store(out, obase + c, out_dtype, 0.0f);
      if (lane == 0) lse[((i64)b * h_q + h) * s_q + s] = MLA_POS_INF;
      continue;
    }
    float sum = 0.0f;
    for (int k = k0; k < k1; ++k) sum += expf(lpart[k * per_b + rem] - m);
    const float inv = 1.0f / sum;
    for (int c = lane; c < dv; c += DP_WARP) {
      float acc = 0.0f;
      for (int k = k0; k < k1; ++k) {
        float w = expf(lpart[k * per_b + rem] - m) * inv;
        if (w != 0.0f) acc += w * opart[(k * per_b + rem) * dv + c];
      }
      dp_store(out, obase + c, out_dtype, acc);
    }
    if (lane == 0) lse[((i64)b * h_q + h) * s_q + s] = m + logf(sum);
  }
}

// ---- prefill -------------------------------------------------------------------------
// d[z, i, j] = Σ_l a[z, i, l] · b[z, l, j] over strided views (element
// strides, base offsets included in the pointers' element offsets).
// grid (ceil(I·J / 256), Z), block 256; f32 accumulation, one rounding.
extern "C" DP_GLOBAL void mla_bmm(const void* __restrict__ a, int a_dt, i64 a_off, i64 a_z,
                                  i64 a_i, i64 a_l, const void* __restrict__ bm, int b_dt,
                                  i64 b_off, i64 b_z, i64 b_l, i64 b_j, void* __restrict__ dm,
                                  int d_dt, i64 d_z, i64 d_i, i64 d_j, int I, int J, int L) {
  const i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= (i64)I * J) return;
  const i64 z = blockIdx.y;
  const i64 i = e / J, j = e % J;
  float acc = 0.0f;
  const i64 ab = a_off + z * a_z + i * a_i, bb = b_off + z * b_z + j * b_j;
  for (int l = 0; l < L; ++l) acc += dp_load(a, ab + l * a_l, a_dt) * dp_load(bm, bb + l * b_l, b_dt);
  dp_store(dm, z * d_z + i * d_i + j * d_j, d_dt, acc);
}

// Causal attention, query t of T at position S − T + t sees keys [0, S−T+t]:
// score = (q1·k1[s] + q2·k2[s]) · scale, out = Σ p · v[s]. Keys and values
// of head h at k1 + s·k1_s + h·k1_h (k1_h = 0: shared by the heads); k2
// shared [S, d2]. grid ceil(T·H / R), block 32·R threads: R rows a CTA,
// one warp a row at a time. Dynamic shared memory R·(d1 + d2 + dv) floats
// (enough for the blockDim.x / DP_WARP warps): each warp's query and
// accumulator (lane-private channels c ≡ lane mod DP_WARP: no barrier).
extern "C" DP_GLOBAL void mla_prefill_attn(
    const void* __restrict__ q1, int q1_dt, const void* __restrict__ q2, int q2_dt,
    const void* __restrict__ k1, int k1_dt, i64 k1_s, i64 k1_h, const void* __restrict__ k2,
    int k2_dt, const void* __restrict__ v, int v_dt, i64 v_s, i64 v_h, void* __restrict__ out,
    int out_dt, int T, int S, int H, int d1, int d2, int dv, float scale) {
  extern __shared__ float mla_pa[];
  const int lane = threadIdx.x % DP_WARP, warp = threadIdx.x / DP_WARP;
  const int nw = blockDim.x / DP_WARP;
  float* a1 = mla_pa + (i64)warp * (d1 + d2 + dv);
  float* a2 = a1 + d1;
  float* o = a2 + d2;
  const i64 r_end0 = ((i64)blockIdx.x + 1) * (blockDim.x / 32), total = (i64)T * H;
  const i64 r_end = r_end0 < total ? r_end0 : total;
  for (i64 r = (i64)blockIdx.x * (blockDim.x / 32) + warp; r < r_end; r += nw) {
    const int t = (int)(r / H), h = (int)(r % H);
    for (int c = lane; c < d1; c += DP_WARP) a1[c] = dp_load(q1, r * d1 + c, q1_dt);
    for (int c = lane; c < d2; c += DP_WARP) a2[c] = dp_load(q2, r * d2 + c, q2_dt);
    for (int c = lane; c < dv; c += DP_WARP) o[c] = 0.0f;
    const int last = S - T + t;
    float m = MLA_NEG_INF, l = 0.0f;
    for (int s = 0; s <= last; ++s) {
      float acc = 0.0f;
      const i64 kb = s * k1_s + h * k1_h, k2b = (i64)s * d2;
      for (int c = lane; c < d1; c += DP_WARP) acc += a1[c] * dp_load(k1, kb + c, k1_dt);
      for (int c = lane; c < d2; c += DP_WARP) acc += a2[c] * dp_load(k2, k2b + c, k2_dt);
      const float sc = mla_warp_sum(acc) * scale;
      const float mn = fmaxf(m, sc);
      const float alpha = expf(m - mn);  // m = -inf: 0
      const float p = expf(sc - mn);
      l = l * alpha + p;
      const i64 vb = s * v_s + h * v_h;
      for (int c = lane; c < dv; c += DP_WARP)
        o[c] = o[c] * alpha + p * dp_load(v, vb + c, v_dt);
      m = mn;
    }
    const float inv = 1.0f / l;  // l ≥ 1: the row sees at least key 0
    for (int c = lane; c < dv; c += DP_WARP) dp_store(out, r * dv + c, out_dt, o[c] * inv);
  }
}
