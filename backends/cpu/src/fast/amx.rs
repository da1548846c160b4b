//! Intel AMX-BF16: run-time detection and one safe micro-kernel.
//!
//! [`available`] checks, once per process, that the CPU has AMX-TILE and
//! AMX-BF16 (CPUID leaf 7), that the OS enabled the tile state (XCR0 bits
//! 17 and 18) and that Linux granted this process the tile data
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, a raw syscall).
//!
//! [`with_amx`] loads the one tile configuration every kernel here uses
//! (eight tiles of 16 rows × 64 bytes) for the duration of a closure and
//! releases the tiles afterwards; inside it, [`Amx::block`] computes one
//! 32 × 32 block of raw f32 inner sums over one 128-wide K block:
//!
//! `out[i][j] = Σ_{q<64} a[i·lda + 2q]·b[q·ldb + j].lo + a[i·lda + 2q + 1]·b[q·ldb + j].hi`
//!
//! `a` holds 32 rows of 128 bf16 (row `i` at `i·lda`), `b` 64 rows of 32
//! bf16 pairs (`lo | hi << 16`, K positions `2q`, `2q + 1`: the VNNI layout
//! `tdpbf16ps` wants) at stride `ldb`. Four tile steps of K = 32 feed 2 × 2
//! accumulator tiles (`tmm0..3`); A rows go through `tmm4/5`, B through
//! `tmm6/7`. The products of bf16 values are exact and the sums are f32;
//! callers promote the block in f32 (`d += sum · scale`), so the FP8 GEMMs
//! keep DeepGEMM's per-128-K semantics. AMX treats bf16 subnormal inputs as
//! zero: e4m3 values are all normal in bf16, and callers use it only where
//! that holds or is allowed.
//!
//! The instructions are written with `asm!` (stable Rust has no AMX
//! intrinsics). Every `unsafe` block says why it is sound.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;

/// bf16 values per row of `a` (one K block).
pub const K: usize = 128;
/// Rows of `a` and columns of `b` per block.
pub const BLOCK: usize = 32;
/// Pair rows of `b` per block (`K / 2`).
pub const KP: usize = K / 2;

/// One 32 × 32 block of f32 sums.
pub type Block = [[f32; BLOCK]; BLOCK];

/// Why AMX is not used on this machine, or `None` when it is usable.
pub fn unavailable_reason() -> Option<&'static str> {
    static STATE: OnceLock<Option<&'static str>> = OnceLock::new();
    *STATE.get_or_init(probe)
}

/// Whether the AMX-BF16 kernels run here (CPU, OS and permission).
pub fn available() -> bool {
    unavailable_reason().is_none()
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn probe() -> Option<&'static str> {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID exists on every x86-64 CPU (the intrinsics are safe).
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 0xd {
        return Some("CPUID has no leaf 7/0xd");
    }
    let l7 = __cpuid_count(7, 0);
    let (tile, bf16) = ((l7.edx >> 24) & 1 == 1, (l7.edx >> 22) & 1 == 1);
    if !(tile && bf16) {
        return Some("the CPU has no AMX-TILE/AMX-BF16");
    }
    let l1 = __cpuid(1);
    if (l1.ecx >> 27) & 1 == 0 {
        return Some("OSXSAVE is off: no XGETBV");
    }
    let xcr0 = xgetbv0();
    if (xcr0 >> 17) & 3 != 3 {
        return Some("the OS did not enable the AMX tile state (XCR0 bits 17/18)");
    }
    if !request_tile_permission() {
        return Some("Linux refused arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)");
    }
    None
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn probe() -> Option<&'static str> {
    Some("AMX is used on x86-64 Linux only")
}

/// XCR0 (the OS-enabled state components).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 is valid when CPUID.1:ECX.OSXSAVE is set
    // (checked by the caller); it only writes EAX/EDX.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    (lo as u64) | ((hi as u64) << 32)
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0`: asks Linux
/// (5.16+) for the tile data state, for the whole process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: a raw Linux x86-64 syscall: number in RAX, arguments in
    // RDI/RSI, result in RAX; the kernel clobbers RCX and R11 (declared). The
    // request only changes which register state this process may use.
    unsafe {
        std::arch::asm!("syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret == 0
}

/// The tile configuration (palette 1): tiles 0..8 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette 1
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // colsb (u16 LE)
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

/// A deliberately wrong VNNI layout for the mutation test
/// (`backends/cpu/tests/amx_mutant.rs`): when on, the GEMM packing swaps the
/// two bf16 of every pair. Never set outside that test.
static VNNI_MUTANT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the VNNI mutant on or off (test hook, process-wide).
#[doc(hidden)]
pub fn set_vnni_mutant(on: bool) {
    VNNI_MUTANT.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// One VNNI pair (`lo` at the even K position), or the mutant's swap.
#[inline]
pub(crate) fn pair(lo: u16, hi: u16, mutant: bool) -> u32 {
    if mutant {
        hi as u32 | (lo as u32) << 16
    } else {
        lo as u32 | (hi as u32) << 16
    }
}

/// Whether the mutant is on (read once per packing call).
pub(crate) fn vnni_mutant() -> bool {
    VNNI_MUTANT.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// Nesting depth of [`with_amx`] on this thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Proof that this thread has the tile configuration of this module loaded
/// (only [`with_amx`] makes one; it cannot leave the thread).
pub struct Amx {
    _not_send: PhantomData<*const ()>,
}

/// Runs `f` with the tiles configured; `None` (without calling `f`) where
/// AMX is not [`available`]. Nested calls share the configuration; the
/// outermost releases the tiles when `f` returns or unwinds.
pub fn with_amx<R>(f: impl FnOnce(&Amx) -> R) -> Option<R> {
    if !available() {
        return None;
    }
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            let d = DEPTH.with(|d| {
                let v = d.get() - 1;
                d.set(v);
                v
            });
            if d == 0 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX is available (checked before the guard was
                // made); TILERELEASE only resets the tile state of this thread.
                unsafe {
                    std::arch::asm!("tilerelease", options(nostack, nomem))
                };
            }
        }
    }
    // Load the configuration on every entry (also nested: the same one),
    // so a tile state left by other code on this thread is replaced.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX-TILE is available and permitted (checked above); CONFIG is
    // a valid 64-byte, 64-aligned palette-1 configuration that LDTILECFG
    // reads.
    unsafe {
        std::arch::asm!("ldtilecfg [{c}]", c = in(reg) CONFIG.0.as_ptr(),
            options(nostack, readonly));
    }
    DEPTH.with(|d| d.set(d.get() + 1));
    let _release = Release;
    Some(f(&Amx {
        _not_send: PhantomData,
    }))
}

impl Amx {
    /// One 32 × 32 block of f32 inner sums over one K block of 128 (see the
    /// module docs): `a` needs `31·lda + 128` bf16 values (`lda ≥ 128`), `b`
    /// `63·ldb + 32` pairs (`ldb ≥ 32`). The caller zero-pads ragged tails.
    ///
    /// # Panics
    /// If a slice is too short or a stride too small (caller bugs).
    pub fn block(&self, a: &[u16], lda: usize, b: &[u32], ldb: usize, out: &mut Block) {
        self.block_k(1, a, lda, b, ldb, out)
    }

    /// [`Amx::block`] over `kb` consecutive K blocks (K = 128·kb, one sum):
    /// row `i` of `a` holds its 128·kb values from `i·lda` (`lda ≥ 128·kb`),
    /// pair row `q < 64·kb` of `b` lies at `q·ldb`.
    ///
    /// # Panics
    /// If `kb` is 0, a slice is too short or a stride too small.
    pub fn block_k(
        &self,
        kb: usize,
        a: &[u16],
        lda: usize,
        b: &[u32],
        ldb: usize,
        out: &mut Block,
    ) {
        check(kb, a, lda, b, ldb, BLOCK);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `self` proves the tiles are configured on this thread
        // (16 rows × 64 bytes each). Every tile load reads 16 rows of 64
        // bytes: A rows i < 32 at byte offsets i·2·lda + 64s (s < 4·kb),
        // i.e. bf16 values below 31·lda + 128·kb; B pair rows q < 64·kb at
        // q·4·ldb + 64c (c < 2), i.e. pairs below (64·kb − 1)·ldb + 32 — both
        // within the slices (checked above). The stores write 16 rows × 64
        // bytes of `out` at a 128-byte stride: exactly its 32 × 32 f32.
        unsafe {
            start_asm(4 * kb, a.as_ptr(), lda * 2, b.as_ptr(), ldb * 4);
            store_asm(out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (a, b, out);
    }

    /// The pipelined form of [`Amx::block`]: stores the sums of the block
    /// in flight (the one the previous call started) into `prev` when one
    /// is given, then starts this block (`a`, `lda`, `b`, `ldb` as for
    /// [`Amx::block`]) in the accumulator tiles and returns without storing
    /// it; [`Amx::finish`] stores the last one. The caller's work on `prev`
    /// (the promotion) follows the new block's tile instructions in program
    /// order, so the core overlaps the two.
    ///
    /// # Panics
    /// As [`Amx::block`].
    pub fn next_block(
        &self,
        prev: Option<&mut Block>,
        a: &[u16],
        lda: usize,
        b: &[u32],
        ldb: usize,
    ) {
        check(1, a, lda, b, ldb, BLOCK);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles are configured (`self`); the store writes
        // exactly `prev`'s 32 × 32 f32; the loads read within `a` and `b`
        // (checked above, as in `block_k`).
        unsafe {
            if let Some(prev) = prev {
                store_asm(prev);
            }
            start_asm(4, a.as_ptr(), lda * 2, b.as_ptr(), ldb * 4);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (prev, a, b);
    }

    /// Stores the block in flight (the last [`Amx::next_block`]'s) into
    /// `out`. Without a block in flight, `out` gets whatever the
    /// accumulator tiles hold (a caller bug, not a memory error).
    pub fn finish(&self, out: &mut Block) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles are configured (`self`); the store writes
        // exactly `out`'s 32 × 32 f32.
        unsafe {
            store_asm(out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = out;
    }

    /// [`Amx::next_block`] for at most 16 columns of B: `b` needs
    /// `63·ldb + 16` pairs (`ldb ≥ 16`), and only columns 0..16 of `prev`
    /// are written (by the sums of the block the previous
    /// `next_block_n16` started). Half the tile work of a full block, for
    /// operands of at most 16 columns (decode-sized batches).
    ///
    /// # Panics
    /// If a slice is too short or a stride too small.
    pub fn next_block_n16(
        &self,
        prev: Option<&mut Block>,
        a: &[u16],
        lda: usize,
        b: &[u32],
        ldb: usize,
    ) {
        check(1, a, lda, b, ldb, BLOCK / 2);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles are configured (`self`); the store writes 16
        // rows × 64 bytes twice inside `prev`'s 32 × 32 f32; the loads read
        // A rows i < 32 at bytes i·2·lda + 64s (s < 4) and B pair rows
        // q < 64 at q·4·ldb + [0, 64), within the slices (checked above).
        unsafe {
            if let Some(prev) = prev {
                store_n16_asm(prev);
            }
            start_n16_asm(a.as_ptr(), lda * 2, b.as_ptr(), ldb * 4);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (prev, a, b);
    }

    /// Stores the block in flight of [`Amx::next_block_n16`] into columns
    /// 0..16 of `out`.
    pub fn finish_n16(&self, out: &mut Block) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the tiles are configured (`self`); the stores stay in
        // `out`'s 32 × 32 f32.
        unsafe {
            store_n16_asm(out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = out;
    }
}

/// Zeroes `tmm0`/`tmm2` and adds the four tile steps of one K block for
/// B's first 16 columns (strides in bytes).
///
/// # Safety
/// As [`start_asm`] with `steps = 4`, B readable for 64 rows of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn start_n16_asm(a: *const u16, sa: usize, b: *const u32, sb: usize) {
    let a_hi = a.wrapping_byte_add(16 * sa);
    // SAFETY (for the whole function): pointers and strides as the caller
    // guarantees; the tiles are not used by compiled code.
    unsafe {
        std::arch::asm!("tilezero tmm0", "tilezero tmm2", options(nostack, nomem));
        for s in 0..4 {
            let a0 = a.byte_add(64 * s);
            let a1 = a_hi.byte_add(64 * s);
            let b0 = b.byte_add(16 * s * sb);
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                sa = in(reg) sa, sb = in(reg) sb,
                options(nostack, readonly)
            );
        }
    }
}

/// Stores `tmm0`/`tmm2` into columns 0..16 of `out`.
///
/// # Safety
/// The tiles must be configured by [`with_amx`] on this thread.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn store_n16_asm(out: &mut Block) {
    let o = out.as_mut_ptr() as *mut f32;
    // SAFETY: two stores of 16 rows × 64 bytes at a 128-byte stride from
    // o and o + 512 (f32): inside the 32 × 32 f32 of `out`.
    unsafe {
        std::arch::asm!(
            "tilestored [{o00} + {st}*1], tmm0",
            "tilestored [{o10} + {st}*1], tmm2",
            o00 = in(reg) o,
            o10 = in(reg) o.add(16 * BLOCK),
            st = in(reg) BLOCK * 4,
            options(nostack)
        );
    }
}

/// The slice and stride checks of [`Amx::block_k`] (`cols = 32`) and
/// [`Amx::next_block_n16`] (`cols = 16`, one K block): B is read for
/// `cols` pairs per row.
fn check(kb: usize, a: &[u16], lda: usize, b: &[u32], ldb: usize, cols: usize) {
    assert!(kb >= 1, "amx: no K block");
    assert!(lda >= K * kb, "amx: lda {lda} < {}", K * kb);
    assert!(ldb >= cols, "amx: ldb {ldb} < {cols}");
    assert!(
        a.len() >= (BLOCK - 1) * lda + K * kb,
        "amx: a holds {} values, needs {}",
        a.len(),
        (BLOCK - 1) * lda + K * kb
    );
    assert!(
        b.len() >= (KP * kb - 1) * ldb + cols,
        "amx: b holds {} pairs, needs {}",
        b.len(),
        (KP * kb - 1) * ldb + cols
    );
}

/// Zeroes the accumulators and adds `steps` tile steps of K = 32.
/// Strides in bytes.
///
/// # Safety
/// The tiles must be configured by [`with_amx`] on this thread; `a` must be
/// readable for 32 rows of `64·steps` bytes at stride `sa`, `b` for
/// `16·steps` rows of 128 bytes at stride `sb`.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn start_asm(steps: usize, a: *const u16, sa: usize, b: *const u32, sb: usize) {
    let a_hi = a.wrapping_byte_add(16 * sa);
    // SAFETY (for the whole function): pointers and strides as the caller
    // guarantees; tmm0..7 are not used by compiled code, so the asm blocks
    // may keep values in them between statements and calls.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for s in 0..steps {
            let a0 = a.byte_add(64 * s);
            let a1 = a_hi.byte_add(64 * s);
            let b0 = b.byte_add(16 * s * sb);
            let b1 = b0.byte_add(64);
            std::arch::asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                sa = in(reg) sa, sb = in(reg) sb,
                options(nostack, readonly)
            );
        }
    }
}

/// Stores the accumulators (2 × 2 tiles of 16 × 16 f32) into `out`.
///
/// # Safety
/// The tiles must be configured by [`with_amx`] on this thread.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn store_asm(out: &mut Block) {
    let o = out.as_mut_ptr() as *mut f32;
    // SAFETY: four stores of 16 rows × 64 bytes at a 128-byte stride from
    // o, o + 16, o + 512, o + 528 (f32): exactly the 32 × 32 f32 of `out`.
    unsafe {
        std::arch::asm!(
            "tilestored [{o00} + {st}*1], tmm0",
            "tilestored [{o01} + {st}*1], tmm1",
            "tilestored [{o10} + {st}*1], tmm2",
            "tilestored [{o11} + {st}*1], tmm3",
            o00 = in(reg) o,
            o01 = in(reg) o.add(16),
            o10 = in(reg) o.add(16 * BLOCK),
            o11 = in(reg) o.add(16 * BLOCK + 16),
            st = in(reg) BLOCK * 4,
            options(nostack)
        );
    }
}

/// The promotion of one block's sums, rows scaled:
/// `acc[r·ld + j] += out[r][j] · scale[r]` for `r < nr`, `j < nc` (a
/// product, then a sum: two f32 roundings, as the scalar code).
///
/// # Panics
/// If `nr` or `nc` exceeds 32, `scale` holds fewer than `nr` values or
/// `acc` fewer than `(nr − 1)·ld + nc`.
pub fn promote_rows(out: &Block, nr: usize, nc: usize, scale: &[f32], acc: &mut [f32], ld: usize) {
    if nr == 0 || nc == 0 {
        return;
    }
    assert!(
        nr <= BLOCK && nc <= BLOCK && scale.len() >= nr,
        "amx: promote_rows bounds"
    );
    assert!(
        acc.len() >= (nr - 1) * ld + nc && ld >= nc,
        "amx: promote_rows acc too short"
    );
    #[cfg(target_arch = "x86_64")]
    if nc == BLOCK && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; rows r < nr of `acc` hold 32 values
        // from r·ld (checked above: (nr − 1)·ld + 32 ≤ len).
        unsafe { x86::promote_rows32(out, nr, scale, acc.as_mut_ptr(), ld) };
        return;
    }
    for r in 0..nr {
        let s = scale[r];
        for (d, &v) in acc[r * ld..r * ld + nc].iter_mut().zip(&out[r][..nc]) {
            *d += v * s;
        }
    }
}

/// The promotion of one block's sums, columns scaled (the transposed
/// problem `Dᵀ = B·Aᵀ`, where a row of A is a column of the block):
/// `acc[r·ld + j] += out[r][j] · scale[j]` for `r < nr`, `j < nc`.
///
/// # Panics
/// As [`promote_rows`], with `scale` holding `nc` values.
pub fn promote_cols(out: &Block, nr: usize, nc: usize, scale: &[f32], acc: &mut [f32], ld: usize) {
    if nr == 0 || nc == 0 {
        return;
    }
    assert!(
        nr <= BLOCK && nc <= BLOCK && scale.len() >= nc,
        "amx: promote_cols bounds"
    );
    assert!(
        acc.len() >= (nr - 1) * ld + nc && ld >= nc,
        "amx: promote_cols acc too short"
    );
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; rows r < nr of `acc` hold nc ≤ 32
        // values from r·ld and `scale` nc values (checked above).
        unsafe { x86::promote_cols(out, nr, nc, scale, acc.as_mut_ptr(), ld) };
        return;
    }
    for r in 0..nr {
        for ((d, &v), &s) in acc[r * ld..r * ld + nc]
            .iter_mut()
            .zip(&out[r][..nc])
            .zip(scale)
        {
            *d += v * s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, BLOCK};
    use std::arch::x86_64::*;

    /// [`super::promote_rows`] for 32 columns.
    ///
    /// # Safety
    /// AVX-512F; `nr ≤ 32`, `scale` holds `nr` values, `acc` is writable
    /// for 32 f32 at `r·ld`, `r < nr`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn promote_rows32(
        out: &Block,
        nr: usize,
        scale: &[f32],
        acc: *mut f32,
        ld: usize,
    ) {
        for (r, (orow, &sr)) in out.iter().zip(scale).take(nr).enumerate() {
            let s = _mm512_set1_ps(sr);
            // SAFETY: orow is 32 f32; acc row r holds 32 f32 (caller).
            unsafe {
                let d = acc.add(r * ld);
                let v0 = _mm512_mul_ps(_mm512_loadu_ps(orow.as_ptr()), s);
                let v1 = _mm512_mul_ps(_mm512_loadu_ps(orow.as_ptr().add(16)), s);
                _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), v0));
                _mm512_storeu_ps(d.add(16), _mm512_add_ps(_mm512_loadu_ps(d.add(16)), v1));
            }
        }
    }

    /// [`super::promote_cols`].
    ///
    /// # Safety
    /// AVX-512F; `nr, nc ≤ 32`, `scale` holds `nc` values, `acc` is
    /// writable for `nc` f32 at `r·ld`, `r < nr`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn promote_cols(
        out: &Block,
        nr: usize,
        nc: usize,
        scale: &[f32],
        acc: *mut f32,
        ld: usize,
    ) {
        let nc = nc.min(BLOCK);
        let m0: __mmask16 = if nc >= 16 {
            0xffff
        } else {
            ((1u32 << nc) - 1) as u16
        };
        let m1: __mmask16 = if nc <= 16 {
            0
        } else {
            ((1u32 << (nc - 16)) - 1) as u16
        };
        let mut sc = [0f32; BLOCK];
        sc[..nc].copy_from_slice(&scale[..nc]);
        // SAFETY: `sc` is 32 f32.
        let (s0, s1) = unsafe {
            (
                _mm512_loadu_ps(sc.as_ptr()),
                _mm512_loadu_ps(sc.as_ptr().add(16)),
            )
        };
        for (r, orow) in out.iter().take(nr).enumerate() {
            // SAFETY: orow is 32 f32; the masked loads and stores touch
            // acc row r's first nc f32 only (caller: writable).
            unsafe {
                let d = acc.add(r * ld);
                let v0 = _mm512_mul_ps(_mm512_loadu_ps(orow.as_ptr()), s0);
                let v1 = _mm512_mul_ps(_mm512_loadu_ps(orow.as_ptr().add(16)), s1);
                let a0 = _mm512_maskz_loadu_ps(m0, d);
                _mm512_mask_storeu_ps(d, m0, _mm512_add_ps(a0, v0));
                if m1 != 0 {
                    let a1 = _mm512_maskz_loadu_ps(m1, d.add(16));
                    _mm512_mask_storeu_ps(d.add(16), m1, _mm512_add_ps(a1, v1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(x: f32) -> u16 {
        (x.to_bits() >> 16) as u16
    }
    fn unbf(x: u16) -> f32 {
        f32::from_bits((x as u32) << 16)
    }

    /// The block against plain loops, with strides larger than the minimum
    /// and values whose f32 sums are exact (so any order agrees).
    #[test]
    fn block_matches_plain_loops() {
        if let Some(why) = unavailable_reason() {
            eprintln!("skipped: AMX not usable here ({why})");
            return;
        }
        for kb in [1usize, 3] {
            let (lda, ldb) = (K * kb + 40, BLOCK + 8);
            let val = |i: usize| ((i * 7 + 3) % 13) as f32 * 0.25 - 1.5;
            let a: Vec<u16> = (0..31 * lda + K * kb).map(|i| bf(val(i))).collect();
            let b: Vec<u32> = (0..(KP * kb - 1) * ldb + BLOCK)
                .map(|i| bf(val(3 * i + 1)) as u32 | (bf(val(5 * i + 2)) as u32) << 16)
                .collect();
            let mut out = [[f32::NAN; BLOCK]; BLOCK];
            with_amx(|amx| amx.block_k(kb, &a, lda, &b, ldb, &mut out)).unwrap();
            for i in 0..BLOCK {
                for j in 0..BLOCK {
                    let want: f32 = (0..KP * kb)
                        .map(|q| {
                            let p = b[q * ldb + j];
                            unbf(a[i * lda + 2 * q]) * unbf(p as u16)
                                + unbf(a[i * lda + 2 * q + 1]) * unbf((p >> 16) as u16)
                        })
                        .sum();
                    assert_eq!(out[i][j], want, "kb {kb} i {i} j {j}");
                }
            }
        }
        let (lda, ldb) = (K + 40, BLOCK + 8);
        let val = |i: usize| ((i * 7 + 3) % 13) as f32 * 0.25 - 1.5;
        let a: Vec<u16> = (0..31 * lda + K).map(|i| bf(val(i))).collect();
        let b: Vec<u32> = (0..63 * ldb + BLOCK)
            .map(|i| bf(val(3 * i + 1)) as u32 | (bf(val(5 * i + 2)) as u32) << 16)
            .collect();
        let mut out = [[f32::NAN; BLOCK]; BLOCK];
        with_amx(|amx| amx.block(&a, lda, &b, ldb, &mut out)).unwrap();
        // Nested sessions keep the configuration; the tiles work after the
        // inner one ends.
        let mut again = [[0f32; BLOCK]; BLOCK];
        with_amx(|amx| {
            with_amx(|_| ()).unwrap();
            amx.block(&a, lda, &b, ldb, &mut again)
        })
        .unwrap();
        assert_eq!(again, out);
    }

    /// The pipelined blocks give the same sums as one block at a time,
    /// each stored into the buffer given with the next block.
    #[test]
    fn pipelined_blocks_match_single_blocks() {
        if let Some(why) = unavailable_reason() {
            eprintln!("skipped: AMX not usable here ({why})");
            return;
        }
        let (lda, ldb) = (K + 8, BLOCK + 4);
        let val = |i: usize| ((i * 11 + 5) % 17) as f32 * 0.125 - 1.0;
        let a: Vec<u16> = (0..40 * lda + K).map(|i| bf(val(i))).collect();
        let b: Vec<u32> = (0..(KP + 8) * ldb + BLOCK)
            .map(|i| bf(val(3 * i + 1)) as u32 | (bf(val(7 * i + 2)) as u32) << 16)
            .collect();
        // Three different blocks: offsets into a and b.
        let offs = [(0usize, 0usize), (3 * lda, 5 * ldb), (8 * lda + 1, 2)];
        let mut want = Vec::new();
        for &(oa, ob) in &offs {
            let mut out = [[f32::NAN; BLOCK]; BLOCK];
            with_amx(|amx| amx.block(&a[oa..], lda, &b[ob..], ldb, &mut out)).unwrap();
            want.push(out);
        }
        let got = with_amx(|amx| {
            let mut got = Vec::new();
            let mut out = [[f32::NAN; BLOCK]; BLOCK];
            for (i, &(oa, ob)) in offs.iter().enumerate() {
                let prev = if i == 0 { None } else { Some(&mut out) };
                amx.next_block(prev, &a[oa..], lda, &b[ob..], ldb);
                if i > 0 {
                    got.push(out);
                }
            }
            amx.finish(&mut out);
            got.push(out);
            got
        })
        .unwrap();
        assert_eq!(got, want);
    }

    /// The 16-column blocks equal the first 16 columns of full blocks
    /// (the other columns untouched), pipelined.
    #[test]
    fn half_blocks_match_full_blocks() {
        if let Some(why) = unavailable_reason() {
            eprintln!("skipped: AMX not usable here ({why})");
            return;
        }
        let (lda, ldb) = (K + 8, BLOCK + 4);
        let val = |i: usize| ((i * 13 + 3) % 19) as f32 * 0.25 - 2.0;
        let a: Vec<u16> = (0..40 * lda + K).map(|i| bf(val(i))).collect();
        // B with 32 readable columns for the full block's reference; the
        // half blocks get only what they may read.
        let b: Vec<u32> = (0..(KP + 8) * ldb + BLOCK)
            .map(|i| bf(val(5 * i + 1)) as u32 | (bf(val(3 * i + 2)) as u32) << 16)
            .collect();
        let offs = [(0usize, 0usize), (5 * lda, 3 * ldb), (2 * lda + 1, 1)];
        let got = with_amx(|amx| {
            let mut got = Vec::new();
            let mut out = [[f32::NAN; BLOCK]; BLOCK];
            for (i, &(oa, ob)) in offs.iter().enumerate() {
                let prev = if i == 0 { None } else { Some(&mut out) };
                amx.next_block_n16(prev, &a[oa..], lda, &b[ob..(KP - 1) * ldb + 16 + ob], ldb);
                if i > 0 {
                    got.push(out);
                    out = [[f32::NAN; BLOCK]; BLOCK];
                }
            }
            amx.finish_n16(&mut out);
            got.push(out);
            got
        })
        .unwrap();
        for (&(oa, ob), g) in offs.iter().zip(&got) {
            let mut want = [[0f32; BLOCK]; BLOCK];
            with_amx(|amx| amx.block(&a[oa..], lda, &b[ob..], ldb, &mut want)).unwrap();
            for (r, (gr, wr)) in g.iter().zip(&want).enumerate() {
                for j in 0..16 {
                    assert_eq!(gr[j].to_bits(), wr[j].to_bits(), "row {r} col {j}");
                }
                assert!(
                    gr[16..].iter().all(|v| v.is_nan()),
                    "row {r}: columns past 16 written"
                );
            }
        }
    }

    /// The promotions against the scalar product-then-sum, bit for bit,
    /// full and ragged.
    #[test]
    fn promotions_match_scalar_code() {
        let val = |i: usize| (((i * 37 + 11) % 101) as f32 - 50.0) * 0.37;
        let mut out = [[0f32; BLOCK]; BLOCK];
        for (r, row) in out.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = val(r * BLOCK + j) * 1.0e3;
            }
        }
        let scale: Vec<f32> = (0..BLOCK).map(|i| val(i + 7) * 1.0e-3 + 0.001).collect();
        let ld = 40;
        for (nr, nc) in [(32, 32), (7, 32), (32, 5), (3, 17), (1, 16), (16, 1)] {
            let acc0: Vec<f32> = (0..BLOCK * ld).map(|i| val(i + 3)).collect();
            let (mut rows, mut cols) = (acc0.clone(), acc0.clone());
            promote_rows(&out, nr, nc, &scale, &mut rows, ld);
            promote_cols(&out, nr, nc, &scale, &mut cols, ld);
            for i in 0..acc0.len() {
                let (r, j) = (i / ld, i % ld);
                let (wr, wc) = if r < nr && j < nc {
                    (
                        acc0[i] + out[r][j] * scale[r],
                        acc0[i] + out[r][j] * scale[j],
                    )
                } else {
                    (acc0[i], acc0[i])
                };
                assert_eq!(rows[i].to_bits(), wr.to_bits(), "rows {nr}×{nc} at {r},{j}");
                assert_eq!(cols[i].to_bits(), wc.to_bits(), "cols {nr}×{nc} at {r},{j}");
            }
        }
    }

    #[test]
    fn short_slices_panic_before_the_kernel() {
        if !available() {
            eprintln!("skipped: AMX not usable here");
            return;
        }
        let a = vec![0u16; 31 * K + K - 1];
        let b = vec![0u32; 63 * BLOCK + BLOCK];
        let mut out = [[0f32; BLOCK]; BLOCK];
        let r = std::panic::catch_unwind(move || {
            with_amx(|amx| amx.block(&a, K, &b, BLOCK, &mut out));
        });
        assert!(r.is_err());
    }
}
