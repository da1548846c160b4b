//! The launch context of the `rocm` backend: the CUDA backend's op glue
//! (`deepport_cuda::ops::glue`) drives the kernels through
//! [`LaunchContext`], which [`RocmCx`] implements on a [`Runtime`] (HIP on
//! a device; a host-memory stand-in in the tests). Nothing of the glue is
//! copied: the same functions pick the kernels and compute the geometry;
//! this file only loads code objects, finds functions, packs arguments
//! (`deepport_cuda::device::PackedArgs`, the same `void**` layout
//! `hipModuleLaunchKernel` takes) and keeps the deferred checks
//! (`deepport_cuda::device::CheckRecord`, the `dp_flag` word of `port.cuh`).
//!
//! * Code objects are compiled by hiprtc once per process and (source,
//!   gfx) ([`compiled`]); each instance loads the ones it uses
//!   (`hipModuleLoadData`) and looks kernels up once
//!   (`hipModuleGetFunction`).
//! * [`Arch`] on AMD: `major`/`minor` are 0 (no CUDA compute capability,
//!   so no Hopper path is ever chosen), `sms` the compute units,
//!   `smem_optin` the LDS per workgroup (64 KiB on CDNA).
//! * Only `Target::Portable` sources launch, and only blocks whose thread
//!   count is a multiple of the wavefront (64): `port.cuh` under `DP_HIP`
//!   reduces over 64-lane wavefronts.
//! * Scratch buffers are freed at the next settle (after the stream is
//!   synchronized), never while a kernel may still read them.

use crate::hip::{dev_err, DeviceDesc, BACKEND};
use crate::runtime::Runtime;
use deepport_core::backend::{InstanceId, Tensor};
use deepport_core::{DType, Error, Result};
use deepport_cuda::device::{first_error, validate_grid, CheckRecord, PackedArgs, STATUS_ENTRIES};
use deepport_cuda::launch::{
    Arch, Arg, CheckKind, Grid, Kernel, KernelSource, LaunchContext, Scratch, Target, TensorMap,
    TmaParams,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The wavefront every kernel is compiled for (`-DDP_HIP`, and
/// `-mwavefrontsize64` on RDNA).
pub const WAVEFRONT: u32 = 64;

/// Compiles a source for a `gfx` architecture into a code object.
pub type Compiler = fn(&'static KernelSource, &str) -> Result<Arc<Vec<u8>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// hiprtc's code object for `src` on `gfx`, compiled once per process.
pub fn compiled(src: &'static KernelSource, gfx: &str) -> Result<Arc<Vec<u8>>> {
    type Cache = HashMap<(&'static str, String), Arc<Vec<u8>>>;
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (src.name, gfx.to_string());
    if let Some(c) = lock(cache).get(&key) {
        return Ok(c.clone());
    }
    // Compiled outside the lock (a source compiled twice at once is only
    // wasted work).
    let code = Arc::new(crate::hiprtc::compile(src.name, src.text, gfx)?.code);
    lock(cache).insert(key, code.clone());
    Ok(code)
}

/// The [`Arch`] the op glue sees on an AMD device (see the module docs).
pub fn arch_of(desc: &DeviceDesc) -> Arch {
    Arch {
        major: 0,
        minor: 0,
        sms: desc.compute_units.max(1),
        smem_optin: desc.smem_per_block,
    }
}

/// A `deepport_cuda` error (its validators name `cuda`) as this backend's.
fn ours(e: Error) -> Error {
    match e {
        Error::Device { msg, .. } => dev_err(msg),
        other => other,
    }
}

#[derive(Default)]
struct Checks {
    records: Vec<CheckRecord>,
    /// The first error found at a settle, reported at the next sync/download.
    pending: Option<Error>,
}

/// Allocations whose owners are gone, freed at the next settle.
type Retired = Arc<Mutex<Vec<u64>>>;

/// Keeps a scratch allocation until its [`Scratch`] is dropped, then
/// retires it (freed after the next synchronize).
struct ScratchGuard {
    ptr: u64,
    retired: Retired,
}

impl Drop for ScratchGuard {
    fn drop(&mut self) {
        lock(&self.retired).push(self.ptr);
    }
}

/// One device, the default stream, the module cache and the deferred
/// checks of one backend instance.
pub struct RocmCx {
    rt: Arc<dyn Runtime>,
    device: usize,
    /// The architecture code objects are compiled for (`gfx90a`, with
    /// target features when the device reports them).
    gfx: String,
    arch: Arch,
    pub(crate) id: InstanceId,
    compiler: Compiler,
    modules: Mutex<HashMap<&'static str, usize>>,
    functions: Mutex<HashMap<(&'static str, &'static str), usize>>,
    status: u64,
    checks: Mutex<Checks>,
    retired: Retired,
}

impl std::fmt::Debug for RocmCx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RocmCx({}: {})", self.device, self.gfx)
    }
}

impl Drop for RocmCx {
    fn drop(&mut self) {
        // Nothing to report to: failures leak.
        if self.rt.set_device(self.device).is_err() || self.rt.synchronize().is_err() {
            return;
        }
        for p in lock(&self.retired).drain(..) {
            let _ = self.rt.free(p);
        }
        let _ = self.rt.free(self.status);
        for (_, m) in lock(&self.modules).drain() {
            let _ = self.rt.unload(m);
        }
    }
}

impl RocmCx {
    /// The context of instance `id` on `device` of `rt`, compiling with
    /// `compiler` for `desc.gfx`.
    pub fn new(
        rt: Arc<dyn Runtime>,
        device: usize,
        desc: &DeviceDesc,
        id: InstanceId,
        compiler: Compiler,
    ) -> Result<RocmCx> {
        rt.set_device(device)?;
        let bytes = STATUS_ENTRIES * 8;
        let status = rt.malloc(bytes)?;
        // SAFETY: `status` is a fresh allocation of `bytes` bytes.
        unsafe { rt.memset(status, 0, bytes) }?;
        Ok(RocmCx {
            rt,
            device,
            gfx: desc.gfx.clone(),
            arch: arch_of(desc),
            id,
            compiler,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            status,
            checks: Mutex::new(Checks::default()),
            retired: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.rt
    }

    pub fn device(&self) -> usize {
        self.device
    }

    pub fn gfx(&self) -> &str {
        &self.gfx
    }

    /// Makes the device current on the calling thread.
    pub fn current(&self) -> Result<()> {
        self.rt.set_device(self.device)
    }

    /// Synchronizes, frees retired scratch, reads and resets the status
    /// entries, and keeps the first error for the next [`RocmCx::synchronize`].
    fn settle(&self, checks: &mut Checks) -> Result<()> {
        self.current()?;
        self.rt.synchronize()?;
        for p in lock(&self.retired).drain(..) {
            self.rt.free(p)?;
        }
        if checks.records.is_empty() {
            return Ok(());
        }
        let n = checks.records.len();
        let mut raw = vec![0u8; n * 8];
        // SAFETY: the status buffer holds STATUS_ENTRIES ≥ n words.
        unsafe { self.rt.dtoh(&mut raw, self.status) }?;
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let err = first_error(&checks.records, &words);
        // SAFETY: as above.
        unsafe { self.rt.memset(self.status, 0, n * 8) }?;
        checks.records.clear();
        if checks.pending.is_none() {
            checks.pending = err;
        }
        Ok(())
    }

    /// Waits for the queued work and returns the first deferred-check
    /// error since the last call (reported once).
    pub fn synchronize(&self) -> Result<()> {
        let mut c = lock(&self.checks);
        self.settle(&mut c)?;
        match c.pending.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn module(&self, src: &'static KernelSource) -> Result<usize> {
        let mut mods = lock(&self.modules);
        if let Some(&m) = mods.get(src.name) {
            return Ok(m);
        }
        let code = (self.compiler)(src, &self.gfx)?;
        self.current()?;
        let m = self
            .rt
            .load(&code)
            .map_err(|e| dev_err(format!("{} for {}: {e}", src.name, self.gfx)))?;
        mods.insert(src.name, m);
        Ok(m)
    }

    fn function(&self, k: Kernel) -> Result<usize> {
        let key = (k.source.name, k.entry);
        if let Some(&f) = lock(&self.functions).get(&key) {
            return Ok(f);
        }
        let m = self.module(k.source)?;
        let f = self.rt.function(m, k.entry).map_err(|e| {
            dev_err(format!(
                "{} ({} for {}): {e}",
                k.entry, k.source.name, self.gfx
            ))
        })?;
        lock(&self.functions).insert(key, f);
        Ok(f)
    }
}

/// Checks what HIP would not: the source runs on AMD, the entry is one
/// of its entries, and the block is whole wavefronts.
pub fn validate_amd(k: &Kernel, g: &Grid) -> Result<()> {
    let bad = |m: String| dev_err(format!("launch of {}::{}: {m}", k.source.name, k.entry));
    if k.source.target != Target::Portable {
        return Err(bad("a CUDA-only (sm_90a) source".into()));
    }
    if !k.source.entries.contains(&k.entry) {
        return Err(bad("not an entry of its source".into()));
    }
    let threads = g.block.0 as u64 * g.block.1 as u64 * g.block.2 as u64;
    if !threads.is_multiple_of(WAVEFRONT as u64) {
        return Err(bad(format!(
            "block {:?} is not whole {WAVEFRONT}-lane wavefronts",
            g.block
        )));
    }
    Ok(())
}

/// The device address of a tensor's first element, bounds-checked against
/// its allocation.
pub(crate) fn addr(base: u64, bytes: usize, t: &Tensor) -> Result<u64> {
    let (off, n) = (t.offset_bytes(), t.nbytes());
    if off.checked_add(n).is_none_or(|end| end > bytes) {
        return Err(dev_err(format!(
            "{t:?}: bytes [{off}, +{n}) lie outside its {bytes}-byte buffer"
        )));
    }
    Ok(base + off as u64)
}

impl LaunchContext for RocmCx {
    fn arch(&self) -> Arch {
        self.arch
    }

    fn ptr(&self, t: &Tensor) -> Result<u64> {
        let s = t.storage_for::<crate::RocmStorage>(self.id, BACKEND)?;
        addr(s.ptr(), s.bytes(), t)
    }

    fn ptr_mut(&self, t: &mut Tensor) -> Result<u64> {
        let (off, n, desc) = (t.offset_bytes(), t.nbytes(), format!("{t:?}"));
        let s = t.storage_mut_for::<crate::RocmStorage>(self.id, BACKEND)?;
        if off.checked_add(n).is_none_or(|end| end > s.bytes()) {
            return Err(dev_err(format!(
                "{desc}: bytes [{off}, +{n}) lie outside its {}-byte buffer",
                s.bytes()
            )));
        }
        Ok(s.ptr() + off as u64)
    }

    fn scratch(&self, bytes: usize) -> Result<Scratch> {
        self.current()?;
        let ptr = self
            .rt
            .malloc(bytes)
            .map_err(|e| dev_err(format!("scratch of {bytes} bytes: {e}")))?;
        let guard = ScratchGuard {
            ptr,
            retired: self.retired.clone(),
        };
        // SAFETY: `ptr` is a fresh allocation of `bytes` bytes.
        unsafe { self.rt.memset(ptr, 0, bytes) }?;
        Ok(Scratch::new(ptr, bytes, Some(Box::new(guard))))
    }

    fn check(
        &self,
        op: &'static str,
        arg: &'static str,
        shape: &[usize],
        kind: CheckKind,
    ) -> Result<u64> {
        let mut c = lock(&self.checks);
        if c.records.len() >= STATUS_ENTRIES {
            // Out of entries: settle the earlier ops first (their error,
            // if any, stays pending for the next synchronize/download).
            self.settle(&mut c)?;
        }
        let i = c.records.len();
        c.records.push(CheckRecord {
            op,
            arg,
            shape: shape.to_vec(),
            kind,
        });
        Ok(self.status + 8 * i as u64)
    }

    fn tensor_map(&self, _params: &TmaParams) -> Result<TensorMap> {
        Err(dev_err(
            "TMA descriptors are NVIDIA Hopper only (no sm_90a path runs on AMD)",
        ))
    }

    fn launch(&self, kernel: Kernel, grid: Grid, args: &[Arg]) -> Result<()> {
        validate_grid(&kernel, &grid, &self.arch).map_err(ours)?;
        validate_amd(&kernel, &grid)?;
        if args.iter().any(|a| matches!(a, Arg::TensorMap(_))) {
            return Err(dev_err(format!(
                "launch of {}: a TMA descriptor argument on AMD",
                kernel.entry
            )));
        }
        let f = self.function(kernel)?;
        self.current()?;
        let packed = PackedArgs::new(args);
        let mut ptrs = packed.pointers();
        // SAFETY: `f` is a function of a module this context loaded (kept
        // until drop); `ptrs` holds one pointer per argument to an 8-byte
        // slot of `packed`, which outlives the call (HIP copies the values
        // before returning; a 4-byte parameter reads the slot's low bytes,
        // little-endian). That `args` matches the kernel's parameters is
        // the op glue's contract, tested on the CPU by deepport-cuda's
        // signature checks; the pointers are device addresses of tensors
        // and scratch of this instance.
        unsafe {
            self.rt
                .launch(f, grid.grid, grid.block, grid.smem, &mut ptrs)
        }
        .map_err(|e| {
            dev_err(format!(
                "launch of {}::{}: {e}",
                kernel.source.name, kernel.entry
            ))
        })
    }

    fn mla_split_kernel(
        &self,
        dtype: DType,
        dims: &deepport_core::ops::MlaDecodeDims,
        q: u64,
        kcache: u64,
    ) -> Option<deepport_cuda::launch::MlaSplitKernel> {
        crate::mfma::mla_split(&self.gfx, dtype, dims, q, kcache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{backend, fake_compiler, run_ops, status_of};
    use deepport_core::backend::Backend;
    use deepport_core::ops::{run, Embedding};
    use deepport_core::{DType, HostTensor};

    #[test]
    fn alloc_zeroed_clears_what_alloc_leaves() {
        let (_fake, b) = backend("gfx90a", fake_compiler);
        // The fake's fresh memory is 0xa5, like a reused device allocation.
        let u = b.alloc(DType::BF16, &[3, 5]).unwrap();
        assert!(b.download(&u).unwrap().bytes().iter().all(|&x| x == 0xa5));
        let t = b.alloc_zeroed(DType::BF16, &[3, 5]).unwrap();
        let got = b.download(&t).unwrap();
        assert_eq!(got.bytes(), HostTensor::zeros(DType::BF16, &[3, 5]).bytes());
    }

    #[test]
    fn every_op_family_launches_through_the_cuda_glue() {
        let (fake, b) = backend("gfx90a", fake_compiler);
        let errs = run_ops(&b);
        assert!(errs.is_empty(), "{errs:#?}");
        let l = fake.launches();
        let entries: Vec<&str> = l.iter().map(|l| l.entry.as_str()).collect();
        for want in [
            "sm_rms_norm",
            "quant_act",
            "fp8_gemm_mfma",
            "gemm_plain_tiled",
            "mla_decode_split",
            "rw_embedding",
        ] {
            assert!(entries.contains(&want), "{want} not in {entries:?}");
        }
        for x in &l {
            let threads = x.block.0 * x.block.1 * x.block.2;
            assert_eq!(threads % WAVEFRONT, 0, "{x:?}");
            assert!(x.smem <= 64 * 1024, "{x:?}");
            assert!(x.params > 0 && x.grid.0 * x.grid.1 * x.grid.2 > 0, "{x:?}");
        }
        // Every local op launched at least one kernel: its glue ran.
        let mut kinds: Vec<&str> = l.iter().map(|l| l.entry.as_str()).collect();
        kinds.sort();
        kinds.dedup();
        assert!(kinds.len() >= 20, "{kinds:?}");
        // Each source is loaded once per instance, however often it runs.
        let loaded = fake.modules_loaded();
        assert!(loaded >= 4, "{loaded} modules");
        let n = l.len();
        assert!(run_ops(&b).is_empty());
        assert_eq!(fake.modules_loaded(), loaded);
        assert_eq!(fake.launches().len(), 2 * n);
        b.synchronize().unwrap();
    }

    #[test]
    fn launched_kernels_exist_in_the_gfx90a_code_objects() {
        let required = std::env::var("DEEPPORT_REQUIRE")
            .is_ok_and(|v| v.split([',', ' ']).any(|t| t == "hiprtc"));
        if let Err(why) = crate::hiprtc::probe() {
            assert!(!required, "DEEPPORT_REQUIRE names hiprtc, but: {why}");
            println!("skipped: {why}");
            return;
        }
        // The real hiprtc code objects: the fake runtime reads their
        // kernel symbols (`*.kd`) and fails a lookup of any other name.
        let (fake, b) = backend("gfx90a", compiled);
        let errs = run_ops(&b);
        assert!(errs.is_empty(), "{errs:#?}");
        assert!(!fake.launches().is_empty());
    }

    #[test]
    fn a_flagged_status_entry_surfaces_once_at_synchronize() {
        let (fake, b) = backend("gfx90a", fake_compiler);
        let table = b
            .upload(&HostTensor::zeros(DType::BF16, &[10, 64]))
            .unwrap();
        let ids = b.upload(&HostTensor::from_i32(&[6], &[1; 6])).unwrap();
        let mut out = b.alloc(DType::BF16, &[6, 64]).unwrap();
        run(
            &b,
            Embedding {
                table: &table,
                ids: &ids,
                out: &mut out,
            },
        )
        .unwrap();
        // What `dp_flag` writes for flat index 4 holding 77.
        let word = ((!4u32 as u64) << 32) | 77;
        fake.poke(status_of(&fake), &word.to_le_bytes());
        let e = b.download(&out).unwrap_err();
        match e {
            deepport_core::Error::IndexOutOfRange {
                op,
                arg,
                position,
                value,
                ..
            } => {
                assert_eq!((op, arg, value), ("embedding", "ids", 77));
                assert_eq!(position, vec![4]);
            }
            other => panic!("{other}"),
        }
        b.synchronize().unwrap();
        b.download(&out).unwrap();
    }

    #[test]
    fn scratch_lives_until_the_next_synchronize() {
        let (fake, b) = backend("gfx90a", fake_compiler);
        let s = b.cx().scratch(1000).unwrap();
        let p = s.ptr();
        let mut z = vec![1u8; 1000];
        // SAFETY: `p` is a 1000-byte allocation of the fake.
        unsafe { fake.dtoh(&mut z, p) }.unwrap();
        assert!(z.iter().all(|&v| v == 0), "scratch is zero-filled");
        drop(s);
        assert!(!fake.freed().contains(&p));
        b.synchronize().unwrap();
        assert!(fake.freed().contains(&p));
    }

    #[test]
    fn cuda_only_sources_and_partial_wavefronts_are_refused() {
        let sm90 = deepport_cuda::sources()
            .into_iter()
            .find(|s| s.target == Target::Sm90a)
            .unwrap();
        let g = Grid {
            grid: (1, 1, 1),
            block: (128, 1, 1),
            smem: 0,
        };
        let k = Kernel {
            source: sm90,
            entry: sm90.entries[0],
        };
        assert!(validate_amd(&k, &g).is_err());
        let portable = crate::sources()[0];
        let k = Kernel {
            source: portable,
            entry: portable.entries[0],
        };
        validate_amd(&k, &g).unwrap();
        let half = Grid {
            block: (32, 1, 1),
            ..g
        };
        let e = validate_amd(&k, &half).unwrap_err().to_string();
        assert!(
            e.contains("wavefront") && e.contains(portable.entries[0]),
            "{e}"
        );
        let bogus = Kernel {
            source: portable,
            entry: "no_such_kernel",
        };
        assert!(validate_amd(&bogus, &g).is_err());
        let (_fake, b) = backend("gfx90a", fake_compiler);
        let e = b.cx().launch(k, half, &[]).unwrap_err();
        assert!(matches!(&e, deepport_core::Error::Device { backend, .. } if backend == "rocm"));
        assert_eq!(b.cx().arch().major, 0, "never a Hopper path");
    }

    #[test]
    fn fp8_weights_follow_the_device() {
        let w =
            HostTensor::from_bytes(DType::F8E4M3, &[1, 4], vec![0x7e, 0x80, 0x7f, 0x01]).unwrap();
        let s = HostTensor::from_f32(DType::F32, &[1, 1], &[0.5]);
        let (_f, mi300) = backend("gfx942:sramecc+:xnack-", fake_compiler);
        assert_eq!(mi300.fp8_dtype(), DType::F8E4M3Fnuz);
        let (dw, ds) = mi300.upload_fp8_weight(&w, &s).unwrap();
        let (hw, hs) = (mi300.download(&dw).unwrap(), mi300.download(&ds).unwrap());
        assert_eq!(hw.dtype(), DType::F8E4M3Fnuz);
        assert_eq!(hw.bytes(), &[0x7e, 0x00, 0x80, 0x01]);
        assert_eq!(hs.to_f32_vec(), vec![1.0]);
        let v: Vec<f32> = hw.to_f32_vec().iter().map(|x| x * 1.0).collect();
        assert_eq!(&v[..2], &[224.0, 0.0]);
        assert_eq!(v[0] * hs.to_f32_vec()[0], 448.0 * 0.5);
        let (_f, mi350) = backend("gfx950", fake_compiler);
        assert_eq!(mi350.fp8_dtype(), DType::F8E4M3);
        let (dw, ds) = mi350.upload_fp8_weight(&w, &s).unwrap();
        assert_eq!(mi350.download(&dw).unwrap().bytes(), w.bytes());
        assert_eq!(mi350.download(&ds).unwrap().to_f32_vec(), vec![0.5]);
    }

    #[test]
    fn dropping_frees_every_allocation() {
        let (fake, b) = backend("gfx90a", fake_compiler);
        assert!(run_ops(&b).is_empty());
        drop(b);
        assert_eq!(fake.live(), 0, "allocations left");
    }
}
