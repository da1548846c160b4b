// mla_sm90.cu — MLA decode on Hopper (sm_90a): wgmma, bf16 operands, f32
// accumulators. Same split-K metadata (mla_metadata) and the same combine
// (mla_combine) as the portable path in mla.cu; this file replaces only
// the split kernel. The wgmma asm statements list every accumulator
// register (32 and 128 operands): long but mechanical.
//
// Shapes (the host checks them, ops/mla.rs use_sm90): bf16 q and cache,
// d = 576 (512 latent ‖ 64 rope), dv = 512, pages of 64 tokens, query
// heads per kv head a multiple of 64, q and kcache 16-byte aligned.
//
// CTA: 2 warpgroups (256 threads) on a tile of 64 query rows (one s, 64
// consecutive heads of one kv head). Per KV block of 64 tokens:
//   S = Q·Kᵀ        64×64, 36 × wgmma m64n64k16, A = Q (smem), B = K (smem,
//                   K-major); both warpgroups compute S (redundantly) so
//                   each holds P in registers, no exchange needed;
//   online softmax  in the accumulator layout (rows g and g+8 of each warp's
//                   16, reduced over the 4 lanes of a quad);
//   O += P·V        warpgroup w: channels [256w, 256w+256), 4 × wgmma
//                   m64n256k16 with A = P from registers (the accumulator
//                   layout is the A-fragment layout) and B = V = the same K
//                   block in smem read MN-major.
// Shared memory uses the no-swizzle canonical layout: 8×8 core matrices of
// 128 bytes (8 rows × 16 contiguous bytes); core (row group rg, channel
// group cg) of a 64-row tile at ((cg·8) + rg)·128. Descriptors: for the
// K-major reads (Q, K as Sᵀ's B) LBO = 1024 (next channel group), SBO = 128
// (next row group); for V read MN-major (K dim = tokens) LBO = 128 (next
// token group), SBO = 1024 (next channel group).
//
// Tokens past the sequence (or past a row's causal limit) are masked to
// -inf in S; cache slots past the sequence are never read (their smem
// rows are zero-filled, so NaN in unused slots cannot reach P·V).
#include "mla.cuh"

#define MLA90_D 576
#define MLA90_DV 512
#define MLA90_BLK 64
#define MLA90_ROWS 64
#define MLA90_TILE_BYTES (MLA90_ROWS * MLA90_D * 2)  // 73728

DP_DEVICE u32 mla90_smem_addr(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}

// Byte offset of (row, channel) in a 64-row tile, canonical no-swizzle layout.
DP_DEVICE u32 mla90_off(int row, int ch) {
  return (u32)((((ch >> 3) * 8 + (row >> 3)) * 128) + (row & 7) * 16 + (ch & 7) * 2);
}

// A shared-memory matrix descriptor (no swizzle).
DP_DEVICE u64 mla90_desc(u32 addr, u32 lbo, u32 sbo) {
  return (u64)((addr >> 4) & 0x3fffu) | ((u64)((lbo >> 4) & 0x3fffu) << 16) |
         ((u64)((sbo >> 4) & 0x3fffu) << 32);
}

#ifndef MLA_EMU  // the PTX helpers (emu/wgmma_sm90.h models them on the host)
DP_DEVICE void mla90_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DP_DEVICE void mla90_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
DP_DEVICE void mla90_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy smem writes become visible to wgmma (async proxy).
DP_DEVICE void mla90_proxy_fence() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// Two f32 → packed bf16x2 (low half = first), round to nearest even.
DP_DEVICE u32 mla90_pack(float lo, float hi) {
  return (u32)dp_f32_to_bf16(lo) | ((u32)dp_f32_to_bf16(hi) << 16);
}

#ifndef MLA_EMU
// D(64×64, f32) += A(64×16, smem desc) · B(64×16 K-major, smem desc)ᵀ
DP_DEVICE void mla90_wgmma_qk(float* d, u64 da, u64 db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(1));
}

// D(64×256, f32) += A(64×16 bf16, registers) · B(16×256, smem desc, MN-major)
DP_DEVICE void mla90_wgmma_pv(float* d, const u32* a, u64 db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
#endif

// grid (parts, h_kv, row_tiles), block 256, dynamic smem 2·73728 + 8192.
extern "C" __global__ void __launch_bounds__(256, 1)
    mla_decode_sm90(const u16* __restrict__ q, const u16* __restrict__ kcache,
                    const i32* __restrict__ block_table, const i32* __restrict__ seqlens,
                    const i32* __restrict__ meta, float* __restrict__ opart,
                    float* __restrict__ lpart, int batch, int s_q, int h_q, int h_kv,
                    int num_blocks, int max_blocks, int parts, int causal, float scale) {
  extern __shared__ __align__(128) unsigned char mla90_smem[];
  unsigned char* qs = mla90_smem;
  unsigned char* ks = mla90_smem + MLA90_TILE_BYTES;
  const int tid = threadIdx.x;
  const int wg = tid / 128;            // warpgroup: channel half of O
  const int warp = (tid % 128) / 32;   // warp in the warpgroup: rows 16·warp..
  const int lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int part = blockIdx.x, kvh = blockIdx.y;
  const int group = h_q / h_kv;
  const int tile_row0 = blockIdx.z * MLA90_ROWS;  // row index within the kv head
  const int s = tile_row0 / group;                // one s per tile (group % 64 == 0)
  const int h0 = kvh * group + tile_row0 % group;
  const i64 capacity = (i64)max_blocks * MLA90_BLK;
  const i32* splits = meta + mla_meta_splits(parts, batch);
  const int k0 = meta[part], k1 = meta[part + 1];
  const u32 qs_a = mla90_smem_addr(qs), ks_a = mla90_smem_addr(ks);

  for (int k = k0; k < k1; ++k) {
    const int b = splits[4 * k];
    const int blk_lo = splits[4 * k + 1], blk_hi = splits[4 * k + 2];
    const i64 len = mla_clamp_len(seqlens[b], capacity);
    const i64 vis = mla_visible(len, s, s_q, causal);  // same for all 64 rows
    const i64 lim = vis < len ? vis : len;

    __syncthreads();  // smem of the previous split is consumed
    // Q tile: rows = heads h0..h0+63 of (b, s).
    for (int u = tid; u < MLA90_ROWS * (MLA90_D / 8); u += blockDim.x) {
      int r = u / (MLA90_D / 8), cg = u % (MLA90_D / 8);
      const uint4* src =
          (const uint4*)(q + (((i64)b * s_q + s) * h_q + h0 + r) * MLA90_D + cg * 8);
      *(uint4*)(qs + mla90_off(r, cg * 8)) = *src;
    }

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float m[2] = {MLA_NEG_INF, MLA_NEG_INF}, l[2] = {0.0f, 0.0f};

    for (int blk = blk_lo; blk < blk_hi; ++blk) {
      const i64 tok0 = (i64)blk * MLA90_BLK;
      if (tok0 >= lim) break;  // no row sees these keys (uniform)
      __syncthreads();         // the previous block's P·V is done
      const i32 page = block_table[(i64)b * max_blocks + blk];
      const bool page_ok = page >= 0 && page < num_blocks;
      for (int u = tid; u < MLA90_BLK * (MLA90_D / 8); u += blockDim.x) {
        int r = u / (MLA90_D / 8), cg = u % (MLA90_D / 8);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (page_ok && tok0 + r < len) {
          v = *(const uint4*)(kcache + (((i64)page * MLA90_BLK + r) * h_kv + kvh) * MLA90_D +
                              cg * 8);
        }
        *(uint4*)(ks + mla90_off(r, cg * 8)) = v;
      }
      mla90_proxy_fence();
      __syncthreads();

      // S = Q·Kᵀ (64×64), K = 576 in 36 steps of 16 (two channel groups).
      float sc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) sc[i] = 0.0f;
      mla90_fence();
#pragma unroll 4
      for (int kk = 0; kk < MLA90_D / 16; ++kk) {
        u64 da = mla90_desc(qs_a + kk * 2048, 1024, 128);
        u64 db = mla90_desc(ks_a + kk * 2048, 1024, 128);
        mla90_wgmma_qk(sc, da, db);
      }
      mla90_commit();
      mla90_wait0();

      // Mask, scale, online softmax. Thread holds rows g (i = 0) and g+8
      // (i = 1); sc[4j + 2i + e] is column 8j + 2·t4 + e.
      u32 pa[16];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = MLA_NEG_INF;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            i64 tok = tok0 + 8 * j + 2 * t4 + e;
            float v = tok < lim ? sc[4 * j + 2 * i + e] * scale : MLA_NEG_INF;
            sc[4 * j + 2 * i + e] = v;
            mx = fmaxf(mx, v);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[i], mx);
        // mn is finite: block tok0 < lim has at least one visible key.
        const float alpha = m[i] == MLA_NEG_INF ? 0.0f : expf(m[i] - mn);
        float rs = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float p = expf(sc[4 * j + 2 * i + e] - mn);  // -inf → 0
            sc[4 * j + 2 * i + e] = p;
            rs += p;
          }
        }
        l[i] = l[i] * alpha + rs;  // per-thread partial; quad-reduced at the end
        m[i] = mn;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j + 2 * i] *= alpha;
          o[4 * j + 2 * i + 1] *= alpha;
        }
      }
      // P as bf16 A fragments, 4 k-steps of 16 tokens.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[4 * kk + 0] = mla90_pack(sc[8 * kk + 0], sc[8 * kk + 1]);
        pa[4 * kk + 1] = mla90_pack(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[4 * kk + 2] = mla90_pack(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[4 * kk + 3] = mla90_pack(sc[8 * kk + 6], sc[8 * kk + 7]);
      }
      // O[:, 256·wg ..] += P·V, V = the block's first 512 channels.
      mla90_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        u64 db = mla90_desc(ks_a + wg * 32 * 1024 + kk * 256, 128, 1024);
        mla90_wgmma_pv(o, pa + 4 * kk, db);
      }
      mla90_commit();
      mla90_wait0();
    }

    // Finish: reduce l over the quad, normalise, write the partial.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float li = l[i];
      li += __shfl_xor_sync(0xffffffffu, li, 1);
      li += __shfl_xor_sync(0xffffffffu, li, 2);
      const int r = warp * 16 + g + 8 * i;  // row in the tile
      const int h = h0 + r;
      const i64 prow = ((i64)k * s_q + s) * h_q + h;
      const float inv = li > 0.0f ? 1.0f / li : 0.0f;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        const int c = wg * 256 + 8 * j + 2 * t4;
        float2 v = make_float2(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
        *(float2*)(opart + prow * MLA90_DV + c) = v;
      }
      if (wg == 0 && t4 == 0) lpart[prow] = li > 0.0f ? m[i] + logf(li) : MLA_NEG_INF;
    }
  }
}
