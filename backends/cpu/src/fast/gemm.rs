//! The FP8 GEMM family (SPEC.md §3, §3.1, §3.2) and the plain GEMM on one
//! packed-panel core.
//!
//! * A rows are decoded once per call to f32 (e4m3 is exact in f32).
//! * B is decoded (through a 256-entry table) into panels of `nr` columns ×
//!   K, `[k][nr]` each. A group that a problem of more than 16 rows uses
//!   keeps its panels with the weight's storage between calls
//!   ([`cached_panels`], within the derived-data budget); past the budget
//!   they are packed once per call for a group that several row blocks of
//!   A use, else decoded on the fly, one 128 × 128 block at a time, by the
//!   only task that reads it.
//! * A task computes a tile of D: at most 128 rows (a multiple of the
//!   register tile's rows: 126 on AVX2; a problem's rows are split into
//!   blocks of equal size, 128 rows as 66 + 62) × 128 columns. For each
//!   128-wide K block the
//!   micro-kernel forms the raw f32 inner sums, which are then promoted in
//!   f32 as DeepGEMM does, `d += sum · (sa[i,kb] · sb[j/128,kb])` — inside
//!   the kernel for a whole register tile ([`Simd::tile_promote`]).
//! * Tasks run on rayon's pool; each encodes its own tile into D's
//!   element type, and the calling thread copies the bytes into place.
//! * With AMX ([`run_amx`]) the FP8 operands are decoded to bf16 (exact)
//!   instead, per call.

use super::simd::{Simd, Tile, MR_MAX, NR_MAX};
use super::{
    bytes_mut_of, bytes_of, current_amx, current_simd, decode_into, encode_into, f32_values,
    fp8_lut, lines, lines_mut, zeroed_lines, Aligned, Lines,
};
use deepport_core::ops::index::{check_range, check_value};
use deepport_core::ops::*;
use deepport_core::Result;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Arc;

/// Rows of A per task.
const MC: usize = 128;
/// Columns of D per task (one `sb` row block).
const NC: usize = QBLOCK;

/// Where B's values come from: e4m3 codes through a table, or f32 values.
#[derive(Clone, Copy)]
enum BSrc<'a> {
    Fp8 {
        codes: &'a [u8],
        lut: &'a [f32; 256],
    },
    F32(&'a [f32]),
}

/// Packs columns `[col0, col0 + cols)` (rows of B) over K `[k0, k0 + kl)`
/// into `out`: `ceil(cols/nr)` panels, panel `p` at `p·pstride`, laid out
/// `[kl][nr]`, zero past column `cols`.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    src: BSrc<'_>,
    k: usize,
    col0: usize,
    cols: usize,
    k0: usize,
    kl: usize,
    nr: usize,
    pstride: usize,
    out: &mut [f32],
) {
    for p in 0..cols.div_ceil(nr) {
        let panel = &mut out[p * pstride..p * pstride + kl * nr];
        // A transpose of [nr][kl] into [kl][nr], 16 K values at a time: the
        // 16 × nr block being written stays in L1.
        for k1 in (0..kl).step_by(16) {
            let k2 = (k1 + 16).min(kl);
            for c in 0..nr {
                let j = p * nr + c;
                let dst = (k1..k2).map(|kk| kk * nr + c);
                if j >= cols {
                    dst.for_each(|i| panel[i] = 0.0);
                    continue;
                }
                let at = (col0 + j) * k + k0;
                match src {
                    BSrc::Fp8 { codes, lut } => {
                        for (i, &code) in dst.zip(&codes[at + k1..at + k2]) {
                            panel[i] = lut[code as usize];
                        }
                    }
                    BSrc::F32(v) => {
                        for (i, &x) in dst.zip(&v[at + k1..at + k2]) {
                            panel[i] = x;
                        }
                    }
                }
            }
        }
    }
}

/// B of one group packed for the whole call: panel `p` at `p·k·nr`, K block
/// `kb` of it at `+ kb·128·nr`.
fn pack_group(src: BSrc<'_>, n: usize, k: usize, nr: usize) -> Lines<f32> {
    let panels = n.div_ceil(nr);
    let mut out = zeroed_lines::<f32>(panels * k * nr);
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(k * nr)
        .enumerate()
        .for_each(|(p, chunk)| {
            let cols = nr.min(n - p * nr);
            pack_b(src, k, p * nr, cols, 0, k, nr, k * nr, chunk);
        });
    out
}

/// Block scales: `None` for the plain GEMM.
struct Scales<'a> {
    /// `[rows of a, kb]`.
    sa: &'a [f32],
    /// `[groups, ceil(n/128), kb]`.
    sb: &'a [f32],
}

/// The operands of one call.
struct Operands<'a> {
    simd: Simd,
    n: usize,
    k: usize,
    /// Decoded A rows, `[rows][k]`, indexed by [`Problem::abuf`].
    a: &'a [f32],
    /// B of each group.
    b: Vec<BSrc<'a>>,
    scales: Option<Scales<'a>>,
    /// B holds OCP e4m3fn codes (decoded with the vectorized exact decode).
    e4m3fn: bool,
    /// A as bf16 pairs for the bf16 dot kernel ([`Simd::bf16_dot`]): row
    /// stride `64·ceil(k/128)`, K block `kb` at `64·kb`, indexed like `a`.
    a_bf: Option<&'a [u32]>,
    /// Per group, B's panels ([`pack_group`]) kept with the B tensor
    /// ([`cached_panels`]); empty or `None` where B is packed per call.
    cached: Vec<Option<Arc<Lines<f32>>>>,
}

impl Operands<'_> {
    /// K block `kb` of decoded A row `ar`: `min(128, k − 128·kb)` values.
    fn a_block(&self, ar: usize, kb: usize) -> &[f32] {
        let k0 = kb * QBLOCK;
        &self.a[ar * self.k + k0..][..QBLOCK.min(self.k - k0)]
    }
}

/// The panels ([`pack_group`]) of each group of B that a problem of more
/// than `min_rows` rows uses, kept with the B tensor's storage
/// ([`crate::HostStorage::derived`]): a weight is packed (FP8 codes
/// decoded to f32) on its first call only, and again after a write. `None`
/// for the other groups, and past the cache's budget (those are packed per
/// call or decoded on the fly, or their rows read in place by
/// [`run_task_swapped`] for a problem of at most 16 rows).
fn cached_panels(
    b: &deepport_core::backend::Tensor,
    srcs: &[BSrc<'_>],
    probs: &[Problem],
    (n, k, nr): (usize, usize, usize),
    min_rows: usize,
) -> Result<Vec<Option<Arc<Lines<f32>>>>> {
    let s = crate::storage(b)?;
    let mut out = vec![None; srcs.len()];
    for p in probs.iter().filter(|p| p.rows > min_rows) {
        let g = p.group;
        if out[g].is_some() {
            continue;
        }
        let key = crate::DerivedKey {
            offset: b.offset_bytes(),
            len: b.nbytes(),
            dtype: b.dtype(),
            kind: "gemm f32 panels",
            params: [g, n, k, nr],
        };
        let bytes = n.div_ceil(nr) * k * nr * std::mem::size_of::<f32>();
        out[g] = s.derived(key, bytes, || pack_group(srcs[g], n, k, nr));
    }
    Ok(out)
}

/// Pairs per 128-wide K block.
const KP: usize = QBLOCK / 2;

/// bf16 bits of an FP8 value of B (exact: e4m3 fits in bf16).
#[inline]
fn bf16_of(src: BSrc<'_>, i: usize) -> u32 {
    match src {
        BSrc::Fp8 { codes, lut } => lut[codes[i] as usize].to_bits() >> 16,
        BSrc::F32(v) => v[i].to_bits() >> 16,
    }
}

/// [`pack_b`] for the bf16 kernel: panels `[ceil(kl/2)][nr]` of pairs
/// (`lo | hi << 16`, a zero high half past an odd `kl`).
#[allow(clippy::too_many_arguments)]
fn pack_b_bf16(
    src: BSrc<'_>,
    k: usize,
    col0: usize,
    cols: usize,
    k0: usize,
    kl: usize,
    nr: usize,
    pstride: usize,
    out: &mut [u32],
) {
    let kp = kl.div_ceil(2);
    for p in 0..cols.div_ceil(nr) {
        let panel = &mut out[p * pstride..p * pstride + kp * nr];
        for c in 0..nr {
            let j = p * nr + c;
            if j < cols {
                let base = (col0 + j) * k + k0;
                for q in 0..kp {
                    let lo = bf16_of(src, base + 2 * q);
                    let hi = if 2 * q + 1 < kl {
                        bf16_of(src, base + 2 * q + 1)
                    } else {
                        0
                    };
                    panel[q * nr + c] = lo | hi << 16;
                }
            } else {
                for q in 0..kp {
                    panel[q * nr + c] = 0;
                }
            }
        }
    }
}

/// B of one group packed once for the bf16 kernel: panel `p` at
/// `p·kbn·KP·nr`, K block `kb` of it at `+ kb·KP·nr`.
fn pack_group_bf16(src: BSrc<'_>, n: usize, k: usize, nr: usize) -> Lines<u32> {
    let kbn = blocks128(k);
    let panels = n.div_ceil(nr);
    let mut out = zeroed_lines::<u32>(panels * kbn * KP * nr);
    if kbn == 0 {
        return out;
    }
    out.par_chunks_mut(kbn * KP * nr)
        .enumerate()
        .for_each(|(p, chunk)| {
            let cols = nr.min(n - p * nr);
            for kb in 0..kbn {
                let k0 = kb * QBLOCK;
                let kl = QBLOCK.min(k - k0);
                let dst = &mut chunk[kb * KP * nr..(kb + 1) * KP * nr];
                pack_b_bf16(src, k, p * nr, cols, k0, kl, nr, KP * nr, dst);
            }
        });
    out
}

/// [`run_task`] on the bf16 dot kernel (FP8 operands, `Simd::Avx512Bf16`).
fn run_task_bf16(
    ops: &Operands<'_>,
    a_bf: &[u32],
    probs: &[Problem],
    t: Task,
    packed: Option<&[u32]>,
) -> Vec<f32> {
    let (simd, n, k) = (ops.simd, ops.n, ops.k);
    let (mr, nr) = (simd.mr(), simd.nr());
    let p = probs[t.prob];
    let r_lo = t.mb * t.mc;
    let rows = t.mc.min(p.rows - r_lo);
    let c_lo = t.nc * NC;
    let cols = NC.min(n - c_lo);
    let panels = cols.div_ceil(nr);
    let kbn = blocks128(k);
    let kstride = kbn * KP;
    let mut c = vec![0f32; rows * NC];
    let zeros = [0u32; KP];
    let mut local = zeroed_lines::<u32>(if packed.is_none() {
        panels * KP * nr
    } else {
        0
    });
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
    for kb in 0..kbn {
        let k0 = kb * QBLOCK;
        let kl = QBLOCK.min(k - k0);
        let kp = kl.div_ceil(2);
        if packed.is_none() {
            pack_b_bf16(
                ops.b[p.group],
                k,
                c_lo,
                cols,
                k0,
                kl,
                nr,
                KP * nr,
                &mut local,
            );
        }
        let sb = ops
            .scales
            .as_ref()
            .map_or(1.0, |s| s.sb[(p.group * blocks128(n) + t.nc) * kbn + kb]);
        for pi in 0..panels {
            let bpanel: &[u32] = match packed {
                Some(all) => {
                    let gp = (c_lo / nr) + pi; // c_lo is a multiple of nr
                    &all[gp * kstride * nr + kb * KP * nr..][..kp * nr]
                }
                None => &local[pi * KP * nr..][..kp * nr],
            };
            let jn = nr.min(cols - pi * nr);
            for r0 in (0..rows).step_by(mr) {
                let a: [&[u32]; MR_MAX] = std::array::from_fn(|r| {
                    if r < mr && r0 + r < rows {
                        let ar = p.abuf + r_lo + r0 + r;
                        &a_bf[ar * kstride + kb * KP..][..kp]
                    } else {
                        &zeros[..kp]
                    }
                });
                simd.tile_bf16(kp, &a, bpanel, &mut tile);
                for (r, trow) in tile.iter().enumerate().take(mr.min(rows - r0)) {
                    let scale = ops
                        .scales
                        .as_ref()
                        .map_or(1.0, |s| s.sa[(p.row0 + r_lo + r0 + r) * kbn + kb] * sb);
                    let dst = &mut c[(r0 + r) * NC + pi * nr..][..jn];
                    for (d, &v) in dst.iter_mut().zip(&trow[..jn]) {
                        *d += v * scale;
                    }
                }
            }
        }
    }
    c
}

/// A rows (f32, exact bf16 values) as bf16 pairs in the layout of
/// [`Operands::a_bf`].
fn a_to_bf16(a: &[f32], k: usize) -> Vec<u32> {
    let kbn = blocks128(k);
    let rows = a.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0u32; rows * kbn * KP];
    if rows == 0 || kbn == 0 {
        return out;
    }
    out.par_chunks_mut(kbn * KP)
        .zip(a.par_chunks(k))
        .for_each(|(dst, src)| {
            for (i, pair) in src.chunks(2).enumerate() {
                let (kb, q) = (i / KP, i % KP);
                let lo = pair[0].to_bits() >> 16;
                let hi = pair.get(1).map_or(0, |v| v.to_bits() >> 16);
                dst[kb * KP + q] = lo | hi << 16;
            }
        });
    out
}

/// Rows `[row0, row0 + rows)` of A (and of D) times B of `group`.
#[derive(Clone, Copy, Debug)]
struct Problem {
    /// First row in the A/sa/D row numbering of the op.
    row0: usize,
    rows: usize,
    group: usize,
    /// First row of this problem in the decoded A buffer.
    abuf: usize,
}

/// One output tile: rows `[mb·mc, (mb+1)·mc)` of a problem (`mc` is
/// [`MC`], or fewer for a plain GEMM of few tiles: see [`run`]) × 128
/// columns.
#[derive(Clone, Copy)]
struct Task {
    prob: usize,
    mb: usize,
    nc: usize,
    mc: usize,
}

/// Computes one tile: `[rows ≤ t.mc][NC]` f32 (row-major, stride NC).
fn run_task(ops: &Operands<'_>, probs: &[Problem], t: Task, packed: Option<&[f32]>) -> Vec<f32> {
    let (simd, n, k) = (ops.simd, ops.n, ops.k);
    let (mr, nr) = (simd.mr(), simd.nr());
    let p = probs[t.prob];
    let r_lo = t.mb * t.mc;
    let rows = t.mc.min(p.rows - r_lo);
    let c_lo = t.nc * NC;
    let cols = NC.min(n - c_lo);
    let panels = cols.div_ceil(nr);
    let kbn = blocks128(k);
    let mut c = vec![0f32; rows * NC];
    if let (None, Some(all)) = (&ops.scales, packed) {
        // A plain GEMM on panels packed for the whole K: one pass of the
        // micro-kernel over all of K per register tile (no 128-K blocks to
        // add up: nothing is promoted).
        let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
        let zeros = vec![0f32; k];
        for pi in 0..panels {
            let gp = (c_lo / nr) + pi; // c_lo is a multiple of nr
            let bpanel = &all[gp * k * nr..][..k * nr];
            let jn = nr.min(cols - pi * nr);
            for r0 in (0..rows).step_by(mr) {
                let a: [&[f32]; MR_MAX] = std::array::from_fn(|r| {
                    if r < mr && r0 + r < rows {
                        let ar = p.abuf + r_lo + r0 + r;
                        &ops.a[ar * k..(ar + 1) * k]
                    } else {
                        &zeros[..]
                    }
                });
                simd.tile(k, &a, bpanel, nr, &mut tile);
                for (r, trow) in tile.iter().enumerate().take(mr.min(rows - r0)) {
                    c[(r0 + r) * NC + pi * nr..][..jn].copy_from_slice(&trow[..jn]);
                }
            }
        }
        return c;
    }
    let zeros = [0f32; QBLOCK];
    let mut local = zeroed_lines::<f32>(if packed.is_none() {
        panels * QBLOCK * nr
    } else {
        0
    });
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
    let mut scale = [0f32; MR_MAX];
    for kb in 0..kbn {
        let k0 = kb * QBLOCK;
        let kl = QBLOCK.min(k - k0);
        if packed.is_none() {
            pack_b(
                ops.b[p.group],
                k,
                c_lo,
                cols,
                k0,
                kl,
                nr,
                QBLOCK * nr,
                &mut local,
            );
        }
        let sb = ops
            .scales
            .as_ref()
            .map(|s| s.sb[(p.group * blocks128(n) + t.nc) * kbn + kb]);
        for pi in 0..panels {
            let bpanel: &[f32] = match packed {
                Some(all) => {
                    let gp = (c_lo / nr) + pi; // c_lo is a multiple of nr
                    &all[gp * k * nr + k0 * nr..][..kl * nr]
                }
                None => &local[pi * QBLOCK * nr..][..kl * nr],
            };
            let jn = nr.min(cols - pi * nr);
            for r0 in (0..rows).step_by(mr) {
                let a: [&[f32]; MR_MAX] = std::array::from_fn(|r| {
                    if r < mr && r0 + r < rows {
                        ops.a_block(p.abuf + r_lo + r0 + r, kb)
                    } else {
                        &zeros[..kl]
                    }
                });
                let rn = mr.min(rows - r0);
                for (r, sc) in scale[..rn].iter_mut().enumerate() {
                    *sc = match (&ops.scales, sb) {
                        (Some(s), Some(sb)) => s.sa[(p.row0 + r_lo + r0 + r) * kbn + kb] * sb,
                        _ => 1.0,
                    };
                }
                if rn == mr && jn == nr {
                    // A whole tile: promoted in the kernel (`v · 1` is `v`
                    // for the plain GEMM).
                    let dst = &mut c[r0 * NC + pi * nr..];
                    simd.tile_promote(kl, &a, bpanel, nr, &scale, dst, NC);
                    continue;
                }
                simd.tile(kl, &a, bpanel, nr, &mut tile);
                for r in 0..rn {
                    let dst = &mut c[(r0 + r) * NC + pi * nr..][..jn];
                    let s = scale[r];
                    if ops.scales.is_some() {
                        for (d, &v) in dst.iter_mut().zip(&tile[r][..jn]) {
                            *d += v * s;
                        }
                    } else {
                        for (d, &v) in dst.iter_mut().zip(&tile[r][..jn]) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
    c
}

/// A problem's rows packed for [`run_task_swapped`], once per call: per K
/// block `kb`, the panel `[128][16]` at `kb·128·16`; zero past the rows
/// and the K tail.
fn pack_a_swapped(ops: &Operands<'_>, p: &Problem) -> Vec<f32> {
    const NR: usize = Simd::NARROW;
    let k = ops.k;
    let mut out = vec![0f32; blocks128(k) * QBLOCK * NR];
    for i in 0..p.rows {
        for kb in 0..blocks128(k) {
            let chunk = ops.a_block(p.abuf + i, kb);
            let panel = &mut out[kb * QBLOCK * NR..][..QBLOCK * NR];
            for (dst, &v) in panel.chunks_exact_mut(NR).zip(chunk) {
                dst[i] = v;
            }
        }
    }
    out
}

/// [`run_task`] for a problem of at most 16 rows (decode, small MoE
/// groups): computed as `Dᵀ = B · Aᵀ` on the 16-column kernel, so that B's
/// rows are the broadcast operand — read in place when B is f32, else
/// decoded contiguously (vectorized) — and A is `apack`
/// ([`pack_a_swapped`]). The sums of each 128-K block are formed by the
/// micro-kernel and added to the output in f32, as in [`run_task`].
fn run_task_swapped(ops: &Operands<'_>, probs: &[Problem], t: Task, apack: &[f32]) -> Vec<f32> {
    const NR: usize = Simd::NARROW;
    let (simd, n, k) = (ops.simd, ops.n, ops.k);
    let mr = simd.mr();
    let p = probs[t.prob];
    let rows = p.rows; // ≤ 16, one row block
    let c_lo = t.nc * NC;
    let cols = NC.min(n - c_lo);
    let kbn = blocks128(k);
    // Dᵀ, `[cols][16]`: a tile's rows are added as contiguous runs.
    let mut ct = vec![0f32; cols * NR];
    let zeros = [0f32; QBLOCK];
    let in_place = matches!(ops.b[p.group], BSrc::F32(_));
    let mut bbuf = vec![0f32; if in_place { 0 } else { cols * QBLOCK }];
    let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
    let mut scale = [1f32; NR];
    for kb in 0..kbn {
        let k0 = kb * QBLOCK;
        let kl = QBLOCK.min(k - k0);
        let apanel = &apack[kb * QBLOCK * NR..][..kl * NR];
        if !in_place {
            for j in 0..cols {
                let at = (c_lo + j) * k + k0;
                let dst = &mut bbuf[j * QBLOCK..j * QBLOCK + kl];
                match ops.b[p.group] {
                    BSrc::Fp8 { codes, .. } if ops.e4m3fn => {
                        simd.decode_e4m3fn(&codes[at..at + kl], dst)
                    }
                    BSrc::Fp8 { codes, lut } => {
                        for (o, &x) in dst.iter_mut().zip(&codes[at..at + kl]) {
                            *o = lut[x as usize];
                        }
                    }
                    BSrc::F32(_) => unreachable!("f32 B is read in place"),
                }
            }
        }
        let b_row = |j: usize| -> &[f32] {
            match ops.b[p.group] {
                BSrc::F32(v) => &v[(c_lo + j) * k + k0..][..kl],
                _ => &bbuf[j * QBLOCK..j * QBLOCK + kl],
            }
        };
        if let Some(s) = &ops.scales {
            // One sb block for the whole chunk (NC = 128, aligned).
            let sb = s.sb[(p.group * blocks128(n) + t.nc) * kbn + kb];
            for (i, sc) in scale[..rows].iter_mut().enumerate() {
                *sc = s.sa[(p.row0 + i) * kbn + kb] * sb;
            }
        }
        for j0 in (0..cols).step_by(mr) {
            let a: [&[f32]; MR_MAX] = std::array::from_fn(|r| {
                if r < mr && j0 + r < cols {
                    b_row(j0 + r)
                } else {
                    &zeros[..kl]
                }
            });
            simd.tile_narrow(kl, &a, apanel, NR, &mut tile);
            for (r, trow) in tile.iter().enumerate().take(mr.min(cols - j0)) {
                let dst = &mut ct[(j0 + r) * NR..][..NR];
                for ((d, &v), &s) in dst.iter_mut().zip(&trow[..NR]).zip(&scale) {
                    *d += v * s;
                }
            }
        }
    }
    let mut c = vec![0f32; rows * NC];
    for (j, col) in ct.chunks_exact(NR).enumerate() {
        for (i, &v) in col[..rows].iter().enumerate() {
            c[i * NC + j] = v;
        }
    }
    c
}

/// Runs every problem and writes its rows of D (`[.., n]` in `dtype`).
/// Rows of D outside every problem are not touched.
fn run(ops: &Operands<'_>, probs: &[Problem], d: &mut [u8], dtype: deepport_core::DType) {
    let (n, k) = (ops.n, ops.k);
    let ncs = n.div_ceil(NC);
    let groups = ops.b.len();
    // A group is packed once when a problem of it spans several row blocks.
    let mut pack = vec![false; groups];
    for p in probs {
        if p.rows > MC {
            pack[p.group] = true;
        }
    }
    // A plain GEMM of few 128-row tiles (the model's linears on a short
    // prompt) is cut into 32-row tiles, so that every thread has several.
    let tiles_of = |mc: usize| -> usize {
        let rows = probs.iter().filter(|p| p.rows > Simd::NARROW);
        rows.map(|p| p.rows.div_ceil(mc) * ncs).sum()
    };
    let plain = ops.scales.is_none() && ops.a_bf.is_none();
    let mc = if plain && tiles_of(MC) < 4 * rayon::current_num_threads() {
        32
    } else {
        MC
    };
    // A multiple of the register tile's rows (126 for AVX2's 6; the bf16
    // tile of `Avx512Bf16` has its set's 8), so that only a problem's last
    // task has a partial register tile.
    let mr = ops.simd.mr();
    let mc = (mc / mr).max(1) * mr;
    let tasks_of = |sel: &dyn Fn(usize) -> bool| -> Vec<Task> {
        let mut v = Vec::new();
        for (i, p) in probs.iter().enumerate() {
            if p.rows == 0 || !sel(p.group) {
                continue;
            }
            // The problem's rows in row blocks of equal size (a multiple
            // of `mr`, at most `mc`): 128 rows are 66 + 62, not 126 + 2.
            let blocks = p.rows.div_ceil(mc);
            let pmc = p.rows.div_ceil(blocks).div_ceil(mr) * mr;
            for mb in 0..p.rows.div_ceil(pmc) {
                for nc in 0..ncs {
                    v.push(Task {
                        prob: i,
                        mb,
                        nc,
                        mc: pmc,
                    });
                }
            }
        }
        v
    };
    let size = dtype.size();
    // A task's tile (`[rows][NC]` f32) encoded by the task itself, in
    // parallel: `[rows][cols]` in `dtype`. What is left for the calling
    // thread is a copy of bytes.
    let encode = |t: &Task, tile: Vec<f32>| -> Vec<u8> {
        let cols = NC.min(n - t.nc * NC);
        let mut out = vec![0u8; tile.len() / NC * cols * size];
        for (row, dst) in tile.chunks_exact(NC).zip(out.chunks_exact_mut(cols * size)) {
            encode_into(dtype, &row[..cols], dst);
        }
        out
    };
    let mut write = |tasks: &[Task], tiles: Vec<Vec<u8>>| {
        for (t, tile) in tasks.iter().zip(tiles) {
            let p = probs[t.prob];
            let c_lo = t.nc * NC;
            let cols = NC.min(n - c_lo);
            for (r, row) in tile.chunks_exact(cols * size).enumerate() {
                let drow = p.row0 + t.mb * t.mc + r;
                let at = (drow * n + c_lo) * size;
                d[at..at + cols * size].copy_from_slice(row);
            }
        }
    };
    let cached = |g: usize| ops.cached.get(g).and_then(|c| c.as_deref());
    // Groups decoded on the fly or cached: all their tiles in one parallel
    // pass.
    let tasks = tasks_of(&|g| !pack[g] || cached(g).is_some());
    if !tasks.is_empty() {
        let apacks: Vec<Option<Vec<f32>>> = probs
            .iter()
            .map(|p| {
                let small = p.rows > 0 && p.rows <= Simd::NARROW;
                (small && cached(p.group).is_none()).then(|| pack_a_swapped(ops, p))
            })
            .collect();
        let tiles: Vec<Vec<u8>> = tasks
            .par_iter()
            .map(|&t| {
                let tile = if let Some(apack) = &apacks[t.prob] {
                    run_task_swapped(ops, probs, t, apack)
                } else if let Some(a_bf) = ops.a_bf {
                    run_task_bf16(ops, a_bf, probs, t, None)
                } else {
                    let panels = cached(probs[t.prob].group).map(|l| &l[..]);
                    run_task(ops, probs, t, panels)
                };
                encode(&t, tile)
            })
            .collect();
        write(&tasks, tiles);
    }
    // Packed groups, one at a time (a packed group is n·k f32).
    for (g, _) in (pack.iter().enumerate()).filter(|&(g, &p)| p && cached(g).is_none()) {
        let tasks = tasks_of(&|x| x == g);
        let tiles: Vec<Vec<u8>> = if let Some(a_bf) = ops.a_bf {
            let panels = pack_group_bf16(ops.b[g], n, k, ops.simd.nr());
            tasks
                .par_iter()
                .map(|&t| encode(&t, run_task_bf16(ops, a_bf, probs, t, Some(&panels))))
                .collect()
        } else {
            let panels = pack_group(ops.b[g], n, k, ops.simd.nr());
            tasks
                .par_iter()
                .map(|&t| encode(&t, run_task(ops, probs, t, Some(&panels))))
                .collect()
        };
        write(&tasks, tiles);
    }
}

/// Decodes the given rows of FP8 A (`[.., k]` codes) into one f32 buffer,
/// problem by problem; sets each problem's `abuf`. OCP e4m3fn (`simd` is
/// `Some`) uses the vectorized exact decode, other formats the table.
fn decode_a(
    codes: &[u8],
    lut: &[f32; 256],
    simd: Option<Simd>,
    k: usize,
    probs: &mut [Problem],
) -> Vec<f32> {
    let mut total = 0;
    for p in probs.iter_mut() {
        p.abuf = total;
        total += p.rows;
    }
    let mut a = vec![0f32; total * k];
    // Row r of the buffer ↔ its source row.
    let mut src = Vec::with_capacity(total);
    for p in probs.iter() {
        src.extend(p.row0..p.row0 + p.rows);
    }
    if k > 0 {
        a.par_chunks_mut(k)
            .zip(src.par_iter())
            .for_each(|(row, &s)| match simd {
                Some(simd) => simd.decode_e4m3fn(&codes[s * k..(s + 1) * k], row),
                None => {
                    for (o, &c) in row.iter_mut().zip(&codes[s * k..(s + 1) * k]) {
                        *o = lut[c as usize];
                    }
                }
            });
    }
    a
}

/// The shared body of the three FP8 GEMMs.
#[allow(clippy::too_many_arguments)]
fn fp8_common(
    a: &deepport_core::backend::Tensor,
    sa: &deepport_core::backend::Tensor,
    b: &deepport_core::backend::Tensor,
    sb: &deepport_core::backend::Tensor,
    d: &mut deepport_core::backend::Tensor,
    dims: &GemmDims,
    mut probs: Vec<Problem>,
) -> Result<()> {
    let (g, n, k) = (dims.groups, dims.n, dims.k);
    let lut = fp8_lut(a.dtype())?;
    let a_codes = bytes_of(a)?;
    let b_codes = bytes_of(b)?;
    let sa_v = f32_values(sa)?;
    let sb_v = f32_values(sb)?;
    let simd = current_simd();
    if current_amx() {
        let lut16 = bf16_lut(&lut);
        let dec = if a.dtype() == deepport_core::DType::F8E4M3 {
            Some(Dec::E4m3fn(simd))
        } else {
            lut16.as_ref().map(Dec::Lut)
        };
        if let Some(dec) = dec {
            let mut a16 = Scratch::take(&A16);
            let used = amx_decode_a(a_codes, dec, k, &mut probs, &mut a16.buf);
            let ops = AmxOps {
                n,
                k,
                a16: lines(&a16.buf, used),
                b: (0..g)
                    .map(|grp| &b_codes[grp * n * k..(grp + 1) * n * k])
                    .collect(),
                dec,
                scales: Some(Scales {
                    sa: &sa_v,
                    sb: &sb_v,
                }),
            };
            let dtype = d.dtype();
            run_amx(&ops, &probs, bytes_mut_of(d)?, dtype);
            return Ok(());
        }
    }
    let fast_decode = (a.dtype() == deepport_core::DType::F8E4M3).then_some(simd);
    let a_f32 = decode_a(a_codes, &lut, fast_decode, k, &mut probs);
    // The bf16 dot kernel serves the problems of more than 16 rows.
    let a_bf = (simd.bf16_dot() && probs.iter().any(|p| p.rows > Simd::NARROW))
        .then(|| a_to_bf16(&a_f32, k));
    let bs: Vec<BSrc<'_>> = (0..g)
        .map(|grp| BSrc::Fp8 {
            codes: &b_codes[grp * n * k..(grp + 1) * n * k],
            lut: &lut,
        })
        .collect();
    // B decoded to f32 panels is kept with the weight for the f32 kernel's
    // problems of more than 16 rows (those of at most 16 decode B's rows
    // on the fly, reading a quarter of the bytes).
    let cached = if a_bf.is_none() {
        cached_panels(b, &bs, &probs, (n, k, simd.nr()), Simd::NARROW)?
    } else {
        Vec::new()
    };
    let ops = Operands {
        simd,
        n,
        k,
        a: &a_f32,
        b: bs,
        e4m3fn: fast_decode.is_some(),
        a_bf: a_bf.as_deref(),
        cached,
        scales: Some(Scales {
            sa: &sa_v,
            sb: &sb_v,
        }),
    };
    let dtype = d.dtype();
    run(&ops, &probs, bytes_mut_of(d)?, dtype);
    Ok(())
}

pub(crate) fn fp8_gemm(op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let probs = vec![Problem {
        row0: 0,
        rows: dims.m,
        group: 0,
        abuf: 0,
    }];
    fp8_common(args.a, args.sa, args.b, args.sb, args.d, dims, probs)
}

pub(crate) fn fp8_grouped_contiguous(op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_contiguous";
    let (args, dims) = op.parts();
    let idx_host = super::super::to_host(args.m_indices)?;
    check_range(OP, "m_indices", &idx_host, 0, dims.groups as i64, Some(-1))?;
    let idx = idx_host.to_i64_vec();
    // Runs of equal group; padding rows (-1) are written as 0, like cpu-ref.
    let mut probs = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let gi = idx[i];
        let mut j = i + 1;
        while j < idx.len() && idx[j] == gi {
            j += 1;
        }
        if let Ok(group) = usize::try_from(gi) {
            probs.push(Problem {
                row0: i,
                rows: j - i,
                group,
                abuf: 0,
            });
        }
        i = j;
    }
    let dtype = args.d.dtype();
    let row_bytes = dims.n * dtype.size();
    {
        let d = bytes_mut_of(args.d)?;
        for (r, &gi) in idx.iter().enumerate() {
            if gi < 0 {
                d[r * row_bytes..(r + 1) * row_bytes].fill(0);
            }
        }
    }
    fp8_common(args.a, args.sa, args.b, args.sb, args.d, dims, probs)
}

pub(crate) fn fp8_grouped_masked(op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "fp8_grouped_masked";
    let (args, dims) = op.parts();
    let masked = super::super::to_host(args.masked_m)?.to_i64_vec();
    for (grp, &v) in masked.iter().enumerate() {
        check_value(OP, "masked_m", &[grp], v, 0, dims.m as i64 + 1)?;
    }
    let probs = masked
        .iter()
        .enumerate()
        .map(|(grp, &rows)| Problem {
            row0: grp * dims.m,
            rows: rows as usize, // checked to lie in [0, m_max]
            group: grp,
            abuf: 0,
        })
        .collect();
    fp8_common(args.a, args.sa, args.b, args.sb, args.d, dims, probs)
}

/// The smallest biased exponent field of the nonzero values (0 for a
/// subnormal; 255 when all are zero).
fn min_bf16_exponent(v: impl Iterator<Item = u16>) -> i32 {
    v.filter(|&x| x & 0x7fff != 0)
        .map(|x| ((x >> 7) & 0xff) as i32)
        .min()
        .unwrap_or(255)
}

/// The plain GEMMs on AMX when both operands are bf16 (exact products):
/// `Ok(false)` when not taken.
fn plain_amx(
    a: &deepport_core::backend::Tensor,
    b: &deepport_core::backend::Tensor,
    d: &mut deepport_core::backend::Tensor,
    dims: &GemmDims,
    probs: &[Problem],
) -> Result<bool> {
    use deepport_core::DType::BF16;
    if !(current_amx() && a.dtype() == BF16 && b.dtype() == BF16) {
        return Ok(false);
    }
    let (g, n, k) = (dims.groups, dims.n, dims.k);
    let mut probs = probs.to_vec();
    let mut a16 = Scratch::take(&A16);
    let used = amx_decode_a(bytes_of(a)?, Dec::Bf16, k, &mut probs, &mut a16.buf);
    let a16 = lines(&a16.buf, used);
    let bb = bytes_of(b)?;
    // AMX reads bf16 subnormals as zero and flushes subnormal f32 results:
    // taken only when every nonzero product is at least 2^-100 (then no
    // partial sum of bf16 products, whose ulp is ≥ 2^-115, is subnormal).
    let ea = min_bf16_exponent(a16.iter().copied());
    let eb = min_bf16_exponent(bb.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
    if ea + eb - 2 * 127 < -100 {
        return Ok(false);
    }
    let ops = AmxOps {
        n,
        k,
        a16,
        b: (0..g)
            .map(|grp| &bb[grp * n * k * 2..(grp + 1) * n * k * 2])
            .collect(),
        dec: Dec::Bf16,
        scales: None,
    };
    let dtype = d.dtype();
    run_amx(&ops, &probs, bytes_mut_of(d)?, dtype);
    Ok(true)
}

pub(crate) fn gemm(op: &mut Checked<Gemm<'_>>) -> Result<()> {
    let (args, dims) = op.parts();
    let (m, n, k) = (dims.m, dims.n, dims.k);
    let whole = [Problem {
        row0: 0,
        rows: m,
        group: 0,
        abuf: 0,
    }];
    if plain_amx(args.a, args.b, args.d, dims, &whole)? {
        return Ok(());
    }
    let a = f32_values(args.a)?;
    let b = f32_values(args.b)?;
    let probs = [Problem {
        row0: 0,
        rows: m,
        group: 0,
        abuf: 0,
    }];
    let simd = current_simd();
    let srcs = vec![BSrc::F32(&b)];
    let ops = Operands {
        simd,
        n,
        k,
        a: &a,
        cached: cached_panels(args.b, &srcs, &probs, (n, k, simd.nr()), 0)?,
        b: srcs,
        scales: None,
        e4m3fn: false,
        a_bf: None,
    };
    let dtype = args.d.dtype();
    run(&ops, &probs, bytes_mut_of(args.d)?, dtype);
    Ok(())
}

/// B of the groups some problem uses as f32 (`[n, k]` each, empty for an
/// unused group): f32 weights read in place, others decoded in parallel.
fn decode_used_groups<'t>(
    b: &'t deepport_core::backend::Tensor,
    groups: usize,
    n: usize,
    k: usize,
    probs: &[Problem],
) -> Result<Vec<Cow<'t, [f32]>>> {
    if b.dtype() == deepport_core::DType::F32 {
        if let Cow::Borrowed(all) = f32_values(b)? {
            return Ok((0..groups)
                .map(|grp| Cow::Borrowed(&all[grp * n * k..(grp + 1) * n * k]))
                .collect());
        }
    }
    let bytes = bytes_of(b)?;
    let dtype = b.dtype();
    let len = n * k * dtype.size();
    let mut used = vec![false; groups];
    for p in probs.iter().filter(|p| p.rows > 0) {
        used[p.group] = true;
    }
    Ok(used
        .par_iter()
        .enumerate()
        .map(|(grp, &u)| {
            if !u {
                return Cow::Owned(Vec::new());
            }
            let mut v = vec![0f32; n * k];
            decode_into(dtype, &bytes[grp * len..(grp + 1) * len], &mut v);
            Cow::Owned(v)
        })
        .collect())
}

/// The shared body of the grouped plain GEMMs: A rows `[.., k]` (f32 or
/// bf16, decoded once), each problem's rows against its group's B.
fn grouped_common(
    a: &deepport_core::backend::Tensor,
    b: &deepport_core::backend::Tensor,
    d: &mut deepport_core::backend::Tensor,
    dims: &GemmDims,
    probs: &[Problem],
) -> Result<()> {
    if plain_amx(a, b, d, dims, probs)? {
        return Ok(());
    }
    let (g, n, k) = (dims.groups, dims.n, dims.k);
    let a_v = f32_values(a)?;
    let b_groups = decode_used_groups(b, g, n, k, probs)?;
    let simd = current_simd();
    let srcs: Vec<BSrc<'_>> = b_groups.iter().map(|v| BSrc::F32(v)).collect();
    let ops = Operands {
        simd,
        n,
        k,
        a: &a_v,
        cached: cached_panels(b, &srcs, probs, (n, k, simd.nr()), 0)?,
        b: srcs,
        scales: None,
        e4m3fn: false,
        a_bf: None,
    };
    let dtype = d.dtype();
    run(&ops, probs, bytes_mut_of(d)?, dtype);
    Ok(())
}

/// Splits `m_indices` into runs of equal group (A rows indexed directly:
/// `abuf = row0`); padding runs (-1) are left out.
fn contiguous_runs(idx: &[i64]) -> Vec<Problem> {
    let mut probs = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let gi = idx[i];
        let mut j = i + 1;
        while j < idx.len() && idx[j] == gi {
            j += 1;
        }
        if let Ok(group) = usize::try_from(gi) {
            probs.push(Problem {
                row0: i,
                rows: j - i,
                group,
                abuf: i,
            });
        }
        i = j;
    }
    probs
}

pub(crate) fn gemm_grouped_contiguous(op: &mut Checked<GemmGroupedContiguous<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_contiguous";
    let (args, dims) = op.parts();
    let idx_host = super::super::to_host(args.m_indices)?;
    check_range(OP, "m_indices", &idx_host, 0, dims.groups as i64, Some(-1))?;
    let idx = idx_host.to_i64_vec();
    let probs = contiguous_runs(&idx);
    // Padding rows (-1): unspecified; written as 0, like cpu-ref.
    let row_bytes = dims.n * args.d.dtype().size();
    {
        let d = bytes_mut_of(args.d)?;
        for (r, &gi) in idx.iter().enumerate() {
            if gi < 0 {
                d[r * row_bytes..(r + 1) * row_bytes].fill(0);
            }
        }
    }
    grouped_common(args.a, args.b, args.d, dims, &probs)
}

pub(crate) fn gemm_grouped_masked(op: &mut Checked<GemmGroupedMasked<'_>>) -> Result<()> {
    const OP: &str = "gemm_grouped_masked";
    let (args, dims) = op.parts();
    let masked = super::super::to_host(args.masked_m)?.to_i64_vec();
    for (grp, &v) in masked.iter().enumerate() {
        check_value(OP, "masked_m", &[grp], v, 0, dims.m as i64 + 1)?;
    }
    // Rows at or past masked_m[g] are not touched.
    let probs: Vec<Problem> = masked
        .iter()
        .enumerate()
        .map(|(grp, &rows)| Problem {
            row0: grp * dims.m,
            rows: rows as usize, // checked to lie in [0, m_max]
            group: grp,
            abuf: grp * dims.m,
        })
        .collect();
    grouped_common(args.a, args.b, args.d, dims, &probs)
}

// ---- AMX-BF16 ------------------------------------------------------------------
//
// Operands become bf16 exactly (e4m3/e4m3fnuz values are bf16 values; bf16
// operands are copied), `fast::amx` forms the raw f32 sums of one 32 × 32
// block per 128-wide K block, and the promotion is the f32 code of the
// other paths: `d += sum · (sa · sb)` (plain GEMMs: `d += sum`).
//
// * A problem of more than 128 rows multiplies its A rows (bf16,
//   row-major, K padded to a multiple of 128 with zeros) by B of its group
//   packed once per call into VNNI panels of 32 columns (`[kb][64 pairs][32]`).
// * A problem of at most 128 rows (decode, small MoE groups) computes
//   `Dᵀ = B · Aᵀ`: B's rows are decoded straight into a 128 × 128 bf16
//   scratch per K block (no transposition of the big operand), A is the
//   VNNI panel (its rows padded to a multiple of 32, packed once).

use super::amx::{self, Amx, Block};

/// How operand bytes become bf16 bits.
#[derive(Clone, Copy)]
enum Dec<'a> {
    /// OCP e4m3fn codes, vectorized bit decode.
    E4m3fn(Simd),
    /// Other 8-bit formats through a table (every entry exact in bf16).
    Lut(&'a [u16; 256]),
    /// bf16 values (little-endian pairs of bytes).
    Bf16,
}

impl Dec<'_> {
    /// Bytes per element.
    fn size(self) -> usize {
        match self {
            Dec::Bf16 => 2,
            _ => 1,
        }
    }
    /// Decodes `out.len() / ld` rows of `kl` values, row `i` from
    /// `bytes[i·stride..]` (in bytes) into `out[i·ld..][..kl]`, and zeroes
    /// the rest of each row.
    fn decode_rows(self, bytes: &[u8], stride: usize, kl: usize, out: &mut [u16], ld: usize) {
        if let Dec::E4m3fn(simd) = self {
            return simd.decode_e4m3fn_bf16_rows(bytes, stride, kl, out, ld);
        }
        let es = self.size();
        for (i, row) in out.chunks_exact_mut(ld.max(1)).enumerate() {
            self.decode(&bytes[i * stride..][..kl * es], &mut row[..kl]);
            row[kl..].fill(0);
        }
    }

    /// Decodes `out.len()` values from `bytes`.
    fn decode(self, bytes: &[u8], out: &mut [u16]) {
        match self {
            Dec::E4m3fn(simd) => simd.decode_e4m3fn_bf16(bytes, out),
            Dec::Lut(t) => {
                for (o, &c) in out.iter_mut().zip(bytes) {
                    *o = t[c as usize];
                }
            }
            Dec::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u16::from_le_bytes([c[0], c[1]]);
                }
            }
        }
    }
}

/// The 8-bit format's values as bf16 bits, or `None` if one is not exactly
/// a bf16 value (then AMX is not used).
fn bf16_lut(lut: &[f32; 256]) -> Option<[u16; 256]> {
    let mut t = [0u16; 256];
    for (o, &v) in t.iter_mut().zip(lut) {
        let b = (v.to_bits() >> 16) as u16;
        let back = f32::from_bits((b as u32) << 16);
        if !(back.to_bits() == v.to_bits() || (v.is_nan() && back.is_nan())) {
            return None;
        }
        // AMX reads bf16 subnormals as zero.
        if v != 0.0 && v.is_finite() && v.abs() < f32::MIN_POSITIVE {
            return None;
        }
        *o = b;
    }
    Some(t)
}

/// The operands of one AMX call.
struct AmxOps<'a> {
    n: usize,
    k: usize,
    /// A rows as bf16 in 32-row blocks ([`a16_at`], zero padding), indexed
    /// by [`Problem::abuf`].
    a16: &'a [u16],
    /// B bytes of each group (`[n][k]` elements).
    b: Vec<&'a [u8]>,
    dec: Dec<'a>,
    scales: Option<Scales<'a>>,
}

impl AmxOps<'_> {
    fn kbn(&self) -> usize {
        blocks128(self.k)
    }
    /// `sa[row, kb] · sb[group, col block, kb]`, or 1.
    fn scale(&self, row: usize, group: usize, nc: usize, kb: usize) -> f32 {
        self.row_scale(row, kb) * self.col_scale(group, nc, kb)
    }
    /// `sa[row, kb]`, or 1.
    fn row_scale(&self, row: usize, kb: usize) -> f32 {
        self.scales
            .as_ref()
            .map_or(1.0, |s| s.sa[row * self.kbn() + kb])
    }
    /// `sb[group, col block, kb]`, or 1.
    fn col_scale(&self, group: usize, nc: usize, kb: usize) -> f32 {
        let kbn = self.kbn();
        self.scales
            .as_ref()
            .map_or(1.0, |s| s.sb[(group * blocks128(self.n) + nc) * kbn + kb])
    }
}

/// The calling thread's operand buffers of the AMX path, kept between
/// calls: a fresh 30–60 MB buffer per call costs ~15 000 page faults (about
/// a tenth of a 4096-row GEMM). Every value a call reads is written by that
/// call (zero padding included), so a reused buffer needs no clearing.
/// Buffers above [`Scratch::KEEP`] bytes are freed after the call.
struct Scratch<T: 'static> {
    buf: Vec<T>,
    home: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
}

thread_local! {
    static A16: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    static PANELS: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    static APAN: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    static ACC: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl<T: 'static> Scratch<T> {
    /// The largest buffer kept for reuse, in bytes.
    const KEEP: usize = 256 << 20;

    /// This thread's buffer (empty the first time, or while another
    /// `Scratch` of the same kind is alive on this thread).
    fn take(home: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>) -> Self {
        Scratch {
            buf: home.with(|c| c.take()),
            home,
        }
    }
}

impl<T: 'static> Drop for Scratch<T> {
    fn drop(&mut self) {
        if self.buf.capacity() * std::mem::size_of::<T>() <= Self::KEEP {
            let buf = std::mem::take(&mut self.buf);
            self.home.with(|c| c.set(buf));
        }
    }
}

/// Decodes the problems' A rows into the `a16` layout in `buf`; sets
/// `abuf` (a multiple of 32 for each problem) and returns how many values
/// of `buf` the layout uses. Padding rows and the K tail are written as
/// zeros.
fn amx_decode_a(
    bytes: &[u8],
    dec: Dec<'_>,
    k: usize,
    probs: &mut [Problem],
    buf: &mut Vec<u16>,
) -> usize {
    let kbn = blocks128(k);
    let mut src: Vec<Option<usize>> = Vec::new();
    for p in probs.iter_mut() {
        p.abuf = src.len();
        src.extend((p.row0..p.row0 + p.rows).map(Some));
        src.resize(src.len().div_ceil(amx::BLOCK) * amx::BLOCK, None);
    }
    let rb_len = kbn * amx::BLOCK * QBLOCK;
    let used = src.len() / amx::BLOCK * rb_len;
    let a = lines_mut(buf, used);
    let es = dec.size();
    if rb_len > 0 {
        a.par_chunks_mut(rb_len)
            .zip(src.par_chunks(amx::BLOCK))
            .for_each(|(blk, rows)| {
                for (ri, s) in rows.iter().enumerate() {
                    for kb in 0..kbn {
                        let dst = &mut blk[(kb * amx::BLOCK + ri) * QBLOCK..][..QBLOCK];
                        let Some(s) = *s else {
                            dst.fill(0);
                            continue;
                        };
                        let (k0, kl) = (kb * QBLOCK, QBLOCK.min(k - kb * QBLOCK));
                        let at = (s * k + k0) * es;
                        dec.decode(&bytes[at..at + kl * es], &mut dst[..kl]);
                        dst[kl..].fill(0);
                    }
                }
            });
    }
    used
}

/// Where row `row` (of the `a16` numbering), K block `kb` starts in `a16`:
/// 32-row blocks, each `[kb][32][128]`, so one block's tile rows lie 256
/// bytes apart (long row strides thrash the L1 sets).
#[inline]
fn a16_at(kbn: usize, row: usize, kb: usize) -> usize {
    ((row / amx::BLOCK * kbn + kb) * amx::BLOCK + row % amx::BLOCK) * QBLOCK
}

/// B of one group as VNNI panels of 32 columns, into `buf` from a cache
/// line (every value of the first `ceil(n/32)·kbn·KP·32` written; that
/// count is returned, for [`lines`]): panel `P` at `P·kbn·KP·32`, K block
/// `kb` at `+ kb·KP·32`, pair row `q` at `+ q·32`. Each K block of a panel
/// is decoded by one [`Dec::decode_rows`] into a `[32][128]` bf16 scratch
/// (rows past `n` and the K tail zero) and then transposed in pairs.
fn amx_pack_b(bytes: &[u8], dec: Dec<'_>, n: usize, k: usize, buf: &mut Vec<u32>) -> usize {
    const B: usize = amx::BLOCK;
    let kbn = blocks128(k);
    let pstride = kbn * amx::KP * B;
    let out = lines_mut(buf, n.div_ceil(B) * pstride);
    if pstride == 0 {
        return 0;
    }
    let (used, es) = (out.len(), dec.size());
    let mutant = amx::vnni_mutant();
    out.par_chunks_mut(pstride)
        .enumerate()
        .for_each(|(p, panel)| {
            let cols = B.min(n - p * B);
            let mut rows = Aligned([0u16; B * QBLOCK]);
            for (kb, dst) in panel.chunks_exact_mut(amx::KP * B).enumerate() {
                let (k0, kl) = (kb * QBLOCK, QBLOCK.min(k - kb * QBLOCK));
                let at = (p * B * k + k0) * es;
                dec.decode_rows(
                    &bytes[at..],
                    k * es,
                    kl,
                    &mut rows.0[..cols * QBLOCK],
                    QBLOCK,
                );
                for (q, drow) in dst.chunks_exact_mut(B).enumerate() {
                    for (d, row) in drow.iter_mut().zip(rows.0.chunks_exact(QBLOCK)) {
                        *d = amx::pair(row[2 * q], row[2 * q + 1], mutant);
                    }
                }
            }
        });
    used
}

/// Rows up to which a small problem runs on half blocks
/// ([`Amx::next_block_n16`]: 16 output rows, half the tile work).
const HALF: usize = amx::BLOCK / 2;

/// `rp` of a small problem: rows rounded up to 32, or 16 for at most 16
/// rows (half blocks).
fn small_rp(rows: usize) -> usize {
    if rows <= HALF {
        HALF
    } else {
        rows.div_ceil(amx::BLOCK) * amx::BLOCK
    }
}

/// A rows of a problem as the VNNI operand of `Dᵀ = B·Aᵀ` into `out`
/// (`kbn·KP·rp` pairs, every one written): `[kb][KP][rp]` pairs, zero
/// columns past the rows, packed K block by K block in parallel.
fn amx_pack_a<'b>(ops: &AmxOps<'_>, p: &Problem, out: &'b mut [u32]) -> APanel<'b> {
    let kbn = ops.kbn();
    let rp = small_rp(p.rows);
    let mutant = amx::vnni_mutant();
    if rp > 0 {
        out.par_chunks_mut(amx::KP * rp)
            .enumerate()
            .for_each(|(kb, dst)| {
                for r in 0..p.rows {
                    let seg = &ops.a16[a16_at(kbn, p.abuf + r, kb)..][..QBLOCK];
                    for (q, pr) in seg.chunks_exact(2).enumerate() {
                        dst[q * rp + r] = amx::pair(pr[0], pr[1], mutant);
                    }
                }
                for q in 0..amx::KP {
                    dst[q * rp + p.rows..(q + 1) * rp].fill(0);
                }
            });
    }
    let mut sa = vec![1f32; kbn * rp];
    for (kb, row) in sa.chunks_exact_mut(rp.max(1)).enumerate() {
        for (r, v) in row[..p.rows].iter_mut().enumerate() {
            *v = ops.row_scale(p.row0 + r, kb);
        }
    }
    APanel { pairs: out, rp, sa }
}

/// A small problem's A as the B operand of `Dᵀ = B·Aᵀ` ([`amx_pack_a`]).
struct APanel<'b> {
    /// `[kb][KP][rp]` VNNI pairs.
    pairs: &'b [u32],
    /// Rows rounded up to 32, or 16 for at most 16 rows.
    rp: usize,
    /// The row scales `sa[row, kb]` as `[kb][rp]` (1 without scales).
    sa: Vec<f32>,
}

/// Rows × columns of D per task of a large AMX problem (multiples of 32;
/// the columns divide 128, so a task lies in one `sb` block). 32 × 128
/// measured fastest at m = 4096 against 64 × 64, 64 × 128, 128 × 64 and
/// 128 × 128 (benches/README.md): its accumulator is 16 KB.
fn amx_task_shape() -> (usize, usize) {
    (amx::BLOCK, NC)
}

/// One task of a large problem over the K blocks `kbs`: the rows
/// `[mb·R, +R)` × columns `[nc·C, +C)` ([`amx_task_shape`]) from B panels
/// packed by [`amx_pack_b`], promoted onto `c` (`rows × C` f32, row
/// stride C; the caller zeroes it before the first K range and passes the
/// ranges in order, so the sums are those of one pass over K). The
/// accumulator stays in L1 across the range, each K block's A blocks
/// (8 KB per 32 rows) serve all its 32-column panels, and each block's
/// promotion overlaps the tile work of the next ([`Amx::next_block`]).
fn amx_task_rows(
    amx: &Amx,
    ops: &AmxOps<'_>,
    p: &Problem,
    t: Task,
    panels: &[u32],
    kbs: std::ops::Range<usize>,
    c: &mut [f32],
) {
    const B: usize = amx::BLOCK;
    let (tr, tc) = amx_task_shape();
    let kbn = ops.kbn();
    let r_lo = t.mb * tr;
    let rows = tr.min(p.rows - r_lo);
    let c_lo = t.nc * tc;
    let cols = tc.min(ops.n - c_lo);
    let sb_block = c_lo / NC;
    let pstride = kbn * amx::KP * B;
    let mut out = Aligned::<Block>([[0f32; B]; B]);
    let out = &mut out.0;
    // Row scales of two K blocks: the block in flight may be the previous
    // K block's.
    let mut scale = vec![0f32; 2 * tr];
    let mut pending: Option<(usize, usize, usize)> = None; // (kb, row block, panel)
    let promote =
        |out: &Block, c: &mut [f32], scale: &[f32], (pkb, ri, pi): (usize, usize, usize)| {
            let jn = B.min(cols - pi * B);
            let rn = B.min(rows - ri * B);
            let s = &scale[(pkb & 1) * tr + ri * B..];
            amx::promote_rows(out, rn, jn, s, &mut c[ri * B * tc + pi * B..], tc);
        };
    for kb in kbs {
        for (r, s) in scale[(kb & 1) * tr..][..rows].iter_mut().enumerate() {
            *s = ops.scale(p.row0 + r_lo + r, p.group, sb_block, kb);
        }
        for pi in 0..cols.div_ceil(B) {
            let gp = c_lo / B + pi;
            let b = &panels[gp * pstride + kb * amx::KP * B..];
            for ri in 0..rows.div_ceil(B) {
                // A 32-row block (abuf and r_lo are multiples of 32).
                let a = &ops.a16[a16_at(kbn, p.abuf + r_lo + ri * B, kb)..];
                match pending {
                    Some(prev) => {
                        amx.next_block(Some(out), a, QBLOCK, b, B);
                        promote(out, c, &scale, prev);
                    }
                    None => amx.next_block(None, a, QBLOCK, b, B),
                }
                pending = Some((kb, ri, pi));
            }
        }
    }
    if let Some(prev) = pending {
        amx.finish(out);
        promote(out, c, &scale, prev);
    }
}

/// K blocks per pass of the large AMX problems: a pass's B chunk (C
/// columns × its K blocks, bf16) is kept within ~1 MB, half of L2, so
/// that it stays there while the row blocks stream past it. At 4096 ×
/// 2112 × 7168 on an idle machine (op_time medians): one pass 0.138 s,
/// 256 KB 0.140 s, 512 KB 0.131 s, 1 MB 0.127 s.
fn amx_k_blocks_per_pass(kbn: usize) -> usize {
    let (_, tc) = amx_task_shape();
    let per = (1usize << 20) / (tc * QBLOCK * 2);
    let passes = kbn.div_ceil(per).max(1);
    kbn.div_ceil(passes).max(1)
}

/// One task of a problem of at most 128 rows: all its rows × the 32
/// columns `[nc·32, +32)`, as `Dᵀ = B·Aᵀ` with B's rows decoded per K
/// block (4 KB of bf16) and the transposed accumulator (`[32][rp]`) in L1
/// across the K loop.
fn amx_task_cols(amx: &Amx, ops: &AmxOps<'_>, p: &Problem, t: Task, apan: &APanel) -> Vec<f32> {
    const B: usize = amx::BLOCK;
    let (kbn, k, es) = (ops.kbn(), ops.k, ops.dec.size());
    let rows = p.rows;
    let c_lo = t.nc * B;
    let cols = B.min(ops.n - c_lo);
    let sb_block = c_lo / NC;
    let bytes = ops.b[p.group];
    let rp = apan.rp;
    // At most 16 rows: half blocks (the A panel is 16 wide).
    let half = rp == HALF;
    // Dᵀ: [32 columns][rp rows].
    let mut acc = zeroed_lines::<f32>(B * rp);
    // B rows of this chunk, one K block: [32][128] bf16, zero past `cols`
    // rows and past the K tail.
    let mut bbuf = Aligned([0u16; B * QBLOCK]);
    let mut out = Aligned::<Block>([[0f32; B]; B]);
    let mut scale = vec![0f32; 2 * MC];
    let mut pending: Option<(usize, usize)> = None; // (kb, r0)
    for kb in 0..kbn {
        let (k0, kl) = (kb * QBLOCK, QBLOCK.min(k - kb * QBLOCK));
        let at = (c_lo * k + k0) * es;
        let rows_b = &mut bbuf.0[..cols * QBLOCK];
        ops.dec
            .decode_rows(&bytes[at..], k * es, kl, rows_b, QBLOCK);
        let sc = &mut scale[(kb & 1) * MC..][..MC];
        let sb = ops.col_scale(p.group, sb_block, kb);
        for (s, &sa) in sc[..rows].iter_mut().zip(&apan.sa[kb * rp..]) {
            *s = sa * sb;
        }
        let apk = &apan.pairs[kb * amx::KP * rp..];
        for r0 in (0..rows).step_by(B) {
            let prev = pending.map(|_| &mut out.0);
            if half {
                amx.next_block_n16(prev, &bbuf.0, QBLOCK, &apk[r0..], rp);
            } else {
                amx.next_block(prev, &bbuf.0, QBLOCK, &apk[r0..], rp);
            }
            if let Some((pkb, pr0)) = pending {
                let rn = B.min(rows - pr0);
                let s = &scale[(pkb & 1) * MC + pr0..];
                amx::promote_cols(&out.0, cols, rn, s, &mut acc[pr0..], rp);
            }
            pending = Some((kb, r0));
        }
    }
    if let Some((pkb, pr0)) = pending {
        if half {
            amx.finish_n16(&mut out.0);
        } else {
            amx.finish(&mut out.0);
        }
        let rn = B.min(rows - pr0);
        let s = &scale[(pkb & 1) * MC + pr0..];
        amx::promote_cols(&out.0, cols, rn, s, &mut acc[pr0..], rp);
    }
    // Back to D's layout: [rows][32].
    let mut c = vec![0f32; rows * B];
    for (j, col) in acc.chunks(rp).enumerate().take(cols) {
        for (i, &v) in col[..rows].iter().enumerate() {
            c[i * B + j] = v;
        }
    }
    c
}

/// [`run`] on AMX: every problem's rows of D (`[.., n]` in `dtype`).
fn run_amx(ops: &AmxOps<'_>, probs: &[Problem], d: &mut [u8], dtype: deepport_core::DType) {
    const B: usize = amx::BLOCK;
    let n = ops.n;
    let size = dtype.size();
    // Tiles of `rb` rows × `cb` columns (row-major, stride `cb`), encoded
    // into D row by row in parallel.
    let mut write = |tasks: &[Task], tiles: &[&[f32]], rb: usize, cb: usize| {
        let row_bytes = n * size;
        if row_bytes == 0 {
            return;
        }
        // (tile, row of the tile) for each row of D.
        let mut parts: Vec<Vec<(usize, usize)>> = vec![Vec::new(); d.len() / row_bytes];
        for (i, (t, tile)) in tasks.iter().zip(tiles).enumerate() {
            let r0 = probs[t.prob].row0 + t.mb * rb;
            for r in 0..tile.len() / cb {
                parts[r0 + r].push((i, r));
            }
        }
        d.par_chunks_mut(row_bytes)
            .zip(parts.par_iter())
            .for_each(|(drow, parts)| {
                for &(i, r) in parts {
                    let c_lo = tasks[i].nc * cb;
                    let cols = cb.min(n - c_lo);
                    encode_into(
                        dtype,
                        &tiles[i][r * cb..r * cb + cols],
                        &mut drow[c_lo * size..(c_lo + cols) * size],
                    );
                }
            });
    };
    // Small problems: Dᵀ = B·Aᵀ, one task per (problem, 32 columns).
    let small: Vec<usize> = (0..probs.len())
        .filter(|&i| probs[i].rows > 0 && probs[i].rows <= MC)
        .collect();
    if !small.is_empty() {
        // Every problem's A panel in one reused buffer, each on a line
        // (the sizes are multiples of 64 pairs).
        let kbn = ops.kbn();
        let sizes: Vec<usize> = small
            .iter()
            .map(|&i| kbn * amx::KP * small_rp(probs[i].rows))
            .collect();
        let mut buf = Scratch::take(&APAN);
        let mut rest = lines_mut(&mut buf.buf, sizes.iter().sum());
        let mut parts = Vec::with_capacity(sizes.len());
        for &n in &sizes {
            let (part, tail) = rest.split_at_mut(n);
            parts.push(part);
            rest = tail;
        }
        let apans: Vec<APanel<'_>> = parts
            .into_par_iter()
            .zip(small.par_iter())
            .map(|(dst, &i)| amx_pack_a(ops, &probs[i], dst))
            .collect();
        let mut tasks = Vec::new();
        let mut pan = Vec::new();
        for (si, &i) in small.iter().enumerate() {
            for nc in 0..n.div_ceil(B) {
                tasks.push(Task {
                    prob: i,
                    mb: 0,
                    nc,
                    mc: MC,
                });
                pan.push(si);
            }
        }
        let tiles: Vec<Vec<f32>> = tasks
            .par_iter()
            .zip(pan.par_iter())
            .map(|(&t, &si)| {
                amx::with_amx(|amx| amx_task_cols(amx, ops, &probs[t.prob], t, &apans[si]))
                    .expect("AMX checked by the caller")
            })
            .collect();
        let tiles: Vec<&[f32]> = tiles.iter().map(Vec::as_slice).collect();
        write(&tasks, &tiles, MC, B);
    }
    // Large problems, group by group: B packed once per group. The K
    // blocks run in passes ([`amx_k_blocks_per_pass`]); within a pass, the
    // tasks of one column chunk run together over the pass's B chunk, which
    // stays in L2 while A streams. Each task's accumulator lives in `acc`
    // between passes (`[column chunk][row task][R·C]`).
    let (tr, tc) = amx_task_shape();
    let kbn = ops.kbn();
    let per_pass = amx_k_blocks_per_pass(kbn);
    for g in 0..ops.b.len() {
        let row_tasks: Vec<(usize, usize)> = probs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.group == g && p.rows > MC)
            .flat_map(|(i, p)| (0..p.rows.div_ceil(tr)).map(move |mb| (i, mb)))
            .collect();
        if row_tasks.is_empty() {
            continue;
        }
        let mut panels = Scratch::take(&PANELS);
        let used = amx_pack_b(ops.b[g], ops.dec, n, ops.k, &mut panels.buf);
        let panels = lines(&panels.buf, used);
        let ncs = n.div_ceil(tc);
        let mut acc = Scratch::take(&ACC);
        let acc = lines_mut(&mut acc.buf, ncs * row_tasks.len() * tr * tc);
        if acc.is_empty() {
            continue;
        }
        for (nc, slab) in acc.chunks_mut(row_tasks.len() * tr * tc).enumerate() {
            for k0 in (0..kbn.max(1)).step_by(per_pass) {
                let kbs = k0..(k0 + per_pass).min(kbn);
                slab.par_chunks_mut(tr * tc)
                    .zip(row_tasks.par_iter())
                    .for_each(|(c, &(prob, mb))| {
                        if k0 == 0 {
                            c.fill(0.0);
                        }
                        let t = Task {
                            prob,
                            mb,
                            nc,
                            mc: MC,
                        };
                        amx::with_amx(|amx| {
                            amx_task_rows(amx, ops, &probs[prob], t, panels, kbs.clone(), c)
                        })
                        .expect("AMX checked by the caller")
                    });
            }
        }
        let tasks: Vec<Task> = (0..ncs)
            .flat_map(|nc| {
                row_tasks.iter().map(move |&(prob, mb)| Task {
                    prob,
                    mb,
                    nc,
                    mc: MC,
                })
            })
            .collect();
        let tiles: Vec<&[f32]> = acc
            .chunks(tr * tc)
            .zip(&tasks)
            .map(|(c, t)| &c[..tr.min(probs[t.prob].rows - t.mb * tr) * tc])
            .collect();
        write(&tasks, &tiles, tr, tc);
    }
}
