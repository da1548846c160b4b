//! An NCCL [`Transport`] for expert parallelism across GPUs.
//!
//! * Payload rows move device to device ([`DeviceExchange::exchange_rows`],
//!   NCCL send/recv on the stream of the tensors' backend instance, so the
//!   exchange is ordered after the ops that wrote `send` and before those
//!   that read the result; nothing is staged through the host).
//! * Control messages ([`Transport::all_to_all_v`], host bytes) go through
//!   small device buffers: one send/recv round of the sizes, then one of the
//!   bytes. [`Transport::barrier`] is an all-to-all of empty messages.
//!
//! **Loading.** NCCL's runtime file is `libnccl.so.2` (the `libnccl2`
//! package and the `nvidia-nccl-cu12` wheel install only that name; the
//! `libnccl.so` symlink comes with the development package). cudarc's
//! loader looks for `libnccl.so`, `libnccl.so.<CUDA major>`, `.12`, `.11`,
//! `.10`, `.9` and `.1` — never `.so.2` — and panics when none loads.
//! Preloading `libnccl.so.2` with `RTLD_GLOBAL` would not help: glibc
//! matches a later `dlopen("libnccl.so")` against a loaded object's file
//! name and SONAME (`libnccl.so.2`), not the requested name. So this
//! module opens `libnccl.so.2`, then `libnccl.so`, itself (see
//! [`library`]) and binds the nine NCCL functions it calls through that
//! handle, with cudarc's `nccl::sys` types (`ncclUniqueId`, `ncclComm_t`);
//! cudarc's NCCL function wrappers are never called. A missing library is
//! [`Error::Unavailable`] naming the files tried.

use crate::device::{Device, DeviceBuffer};
use crate::probe::{self, BACKEND};
use crate::CudaStorage;
use cudarc::nccl::sys::{ncclComm_t, ncclUniqueId};
use deepport_core::backend::{Backend, Tensor};
use deepport_core::comm::{DeviceExchange, Transport};
use deepport_core::{Error, Result};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

/// File names tried for NCCL, in order.
pub const NCCL_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// `ncclUint8`.
const NCCL_UINT8: c_int = 1;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueIdFn = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type CommDestroyFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
type GroupFn = unsafe extern "C" fn() -> c_int;
type SendFn =
    unsafe extern "C" fn(*const c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> c_int;
type RecvFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> c_int;
type ErrorStringFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// The NCCL functions this module calls, bound from one library handle.
pub struct Nccl {
    pub file: String,
    /// `ncclGetVersion`: e.g. 22105 for 2.21.5.
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

/// The symbols bound from NCCL.
pub const NCCL_SYMBOLS: &[&str] = &[
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

/// NCCL 2.7 introduced send/recv.
pub const MIN_NCCL_VERSION: i32 = 2700;

fn open_nccl(names: &[&str]) -> std::result::Result<Nccl, String> {
    let (lib, file) = probe::open_first("NCCL (libnccl)", names)?;
    let missing = probe::missing_symbols(&lib, NCCL_SYMBOLS);
    if !missing.is_empty() {
        return Err(format!(
            "NCCL too old: {file} lacks {} (send/recv need NCCL 2.7 or newer)",
            missing.join(", ")
        ));
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: the symbol exists (checked above) and has this C
            // signature in every NCCL 2.x (`ncclResult_t` and
            // `ncclDataType_t` are C enums, passed as int).
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
    if version < MIN_NCCL_VERSION {
        return Err(format!(
            "NCCL too old: {file} is version {version}, send/recv need 2.7 or newer"
        ));
    }
    Ok(Nccl {
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

/// NCCL, loaded once per process (function pointers stay valid: the
/// handle lives in the static); [`Error::Unavailable`] with the reason.
pub fn library() -> Result<&'static Nccl> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| open_nccl(NCCL_NAMES))
        .as_ref()
        .map_err(|why| probe::unavailable(why.clone()))
}

impl Nccl {
    fn check(&self, rank: usize, what: &str, r: c_int) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string
        // for any code.
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
            msg: format!("NCCL {what} failed ({r}: {text})"),
        })
    }

    /// `2.21.5`-style text of the version.
    pub fn version_text(&self) -> String {
        let v = self.version;
        if v >= 10000 {
            format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
        } else {
            format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
        }
    }
}

/// An NCCL unique id: made by one rank, handed to every other (out of
/// band), then used by all in [`NcclTransport::new`].
#[derive(Clone)]
pub struct NcclId(pub [u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`).
    pub fn new() -> Result<NcclId> {
        let lib = library()?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: a live out-pointer of the right type.
        let r = unsafe { (lib.get_unique_id)(&mut id) };
        lib.check(0, "ncclGetUniqueId", r)?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    fn raw(&self) -> ncclUniqueId {
        ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

struct Comm(ncclComm_t);
// SAFETY: an NCCL communicator may be used from any thread; this module
// serialises its use (the `Mutex` in `NcclTransport`), as NCCL requires.
unsafe impl Send for Comm {}

/// One rank of an NCCL group (one GPU). See the module docs.
pub struct NcclTransport {
    rank: usize,
    world: usize,
    lib: &'static Nccl,
    /// The rank's device: its context, and the stream control messages use.
    dev: Arc<Device>,
    comm: Mutex<Comm>,
}

impl std::fmt::Debug for NcclTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclTransport(rank {} of {}, {:?})",
            self.rank, self.world, self.dev
        )
    }
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        let c = self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        if !c.0.is_null() && self.dev.bind("ncclCommDestroy").is_ok() {
            // SAFETY: the communicator was created by ncclCommInitRank and
            // is destroyed once (nulled below).
            let _ = unsafe { (self.lib.comm_destroy)(c.0) };
            c.0 = std::ptr::null_mut();
        }
    }
}

impl NcclTransport {
    /// Rank `rank` of `world`, on CUDA device `device`. Collective: every
    /// rank calls it with the same `id` (it blocks until all have joined).
    pub fn new(rank: usize, world: usize, id: &NcclId, device: usize) -> Result<NcclTransport> {
        let lib = library()?;
        if world == 0 || rank >= world {
            return Err(Error::Comm {
                rank,
                msg: format!("NCCL: rank {rank} of a group of {world}"),
            });
        }
        let dev = Device::open(device)?;
        dev.bind("ncclCommInitRank")?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: a live out-pointer; the id is 128 bytes by value; the
        // device's context is current, so NCCL binds to that GPU.
        let r = unsafe { (lib.comm_init_rank)(&mut comm, world as c_int, id.raw(), rank as c_int) };
        lib.check(rank, "ncclCommInitRank", r)?;
        Ok(NcclTransport {
            rank,
            world,
            lib,
            dev,
            comm: Mutex::new(Comm(comm)),
        })
    }

    /// A group of in-process ranks, rank `i` on device `devices[i]` (one
    /// thread each while the communicators are created). NCCL allows one
    /// rank per GPU: the devices must be distinct.
    pub fn group(devices: &[usize]) -> Result<Vec<NcclTransport>> {
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(Error::Comm {
                    rank: i,
                    msg: format!("NCCL: device {d} appears twice in {devices:?}; one rank per GPU"),
                });
            }
        }
        let id = NcclId::new()?;
        let world = devices.len();
        let results: Vec<Result<NcclTransport>> = std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, &dev)| {
                    let id = &id;
                    s.spawn(move || NcclTransport::new(rank, world, id, dev))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Comm {
                            rank,
                            msg: "NCCL: the thread creating this rank panicked".into(),
                        })
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// One group call of sends and receives on `stream` (`(peer, ptr,
    /// bytes)`; zero-byte entries skipped; both sides skip the same ones,
    /// since the counts agree).
    fn send_recv(
        &self,
        what: &str,
        stream: *mut c_void,
        sends: &[(usize, u64, usize)],
        recvs: &[(usize, u64, usize)],
    ) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let lib = self.lib;
        // SAFETY: plain NCCL group calls.
        lib.check(self.rank, "ncclGroupStart", unsafe { (lib.group_start)() })?;
        let mut first_err = Ok(());
        for &(peer, ptr, bytes) in sends.iter().filter(|s| s.2 > 0) {
            // SAFETY: `ptr..ptr+bytes` is device memory of this GPU that
            // stays alive until the stream passes this call (callers keep
            // the buffers alive and synchronize, or own them via tensors
            // whose frees are ordered on the same stream).
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
        // The group must be closed even after a failed call.
        // SAFETY: closes the group opened above.
        let end = lib.check(self.rank, "ncclGroupEnd", unsafe { (lib.group_end)() });
        first_err.and(end)
    }

    fn stream(&self) -> *mut c_void {
        self.dev.cu_stream() as *mut c_void
    }

    fn staging(&self, what: &str, bytes: &[u8]) -> Result<DeviceBuffer> {
        let b = self.dev.alloc(what, bytes.len())?;
        self.dev.upload(what, b.ptr(), bytes)?;
        Ok(b)
    }
}

/// Offsets (prefix sums) of `counts`.
pub(crate) fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(counts.len());
    let mut acc = 0;
    for &c in counts {
        o.push(acc);
        acc += c;
    }
    o
}

impl Transport for NcclTransport {
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
        self.dev.bind(what)?;
        // Round 1: the sizes (one u64 per peer).
        let sizes: Vec<u8> = send
            .iter()
            .flat_map(|m| (m.len() as u64).to_le_bytes())
            .collect();
        let dsizes = self.staging(what, &sizes)?;
        let rsizes = self.dev.alloc(what, 8 * w)?;
        let sends: Vec<_> = (0..w)
            .map(|r| (r, dsizes.ptr() + 8 * r as u64, 8))
            .collect();
        let recvs: Vec<_> = (0..w)
            .map(|r| (r, rsizes.ptr() + 8 * r as u64, 8))
            .collect();
        self.send_recv(what, self.stream(), &sends, &recvs)?;
        let mut raw = vec![0u8; 8 * w];
        self.dev.download(what, rsizes.ptr(), &mut raw)?;
        let recv_len: Vec<usize> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
            .collect();
        // Round 2: the bytes, concatenated in rank order.
        let send_len: Vec<usize> = send.iter().map(|m| m.len()).collect();
        let flat: Vec<u8> = send.concat();
        let dsend = self.staging(what, &flat)?;
        let total: usize = recv_len.iter().sum();
        let drecv = self.dev.alloc(what, total)?;
        let (so, ro) = (offsets(&send_len), offsets(&recv_len));
        let sends: Vec<_> = (0..w)
            .map(|r| (r, dsend.ptr() + so[r] as u64, send_len[r]))
            .collect();
        let recvs: Vec<_> = (0..w)
            .map(|r| (r, drecv.ptr() + ro[r] as u64, recv_len[r]))
            .collect();
        self.send_recv(what, self.stream(), &sends, &recvs)?;
        let mut all = vec![0u8; total];
        self.dev.download(what, drecv.ptr(), &mut all)?;
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

impl DeviceExchange for NcclTransport {
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
                "NCCL moves only cuda tensors, not {}",
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
        let rows = shape.first().copied().unwrap_or(0);
        if send_rows.iter().sum::<usize>() != rows {
            return Err(comm_err(format!(
                "send counts {send_rows:?} do not add up to the {rows} rows of {send:?}"
            )));
        }
        if shape.is_empty() {
            return Err(comm_err(format!("{send:?} has no rows (rank 0)")));
        }
        let row_bytes = shape[1..].iter().product::<usize>() * send.dtype().size();
        let mut out_shape = shape.to_vec();
        out_shape[0] = recv_rows.iter().sum();
        send.check_owner(backend.instance(), BACKEND)?;
        let s = send
            .storage_any::<CudaStorage>()
            .ok_or_else(|| comm_err(format!("{send:?} is not in cuda memory")))?;
        if s.device().desc.ordinal != self.dev.desc.ordinal {
            return Err(comm_err(format!(
                "{send:?} is on cuda:{}, this rank on cuda:{}",
                s.device().desc.ordinal,
                self.dev.desc.ordinal
            )));
        }
        let out = backend.alloc(send.dtype(), &out_shape)?;
        let o = out
            .storage_any::<CudaStorage>()
            .ok_or_else(|| comm_err("the backend's alloc is not cuda memory".into()))?;
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
        // On the backend instance's own stream: ordered after the ops that
        // wrote `send`, before the ops that will read `out`.
        let dev = s.device();
        dev.bind("exchange_rows")?;
        self.send_recv(
            "exchange_rows",
            dev.cu_stream() as *mut c_void,
            &sends,
            &recvs,
        )?;
        Ok(out)
    }
}

/// The NCCL version text, or why NCCL is unavailable.
pub fn probe() -> std::result::Result<String, String> {
    match library() {
        Ok(l) => Ok(format!("NCCL {} ({})", l.version_text(), l.file)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake libnccl built with the C compiler, or `None` without one.
    fn fake_nccl(tag: &str, version: i32, omit: &str) -> Option<std::path::PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "deepport-cuda-fakenccl-{}-{tag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let mut c = String::new();
        for s in NCCL_SYMBOLS {
            match *s {
                "ncclGetVersion" => {
                    c += &format!("int ncclGetVersion(int* v) {{ *v = {version}; return 0; }}\n")
                }
                s if s == omit => {}
                s => c += &format!("int {s}(void) {{ return 0; }}\n"),
            }
        }
        let src = dir.join("fake.c");
        let lib = dir.join("libnccl-fake.so.2");
        std::fs::write(&src, c).ok()?;
        let ok = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            println!("no C compiler: fake-NCCL test skipped");
            return None;
        }
        Some(lib)
    }

    #[test]
    fn loader_on_fake_nccl() {
        let open = |p: &std::path::Path| open_nccl(&[p.to_str().unwrap()]);
        let Some(good) = fake_nccl("good", 22105, "") else {
            return;
        };
        let n = open(&good).map_err(|e| e.to_string()).unwrap();
        assert_eq!(n.version_text(), "2.21.5");
        let old = fake_nccl("old", 2604, "").unwrap();
        let e = open(&old).err().unwrap();
        assert!(e.contains("NCCL too old") && e.contains("2604"), "{e}");
        let nosym = fake_nccl("nosym", 22105, "ncclSend").unwrap();
        let e = open(&nosym).err().unwrap();
        assert!(e.contains("NCCL too old") && e.contains("ncclSend"), "{e}");
        let e = open_nccl(&["libnccl-deepport-missing.so.2"]).err().unwrap();
        assert!(e.contains("NCCL (libnccl) library not found"), "{e}");
        assert!(e.contains("libnccl-deepport-missing.so.2"), "{e}");
        for p in [good, old, nosym] {
            if let Some(d) = p.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }

    #[test]
    fn prefix_offsets() {
        assert_eq!(offsets(&[2, 0, 3]), vec![0, 2, 2]);
        assert!(offsets(&[]).is_empty());
    }
}
