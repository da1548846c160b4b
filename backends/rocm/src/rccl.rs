//! An RCCL [`Transport`] for expert parallelism across AMD GPUs, the
//! counterpart of `deepport_cuda::nccl` (same design, own binding).
//!
//! * RCCL exports NCCL's C API (`ncclSend`, `ncclRecv`, …), so the nine
//!   functions bound here have NCCL's names and signatures; they come
//!   from RCCL's own file, loaded at run time: `$DEEPPORT_RCCL_LIB` (a
//!   file; when set, nothing else is tried), else `librccl.so.1`,
//!   `librccl.so`, `/opt/rocm/lib/librccl.so.1`. Missing is
//!   [`Error::Unavailable`] naming every file tried; a library without
//!   send/recv (before NCCL API 2.7) is refused the same way.
//! * Payload rows move device to device ([`DeviceExchange::exchange_rows`],
//!   `ncclSend`/`ncclRecv` on HIP's default stream, the stream every op of
//!   the `rocm` backend runs on: ordered after the kernels that wrote
//!   `send` and before those that read the result; nothing is staged
//!   through the host).
//! * Control messages ([`Transport::all_to_all_v`], host bytes) go
//!   through small device buffers: one send/recv round of the sizes, then
//!   one of the bytes. [`Transport::barrier`] is an all-to-all of empty
//!   messages.
//!
//! Not run here: no AMD GPU and no RCCL were available; the loader is
//! tested against a fake library built with the C compiler.
#![allow(unsafe_code)]

use crate::hip::{self, open_first, BACKEND};
use crate::runtime::Runtime;
use crate::RocmStorage;
use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::{DeviceExchange, Transport};
use deepport_core::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

/// The symbols bound from RCCL.
pub const RCCL_SYMBOLS: &[&str] = &[
    "ncclGetVersion",
    "ncclGetUniqueId",
    "ncclCommInitRank",
    "ncclCommDestroy",
    "ncclGroupStart",
    "ncclGroupEnd",
    "ncclSend",
    "ncclRecv",
    "ncclGetErrorString",
];

/// The NCCL API version with point-to-point send/recv (2.7.0).
const MIN_VERSION: c_int = 2700;

/// `ncclUint8`.
const NCCL_UINT8: c_int = 1;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int;
type CommDestroyFn = unsafe extern "C" fn(Comm) -> c_int;
type GroupFn = unsafe extern "C" fn() -> c_int;
type SendFn = unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type RecvFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// The RCCL functions this module calls, bound from one library handle.
pub struct Rccl {
    pub file: String,
    /// `ncclGetVersion` (e.g. 21804 for NCCL API 2.18.4).
    pub version: i32,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    comm_destroy: CommDestroyFn,
    group_start: GroupFn,
    group_end: GroupFn,
    send: SendFn,
    recv: RecvFn,
    error_string: ErrorStringFn,
    _lib: libloading::Library,
}

/// The file names tried for RCCL, in order.
pub fn library_names() -> Vec<String> {
    if let Some(p) = std::env::var_os("DEEPPORT_RCCL_LIB").filter(|v| !v.is_empty()) {
        return vec![p.to_string_lossy().into_owned()];
    }
    ["librccl.so.1", "librccl.so", "/opt/rocm/lib/librccl.so.1"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn open_rccl(names: &[String]) -> std::result::Result<Rccl, String> {
    let (path, lib) = open_first(names).map_err(|e| format!("RCCL (librccl) not found: {e}"))?;
    let file = path.display().to_string();
    let missing: Vec<&str> = RCCL_SYMBOLS
        .iter()
        .copied()
        .filter(|n| {
            // SAFETY: only the symbol's presence is checked; the pointer
            // is never called.
            unsafe { lib.get::<*const ()>(n.as_bytes()) }.is_err()
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "RCCL too old: {file} lacks {} (send/recv need the NCCL 2.7 API)",
            missing.join(", ")
        ));
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: the symbol exists (checked above) and has this C
            // signature in every RCCL (NCCL's API; enums passed as int).
            let s = unsafe { lib.get::<$ty>($name) }.map_err(|e| e.to_string())?;
            *s
        }};
    }
    let get_version = sym!(b"ncclGetVersion", GetVersionFn);
    let mut version: c_int = 0;
    // SAFETY: a live out-pointer.
    let r = unsafe { get_version(&mut version) };
    if r != 0 {
        return Err(format!("{file}: ncclGetVersion failed ({r})"));
    }
    if version < MIN_VERSION {
        return Err(format!(
            "RCCL too old: {file} has NCCL API version {version}; send/recv need 2.7 or newer"
        ));
    }
    Ok(Rccl {
        version,
        get_unique_id: sym!(b"ncclGetUniqueId", GetUniqueIdFn),
        comm_init_rank: sym!(b"ncclCommInitRank", CommInitRankFn),
        comm_destroy: sym!(b"ncclCommDestroy", CommDestroyFn),
        group_start: sym!(b"ncclGroupStart", GroupFn),
        group_end: sym!(b"ncclGroupEnd", GroupFn),
        send: sym!(b"ncclSend", SendFn),
        recv: sym!(b"ncclRecv", RecvFn),
        error_string: sym!(b"ncclGetErrorString", ErrorStringFn),
        file,
        _lib: lib,
    })
}

fn unavailable(reason: String) -> Error {
    Error::Unavailable {
        backend: BACKEND.into(),
        reason,
    }
}

/// RCCL, loaded once per process; [`Error::Unavailable`] with the reason.
pub fn library() -> Result<&'static Rccl> {
    static LIB: OnceLock<std::result::Result<Rccl, String>> = OnceLock::new();
    LIB.get_or_init(|| open_rccl(&library_names()))
        .as_ref()
        .map_err(|why| unavailable(why.clone()))
}

/// The RCCL version text, or why RCCL is unavailable.
pub fn probe() -> std::result::Result<String, String> {
    library()
        .map(|l| format!("RCCL (NCCL API {}) ({})", version_text(l.version), l.file))
        .map_err(|e| e.to_string())
}

/// `2.18.4`-style text of an NCCL API version code.
pub fn version_text(v: i32) -> String {
    if v >= 10000 {
        format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
    }
}

impl Rccl {
    fn check(&self, rank: usize, what: &str, r: c_int) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string
        // (or null) for any code.
        let text = unsafe {
            let p = (self.error_string)(r);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(Error::Comm {
            rank,
            msg: format!("RCCL {what} failed ({r}: {text})"),
        })
    }
}

/// An RCCL unique id: made by one rank, handed to the others out of band.
#[derive(Clone)]
pub struct RcclId(pub [u8; 128]);

impl std::fmt::Debug for RcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RcclId(..)")
    }
}

impl RcclId {
    /// A fresh id (`ncclGetUniqueId`).
    pub fn new() -> Result<RcclId> {
        let lib = library()?;
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: a live out-pointer of the right type.
        let r = unsafe { (lib.get_unique_id)(&mut id) };
        lib.check(0, "ncclGetUniqueId", r)?;
        Ok(RcclId(id.internal.map(|c| c as u8)))
    }

    fn raw(&self) -> UniqueId {
        UniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

struct CommHandle(Comm);
// SAFETY: a communicator may be used from any thread; this module
// serialises its use (the `Mutex` in `RcclTransport`), as RCCL requires.
unsafe impl Send for CommHandle {}

/// A device buffer freed on drop (staging for control messages).
struct Staging<'a> {
    rt: &'a dyn Runtime,
    ptr: u64,
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let _ = self.rt.free(self.ptr);
    }
}

/// One rank of an RCCL group (one GPU).
pub struct RcclTransport {
    rank: usize,
    world: usize,
    lib: &'static Rccl,
    rt: Arc<dyn Runtime>,
    device: usize,
    comm: Mutex<CommHandle>,
}

impl std::fmt::Debug for RcclTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RcclTransport(rank {} of {}, rocm:{})",
            self.rank, self.world, self.device
        )
    }
}

impl Drop for RcclTransport {
    fn drop(&mut self) {
        let c = self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        if !c.0.is_null() && self.rt.set_device(self.device).is_ok() {
            // SAFETY: created by ncclCommInitRank, destroyed once.
            let _ = unsafe { (self.lib.comm_destroy)(c.0) };
            c.0 = std::ptr::null_mut();
        }
    }
}

/// Offsets (prefix sums) of `counts`.
fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let o = *acc;
            *acc += c;
            Some(o)
        })
        .collect()
}

impl RcclTransport {
    /// Rank `rank` of `world` on AMD GPU `device`. Collective: every rank
    /// calls it with the same `id` (it blocks until all have joined).
    pub fn new(rank: usize, world: usize, id: &RcclId, device: usize) -> Result<RcclTransport> {
        let lib = library()?;
        if world == 0 || rank >= world {
            return Err(Error::Comm {
                rank,
                msg: format!("RCCL: rank {rank} of a group of {world}"),
            });
        }
        hip::probe().map_err(unavailable)?;
        let h = hip::library().map_err(unavailable)?;
        let rt: Arc<dyn Runtime> = Arc::new(h);
        rt.set_device(device)?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: a live out-pointer; the id by value; the device is
        // current, so RCCL binds this rank to that GPU.
        let r = unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id.raw(), rank as c_int) };
        lib.check(rank, "ncclCommInitRank", r)?;
        Ok(RcclTransport {
            rank,
            world,
            lib,
            rt,
            device,
            comm: Mutex::new(CommHandle(comm)),
        })
    }

    /// A group of in-process ranks, rank `i` on device `devices[i]` (one
    /// thread each while the communicators are created; one rank per GPU).
    pub fn group(devices: &[usize]) -> Result<Vec<RcclTransport>> {
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(Error::Comm {
                    rank: i,
                    msg: format!("RCCL: device {d} appears twice in {devices:?}; one rank per GPU"),
                });
            }
        }
        let id = RcclId::new()?;
        let world = devices.len();
        let results: Vec<Result<RcclTransport>> = std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, &dev)| {
                    let id = &id;
                    s.spawn(move || RcclTransport::new(rank, world, id, dev))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Comm {
                            rank,
                            msg: "RCCL: the thread creating this rank panicked".into(),
                        })
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// One group call of sends and receives on the default stream
    /// (`(peer, ptr, bytes)`; zero-byte entries skipped on both sides).
    fn send_recv(
        &self,
        what: &str,
        sends: &[(usize, u64, usize)],
        recvs: &[(usize, u64, usize)],
    ) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let lib = self.lib;
        let stream = std::ptr::null_mut();
        // SAFETY: plain group call.
        lib.check(self.rank, "ncclGroupStart", unsafe { (lib.group_start)() })?;
        let mut first_err = Ok(());
        for &(peer, ptr, bytes) in sends.iter().filter(|s| s.2 > 0) {
            // SAFETY: `ptr..ptr+bytes` is device memory of this GPU that
            // stays alive until the default stream passes this call (the
            // callers hold it and synchronize, or it belongs to a tensor
            // whose free waits for the device).
            let r = unsafe {
                (lib.send)(
                    ptr as *const c_void,
                    bytes,
                    NCCL_UINT8,
                    peer as c_int,
                    comm.0,
                    stream,
                )
            };
            if first_err.is_ok() {
                first_err = lib.check(self.rank, &format!("{what}: ncclSend to {peer}"), r);
            }
        }
        for &(peer, ptr, bytes) in recvs.iter().filter(|s| s.2 > 0) {
            // SAFETY: as above, for the receive buffer.
            let r = unsafe {
                (lib.recv)(
                    ptr as *mut c_void,
                    bytes,
                    NCCL_UINT8,
                    peer as c_int,
                    comm.0,
                    stream,
                )
            };
            if first_err.is_ok() {
                first_err = lib.check(self.rank, &format!("{what}: ncclRecv from {peer}"), r);
            }
        }
        // SAFETY: closes the group opened above (even after a failure).
        let end = lib.check(self.rank, "ncclGroupEnd", unsafe { (lib.group_end)() });
        first_err.and(end)
    }

    fn staging(&self, bytes: &[u8]) -> Result<Staging<'_>> {
        let ptr = self.rt.malloc(bytes.len())?;
        let s = Staging {
            rt: self.rt.as_ref(),
            ptr,
        };
        // SAFETY: a fresh allocation of `bytes.len()` bytes.
        unsafe { self.rt.htod(ptr, bytes) }?;
        Ok(s)
    }

    fn read(&self, ptr: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        // SAFETY: `ptr` is a staging buffer of at least `len` bytes.
        unsafe { self.rt.dtoh(&mut out, ptr) }?;
        Ok(out)
    }
}

impl Transport for RcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let w = self.world;
        if send.len() != w {
            return Err(Error::Comm {
                rank: self.rank,
                msg: format!("all_to_all_v: {} messages for {w} ranks", send.len()),
            });
        }
        let what = "all_to_all_v";
        self.rt.set_device(self.device)?;
        // Round 1: the sizes (one u64 per peer).
        let sizes: Vec<u8> = send
            .iter()
            .flat_map(|m| (m.len() as u64).to_le_bytes())
            .collect();
        let dsizes = self.staging(&sizes)?;
        let rsizes = self.staging(&vec![0u8; 8 * w])?;
        let sends: Vec<_> = (0..w).map(|r| (r, dsizes.ptr + 8 * r as u64, 8)).collect();
        let recvs: Vec<_> = (0..w).map(|r| (r, rsizes.ptr + 8 * r as u64, 8)).collect();
        self.send_recv(what, &sends, &recvs)?;
        let raw = self.read(rsizes.ptr, 8 * w)?;
        let recv_len: Vec<usize> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
            .collect();
        // Round 2: the bytes, concatenated in rank order.
        let send_len: Vec<usize> = send.iter().map(|m| m.len()).collect();
        let dsend = self.staging(&send.concat())?;
        let total: usize = recv_len.iter().sum();
        let drecv = self.staging(&vec![0u8; total])?;
        let (so, ro) = (offsets(&send_len), offsets(&recv_len));
        let sends: Vec<_> = (0..w)
            .map(|r| (r, dsend.ptr + so[r] as u64, send_len[r]))
            .collect();
        let recvs: Vec<_> = (0..w)
            .map(|r| (r, drecv.ptr + ro[r] as u64, recv_len[r]))
            .collect();
        self.send_recv(what, &sends, &recvs)?;
        let all = self.read(drecv.ptr, total)?;
        Ok((0..w)
            .map(|r| all[ro[r]..ro[r] + recv_len[r]].to_vec())
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        self.all_to_all_v(vec![Vec::new(); self.world]).map(|_| ())
    }

    fn device(&self) -> Option<&dyn DeviceExchange> {
        Some(self)
    }
}

impl DeviceExchange for RcclTransport {
    fn accepts(&self, backend: &dyn Backend) -> bool {
        backend.name() == BACKEND
    }

    fn exchange_rows(
        &self,
        backend: &dyn Backend,
        send: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor> {
        let comm_err = |msg: String| Error::Comm {
            rank: self.rank,
            msg: format!("exchange_rows: {msg}"),
        };
        if !self.accepts(backend) {
            return Err(comm_err(format!(
                "RCCL moves only rocm tensors, not {}",
                backend.name()
            )));
        }
        let w = self.world;
        if send_rows.len() != w || recv_rows.len() != w {
            return Err(comm_err(format!(
                "{} send and {} receive counts for {w} ranks",
                send_rows.len(),
                recv_rows.len()
            )));
        }
        let shape = send.shape();
        if shape.is_empty() {
            return Err(comm_err(format!("{send:?} has no rows (rank 0)")));
        }
        if send_rows.iter().sum::<usize>() != shape[0] {
            return Err(comm_err(format!(
                "send counts {send_rows:?} do not add up to the {} rows of {send:?}",
                shape[0]
            )));
        }
        let row_bytes = shape[1..].iter().product::<usize>() * send.dtype().size();
        let mut out_shape = shape.to_vec();
        out_shape[0] = recv_rows.iter().sum();
        send.check_owner(backend.instance(), BACKEND)?;
        let s = send
            .storage_any::<RocmStorage>()
            .ok_or_else(|| comm_err(format!("{send:?} is not in rocm memory")))?;
        if s.device() != self.device {
            return Err(comm_err(format!(
                "{send:?} is on rocm:{}, this rank on rocm:{}",
                s.device(),
                self.device
            )));
        }
        let out = backend.alloc(send.dtype(), &out_shape)?;
        let o = out
            .storage_any::<RocmStorage>()
            .ok_or_else(|| comm_err("the backend's alloc is not rocm memory".into()))?;
        let base = s.ptr() + send.offset_bytes() as u64;
        let (so, ro) = (offsets(send_rows), offsets(recv_rows));
        let sends: Vec<_> = (0..w)
            .map(|r| {
                (
                    r,
                    base + (so[r] * row_bytes) as u64,
                    send_rows[r] * row_bytes,
                )
            })
            .collect();
        let recvs: Vec<_> = (0..w)
            .map(|r| {
                (
                    r,
                    o.ptr() + (ro[r] * row_bytes) as u64,
                    recv_rows[r] * row_bytes,
                )
            })
            .collect();
        self.rt.set_device(self.device)?;
        self.send_recv("exchange_rows", &sends, &recvs)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake librccl built with the C compiler, or `None` without one.
    fn fake_rccl(tag: &str, version: i32, omit: &str) -> Option<std::path::PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "deepport-rocm-fakerccl-{}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let mut c = String::new();
        for s in RCCL_SYMBOLS {
            match *s {
                "ncclGetVersion" => {
                    c += &format!("int ncclGetVersion(int* v) {{ *v = {version}; return 0; }}\n")
                }
                s if s == omit => {}
                s => c += &format!("int {s}(void) {{ return 0; }}\n"),
            }
        }
        let src = dir.join("fake.c");
        let lib = dir.join("librccl-fake.so.1");
        std::fs::write(&src, c).ok()?;
        let ok = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            println!("no C compiler: fake-RCCL test skipped");
            return None;
        }
        Some(lib)
    }

    #[test]
    fn loader_on_fake_rccl() {
        let open = |p: &std::path::Path| open_rccl(&[p.display().to_string()]);
        let Some(good) = fake_rccl("good", 21804, "") else {
            return;
        };
        let r = open(&good).map_err(|e| e.to_string()).unwrap();
        assert_eq!(version_text(r.version), "2.18.4");
        let old = fake_rccl("old", 2604, "").unwrap();
        let e = open(&old).err().unwrap();
        assert!(e.contains("RCCL too old") && e.contains("2604"), "{e}");
        let nosym = fake_rccl("nosym", 21804, "ncclRecv").unwrap();
        let e = open(&nosym).err().unwrap();
        assert!(e.contains("RCCL too old") && e.contains("ncclRecv"), "{e}");
        let e = open_rccl(&["librccl-deepport-missing.so.1".into()])
            .err()
            .unwrap();
        assert!(e.contains("RCCL (librccl) not found"), "{e}");
        assert!(e.contains("librccl-deepport-missing.so.1"), "{e}");
        for p in [good, old, nosym] {
            if let Some(d) = p.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }

    #[test]
    fn absent_rccl_or_gpu_is_an_error_not_a_panic() {
        // Here there is no RCCL and no AMD GPU: a group is an error with a
        // reason, never a panic; a rank outside its group is refused.
        match RcclTransport::group(&[0, 1]) {
            Ok(g) => assert_eq!(g.len(), 2),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        assert!(RcclTransport::group(&[0, 0]).is_err());
        if library().is_ok() {
            let id = RcclId([0; 128]);
            assert!(RcclTransport::new(3, 2, &id, 0).is_err());
        }
        assert_eq!(offsets(&[2, 0, 3]), vec![0, 2, 2]);
        assert!(offsets(&[]).is_empty());
    }
}
