//! Launch geometry of the GEMM family, in plain Rust (tested on the CPU).
//!
//! * The portable tiled kernels (`kernels/gemm.cu`): one CTA per
//!   `64 × 64` output tile, `grid = (m tiles, n tiles, groups)`.
//! * The Hopper FP8 kernel (`kernels/fp8_gemm_sm90.cu`): a persistent
//!   schedule. The output is cut into `64 × BLOCK_N` tiles (per group for
//!   the masked layout), numbered `t = tn · tiles_m + tm` (+ `g · tiles_m ·
//!   tiles_n` when masked); CTA `c` of `grid` walks `t = c, c + grid, …`.
//!   The kernel repeats [`Sm90Plan::tile`] exactly; the tests here check
//!   that the walk covers every output tile once, visits each K block once
//!   per tile, and that tiles never straddle groups.
//! * TMA descriptor parameters of the A and B operands ([`tma_a`],
//!   [`tma_b`]) and the Hopper-vs-portable choice with its reason
//!   ([`choose_fp8_path`]).

use crate::launch::{Arch, Grid, TmaDtype, TmaParams, TmaSwizzle};
use deepport_core::{Error, Result};

/// Width of a scale block along K (and N for `sb`).
pub const QBLOCK: usize = 128;
/// Output tile of the portable kernels: rows.
pub const PORTABLE_BM: usize = 64;
/// Output tile of the portable kernels: columns.
pub const PORTABLE_BN: usize = 64;
/// Threads of a portable GEMM CTA (16 × 16, 4 × 4 outputs each).
pub const PORTABLE_THREADS: u32 = 256;
/// Rows of a Hopper tile (one `wgmma` m64 per warpgroup).
pub const SM90_BM: usize = 64;
/// Threads of a Hopper CTA: one warpgroup.
pub const SM90_THREADS: u32 = 128;
/// Pipeline stages of the Hopper kernel.
pub const SM90_STAGES: usize = 4;
/// Static shared memory of the Hopper kernel (its row-group table, placed
/// before the 1024-byte aligned dynamic buffer: ptxas reports 1024).
pub const SM90_STATIC_SMEM: usize = 1024;
/// The largest grid y / z dimension.
pub const MAX_GRID_YZ: usize = 65535;
/// The largest grid x dimension.
pub const MAX_GRID_X: usize = i32::MAX as usize;

/// Which rows of `a` a GEMM computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `a [m, k]`, `b [n, k]`.
    Dense,
    /// `a [m_sum, k]`, `b [G, n, k]`, a group per row (`m_indices`).
    Contiguous,
    /// `a [G, m, k]`, `b [G, n, k]`, `masked_m[g]` rows per group.
    Masked,
}

impl Layout {
    /// The `mode` argument of the kernels.
    pub fn code(self) -> i32 {
        match self {
            Layout::Dense => 0,
            Layout::Contiguous => 1,
            Layout::Masked => 2,
        }
    }
}

/// A GEMM's shape: `m` is rows per group for [`Layout::Masked`], all rows
/// otherwise; `groups` is 1 for [`Layout::Dense`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub layout: Layout,
    pub groups: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl Problem {
    /// Rows of `a` (and `d`) in all.
    pub fn rows_total(&self) -> usize {
        match self.layout {
            Layout::Masked => self.groups * self.m,
            _ => self.m,
        }
    }
    /// Rows of `b` in all.
    pub fn b_rows_total(&self) -> usize {
        match self.layout {
            Layout::Dense => self.n,
            _ => self.groups * self.n,
        }
    }
    /// True when there is nothing to compute (no launch).
    pub fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0 || self.groups == 0
    }
}

fn too_big(op: &'static str, what: &str, v: usize, max: usize) -> Error {
    Error::not_supported(
        "cuda",
        op,
        format!("{what} = {v} exceeds the launch limit {max}"),
    )
}

/// Grid of the portable tiled GEMMs (FP8 and plain): x = row tiles (per
/// group when masked), y = column tiles, z = groups when masked.
pub fn portable_grid(op: &'static str, p: &Problem) -> Result<Grid> {
    let tm = p.m.div_ceil(PORTABLE_BM);
    let tn = p.n.div_ceil(PORTABLE_BN);
    let tz = if p.layout == Layout::Masked {
        p.groups
    } else {
        1
    };
    if tm > MAX_GRID_X {
        return Err(too_big(op, "row tiles", tm, MAX_GRID_X));
    }
    if tn > MAX_GRID_YZ {
        return Err(too_big(op, "column tiles", tn, MAX_GRID_YZ));
    }
    if tz > MAX_GRID_YZ {
        return Err(too_big(op, "groups", tz, MAX_GRID_YZ));
    }
    Ok(Grid {
        grid: (tm as u32, tn as u32, tz as u32),
        block: (PORTABLE_THREADS, 1, 1),
        smem: 0,
    })
}

/// Grid of a one-dimensional grid-stride kernel over `count` items with
/// `threads` per CTA and `per_cta` items per CTA per step (capped: the
/// kernels loop).
pub fn stride_grid(count: usize, per_cta: usize, threads: u32) -> Grid {
    let blocks = count.div_ceil(per_cta.max(1)).clamp(1, 1 << 20);
    Grid {
        grid: (blocks as u32, 1, 1),
        block: (threads, 1, 1),
        smem: 0,
    }
}

/// Configuration of the Hopper FP8 kernel for one problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sm90Plan {
    pub problem: Problem,
    /// 128 when `n % 128 == 0`, else 64.
    pub block_n: usize,
    pub tiles_m: usize,
    pub tiles_n: usize,
    /// Tiles in all (over groups when masked).
    pub num_tiles: usize,
    /// K blocks of 128 per tile.
    pub k_blocks: usize,
}

/// One output tile of the persistent schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Group (masked: from the tile number; contiguous: decided by the
    /// kernel from `m_indices`; dense: 0).
    pub group: usize,
    /// First row within the group (masked) or within `a` (otherwise).
    pub m0: usize,
    pub n0: usize,
    /// TMA row coordinate of the A box (row of the 2-D `[rows_total, k]` view).
    pub a_row: usize,
    /// TMA row coordinate of the B box, given the group.
    pub b_row: usize,
}

impl Sm90Plan {
    /// The tile numbered `t` (`t < num_tiles`). For the contiguous layout,
    /// `group` is 0 here: the kernel reads it from `m_indices[m0]` and then
    /// uses `b_row_of(group, n0)`.
    pub fn tile(&self, t: usize) -> Tile {
        let per_group = self.tiles_m * self.tiles_n;
        let (g, r) = match self.problem.layout {
            Layout::Masked => (t / per_group, t % per_group),
            _ => (0, t),
        };
        let tm = r % self.tiles_m;
        let tn = r / self.tiles_m;
        let (m0, n0) = (tm * SM90_BM, tn * self.block_n);
        let a_row = match self.problem.layout {
            Layout::Masked => g * self.problem.m + m0,
            _ => m0,
        };
        Tile {
            group: g,
            m0,
            n0,
            a_row,
            b_row: self.b_row_of(g, n0),
        }
    }
    /// The row of `b` (as `[G·n, k]`) where group `g`'s columns `n0..` start.
    pub fn b_row_of(&self, g: usize, n0: usize) -> usize {
        g * self.problem.n + n0
    }
    /// Contiguous layout: the passes of a tile whose rows have the groups
    /// `row_groups` (its `m_indices` slice): each distinct group in
    /// `[0, G)`, ascending, as the kernel's scan finds them (padding and
    /// out-of-range rows take no pass). DeepGEMM's layout gives at most one.
    pub fn contiguous_passes(&self, row_groups: &[i64]) -> Vec<usize> {
        let mut prev = -1i64;
        let mut out = Vec::new();
        loop {
            let best = row_groups
                .iter()
                .copied()
                .filter(|&v| v > prev && v < self.problem.groups as i64)
                .min();
            match best {
                Some(b) => {
                    out.push(b as usize);
                    prev = b;
                }
                None => return out,
            }
        }
    }
    /// The tiles CTA `cta` of a `grid`-CTA launch computes, in order.
    pub fn tiles_of(&self, cta: usize, grid: usize) -> impl Iterator<Item = usize> {
        (cta..self.num_tiles).step_by(grid.max(1))
    }
    /// Dynamic shared memory: the stages (A and B tiles, each 1024-byte
    /// aligned for the 128-byte swizzle), the barriers, and 1024 bytes of
    /// slack to align the base.
    pub fn smem_bytes(&self) -> usize {
        let stage = SM90_BM * QBLOCK + self.block_n * QBLOCK;
        SM90_STAGES * stage + SM90_STAGES * 8 + 1024
    }
    /// The persistent launch: one CTA per SM (fewer when there are fewer tiles).
    pub fn grid(&self, arch: &Arch) -> Grid {
        let ctas = self.num_tiles.min(arch.sms.max(1) as usize).max(1);
        Grid {
            grid: (ctas as u32, 1, 1),
            block: (SM90_THREADS, 1, 1),
            smem: self.smem_bytes() as u32,
        }
    }
}

/// Which FP8 kernel runs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fp8Path {
    Sm90(Sm90Plan),
    Portable { reason: String },
}

/// Picks the Hopper kernel when the device is sm_90 and the problem meets
/// its preconditions; otherwise the portable kernel, with the reason.
/// `a_addr`, `b_addr`: device addresses of the operands (TMA needs 16-byte
/// aligned bases). `fnuz`: the operands are e4m3fnuz (wgmma has no such type).
pub fn choose_fp8_path(arch: &Arch, p: &Problem, fnuz: bool, a_addr: u64, b_addr: u64) -> Fp8Path {
    let why = |s: String| Fp8Path::Portable { reason: s };
    if !arch.is_hopper() {
        return why(format!("sm_{}{} is not Hopper", arch.major, arch.minor));
    }
    if fnuz {
        return why("e4m3fnuz operands (wgmma takes OCP e4m3)".into());
    }
    if p.is_empty() || p.k == 0 {
        return why("empty problem".into());
    }
    if !p.k.is_multiple_of(QBLOCK) {
        return why(format!("k = {} is not a multiple of 128", p.k));
    }
    if !p.n.is_multiple_of(64) {
        return why(format!("n = {} is not a multiple of 64", p.n));
    }
    if !a_addr.is_multiple_of(16) || !b_addr.is_multiple_of(16) {
        return why("operand base not 16-byte aligned (TMA)".into());
    }
    let i32max = i32::MAX as usize;
    if p.rows_total() >= i32max || p.b_rows_total() >= i32max || p.k >= i32max {
        return why("dimension beyond 32-bit TMA coordinates".into());
    }
    if p.rows_total().saturating_mul(p.n) >= u32::MAX as usize {
        return why("output beyond 2^32 elements".into());
    }
    let block_n = if p.n.is_multiple_of(128) { 128 } else { 64 };
    let tiles_m = p.m.div_ceil(SM90_BM);
    let tiles_n = p.n / block_n;
    let per_group = tiles_m * tiles_n;
    let num_tiles = match p.layout {
        Layout::Masked => per_group * p.groups,
        _ => per_group,
    };
    if num_tiles >= i32max {
        return why("too many tiles".into());
    }
    let plan = Sm90Plan {
        problem: *p,
        block_n,
        tiles_m,
        tiles_n,
        num_tiles,
        k_blocks: p.k / QBLOCK,
    };
    let smem = plan.smem_bytes() + SM90_STATIC_SMEM;
    if smem > arch.smem_optin as usize {
        return why(format!(
            "needs {smem} bytes of shared memory, the device allows {}",
            arch.smem_optin
        ));
    }
    Fp8Path::Sm90(plan)
}

/// TMA parameters of a row-major e4m3 matrix `[rows, k]` read in boxes of
/// `box_rows × 128` bytes with the 128-byte swizzle (one 128-byte row per
/// K block, the canonical K-major layout wgmma reads).
fn tma_rows(base: u64, rows: usize, k: usize, box_rows: usize) -> TmaParams {
    TmaParams {
        dtype: TmaDtype::U8,
        base,
        dims: vec![k as u64, rows as u64],
        strides: vec![k as u64],
        box_dims: vec![QBLOCK as u32, box_rows as u32],
        swizzle: TmaSwizzle::B128,
    }
}

/// TMA parameters of A (`[rows_total, k]`, boxes `128 × 64`).
pub fn tma_a(plan: &Sm90Plan, base: u64) -> TmaParams {
    tma_rows(base, plan.problem.rows_total(), plan.problem.k, SM90_BM)
}

/// TMA parameters of B (`[G·n, k]`, boxes `128 × block_n`).
pub fn tma_b(plan: &Sm90Plan, base: u64) -> TmaParams {
    tma_rows(
        base,
        plan.problem.b_rows_total(),
        plan.problem.k,
        plan.block_n,
    )
}

/// Checks the rules of `cuTensorMapEncodeTiled` that the parameters must
/// meet (also used by the tests): rank, 16-byte aligned base and strides,
/// boxes of at most 256 per dim, the inner box span within the swizzle.
pub fn validate_tma(t: &TmaParams) -> std::result::Result<(), String> {
    let rank = t.dims.len();
    if !(1..=5).contains(&rank) || t.box_dims.len() != rank || t.strides.len() + 1 != rank {
        return Err("rank mismatch".into());
    }
    if !t.base.is_multiple_of(16) {
        return Err("base not 16-byte aligned".into());
    }
    if t.strides.iter().any(|s| s % 16 != 0 || *s >= 1 << 40) {
        return Err("stride not a multiple of 16 (or too large)".into());
    }
    if t.box_dims.iter().any(|b| *b == 0 || *b > 256) {
        return Err("box dim outside 1..=256".into());
    }
    if t.dims.iter().any(|d| *d == 0 || *d > 1 << 32) {
        return Err("dim outside 1..=2^32".into());
    }
    let elem = match t.dtype {
        TmaDtype::U8 => 1,
        TmaDtype::U16 | TmaDtype::Bf16 => 2,
        TmaDtype::F32 => 4,
    };
    let inner = t.box_dims[0] as u64 * elem;
    if !inner.is_multiple_of(16) {
        return Err("inner box span not a multiple of 16 bytes".into());
    }
    let span = match t.swizzle {
        TmaSwizzle::None => u64::MAX,
        TmaSwizzle::B32 => 32,
        TmaSwizzle::B64 => 64,
        TmaSwizzle::B128 => 128,
    };
    if inner > span {
        return Err("inner box span exceeds the swizzle span".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H200: Arch = Arch {
        major: 9,
        minor: 0,
        sms: 132,
        smem_optin: 232448,
    };
    const A100: Arch = Arch {
        major: 8,
        minor: 0,
        sms: 108,
        smem_optin: 166912,
    };
    const DEEPSEEK_NK: [(usize, usize); 6] = [
        (2112, 7168),
        (24576, 1536),
        (32768, 512),
        (7168, 16384),
        (4096, 7168),
        (7168, 2048),
    ];
    const MS: [usize; 4] = [1, 16, 128, 4096];

    fn dense(m: usize, n: usize, k: usize) -> Problem {
        Problem {
            layout: Layout::Dense,
            groups: 1,
            m,
            n,
            k,
        }
    }

    fn plan(p: &Problem) -> Sm90Plan {
        match choose_fp8_path(&H200, p, false, 0x1000, 0x2000) {
            Fp8Path::Sm90(plan) => plan,
            Fp8Path::Portable { reason } => panic!("expected the sm90 path for {p:?}: {reason}"),
        }
    }

    /// The kernel's TMA/mbarrier pipeline bookkeeping, step by step: the
    /// loads each stage received (tile, K block), and how many of them were
    /// consumed. A load may only go into a stage with nothing outstanding
    /// (else it would overwrite a tile still being read), and the consumer
    /// of the CTA's `it`-th K block waits on completion `it / STAGES` of
    /// stage `it % STAGES` (the parity it waits for), which must be the
    /// load of exactly that tile and K block.
    struct Pipeline {
        k_blocks: usize,
        it: usize,
        loads: Vec<Vec<(usize, usize)>>,
        consumed: Vec<usize>,
    }

    impl Pipeline {
        fn new(k_blocks: usize) -> Self {
            Self {
                k_blocks,
                it: 0,
                loads: vec![Vec::new(); SM90_STAGES],
                consumed: vec![0; SM90_STAGES],
            }
        }
        fn issue(&mut self, s: usize, t: usize, kb: usize) {
            assert_eq!(
                self.loads[s].len(),
                self.consumed[s],
                "stage {s} overwritten"
            );
            self.loads[s].push((t, kb));
        }
        /// One tile, as `fp8_sm90_body` runs it.
        fn tile(&mut self, t: usize) {
            for p in 0..self.k_blocks.min(SM90_STAGES) {
                self.issue((self.it + p) % SM90_STAGES, t, p);
            }
            for kb in 0..self.k_blocks {
                let s = self.it % SM90_STAGES;
                let completion = self.it / SM90_STAGES;
                assert_eq!(
                    self.loads[s].get(completion),
                    Some(&(t, kb)),
                    "tile {t} block {kb}"
                );
                self.consumed[s] += 1;
                if kb + SM90_STAGES < self.k_blocks {
                    self.issue(s, t, kb + SM90_STAGES);
                }
                self.it += 1;
            }
        }
    }

    /// Walks the persistent schedule like the kernel does and marks every
    /// output element computed; `group_of_row` gives the contiguous
    /// layout's `m_indices`, `masked` the masked layout's `masked_m`.
    /// Returns per output element how often it was written, and checks
    /// each visited tile saw every K block once.
    fn simulate(plan: &Sm90Plan, ctas: usize, group_of_row: &[i64], masked: &[usize]) -> Vec<u8> {
        simulate_with(plan, ctas, group_of_row, masked, true)
    }

    /// As [`simulate`]; `aligned_layout`: the contiguous layout keeps groups
    /// constant per 128 rows (DeepGEMM's), so every tile takes one pass.
    fn simulate_with(
        plan: &Sm90Plan,
        ctas: usize,
        group_of_row: &[i64],
        masked: &[usize],
        aligned_layout: bool,
    ) -> Vec<u8> {
        let p = plan.problem;
        let mut hits = vec![0u8; p.rows_total() * p.n];
        let mut seen = vec![0u32; plan.num_tiles];
        for cta in 0..ctas {
            let mut pipe = Pipeline::new(plan.k_blocks);
            for t in plan.tiles_of(cta, ctas) {
                seen[t] += 1;
                let tile = plan.tile(t);
                let rows_end = (tile.m0 + SM90_BM).min(p.m);
                // The passes the kernel runs: (group, rows valid in it).
                let passes: Vec<(usize, usize)> = match p.layout {
                    Layout::Dense => vec![(0, p.m)],
                    Layout::Masked if tile.m0 >= masked[tile.group] => vec![],
                    Layout::Masked => vec![(tile.group, masked[tile.group])],
                    Layout::Contiguous => plan
                        .contiguous_passes(&group_of_row[tile.m0..rows_end])
                        .into_iter()
                        .map(|g| (g, p.m))
                        .collect(),
                };
                if aligned_layout {
                    assert!(passes.len() <= 1, "tile {t} straddles groups");
                }
                for (g, rows_valid) in passes {
                    pipe.tile(t);
                    assert_eq!(plan.b_row_of(g, tile.n0) % p.n, tile.n0);
                    #[allow(clippy::needless_range_loop)]
                    for r in tile.m0..(tile.m0 + SM90_BM).min(rows_valid) {
                        if p.layout == Layout::Contiguous && group_of_row[r] != g as i64 {
                            continue; // another pass's row (or padding)
                        }
                        let row = match p.layout {
                            Layout::Masked => g * p.m + r,
                            _ => r,
                        };
                        assert_eq!(tile.a_row + (r - tile.m0), row, "A's TMA row coordinate");
                        for c in tile.n0..tile.n0 + plan.block_n {
                            hits[row * p.n + c] += 1;
                        }
                    }
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "a tile walked twice or never");
        hits
    }

    #[test]
    fn dense_schedule_covers_every_output_once() {
        for &(n, k) in &DEEPSEEK_NK {
            for &m in &MS {
                let p = dense(m, n, k);
                let plan = plan(&p);
                assert_eq!(plan.block_n, if n % 128 == 0 { 128 } else { 64 });
                let ctas = plan.grid(&H200).grid.0 as usize;
                assert!((1..=132).contains(&ctas));
                let hits = simulate(&plan, ctas, &[], &[]);
                assert!(hits.iter().all(|&h| h == 1), "m={m} n={n} k={k}");
            }
        }
    }

    #[test]
    fn odd_shapes_fall_back_or_cover() {
        // n a multiple of 64 only: block_n 64; odd m.
        let p = dense(77, 704, 512);
        let plan = plan(&p);
        assert_eq!(plan.block_n, 64);
        for ctas in [1, 3, 132] {
            let hits = simulate(&plan, ctas, &[], &[]);
            assert!(hits.iter().all(|&h| h == 1));
        }
        // 576 = 4.5 blocks of 128: block_n 64.
        assert_eq!(plan_of(dense(5, 576, 7168)).block_n, 64);
        let reason = |p: Problem, fnuz: bool, a: u64| match choose_fp8_path(&H200, &p, fnuz, a, 0) {
            Fp8Path::Portable { reason } => reason,
            Fp8Path::Sm90(_) => panic!("expected the portable path for {p:?}"),
        };
        assert!(reason(dense(4, 128, 100), false, 0).contains("multiple of 128"));
        assert!(reason(dense(4, 100, 128), false, 0).contains("multiple of 64"));
        assert!(reason(dense(4, 128, 128), true, 0).contains("fnuz"));
        assert!(reason(dense(4, 128, 128), false, 8).contains("aligned"));
        assert!(reason(dense(0, 128, 128), false, 0).contains("empty"));
        match choose_fp8_path(&A100, &dense(128, 4096, 7168), false, 0, 0) {
            Fp8Path::Portable { reason } => assert!(reason.contains("sm_80")),
            Fp8Path::Sm90(_) => panic!("A100 has no wgmma"),
        }
        let small = Arch {
            smem_optin: 48 * 1024,
            ..H200
        };
        match choose_fp8_path(&small, &dense(128, 4096, 7168), false, 0, 0) {
            Fp8Path::Portable { reason } => assert!(reason.contains("shared memory")),
            Fp8Path::Sm90(_) => panic!("does not fit"),
        }
    }

    fn plan_of(p: Problem) -> Sm90Plan {
        plan(&p)
    }

    /// DeepGEMM's contiguous layout: each group's rows padded to a
    /// multiple of 128 with -1 rows.
    fn contiguous_indices(sizes: &[usize]) -> Vec<i64> {
        let mut v = Vec::new();
        for (g, &s) in sizes.iter().enumerate() {
            let padded = s.div_ceil(128) * 128;
            v.extend(std::iter::repeat_n(g as i64, s));
            v.extend(std::iter::repeat_n(-1, padded - s));
        }
        v
    }

    #[test]
    fn contiguous_schedule_covers_each_non_padding_row_once() {
        let cases: [&[usize]; 4] = [
            &[128, 256, 128, 384],
            &[1, 0, 300, 17, 128, 5, 0, 129],
            &[3; 32],
            &[
                1000, 1, 1, 1, 0, 0, 200, 64, 65, 127, 129, 255, 256, 257, 0, 9,
            ],
        ];
        for sizes in cases {
            let idx = contiguous_indices(sizes);
            for &(n, k) in &[(4096, 7168), (7168, 2048), (576, 512)] {
                let p = Problem {
                    layout: Layout::Contiguous,
                    groups: sizes.len(),
                    m: idx.len(),
                    n,
                    k,
                };
                let plan = plan(&p);
                let hits = simulate(&plan, 132, &idx, &[]);
                for (r, &g) in idx.iter().enumerate() {
                    let want = u8::from(g >= 0);
                    assert!(
                        hits[r * n..(r + 1) * n].iter().all(|&h| h == want),
                        "row {r} of group {g}: sizes {sizes:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn contiguous_groups_changing_inside_tiles_take_one_pass_each() {
        // The conformance suite's pattern: groups change every row, padding
        // inside tiles; plus an out-of-range value (skipped, flagged).
        let mut idx: Vec<i64> = (0..150).map(|r| [0, 2, -1, 2, 0, 0][r % 6]).collect();
        idx[77] = 9;
        let p = Problem {
            layout: Layout::Contiguous,
            groups: 4,
            m: idx.len(),
            n: 192,
            k: 256,
        };
        let plan = plan(&p);
        assert_eq!(plan.contiguous_passes(&idx[..64]), vec![0, 2]);
        assert_eq!(plan.contiguous_passes(&[-1, -1, 7]), Vec::<usize>::new());
        for ctas in [1, 2, 132] {
            let hits = simulate_with(&plan, ctas, &idx, &[], false);
            for (r, &g) in idx.iter().enumerate() {
                let want = u8::from((0..4).contains(&g));
                assert!(
                    hits[r * p.n..(r + 1) * p.n].iter().all(|&h| h == want),
                    "row {r} of group {g}"
                );
            }
        }
    }

    #[test]
    fn masked_schedule_covers_rows_below_masked_m_once() {
        let cases: [(&[usize], usize); 4] = [
            (&[0, 0, 0, 0], 128),
            (&[128, 64, 1, 0], 128),
            (&[7, 300, 256, 255, 0, 1, 64, 65], 320),
            (&[1; 32], 16),
        ];
        for (masked, m_max) in cases {
            assert!(masked.iter().all(|&v| v <= m_max));
            for &(n, k) in &[(7168, 2048), (4096, 7168), (64, 128)] {
                let p = Problem {
                    layout: Layout::Masked,
                    groups: masked.len(),
                    m: m_max,
                    n,
                    k,
                };
                let plan = plan(&p);
                assert_eq!(
                    plan.num_tiles,
                    masked.len() * m_max.div_ceil(64) * plan.tiles_n
                );
                for ctas in [1, 5, 132] {
                    let hits = simulate(&plan, ctas, &[], masked);
                    for (g, &mg) in masked.iter().enumerate() {
                        for r in 0..m_max {
                            let want = u8::from(r < mg);
                            let row = g * m_max + r;
                            assert!(
                                hits[row * n..(row + 1) * n].iter().all(|&h| h == want),
                                "group {g} row {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tma_parameters_follow_the_encode_rules() {
        for &(n, k) in &DEEPSEEK_NK {
            for &m in &MS {
                let plan = plan(&dense(m, n, k));
                let a = tma_a(&plan, 0x10000);
                let b = tma_b(&plan, 0x20000);
                validate_tma(&a).unwrap();
                validate_tma(&b).unwrap();
                assert_eq!(a.dims, vec![k as u64, m as u64]);
                assert_eq!(a.strides, vec![k as u64]);
                assert_eq!(a.box_dims, vec![128, 64]);
                assert_eq!(b.dims, vec![k as u64, n as u64]);
                assert_eq!(b.box_dims, vec![128, plan.block_n as u32]);
                assert_eq!(a.swizzle, TmaSwizzle::B128);
            }
        }
        let g = Problem {
            layout: Layout::Masked,
            groups: 8,
            m: 256,
            n: 4096,
            k: 7168,
        };
        let plan = plan(&g);
        assert_eq!(tma_a(&plan, 0).dims, vec![7168, 8 * 256]);
        assert_eq!(tma_b(&plan, 0).dims, vec![7168, 8 * 4096]);
        // The validator itself rejects what the driver rejects.
        let mut bad = tma_a(&plan, 0);
        bad.strides = vec![7160];
        assert!(validate_tma(&bad).is_err());
        let mut bad = tma_a(&plan, 0);
        bad.box_dims = vec![128, 512];
        assert!(validate_tma(&bad).is_err());
        let mut bad = tma_a(&plan, 0);
        bad.box_dims = vec![256, 64];
        assert!(
            validate_tma(&bad).is_err(),
            "256 bytes exceed the 128B swizzle"
        );
        let mut bad = tma_a(&plan, 0);
        bad.base = 8;
        assert!(validate_tma(&bad).is_err());
    }

    #[test]
    fn portable_grid_covers_and_respects_limits() {
        for &(n, k) in &DEEPSEEK_NK {
            for &m in &MS {
                let g = portable_grid("fp8_gemm", &dense(m, n, k)).unwrap();
                let (x, y, z) = g.grid;
                assert!(x as usize * PORTABLE_BM >= m && (x as usize - 1) * PORTABLE_BM < m);
                assert!(y as usize * PORTABLE_BN >= n && (y as usize - 1) * PORTABLE_BN < n);
                assert_eq!(z, 1);
                assert_eq!(g.block.0, PORTABLE_THREADS);
            }
        }
        let masked = Problem {
            layout: Layout::Masked,
            groups: 32,
            m: 33,
            n: 100,
            k: 7,
        };
        assert_eq!(portable_grid("x", &masked).unwrap().grid, (1, 2, 32));
        let wide = dense(1, 64 * 65536, 128);
        assert!(portable_grid("x", &wide).is_err());
        let many = Problem {
            groups: 70000,
            ..masked
        };
        assert!(portable_grid("x", &many).is_err());
        let tall = dense(1 << 30, 64, 128);
        assert!(portable_grid("x", &tall).is_ok());
    }

    #[test]
    fn smem_and_grid_fit_hopper() {
        for &(n, k) in &DEEPSEEK_NK {
            let plan = plan(&dense(4096, n, k));
            let g = plan.grid(&H200);
            assert_eq!(g.grid.0, 132);
            assert!(g.smem as usize <= H200.smem_optin as usize);
            assert_eq!(g.block, (SM90_THREADS, 1, 1));
        }
        let tiny = plan(&dense(1, 128, 128));
        assert_eq!(tiny.grid(&H200).grid.0, 1);
    }
}
