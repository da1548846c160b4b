//! The f32 micro-kernels of the fast CPU backend, one per instruction set,
//! chosen once at run time ([`Simd::detect`]).
//!
//! A micro-kernel computes one register tile of raw inner sums
//! `tile[r][j] = Σ_{k < kl} a[r][k] · b[k·ldb + j]` for `r < MR`, `j < NR`
//! (the geometry of the instruction set, [`Simd::mr`] × [`Simd::nr`]). The
//! caller scales and adds the tile into its output (the FP8 promotion), so
//! the kernels know nothing about quantization.
//!
//! This is the only module of the crate with `unsafe` code: intrinsics and
//! `#[target_feature]` functions. The safe entry point [`Simd::tile`] checks
//! every length the kernels rely on before it calls them.

#![allow(unsafe_code)]

/// The largest row count of a register tile (over every instruction set).
pub const MR_MAX: usize = 8;
/// The largest column count of a register tile.
pub const NR_MAX: usize = 32;

/// One register tile of results, `[MR_MAX][NR_MAX]`; a kernel fills its
/// `mr × nr` corner.
pub type Tile = [[f32; NR_MAX]; MR_MAX];

/// The instruction set the fast kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// x86-64 AVX-512F (+BW for the FP8 decode): 8 × 32 f32 FMA tile (16 zmm accumulators).
    Avx512,
    /// [`Simd::Avx512`] plus AVX512_BF16: the FP8 GEMMs multiply in bf16
    /// (e4m3 is exact in bf16) with `vdpbf16ps`, f32 accumulation, on an
    /// 8 × 32 tile; everything else as `Avx512`. Opt-in only
    /// (`DEEPPORT_CPU_SIMD=avx512bf16`): on the Sapphire Rapids VM it was
    /// measured on it ran at ~0.75× the f32 kernel, so [`Simd::detect`]
    /// never picks it.
    Avx512Bf16,
    /// x86-64 AVX2 + FMA: 6 × 16 f32 FMA tile (12 ymm accumulators).
    Avx2,
    /// Plain Rust loops over fixed-size arrays (4 × 16) that the compiler
    /// vectorizes for the baseline target; runs everywhere.
    Portable,
}

impl Simd {
    /// The best instruction set this CPU offers (never the opt-in
    /// [`Simd::Avx512Bf16`]).
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if Simd::Avx512.available() {
                return Simd::Avx512;
            }
            if Simd::Avx2.available() {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }

    /// Parses a name (`avx512`, `avx2`, `portable`); `None` for anything else.
    pub fn parse(s: &str) -> Option<Simd> {
        match s.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx-512" | "avx512f" => Some(Simd::Avx512),
            "avx512bf16" | "avx512-bf16" | "avx512_bf16" => Some(Simd::Avx512Bf16),
            "avx2" => Some(Simd::Avx2),
            "portable" | "scalar" | "generic" => Some(Simd::Portable),
            _ => None,
        }
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Simd::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Bf16 => {
                Simd::Avx512.available() && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Short name, as `deepport list` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Avx512Bf16 => "avx512-bf16",
            Simd::Avx2 => "avx2+fma",
            Simd::Portable => "portable",
        }
    }

    /// Rows of the register tile.
    pub fn mr(self) -> usize {
        match self {
            Simd::Avx512 | Simd::Avx512Bf16 => 8,
            Simd::Avx2 => 6,
            Simd::Portable => 4,
        }
    }

    /// Columns of the register tile (the width of a packed B panel).
    pub fn nr(self) -> usize {
        match self {
            Simd::Avx512 | Simd::Avx512Bf16 => 32,
            Simd::Avx2 => 16,
            Simd::Portable => 16,
        }
    }

    /// Computes `tile[r][j] = Σ_{k<kl} a[r][k] · b[k·ldb + j]` for the
    /// `mr() × nr()` corner of `tile` (the rest is left as it is). Rows of
    /// `a` past `mr()` are ignored; every used row needs `kl` values, and
    /// `b` needs `nr()` values at each of its `kl` rows (`ldb ≥ nr()`).
    ///
    /// # Panics
    /// If a slice is shorter than that (a caller bug, never bad user input).
    pub fn tile(self, kl: usize, a: &[&[f32]; MR_MAX], b: &[f32], ldb: usize, tile: &mut Tile) {
        self.check_tile(kl, a, b, ldb);
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 => {
                assert!(self.available(), "AVX-512 kernel on a CPU without AVX-512F");
                // SAFETY: the CPU supports AVX-512F (checked above); every row
                // of `a` has ≥ kl values and `b` has ≥ (kl−1)·ldb + 32 values
                // (checked above), which is all the kernel reads; `tile` is a
                // valid 8 × 32 array.
                unsafe { x86::tile_avx512(kl, a, b.as_ptr(), ldb, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                assert!(self.available(), "AVX2 kernel on a CPU without AVX2+FMA");
                // SAFETY: the CPU supports AVX2 and FMA (checked above); the
                // reads stay within the lengths checked above (6 rows of a,
                // 16 values per row of b); `tile` is a valid array.
                unsafe { x86::tile_avx2(kl, a, b.as_ptr(), ldb, tile) }
            }
            _ => tile_portable(kl, a, b, ldb, tile),
        }
    }
}

impl Simd {
    /// The slice lengths [`Simd::tile`] reads: `ldb ≥ nr()`, `b` with
    /// `nr()` values at each of its `kl` rows, every used row of `a` with
    /// `kl` values (a shortfall is a caller bug: panics).
    fn check_tile(self, kl: usize, a: &[&[f32]; MR_MAX], b: &[f32], ldb: usize) {
        let (mr, nr) = (self.mr(), self.nr());
        assert!(ldb >= nr, "micro-kernel: ldb {ldb} < nr {nr}");
        assert!(
            kl == 0 || b.len() >= (kl - 1) * ldb + nr,
            "micro-kernel: b holds {} values, needs {}",
            b.len(),
            (kl.max(1) - 1) * ldb + nr
        );
        for row in &a[..mr] {
            assert!(row.len() >= kl, "micro-kernel: an a row is shorter than kl");
        }
    }

    /// [`Simd::tile`] for the whole `mr() × nr()` tile, promoted onto `c`
    /// as DeepGEMM promotes a 128-K block's sums: `c[r·ldc + j] +=
    /// tile[r][j] · scale[r]`, the product and then the sum each rounded to
    /// f32 (the same bits as `tile` followed by that loop, without the
    /// tile's round trip through memory).
    ///
    /// # Panics
    /// As [`Simd::tile`], and if `c` holds fewer than `(mr() − 1)·ldc +
    /// nr()` values or `ldc < nr()` (caller bugs).
    #[allow(clippy::too_many_arguments)]
    pub fn tile_promote(
        self,
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: &[f32],
        ldb: usize,
        scale: &[f32; MR_MAX],
        c: &mut [f32],
        ldc: usize,
    ) {
        let (mr, nr) = (self.mr(), self.nr());
        assert!(
            ldc >= nr && c.len() >= (mr - 1) * ldc + nr,
            "micro-kernel: c holds {} values, needs {} (ldc {ldc})",
            c.len(),
            (mr - 1) * ldc + nr
        );
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 | Simd::Avx2 => {
                assert!(
                    self.available(),
                    "{} kernel on a CPU without it",
                    self.name()
                );
                self.check_tile(kl, a, b, ldb);
                let (b, c) = (b.as_ptr(), c.as_mut_ptr());
                if self == Simd::Avx2 {
                    // SAFETY: AVX2 and FMA are present (checked above); `a`'s
                    // 6 rows hold ≥ kl values, `b` ≥ (kl−1)·ldb + 16 and `c`
                    // ≥ 5·ldc + 16 (all checked above).
                    unsafe { x86::promote_avx2(kl, a, b, ldb, scale, c, ldc) }
                } else {
                    // SAFETY: AVX-512F is present (checked above); `a`'s 8
                    // rows hold ≥ kl values, `b` ≥ (kl−1)·ldb + 32 and `c`
                    // ≥ 7·ldc + 32 (all checked above).
                    unsafe { x86::promote_avx512(kl, a, b, ldb, scale, c, ldc) }
                }
            }
            _ => {
                let mut tile: Tile = [[0f32; NR_MAX]; MR_MAX];
                self.tile(kl, a, b, ldb, &mut tile);
                for (r, trow) in tile.iter().enumerate().take(mr) {
                    for (d, &v) in c[r * ldc..][..nr].iter_mut().zip(&trow[..nr]) {
                        *d += v * scale[r];
                    }
                }
            }
        }
    }
}

impl Simd {
    /// Columns of the narrow register tile ([`Simd::tile_narrow`]): 16.
    pub const NARROW: usize = 16;

    /// [`Simd::tile`] with 16 columns (`b` needs 16 values per row): the
    /// AVX-512 8 × 16 kernel, else the 16-column kernel of the set. For
    /// GEMMs whose packed side has at most 16 rows (decode).
    pub fn tile_narrow(
        self,
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: &[f32],
        ldb: usize,
        tile: &mut Tile,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 => {
                assert!(self.available(), "AVX-512 kernel on a CPU without AVX-512F");
                assert!(ldb >= 16, "micro-kernel: ldb {ldb} < 16");
                assert!(
                    kl == 0 || b.len() >= (kl - 1) * ldb + 16,
                    "micro-kernel: b is too short"
                );
                for row in a {
                    assert!(row.len() >= kl, "micro-kernel: an a row is shorter than kl");
                }
                // SAFETY: AVX-512F is present; the 8 rows of `a` hold ≥ kl
                // values and `b` ≥ (kl−1)·ldb + 16 (all checked above).
                unsafe { x86::tile_avx512_n16(kl, a, b.as_ptr(), ldb, tile) }
            }
            _ => self.tile(kl, a, b, ldb, tile),
        }
    }
}

impl Simd {
    /// Whether this set multiplies the FP8 GEMMs in bf16 ([`Simd::tile_bf16`]).
    pub fn bf16_dot(self) -> bool {
        self == Simd::Avx512Bf16
    }

    /// The bf16 dot-product tile of [`Simd::Avx512Bf16`]: operands are
    /// pairs of bf16 (`lo | hi << 16` = K positions `2p`, `2p + 1`);
    /// `tile[r][j] = Σ_{p<kp} a[r][p]·b[p·32 + j]` (both pair products), for
    /// 8 rows × 32 columns, accumulated in f32.
    ///
    /// # Panics
    /// If `self` is not `Avx512Bf16` or a slice is too short (caller bugs).
    pub fn tile_bf16(self, kp: usize, a: &[&[u32]; MR_MAX], b: &[u32], tile: &mut Tile) {
        assert!(self.bf16_dot() && self.available(), "bf16 tile on {self:?}");
        assert!(b.len() >= kp * 32, "bf16 micro-kernel: b is too short");
        for row in a {
            assert!(
                row.len() >= kp,
                "bf16 micro-kernel: an a row is shorter than kp"
            );
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F and AVX512_BF16 are present (checked); the 8
        // rows of `a` hold ≥ kp pairs and `b` ≥ kp·32 pairs (checked).
        unsafe {
            x86::tile_avx512_bf16(kp, a, b.as_ptr(), tile)
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (kp, a, b, tile);
    }
}

/// OCP e4m3fn codes → f32, exactly (every code, NaN codes → NaN), with
/// branch-free bit arithmetic that the compiler vectorizes.
#[inline(always)]
fn e4m3fn_body(codes: &[u8], out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        let c = c as u32;
        let mag = c & 0x7f;
        // Normal: the f32 with exponent e + (127 − 7) and the 3 mantissa bits.
        let normal = f32::from_bits((mag << 20) + (120 << 23));
        // Subnormal (exponent field 0): m · 2^-9.
        let sub = (mag & 7) as f32 * (1.0 / 512.0);
        let v = if mag < 8 { sub } else { normal };
        let v = if mag == 0x7f { f32::NAN } else { v };
        *o = f32::from_bits(v.to_bits() | ((c & 0x80) << 24));
    }
}

impl Simd {
    /// Decodes OCP e4m3fn codes into `out` (`min(len)` values), exactly.
    pub fn decode_e4m3fn(self, codes: &[u8], out: &mut [f32]) {
        let n = codes.len().min(out.len());
        let (codes, out) = (&codes[..n], &mut out[..n]);
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 if self.available() => {
                // SAFETY: the CPU supports AVX-512F/BW (checked); the body
                // is safe code over slices of equal length.
                unsafe { x86::decode_avx512(codes, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 if self.available() => {
                // SAFETY: the CPU supports AVX2 (checked); safe body.
                unsafe { x86::decode_avx2(codes, out) }
            }
            _ => e4m3fn_body(codes, out),
        }
    }
}

/// OCP e4m3fn codes → bf16 bits, exactly (e4m3 values are bf16 values;
/// NaN codes → a quiet NaN of the code's sign), branch-free for the
/// vectorizer.
#[inline(always)]
fn e4m3fn_bf16_body(codes: &[u8], out: &mut [u16]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        let c = c as u32;
        let mag = c & 0x7f;
        // Normal: exponent e + (127 − 7), the 3 mantissa bits on top of 7.
        let normal = (mag << 4) + (120 << 7);
        // Subnormal (exponent field 0): m · 2^-9, normal in bf16.
        let sub = ((mag & 7) as f32 * (1.0 / 512.0)).to_bits() >> 16;
        let v = if mag < 8 { sub } else { normal };
        let v = if mag == 0x7f { 0x7fc0 } else { v };
        *o = (v | ((c & 0x80) << 8)) as u16;
    }
}

impl Simd {
    /// Decodes OCP e4m3fn codes into bf16 bits (`min(len)` values), exactly.
    pub fn decode_e4m3fn_bf16(self, codes: &[u8], out: &mut [u16]) {
        let n = codes.len().min(out.len());
        let (codes, out) = (&codes[..n], &mut out[..n]);
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 if x86::vbmi() => {
                // SAFETY: the CPU supports AVX-512F/BW/VBMI (checked); one
                // row, read and written within the slices (equal length).
                unsafe { x86::decode_rows_bf16_vbmi(codes, n, n, out, n) }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 if self.available() => {
                // SAFETY: the CPU supports AVX-512F/BW (checked); the body
                // is safe code over slices of equal length.
                unsafe { x86::decode_bf16_avx512(codes, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 if self.available() => {
                // SAFETY: the CPU supports AVX2 (checked); safe body.
                unsafe { x86::decode_bf16_avx2(codes, out) }
            }
            _ => e4m3fn_bf16_body(codes, out),
        }
    }

    /// How [`Simd::decode_e4m3fn_bf16`] decodes under this set, for
    /// `deepport list`.
    pub fn e4m3fn_bf16_decoder(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 if x86::vbmi() => "avx512-vbmi byte-table lookups",
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 | Simd::Avx512Bf16 if self.available() => {
                "avx512 shift-add, vpermw subnormals"
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 if self.available() => "avx2 (compiled loop)",
            _ => "portable loop",
        }
    }

    /// [`Simd::decode_e4m3fn_bf16`] of `out.len() / ld` rows: row `i`'s
    /// `kl` codes start at `codes[i·stride]` and go to `out[i·ld..][..kl]`,
    /// the rest of each output row (`kl..ld`) is zeroed. One dispatch for
    /// the whole batch (the AMX small path decodes 32 rows of 128 codes
    /// per K block).
    pub fn decode_e4m3fn_bf16_rows(
        self,
        codes: &[u8],
        stride: usize,
        kl: usize,
        out: &mut [u16],
        ld: usize,
    ) {
        assert!(kl <= ld, "decode rows: {kl} codes into rows of {ld}");
        if ld == 0 {
            return;
        }
        let rows = out.len() / ld;
        if rows == 0 {
            return;
        }
        assert!(
            codes.len() >= (rows - 1) * stride + kl,
            "decode rows: {} codes, {rows} rows of {kl} at stride {stride} need {}",
            codes.len(),
            (rows - 1) * stride + kl
        );
        #[cfg(target_arch = "x86_64")]
        if matches!(self, Simd::Avx512 | Simd::Avx512Bf16) && x86::vbmi() {
            // SAFETY: the CPU supports AVX-512F/BW/VBMI (checked); the
            // kernel reads and writes through the slices' bounds.
            unsafe { x86::decode_rows_bf16_vbmi(codes, stride, kl, out, ld) };
            return;
        }
        for (i, row) in out.chunks_exact_mut(ld).enumerate() {
            self.decode_e4m3fn_bf16(&codes[i * stride..][..kl], &mut row[..kl]);
            row[kl..].fill(0);
        }
    }
}

/// The bf16 bits of the e4m3fn magnitudes 0..128 (sign clear): the
/// table the VBMI decoder looks bytes up in.
const E4M3FN_BF16: [u16; 128] = {
    let mut t = [0u16; 128];
    let mut mag = 0;
    while mag < 128 {
        let (e, m) = (mag >> 3, mag & 7);
        t[mag] = if mag == 0x7f {
            0x7fc0
        } else if e > 0 {
            // 2^(e−7) · (1 + m/8): bf16 exponent e + 120, m on top of 7 bits.
            (((e + 120) << 7) | (m << 4)) as u16
        } else if m == 0 {
            0
        } else {
            // m · 2^-9 with m = 2^p + r (r < 2^p): exponent 118 + p, the
            // p bits of r on top of bf16's 7.
            let p = if m >= 4 {
                2
            } else if m >= 2 {
                1
            } else {
                0
            };
            (((118 + p) << 7) | ((m - (1 << p)) << (7 - p))) as u16
        };
        mag += 1;
    }
    t
};

/// The portable 4 × 16 kernel: fixed-size arrays the compiler keeps in
/// vector registers.
fn tile_portable(kl: usize, a: &[&[f32]; MR_MAX], b: &[f32], ldb: usize, tile: &mut Tile) {
    const MR: usize = 4;
    const NR: usize = 16;
    let mut acc = [[0f32; NR]; MR];
    let rows: [&[f32]; MR] = [&a[0][..kl], &a[1][..kl], &a[2][..kl], &a[3][..kl]];
    for k in 0..kl {
        let bk: &[f32; NR] = b[k * ldb..k * ldb + NR]
            .try_into()
            .expect("slice of NR values");
        for r in 0..MR {
            let av = rows[r][k];
            for j in 0..NR {
                acc[r][j] += av * bk[j];
            }
        }
    }
    for r in 0..MR {
        tile[r][..NR].copy_from_slice(&acc[r]);
    }
}

/// `isa_dispatch!(fn name(a: T, ...) -> R = body);` defines
/// `fn name(simd: Simd, a: T, ...) -> R`, which runs `body(a, ...)`
/// compiled for AVX-512F (`Simd::Avx512*`), for AVX2 (`Simd::Avx2`) or for
/// the baseline target (`Simd::Portable`). `body` must be safe code marked
/// `#[inline(always)]` (so it is compiled into each variant, with what it
/// inlines); Rust never contracts a product and a sum into a fused
/// multiply-add, so every variant computes the same bits — only the vector
/// width the compiler picks changes.
macro_rules! isa_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? = $body:path) => {
        $(#[$m])*
        #[allow(unsafe_code)]
        $vis fn $name(simd: $crate::fast::simd::Simd, $($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                match simd {
                    $crate::fast::simd::Simd::Avx512 | $crate::fast::simd::Simd::Avx512Bf16 => {
                        // SAFETY: a `Simd` other than `Portable` is only in
                        // use where `Simd::available` found its features
                        // (AVX-512F for both AVX-512 sets).
                        return unsafe { avx512($($a),*) };
                    }
                    $crate::fast::simd::Simd::Avx2 => {
                        // SAFETY: as above, AVX2.
                        return unsafe { avx2($($a),*) };
                    }
                    $crate::fast::simd::Simd::Portable => {}
                }
            }
            $body($($a),*)
        }
    };
}
pub(crate) use isa_dispatch;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{e4m3fn_bf16_body, e4m3fn_body, Tile, MR_MAX};
    use std::arch::x86_64::*;

    /// [`e4m3fn_bf16_body`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512BW.
    ///
    /// 32 codes per step in 16-bit lanes: the normal encoding is a shift and
    /// an add, the eight subnormal magnitudes come from a `vpermw` table.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn decode_bf16_avx512(codes: &[u8], out: &mut [u16]) {
        let n = codes.len().min(out.len());
        let main = n / 32 * 32;
        // bf16 bits of m · 2^-9, the subnormal e4m3 magnitudes m < 8.
        const SUB: [u16; 32] = {
            let mut t = [0u16; 32];
            let mut m = 0;
            while m < 8 {
                t[m] = super::E4M3FN_BF16[m];
                m += 1;
            }
            t
        };
        // SAFETY (for the block): AVX-512F/BW are enabled by the caller's
        // check; every load reads 32 bytes of `codes` and every store
        // writes 32 values of `out` at offsets below `main ≤ len`.
        unsafe {
            let sub = _mm512_loadu_si512(SUB.as_ptr().cast());
            let (m7f, m80) = (_mm512_set1_epi16(0x7f), _mm512_set1_epi16(0x80));
            let (bias, eight) = (_mm512_set1_epi16(120 << 7), _mm512_set1_epi16(8));
            let nan = _mm512_set1_epi16(0x7fc0);
            for i in (0..main).step_by(32) {
                let c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(codes.as_ptr().add(i).cast()));
                let mag = _mm512_and_si512(c, m7f);
                let normal = _mm512_add_epi16(_mm512_slli_epi16::<4>(mag), bias);
                let v = _mm512_mask_blend_epi16(
                    _mm512_cmplt_epu16_mask(mag, eight),
                    normal,
                    _mm512_permutexvar_epi16(mag, sub),
                );
                let v = _mm512_mask_blend_epi16(_mm512_cmpeq_epi16_mask(mag, m7f), v, nan);
                let v = _mm512_or_si512(v, _mm512_slli_epi16::<8>(_mm512_and_si512(c, m80)));
                _mm512_storeu_si512(out.as_mut_ptr().add(i).cast(), v);
            }
        }
        e4m3fn_bf16_body(&codes[main..n], &mut out[main..n])
    }

    /// Whether the CPU has AVX-512F/BW and VBMI (byte permutes), for
    /// [`decode_rows_bf16_vbmi`].
    pub(super) fn vbmi() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
    }

    /// e4m3fn → bf16 by table, 64 codes per step: the low and the high
    /// byte of each value are two `vpermi2b` lookups of the code's 7
    /// magnitude bits in [`super::E4M3FN_BF16`] (128 entries, two
    /// registers per byte), the sign is OR-ed into the high byte, and two
    /// `vpermt2b` interleave the bytes into 16-bit values: four shuffles
    /// per 64 codes, where [`decode_bf16_avx512`] spends a widening, a
    /// `vpermw`, two compares and two blends per 32 (measured 1.6× faster
    /// on a 4 096-code block, 2.1 against 3.3 ns per 64 codes). Rows
    /// as [`super::Simd::decode_e4m3fn_bf16_rows`] (the tail of a row by
    /// masked loads and stores).
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW/VBMI ([`vbmi`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn decode_rows_bf16_vbmi(
        codes: &[u8],
        stride: usize,
        kl: usize,
        out: &mut [u16],
        ld: usize,
    ) {
        /// The low and the high bytes of [`super::E4M3FN_BF16`].
        const BYTES: [[u8; 128]; 2] = {
            let mut t = [[0u8; 128]; 2];
            let mut i = 0;
            while i < 128 {
                t[0][i] = super::E4M3FN_BF16[i] as u8;
                t[1][i] = (super::E4M3FN_BF16[i] >> 8) as u8;
                i += 1;
            }
            t
        };
        /// Byte i of the first (second) 32 values: lo[i] at 2i, hi[i] at
        /// 2i + 1 (an index of 64 + i picks the second operand).
        const INTERLEAVE: [[u8; 64]; 2] = {
            let mut t = [[0u8; 64]; 2];
            let mut j = 0;
            while j < 32 {
                t[0][2 * j] = j as u8;
                t[0][2 * j + 1] = 64 + j as u8;
                t[1][2 * j] = 32 + j as u8;
                t[1][2 * j + 1] = 96 + j as u8;
                j += 1;
            }
            t
        };
        let [lo, hi] = &BYTES;
        let [i0, i1] = &INTERLEAVE;
        let rows = out.len().checked_div(ld).unwrap_or(0);
        assert!(kl <= ld && (rows == 0 || codes.len() >= (rows - 1) * stride + kl));
        // SAFETY (for the block): VBMI and AVX-512F/BW are enabled by the
        // caller's check. Row r reads codes[r·stride + j] for j < kl and
        // writes out[r·ld + j] for j < ld, in bounds by the assertion
        // above (`rows` whole rows of `out`); the tail steps mask both.
        unsafe {
            let l0 = _mm512_loadu_si512(lo.as_ptr().cast());
            let l1 = _mm512_loadu_si512(lo[64..].as_ptr().cast());
            let h0 = _mm512_loadu_si512(hi.as_ptr().cast());
            let h1 = _mm512_loadu_si512(hi[64..].as_ptr().cast());
            let i0 = _mm512_loadu_si512(i0.as_ptr().cast());
            let i1 = _mm512_loadu_si512(i1.as_ptr().cast());
            let sign = _mm512_set1_epi8(0x80u8 as i8);
            for r in 0..rows {
                let src = codes.as_ptr().add(r * stride);
                let dst = out.as_mut_ptr().add(r * ld);
                let mut j = 0;
                while j < kl {
                    let n = (kl - j).min(64);
                    let c = if n == 64 {
                        _mm512_loadu_si512(src.add(j).cast())
                    } else {
                        _mm512_maskz_loadu_epi8(u64::MAX >> (64 - n), src.add(j).cast())
                    };
                    let vl = _mm512_permutex2var_epi8(l0, c, l1);
                    let vh = _mm512_permutex2var_epi8(h0, c, h1);
                    // vh | (c & 0x80)
                    let vh = _mm512_ternarylogic_epi32::<0xF8>(vh, c, sign);
                    let w0 = _mm512_permutex2var_epi8(vl, i0, vh);
                    let w1 = _mm512_permutex2var_epi8(vl, i1, vh);
                    if n == 64 {
                        _mm512_storeu_si512(dst.add(j).cast(), w0);
                        _mm512_storeu_si512(dst.add(j + 32).cast(), w1);
                    } else {
                        let m0 = u32::MAX >> (32 - n.min(32));
                        _mm512_mask_storeu_epi16(dst.add(j).cast(), m0, w0);
                        if n > 32 {
                            let m1 = u32::MAX >> (64 - n);
                            _mm512_mask_storeu_epi16(dst.add(j + 32).cast(), m1, w1);
                        }
                    }
                    j += n;
                }
                if kl < ld {
                    std::slice::from_raw_parts_mut(dst.add(kl), ld - kl).fill(0);
                }
            }
        }
    }

    /// [`e4m3fn_bf16_body`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_bf16_avx2(codes: &[u8], out: &mut [u16]) {
        e4m3fn_bf16_body(codes, out)
    }

    /// [`e4m3fn_body`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn decode_avx512(codes: &[u8], out: &mut [f32]) {
        e4m3fn_body(codes, out)
    }

    /// [`e4m3fn_body`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_avx2(codes: &[u8], out: &mut [f32]) {
        e4m3fn_body(codes, out)
    }

    /// The sums of the 8 × 32 AVX-512 tile, in registers.
    ///
    /// # Safety
    /// As [`tile_avx512`].
    #[inline(always)]
    unsafe fn acc_avx512(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
    ) -> [[__m512; 2]; 8] {
        let p: [*const f32; 8] = std::array::from_fn(|r| a[r].as_ptr());
        let mut c = [[_mm512_setzero_ps(); 2]; 8];
        for k in 0..kl {
            // SAFETY: k < kl, so b + k·ldb .. + 32 lies inside b (caller).
            let bk = unsafe { b.add(k * ldb) };
            // SAFETY: as above; unaligned loads.
            let (b0, b1) = unsafe { (_mm512_loadu_ps(bk), _mm512_loadu_ps(bk.add(16))) };
            for r in 0..8 {
                // SAFETY: a[r] holds ≥ kl values (caller) and k < kl.
                let av = _mm512_set1_ps(unsafe { *p[r].add(k) });
                c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
                c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
            }
        }
        c
    }

    /// 8 × 32 tile with AVX-512F FMAs.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; every `a[r]` (r < 8) must hold `kl`
    /// values and `b` must hold `(kl − 1)·ldb + 32` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
        tile: &mut Tile,
    ) {
        // SAFETY: the caller's contract is acc_avx512's.
        let c = unsafe { acc_avx512(kl, a, b, ldb) };
        for r in 0..8 {
            // SAFETY: tile[r] is a [f32; 32]: two 16-lane stores fit.
            unsafe {
                _mm512_storeu_ps(tile[r].as_mut_ptr(), c[r][0]);
                _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), c[r][1]);
            }
        }
    }

    /// [`tile_avx512`] promoted onto `c`: `c[r·ldc + j] += sum · scale[r]`
    /// (product, then sum, each rounded).
    ///
    /// # Safety
    /// As [`tile_avx512`]; `c` must hold `7·ldc + 32` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn promote_avx512(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
        scale: &[f32; MR_MAX],
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: the caller's contract is acc_avx512's.
        let acc = unsafe { acc_avx512(kl, a, b, ldb) };
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(scale[r]);
            for (h, &v) in acc.iter().enumerate() {
                // SAFETY: r < 8 and h < 2, so c + r·ldc + 16h .. + 16 lies
                // within 7·ldc + 32 values (caller).
                unsafe {
                    let at = c.add(r * ldc + 16 * h);
                    let sum = _mm512_add_ps(_mm512_loadu_ps(at), _mm512_mul_ps(v, s));
                    _mm512_storeu_ps(at, sum);
                }
            }
        }
    }

    /// 8 × 16 tile with AVX-512F FMAs (one zmm per row).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; every `a[r]` (r < 8) must hold `kl`
    /// values and `b` must hold `(kl − 1)·ldb + 16` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512_n16(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
        tile: &mut Tile,
    ) {
        let p: [*const f32; 8] = std::array::from_fn(|r| a[r].as_ptr());
        let mut c = [_mm512_setzero_ps(); 8];
        for k in 0..kl {
            // SAFETY: k < kl, so b + k·ldb .. + 16 lies inside b (caller).
            let b0 = unsafe { _mm512_loadu_ps(b.add(k * ldb)) };
            for r in 0..8 {
                // SAFETY: a[r] holds ≥ kl values (caller) and k < kl.
                let av = _mm512_set1_ps(unsafe { *p[r].add(k) });
                c[r] = _mm512_fmadd_ps(av, b0, c[r]);
            }
        }
        for r in 0..8 {
            // SAFETY: tile[r] is a [f32; 32]: one 16-lane store fits.
            unsafe { _mm512_storeu_ps(tile[r].as_mut_ptr(), c[r]) };
        }
    }

    /// 8 × 32 tile of bf16 pair dot products (`vdpbf16ps`), f32 sums.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX512_BF16; every `a[r]` must
    /// hold `kp` pairs and `b` must hold `kp·32` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile_avx512_bf16(
        kp: usize,
        a: &[&[u32]; MR_MAX],
        b: *const u32,
        tile: &mut Tile,
    ) {
        let p: [*const u32; 8] = std::array::from_fn(|r| a[r].as_ptr());
        let mut c = [[_mm512_setzero_ps(); 2]; 8];
        for k in 0..kp {
            // SAFETY: k < kp, so b + 32k .. + 32 lies inside b (caller).
            let (b0, b1): (__m512bh, __m512bh) = unsafe {
                let bk = b.add(k * 32) as *const __m512i;
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bk)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bk.add(1))),
                )
            };
            for r in 0..8 {
                // SAFETY: a[r] holds ≥ kp pairs (caller) and k < kp; the
                // transmute reinterprets 16 lanes of 32 bits as 32 bf16.
                let av = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*p[r].add(k) as i32))
                };
                c[r][0] = _mm512_dpbf16_ps(c[r][0], av, b0);
                c[r][1] = _mm512_dpbf16_ps(c[r][1], av, b1);
            }
        }
        for r in 0..8 {
            // SAFETY: tile[r] is a [f32; 32]: two 16-lane stores fit.
            unsafe {
                _mm512_storeu_ps(tile[r].as_mut_ptr(), c[r][0]);
                _mm512_storeu_ps(tile[r].as_mut_ptr().add(16), c[r][1]);
            }
        }
    }

    /// The sums of the 6 × 16 AVX2 tile, in registers.
    ///
    /// # Safety
    /// As [`tile_avx2`].
    #[inline(always)]
    unsafe fn acc_avx2(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
    ) -> [[__m256; 2]; 6] {
        let p: [*const f32; 6] = std::array::from_fn(|r| a[r].as_ptr());
        let mut c = [[_mm256_setzero_ps(); 2]; 6];
        for k in 0..kl {
            // SAFETY: k < kl, so b + k·ldb .. + 16 lies inside b (caller).
            let bk = unsafe { b.add(k * ldb) };
            // SAFETY: as above; unaligned loads.
            let (b0, b1) = unsafe { (_mm256_loadu_ps(bk), _mm256_loadu_ps(bk.add(8))) };
            for r in 0..6 {
                // SAFETY: a[r] holds ≥ kl values (caller) and k < kl.
                let av = _mm256_set1_ps(unsafe { *p[r].add(k) });
                c[r][0] = _mm256_fmadd_ps(av, b0, c[r][0]);
                c[r][1] = _mm256_fmadd_ps(av, b1, c[r][1]);
            }
        }
        c
    }

    /// 6 × 16 tile with AVX2 + FMA.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every `a[r]` (r < 6) must hold
    /// `kl` values and `b` must hold `(kl − 1)·ldb + 16` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
        tile: &mut Tile,
    ) {
        // SAFETY: the caller's contract is acc_avx2's.
        let c = unsafe { acc_avx2(kl, a, b, ldb) };
        for r in 0..6 {
            // SAFETY: tile[r] is a [f32; 32]: two 8-lane stores fit.
            unsafe {
                _mm256_storeu_ps(tile[r].as_mut_ptr(), c[r][0]);
                _mm256_storeu_ps(tile[r].as_mut_ptr().add(8), c[r][1]);
            }
        }
    }

    /// [`tile_avx2`] promoted onto `c`: `c[r·ldc + j] += sum · scale[r]`
    /// (product, then sum, each rounded).
    ///
    /// # Safety
    /// As [`tile_avx2`]; `c` must hold `5·ldc + 16` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn promote_avx2(
        kl: usize,
        a: &[&[f32]; MR_MAX],
        b: *const f32,
        ldb: usize,
        scale: &[f32; MR_MAX],
        c: *mut f32,
        ldc: usize,
    ) {
        // SAFETY: the caller's contract is acc_avx2's.
        let acc = unsafe { acc_avx2(kl, a, b, ldb) };
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm256_set1_ps(scale[r]);
            for (h, &v) in acc.iter().enumerate() {
                // SAFETY: r < 6 and h < 2, so c + r·ldc + 8h .. + 8 lies
                // within 5·ldc + 16 values (caller).
                unsafe {
                    let at = c.add(r * ldc + 8 * h);
                    let sum = _mm256_add_ps(_mm256_loadu_ps(at), _mm256_mul_ps(v, s));
                    _mm256_storeu_ps(at, sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_available_kernel_matches_plain_loops() {
        let kl = 131;
        let ldb = 40;
        let a_rows: Vec<Vec<f32>> = (0..MR_MAX)
            .map(|r| {
                (0..kl)
                    .map(|k| ((r * 7 + k * 3) % 11) as f32 - 5.0)
                    .collect()
            })
            .collect();
        let b: Vec<f32> = (0..kl * ldb)
            .map(|i| ((i * 5) % 13) as f32 * 0.25 - 1.5)
            .collect();
        let a: [&[f32]; MR_MAX] = std::array::from_fn(|r| a_rows[r].as_slice());
        for simd in [Simd::Avx512Bf16, Simd::Avx512, Simd::Avx2, Simd::Portable] {
            if !simd.available() {
                continue;
            }
            let mut tile = [[f32::NAN; NR_MAX]; MR_MAX];
            simd.tile(kl, &a, &b, ldb, &mut tile);
            for r in 0..simd.mr() {
                for j in 0..simd.nr() {
                    let want: f32 = (0..kl).map(|k| a_rows[r][k] * b[k * ldb + j]).sum();
                    assert_eq!(tile[r][j], want, "{simd:?} r {r} j {j}");
                }
            }
            let mut tile = [[f32::NAN; NR_MAX]; MR_MAX];
            simd.tile_narrow(kl, &a, &b, ldb, &mut tile);
            for r in 0..simd.mr() {
                for j in 0..Simd::NARROW {
                    let want: f32 = (0..kl).map(|k| a_rows[r][k] * b[k * ldb + j]).sum();
                    assert_eq!(tile[r][j], want, "{simd:?} narrow r {r} j {j}");
                }
            }
        }
    }

    /// `tile_promote` is `tile` followed by `c += tile · scale` (product,
    /// then sum, each rounded), bit for bit, on random values; the rest of
    /// `c` (between rows, past the tile) is untouched.
    #[test]
    fn tile_promote_is_tile_then_promotion() {
        let (kl, ldb, ldc) = (128, 48, 40);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut val = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let a_rows: Vec<Vec<f32>> = (0..MR_MAX)
            .map(|_| (0..kl).map(|_| val()).collect())
            .collect();
        let b: Vec<f32> = (0..kl * ldb).map(|_| val()).collect();
        let scale: [f32; MR_MAX] = std::array::from_fn(|_| val() * 0.01);
        let c0: Vec<f32> = (0..MR_MAX * ldc).map(|_| val()).collect();
        let a: [&[f32]; MR_MAX] = std::array::from_fn(|r| a_rows[r].as_slice());
        for simd in [Simd::Avx512Bf16, Simd::Avx512, Simd::Avx2, Simd::Portable] {
            if !simd.available() {
                continue;
            }
            let (mr, nr) = (simd.mr(), simd.nr());
            let mut tile = [[f32::NAN; NR_MAX]; MR_MAX];
            simd.tile(kl, &a, &b, ldb, &mut tile);
            let mut want = c0.clone();
            for r in 0..mr {
                for j in 0..nr {
                    want[r * ldc + j] += tile[r][j] * scale[r];
                }
            }
            let mut got = c0.clone();
            simd.tile_promote(kl, &a, &b, ldb, &scale, &mut got, ldc);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{simd:?}: c[{i}] {g} vs {w}");
            }
        }
    }

    #[test]
    fn e4m3_decode_is_exact_on_every_code() {
        let codes: Vec<u8> = (0..=255u8).collect();
        for simd in [Simd::Avx512Bf16, Simd::Avx512, Simd::Avx2, Simd::Portable] {
            if !simd.available() {
                continue;
            }
            let mut out = vec![0f32; 256];
            simd.decode_e4m3fn(&codes, &mut out);
            for (c, v) in out.iter().enumerate() {
                let want = deepport_core::formats::e4m3_to_f32(c as u8);
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "{simd:?} code {c:#x}: {v} vs {want}"
                );
            }
        }
    }

    #[test]
    fn e4m3_bf16_decode_is_exact_on_every_code() {
        // Every code, then a length that leaves a ragged tail after the
        // vector steps, starting at an odd code.
        let all: Vec<u8> = (0..=255u8).collect();
        let ragged: Vec<u8> = (0..301).map(|i| (i * 37 + 5) as u8).collect();
        for (codes, simd) in [&all, &ragged]
            .into_iter()
            .flat_map(|c| [Simd::Avx512, Simd::Avx2, Simd::Portable].map(|s| (c, s)))
        {
            if !simd.available() {
                continue;
            }
            let mut out = vec![0u16; codes.len()];
            simd.decode_e4m3fn_bf16(codes, &mut out);
            check_e4m3_bf16(&format!("{simd:?}"), codes, &out);
        }
        // Both AVX-512 kernels, whichever the dispatch picks here.
        #[cfg(target_arch = "x86_64")]
        for codes in [&all, &ragged] {
            let mut out = vec![0u16; codes.len()];
            if Simd::Avx512.available() {
                // SAFETY: AVX-512F/BW checked.
                unsafe { x86::decode_bf16_avx512(codes, &mut out) };
                check_e4m3_bf16("avx512 shift", codes, &out);
            }
            if x86::vbmi() {
                let n = codes.len();
                out.fill(0xffff);
                // SAFETY: AVX-512F/BW/VBMI checked.
                unsafe { x86::decode_rows_bf16_vbmi(codes, n, n, &mut out, n) };
                check_e4m3_bf16("avx512 vbmi", codes, &out);
            }
        }
    }

    fn check_e4m3_bf16(what: &str, codes: &[u8], out: &[u16]) {
        assert_eq!(codes.len(), out.len());
        for (&c, &v) in codes.iter().zip(out) {
            let want = deepport_core::formats::e4m3_to_f32(c);
            let got = f32::from_bits((v as u32) << 16);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{what} code {c:#x}: {got} vs {want}"
            );
        }
    }

    /// The batched row decode: every row's codes at its stride, each
    /// output row's tail zeroed (the buffer is poisoned first), for
    /// lengths around the 64-code step and for every instruction set.
    #[test]
    fn e4m3_bf16_row_decode_matches_the_single_decode() {
        let (rows, stride) = (5usize, 300usize);
        let codes: Vec<u8> = (0..rows * stride).map(|i| (i * 131 + 7) as u8).collect();
        let shapes = [0usize, 1, 31, 32, 63, 64, 65, 100, 128, 160].map(|kl| (kl, 160));
        for simd in [Simd::Avx512, Simd::Avx2, Simd::Portable] {
            if !simd.available() {
                continue;
            }
            for (kl, ld) in shapes.into_iter().chain([(45, 45), (100, 100)]) {
                // Poisoned, past the last row too: nothing may land there.
                let mut big = vec![0xffffu16; rows * ld + 64];
                let codes = &codes[..(rows - 1) * stride + kl];
                simd.decode_e4m3fn_bf16_rows(codes, stride, kl, &mut big[..rows * ld], ld);
                assert!(
                    big[rows * ld..].iter().all(|&v| v == 0xffff),
                    "{simd:?} kl {kl}: wrote past the last row"
                );
                for r in 0..rows {
                    let row = &big[r * ld..(r + 1) * ld];
                    let what = format!("{simd:?} kl {kl} row {r}");
                    check_e4m3_bf16(&what, &codes[r * stride..][..kl], &row[..kl]);
                    assert!(row[kl..].iter().all(|&v| v == 0), "{what}: tail not zeroed");
                }
            }
        }
    }

    #[test]
    fn bf16_tile_matches_plain_loops() {
        if !Simd::Avx512Bf16.available() {
            return;
        }
        let kp = 70;
        // Small integers and halves: exact in bf16, sums exact in f32.
        let bf = |x: f32| x.to_bits() >> 16;
        let val = |i: usize| ((i * 7) % 9) as f32 * 0.5 - 2.0;
        let a_rows: Vec<Vec<u32>> = (0..MR_MAX)
            .map(|r| {
                (0..kp)
                    .map(|p| bf(val(r * 131 + 2 * p)) | bf(val(r * 131 + 2 * p + 1)) << 16)
                    .collect()
            })
            .collect();
        let b: Vec<u32> = (0..kp * 32)
            .map(|i| bf(val(3 * i + 1)) | bf(val(5 * i + 2)) << 16)
            .collect();
        let a: [&[u32]; MR_MAX] = std::array::from_fn(|r| a_rows[r].as_slice());
        let mut tile = [[f32::NAN; NR_MAX]; MR_MAX];
        Simd::Avx512Bf16.tile_bf16(kp, &a, &b, &mut tile);
        let unbf = |x: u32| f32::from_bits((x & 0xffff) << 16);
        for r in 0..MR_MAX {
            for j in 0..32 {
                let want: f32 = (0..kp)
                    .map(|p| {
                        let (x, y) = (a_rows[r][p], b[p * 32 + j]);
                        unbf(x) * unbf(y) + unbf(x >> 16) * unbf(y >> 16)
                    })
                    .sum();
                assert_eq!(tile[r][j], want, "r {r} j {j}");
            }
        }
    }
}
