// mla_decode_mfma.cu — MLA decode's split kernel (SPEC.md §4) on AMD CDNA
// matrix cores, where the CUDA backend uses wgmma (mla_sm90.cu). It
// replaces only the split kernel: the CUDA glue's mla_metadata (checks and
// the split plan) and mla_combine (kernels/mla.cu) run before and after
// it, and it takes mla_decode_sm90's arguments and writes the same
// partials (opart normalised by the split's own sum, lpart its LSE).
// HIP only (hiprtc, -DDP_HIP, wavefront 64).
//
// Shapes (the host checks them, mfma.rs `mla_split`): bf16 q and cache,
// d = 576 (512 latent ‖ 64 rope), dv = 512, pages of 64 tokens, query heads
// per kv head a multiple of 32, q and kcache 16-byte aligned.
//
// Workgroup: 4 wavefronts (256 threads) on a tile of 32 query rows (one s,
// 32 consecutive heads of one kv head). Per step of 32 tokens (half a
// page; LDS holds 64 KiB, too little for a whole 64 x 576 bf16 page next
// to anything else):
//   keys       staged in LDS as bf16 rows (zero past the sequence or for a
//              bad page, so NaN in unused cache slots never reaches P·V);
//   S = Q·Kᵀ   32 x 32, K = 576 split over the wavefronts (wavefront w:
//              channels [144 w, 144 w + 144), 18 MFMAs; A = Q read from
//              global memory, B = the key rows), partials through LDS,
//              summed in wavefront order;
//   softmax    online, in f32, every wavefront for all 32 rows (lane l:
//              row l % 32, 16 of the 32 tokens; the pair l, l ^ 32 shares
//              a row); the rescale factor of each row goes through LDS to
//              the lanes holding that row's accumulators;
//   O += P·V   wavefront w: channels [128 w, 128 w + 128), 4 accumulator
//              tiles of 32 x 32, 4 MFMAs each (P rounded to bf16 as the
//              Hopper kernel and FlashMLA do; the row sum uses f32 P).
// Tokens past the sequence (or past the rows' causal limit, the same for
// the whole tile) are masked to -inf in S.
#include "mla.cuh"
#include "mfma.cuh"

#define MM_D 576
#define MM_DV 512
#define MM_BLK 64
#define MM_STEP 32
#define MM_ROWS 32
#define MM_WAVES 4
#define MM_LDK (MM_D + 4)              // key row pitch in LDS (bf16), 8-byte aligned rows
#define MM_KSTEPS (MM_D / 8 / MM_WAVES)  // 18 MFMAs of S per wavefront

// A bf16 as the short an MFMA operand item holds.
DP_DEVICE short mm_bf(u16 h) { return (short)h; }

// grid (parts, h_kv, row_tiles), block 256, static LDS ~54 KiB.
extern "C" DP_GLOBAL void __launch_bounds__(256)
    mla_decode_mfma(const u16* __restrict__ q, const u16* __restrict__ kcache,
                    const i32* __restrict__ block_table, const i32* __restrict__ seqlens,
                    const i32* __restrict__ meta, float* __restrict__ opart,
                    float* __restrict__ lpart, int batch, int s_q, int h_q, int h_kv,
                    int num_blocks, int max_blocks, int parts, int causal, float scale) {
  __shared__ u16 ks[MM_STEP * MM_LDK];                 // the step's keys
  __shared__ float sp[MM_WAVES][MM_ROWS][MM_STEP + 1];  // S partials per wavefront
  __shared__ float rowv[MM_WAVES][MM_ROWS];             // per-row factor, per wavefront
  const int tid = threadIdx.x;
  const int lane = tid % 64, wave = tid / 64;
  const int li = lane % 32, hi = lane / 32;
  const int part = blockIdx.x, kvh = blockIdx.y;
  const int group = h_q / h_kv;
  const int tile_row0 = blockIdx.z * MM_ROWS;  // row index within the kv head
  const int s = tile_row0 / group;             // one s per tile (group % 32 == 0)
  const int h0 = kvh * group + tile_row0 % group;
  const i64 capacity = (i64)max_blocks * MM_BLK;
  const i32* splits = meta + mla_meta_splits(parts, batch);
  const int k0 = meta[part], k1 = meta[part + 1];

  for (int k = k0; k < k1; ++k) {
    const int b = splits[4 * k];
    const i64 tok_lo = (i64)splits[4 * k + 1] * MM_BLK, tok_hi = (i64)splits[4 * k + 2] * MM_BLK;
    const i64 len = mla_clamp_len(seqlens[b], capacity);
    const i64 vis = mla_visible(len, s, s_q, causal);  // same for all 32 rows
    const i64 lim = vis < len ? vis : len;
    // This lane's query row as the A operand of S (row li of the tile).
    const u16* qrow = q + (((i64)b * s_q + s) * h_q + h0 + li) * MM_D;

    mf_f32x16 o[4];
    for (int nt = 0; nt < 4; ++nt)
      for (int v = 0; v < 16; ++v) o[nt][v] = 0.0f;
    float m_run = MLA_NEG_INF, l_run = 0.0f;  // row li; l_run: this lane's tokens only

    for (i64 t0 = tok_lo; t0 < tok_hi && t0 < lim; t0 += MM_STEP) {  // uniform
      __syncthreads();  // the previous step's keys and partials are consumed
      for (int u = tid; u < MM_STEP * (MM_D / 4); u += 256) {
        const int r = u / (MM_D / 4), c4 = u % (MM_D / 4);
        const i64 tok = t0 + r;
        u64 v = 0;
        if (tok < len) {
          const i32 page = block_table[(i64)b * max_blocks + tok / MM_BLK];
          if (page >= 0 && page < num_blocks)
            v = *(const u64*)(kcache + (((i64)page * MM_BLK + tok % MM_BLK) * h_kv + kvh) * MM_D +
                              c4 * 4);
        }
        *(u64*)(ks + r * MM_LDK + c4 * 4) = v;
      }
      __syncthreads();

      // S partial over this wavefront's channels.
      mf_f32x16 sacc;
      for (int v = 0; v < 16; ++v) sacc[v] = 0.0f;
      for (int kk = 0; kk < MM_KSTEPS; ++kk) {
        const int c = (wave * MM_KSTEPS + kk) * 8 + 4 * hi;
        mf_bf16x4 av, bv;
        for (int i = 0; i < 4; ++i) {
          av[i] = mm_bf(qrow[c + i]);
          bv[i] = mm_bf(ks[li * MM_LDK + c + i]);
        }
        sacc = mf_mfma(av, bv, sacc);
      }
      for (int v = 0; v < 16; ++v) sp[wave][mf_acc_row(v, lane)][li] = sacc[v];
      __syncthreads();

      // Online softmax of row li over tokens 8 j + 4 hi + i (j, i in 0..3).
      float p[16];
      float mx = MLA_NEG_INF;
      for (int j = 0; j < 4; ++j) {
        for (int i = 0; i < 4; ++i) {
          const int t = 8 * j + 4 * hi + i;
          float sv = sp[0][li][t];
          for (int w = 1; w < MM_WAVES; ++w) sv += sp[w][li][t];
          sv = t0 + t < lim ? sv * scale : MLA_NEG_INF;
          p[4 * j + i] = sv;
          mx = fmaxf(mx, sv);
        }
      }
      mx = fmaxf(mx, DP_SHFL_XOR(mx, 32));
      // mn is finite: token t0 < lim is visible to every row of the tile.
      const float mn = fmaxf(m_run, mx);
      const float alpha = m_run == MLA_NEG_INF ? 0.0f : expf(m_run - mn);
      float rs = 0.0f;
      for (int e = 0; e < 16; ++e) {
        p[e] = expf(p[e] - mn);  // -inf → 0
        rs += p[e];
      }
      l_run = l_run * alpha + rs;
      m_run = mn;
      if (hi == 0) rowv[wave][li] = alpha;
      __syncthreads();
      for (int nt = 0; nt < 4; ++nt)
        for (int v = 0; v < 16; ++v) o[nt][v] *= rowv[wave][mf_acc_row(v, lane)];

      // O += P·V: k = tokens, 4 steps of 8; B = V = the keys' first 512 channels.
      for (int j = 0; j < 4; ++j) {
        mf_bf16x4 pa;
        for (int i = 0; i < 4; ++i) pa[i] = (short)dp_f32_to_bf16(p[4 * j + i]);
        for (int nt = 0; nt < 4; ++nt) {
          const int ch = 128 * wave + 32 * nt + li;
          mf_bf16x4 vb;
          for (int i = 0; i < 4; ++i) vb[i] = mm_bf(ks[(8 * j + 4 * hi + i) * MM_LDK + ch]);
          o[nt] = mf_mfma(pa, vb, o[nt]);
        }
      }
    }

    // Finish: the row sums, normalise, write the partial.
    const float lt = l_run + DP_SHFL_XOR(l_run, 32);
    __syncthreads();  // every lane has read rowv
    if (hi == 0) rowv[wave][li] = lt > 0.0f ? 1.0f / lt : 0.0f;
    if (wave == 0 && hi == 0) {
      const i64 prow = ((i64)k * s_q + s) * h_q + h0 + li;
      lpart[prow] = lt > 0.0f ? m_run + logf(lt) : MLA_NEG_INF;
    }
    __syncthreads();
    for (int nt = 0; nt < 4; ++nt) {
      const int c = 128 * wave + 32 * nt + li;
      for (int v = 0; v < 16; ++v) {
        const int r = mf_acc_row(v, lane);
        const i64 prow = ((i64)k * s_q + s) * h_q + h0 + r;
        opart[prow * MM_DV + c] = o[nt][v] * rowv[wave][r];
      }
    }
  }
}
