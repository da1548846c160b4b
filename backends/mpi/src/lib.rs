//! deepport-mpi: the expert-parallel [`Transport`] over MPI (Open MPI),
//! one process per rank under `mpirun`.
//!
//! * **Bounded collectives.** Every collective is nonblocking point-to-point
//!   traffic (`MPI_Isend`/`MPI_Irecv` on a private duplicate of
//!   `MPI_COMM_WORLD`) polled against a deadline
//!   ([`MpiComm::timeout`], default [`DEFAULT_TIMEOUT`], or
//!   `$DEEPPORT_MPI_TIMEOUT` seconds). A peer that died or stopped
//!   answering makes the collective fail with [`Error::Comm`] naming the
//!   silent ranks, never hang. The group is then *broken*: later
//!   collectives fail at once, and dropping it calls `MPI_Abort` (whose
//!   `mpirun` kills every process of the job, the silent one included)
//!   instead of `MPI_Finalize`, which could wait on the dead peer forever.
//! * **Start-up handshake.** [`MpiComm::handshake`] exchanges every rank's
//!   configuration (world size, expert count, hidden size, dtype,
//!   checkpoint fingerprint, …) and fails on every rank with a message
//!   naming the first field that differs and the ranks that disagree.
//! * **Host path only.** Payloads are staged through host memory (no
//!   [`DeviceExchange`](deepport_core::comm::DeviceExchange)); the bytes on
//!   the wire are core's protocol, so MPI ranks compute exactly what
//!   in-process ranks compute.
//!
//! `all_to_all_v` is two rounds: every rank sends every peer its message
//! length (8 bytes), then the messages themselves (split into pieces of at
//! most [`MAX_PIECE`] bytes, so any size fits MPI's `int` counts). A rank
//! sends nothing to itself through MPI. `all_to_all_v_flat` (the payloads
//! of core's protocol, counts known) is one round, sent straight from the
//! caller's buffer and received straight into the result, which reuses the
//! largest buffer handed back ([`Transport::recycle`], or the previous
//! flat exchange's send buffer) so that a steady stream of steps touches no
//! fresh pages. Both use one poll loop ([`MpiComm`]'s `round`).

use deepport_core::backend::{Recycler, Tensor};
use deepport_core::comm::{check_flat, host_rows, row_counts, Transport};
use deepport_core::{Error, Result};
use mpi::ffi;
use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The default collective deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The environment variable that overrides [`DEFAULT_TIMEOUT`] (seconds).
pub const TIMEOUT_ENV: &str = "DEEPPORT_MPI_TIMEOUT";

/// The largest piece of a message sent with one MPI call.
pub const MAX_PIECE: usize = 1 << 30;

/// The version of the handshake message.
const HANDSHAKE_VERSION: u64 = 1;

/// Message tags: sizes and data of the collectives use two tags that
/// alternate with a sequence number, so a late message of one collective
/// can never be taken for another's.
const TAG_SPAN: u64 = 1 << 14;

/// The MPI state a group owns: the communicator and, when this group
/// initialized MPI, the universe (whose drop finalizes).
struct Inner {
    comm: ffi::MPI_Comm,
    /// The deadline of each collective.
    timeout: Duration,
    /// Collectives started so far (for tags and messages).
    seq: u64,
    /// Set when a collective timed out or MPI failed: the group can no
    /// longer be used and must abort instead of finalizing.
    broken: Option<String>,
    universe: Option<mpi::environment::Universe>,
}

/// The most buffers a group keeps for later exchanges.
const POOL_MAX: usize = 4;

/// Buffers to receive (or pack) the next flat exchanges into, handed back
/// by [`Transport::recycle`], by the exchanges themselves (a sent buffer)
/// and by tensors adopted from received buffers ([`Transport::recycler`]):
/// memory already mapped, so a steady stream of steps touches no fresh
/// pages. At most [`POOL_MAX`] buffers, the largest kept; they live as
/// long as the group.
#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Vec<u8>>>>);

impl Pool {
    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut v = match self.0.lock() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        };
        v.push(buf);
        if v.len() > POOL_MAX {
            if let Some(i) = (0..v.len()).min_by_key(|&i| v[i].capacity()) {
                let small = v.swap_remove(i);
                drop(v);
                drop(small);
            }
        }
    }
    /// The smallest kept buffer that holds `n` bytes, with length `n`
    /// (its bytes initialized, their values unspecified).
    fn take(&self, n: usize) -> Option<Vec<u8>> {
        if n == 0 {
            return None;
        }
        let mut v = self.0.lock().ok()?;
        let i = (0..v.len())
            .filter(|&i| v[i].capacity() >= n)
            .min_by_key(|&i| v[i].capacity())?;
        let mut b = v.swap_remove(i);
        drop(v);
        if b.len() >= n {
            b.truncate(n);
        } else {
            b.resize(n, 0);
        }
        Some(b)
    }
}

/// How [`MpiComm`]'s `all_to_all_v_rows` sends rows that are not
/// contiguous in the source: packed into a pooled buffer first (`pack`,
/// the default), or described to MPI as an `MPI_Type_create_hindexed`
/// datatype per peer so that MPI gathers them itself (`datatype`). Set
/// with `$DEEPPORT_MPI_GATHER`.
pub const GATHER_ENV: &str = "DEEPPORT_MPI_GATHER";

fn gather_with_datatypes() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(GATHER_ENV).is_ok_and(|v| v.trim() == "datatype"))
}

// SAFETY: `MPI_Comm` is a handle (a pointer in Open MPI) that MPI lets any
// thread use when MPI was initialized with MPI_THREAD_SERIALIZED or better
// and calls are never concurrent. `Inner` lives only inside the `Mutex` of
// `MpiComm`, so every MPI call made through it is serialized by that lock.
unsafe impl Send for Inner {}

/// One rank of an MPI group (a process under `mpirun`).
pub struct MpiComm {
    rank: usize,
    world: usize,
    inner: Mutex<Inner>,
    pool: Pool,
}

/// The collective deadline from `$DEEPPORT_MPI_TIMEOUT` (seconds, > 0), or
/// [`DEFAULT_TIMEOUT`] when unset.
pub fn timeout_from_env() -> Result<Duration> {
    match std::env::var(TIMEOUT_ENV) {
        Err(_) => Ok(DEFAULT_TIMEOUT),
        Ok(s) => parse_timeout(&s).map_err(|e| Error::Other(format!("${TIMEOUT_ENV}: {e}"))),
    }
}

/// Parses a deadline in seconds (positive, at most 10⁶).
pub fn parse_timeout(s: &str) -> Result<Duration> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e6 => Ok(Duration::from_secs_f64(v)),
        _ => Err(Error::Other(format!(
            "`{s}` is not a positive number of seconds (at most 1e6)"
        ))),
    }
}

fn mpi_err(rank: usize, what: &str, code: c_int) -> Error {
    Error::Comm {
        rank,
        msg: format!("MPI error {code} in {what}"),
    }
}

impl MpiComm {
    /// Initializes MPI (`MPI_THREAD_SERIALIZED`) and returns this process's
    /// rank of `MPI_COMM_WORLD`, with the deadline of [`timeout_from_env`].
    /// Fails when MPI was already initialized in this process.
    pub fn init() -> Result<MpiComm> {
        Self::init_with_timeout(timeout_from_env()?)
    }

    /// [`MpiComm::init`] with an explicit collective deadline.
    pub fn init_with_timeout(timeout: Duration) -> Result<MpiComm> {
        let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::Other("MPI is already initialized in this process".into()))?;
        if level < mpi::Threading::Serialized {
            return Err(Error::Other(format!(
                "MPI provides thread level {level:?}; deepport needs Serialized"
            )));
        }
        // SAFETY: a library constant.
        let mut comm = unsafe { ffi::RSMPI_COMM_NULL };
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: MPI is initialized (we hold the universe); RSMPI_COMM_WORLD
        // and RSMPI_ERRORS_RETURN are constants of the library; the out
        // pointers point to live locals of the right types.
        let codes = unsafe {
            [
                ffi::MPI_Comm_dup(ffi::RSMPI_COMM_WORLD, &mut comm),
                ffi::MPI_Comm_set_errhandler(comm, ffi::RSMPI_ERRORS_RETURN),
                ffi::MPI_Comm_rank(comm, &mut rank),
                ffi::MPI_Comm_size(comm, &mut size),
            ]
        };
        if let Some(&c) = codes.iter().find(|&&c| c != 0) {
            return Err(mpi_err(0, "creating the communicator", c));
        }
        Ok(MpiComm {
            rank: rank.max(0) as usize,
            world: size.max(1) as usize,
            inner: Mutex::new(Inner {
                comm,
                timeout,
                seq: 0,
                broken: None,
                universe: Some(universe),
            }),
            pool: Pool::default(),
        })
    }

    /// The deadline of every collective.
    pub fn timeout(&self) -> Duration {
        match self.inner.lock() {
            Ok(i) => i.timeout,
            Err(p) => p.into_inner().timeout,
        }
    }

    /// Sets the deadline of the collectives that follow (e.g. a long one
    /// for start-up, when ranks load checkpoints at different speeds, and
    /// a short one after). Every rank should set the same.
    pub fn set_timeout(&self, timeout: Duration) {
        match self.inner.lock() {
            Ok(mut i) => i.timeout = timeout,
            Err(p) => p.into_inner().timeout = timeout,
        }
    }

    /// Whether a collective has failed and the group can no longer be used
    /// (the reason).
    pub fn broken(&self) -> Option<String> {
        self.inner.lock().ok().and_then(|i| i.broken.clone())
    }

    /// Ends the whole MPI job at once with `code` (`MPI_Abort`): `mpirun`
    /// kills every process, including one that stopped answering. Use it
    /// after printing an error that may not have reached the other ranks.
    pub fn abort(&self, code: i32) -> ! {
        let comm = self
            .inner
            .lock()
            .map(|i| i.comm)
            .unwrap_or_else(|p| p.into_inner().comm);
        // SAFETY: `comm` is the live duplicate of MPI_COMM_WORLD made in
        // init (never freed before drop); MPI_Abort does not return in
        // practice, and the exit below covers an implementation where it does.
        unsafe {
            ffi::MPI_Abort(comm, code);
        }
        std::process::exit(code)
    }

    /// A plain blocking `MPI_Alltoallv` of bytes (`send` holds the
    /// messages to ranks 0, 1, … back to back, `recv` receives those from
    /// every rank in rank order): the baseline the benchmark compares the
    /// transport with. **No deadline**: not for production use.
    pub fn alltoallv_baseline(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        let world = self.world;
        let ints = |v: &[usize]| -> Result<(Vec<c_int>, Vec<c_int>)> {
            let mut counts = Vec::with_capacity(world);
            let mut displs = Vec::with_capacity(world);
            let mut at = 0usize;
            for &c in v {
                let (ci, di) = (c_int::try_from(c), c_int::try_from(at));
                match (ci, di) {
                    (Ok(ci), Ok(di)) => {
                        counts.push(ci);
                        displs.push(di);
                    }
                    _ => return Err(self.err("alltoallv_baseline: counts exceed MPI's int".into())),
                }
                at += c;
            }
            Ok((counts, displs))
        };
        if send_counts.len() != world
            || recv_counts.len() != world
            || send_counts.iter().sum::<usize>() > send.len()
            || recv_counts.iter().sum::<usize>() > recv.len()
        {
            return Err(self.err("alltoallv_baseline: counts do not match the buffers".into()));
        }
        let (sc, sd) = ints(send_counts)?;
        let (rc, rd) = ints(recv_counts)?;
        let inner = self
            .inner
            .lock()
            .map_err(|_| self.err("group lock poisoned".into()))?;
        // SAFETY: the counts and displacements were checked against the
        // buffers' lengths above; both buffers outlive this blocking call;
        // `comm` is live.
        let code = unsafe {
            ffi::MPI_Alltoallv(
                send.as_ptr() as *const c_void,
                sc.as_ptr(),
                sd.as_ptr(),
                ffi::RSMPI_UINT8_T,
                recv.as_mut_ptr() as *mut c_void,
                rc.as_ptr(),
                rd.as_ptr(),
                ffi::RSMPI_UINT8_T,
                inner.comm,
            )
        };
        if code != 0 {
            return Err(mpi_err(self.rank, "MPI_Alltoallv", code));
        }
        Ok(())
    }

    /// A zeroed buffer of `n` bytes for `what`, or an error (never an abort
    /// on a size announced by a peer).
    fn zeroed(&self, n: u64, what: &str) -> Result<Vec<u8>> {
        let n = usize::try_from(n).map_err(|_| self.err(format!("{what} would need {n} bytes")))?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let fail = || self.err(format!("cannot allocate {n} bytes for {what}"));
        let layout = std::alloc::Layout::array::<u8>(n).map_err(|_| fail())?;
        // Zeroed by the allocator (fresh pages from the kernel for a large
        // buffer: no pass of memset before MPI writes it).
        // SAFETY: `layout` has a nonzero size (n > 0).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(fail());
        }
        // SAFETY: `ptr` was allocated by the global allocator with the
        // layout of `n` bytes (align 1) and holds `n` initialized (zero)
        // bytes: exactly what `Vec<u8>` with capacity `n` owns.
        Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
    }

    fn err(&self, msg: String) -> Error {
        Error::Comm {
            rank: self.rank,
            msg,
        }
    }

    /// Exchanges `fields` (name, value) with every rank and checks that all
    /// ranks agree, in order. On a difference every rank fails with the
    /// same message naming the first field (in rank 0's order) that
    /// differs, its value on rank 0, and the first rank that has another.
    pub fn handshake(&self, fields: &[(&str, String)]) -> Result<()> {
        let mut msg = Vec::new();
        put_u64(&mut msg, HANDSHAKE_VERSION);
        put_u64(&mut msg, fields.len() as u64 + 1);
        put_str(&mut msg, "world_size");
        put_str(&mut msg, &self.world.to_string());
        for (k, v) in fields {
            put_str(&mut msg, k);
            put_str(&mut msg, v);
        }
        let recv = self.all_to_all_v(vec![msg; self.world])?;
        let mut all = Vec::with_capacity(self.world);
        for (src, buf) in recv.iter().enumerate() {
            all.push(parse_handshake(buf).map_err(|e| {
                self.err(format!(
                    "handshake: malformed configuration from rank {src} ({e}; another deepport version?)"
                ))
            })?);
        }
        match first_difference(&all) {
            None => Ok(()),
            Some(d) => Err(self.err(format!("the ranks disagree on their configuration: {d}"))),
        }
    }

    /// One round of point-to-point traffic: posts a receive for every
    /// `(peer, buffer)` of `recvs`, a send for every one of `sends`
    /// (empty buffers are skipped) and one of a derived datatype for every
    /// one of `typed`, then polls them until all completed or
    /// the deadline passed. On failure the group is broken, and requests may
    /// still be pending: the caller must leak every buffer it passed.
    ///
    /// Polling: `MPI_Test` drives MPI's progress (a large message moves only
    /// while its ends poll), so the loop spins, yielding the core between
    /// tests (a rank waiting on an oversubscribed core hands it to the peer
    /// it waits for), and sleeps between tests only after a second without
    /// completion (a peer still busy elsewhere, e.g. loading a checkpoint).
    #[allow(clippy::too_many_arguments)]
    fn round(
        &self,
        inner: &mut Inner,
        sends: &[(usize, &[u8])],
        typed: &[TypedSend],
        recvs: &mut [(usize, &mut [u8])],
        tag: c_int,
        what: &str,
        deadline: Instant,
    ) -> Result<()> {
        let comm = inner.comm;
        let (mut reqs, mut peers) = (Vec::new(), Vec::new());
        let mut code = 0;
        for (p, buf) in recvs.iter_mut() {
            if code == 0 && !buf.is_empty() {
                code = irecv_pieces(comm, buf, *p, tag, &mut reqs, &mut peers);
            }
        }
        for (p, buf) in sends {
            if code == 0 && !buf.is_empty() {
                code = isend_pieces(comm, buf, *p, tag, &mut reqs, &mut peers);
            }
        }
        for t in typed {
            if code == 0 {
                // SAFETY: a library constant.
                let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
                // SAFETY: `t.base` with `t.dtype` (committed) addresses
                // only bytes of a buffer the caller keeps alive until the
                // request completes (or leaks on failure): the datatype's
                // blocks were checked against that buffer's length when it
                // was built; `comm` is live.
                code = unsafe {
                    ffi::MPI_Isend(t.base, 1, t.dtype, t.peer as c_int, tag, comm, &mut req)
                };
                if code == 0 {
                    reqs.push(req);
                    peers.push(t.peer);
                }
            }
        }
        if code != 0 {
            let e = format!("MPI error {code} posting messages while {what}");
            inner.broken = Some(e.clone());
            return Err(self.err(e));
        }
        let start = Instant::now();
        let mut last = start;
        loop {
            let mut pending = false;
            for r in reqs.iter_mut() {
                // SAFETY: RSMPI_REQUEST_NULL is a library constant; comparing
                // handles reads no memory.
                if *r == unsafe { ffi::RSMPI_REQUEST_NULL } {
                    continue;
                }
                let mut flag: c_int = 0;
                // SAFETY: `r` is a request started above on buffers the
                // caller keeps alive until it completes (or leaks on
                // failure); MPI_Test sets it to MPI_REQUEST_NULL when
                // complete.
                let code = unsafe { ffi::MPI_Test(r, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
                if code != 0 {
                    let e = format!("MPI error {code} while {what}");
                    inner.broken = Some(e.clone());
                    return Err(self.err(e));
                }
                if flag == 0 {
                    pending = true;
                } else {
                    last = Instant::now();
                }
            }
            if !pending {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let mut silent: Vec<usize> = reqs
                    .iter()
                    .zip(&peers)
                    // SAFETY: as above, a handle comparison.
                    .filter(|(r, _)| **r != unsafe { ffi::RSMPI_REQUEST_NULL })
                    .map(|(_, &p)| p)
                    .collect();
                silent.sort_unstable();
                silent.dedup();
                let names: Vec<String> = silent.iter().map(|r| r.to_string()).collect();
                let e = format!(
                    "no answer from rank(s) {} within {:.1} s while {what} (collective #{}): \
                     the rank died or stopped answering; the group is broken \
                     (${TIMEOUT_ENV} sets the deadline in seconds)",
                    names.join(", "),
                    inner.timeout.as_secs_f64(),
                    inner.seq
                );
                inner.broken = Some(e.clone());
                return Err(self.err(e));
            }
            if now.duration_since(last) < Duration::from_secs(1) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// One flat round of a collective: sends `sends` (byte ranges) and, for
    /// each `(peer, rows)` of `typed`, rows `rows` of `bytes` (rows of
    /// `row` bytes, gathered by MPI through a derived datatype), and
    /// returns the bytes from every rank in rank order, `recv_counts[r]`
    /// from rank `r`, in a pooled buffer when one is large enough; `own`
    /// fills this rank's part. On failure the group is broken and the
    /// result buffer leaked (requests may still write it); the caller must
    /// leak what `sends` and `bytes` borrow from.
    #[allow(clippy::too_many_arguments)]
    fn flat_round(
        &self,
        sends: &[(usize, &[u8])],
        typed: &[(usize, &[i64])],
        bytes: &[u8],
        row: usize,
        recv_counts: &[usize],
        own: impl FnOnce(&mut [u8]),
    ) -> Result<Vec<u8>> {
        let (world, me) = (self.world, self.rank);
        let total = recv_counts
            .iter()
            .try_fold(0usize, |a, &n| a.checked_add(n))
            .filter(|_| recv_counts.len() == world)
            .ok_or_else(|| {
                self.err(format!(
                    "{} receive counts for {world} ranks (or their sum overflows)",
                    recv_counts.len()
                ))
            })?;
        let (mut guard, deadline, base) = self.begin()?;
        let inner = &mut *guard;
        let mut recv = match self.pool.take(total) {
            Some(b) => b,
            None => self.zeroed(total as u64, "the received payload")?,
        };
        // Datatypes are built and freed under the group lock (MPI calls
        // are serialized); freeing one that pending sends use is allowed.
        let mut types = Vec::with_capacity(typed.len());
        for &(peer, rows) in typed {
            match TypedSend::rows(peer, bytes, row, rows) {
                Ok(t) => types.push(t),
                Err(code) => return Err(mpi_err(me, "building a row datatype", code)),
            }
        }
        let mut recvs = Vec::with_capacity(world);
        let mut own = Some(own);
        let mut rest = &mut recv[..];
        for (p, &n) in recv_counts.iter().enumerate() {
            let (r, tail) = rest.split_at_mut(n);
            rest = tail;
            if p == me {
                if let Some(f) = own.take() {
                    f(r);
                }
            } else {
                recvs.push((p, r));
            }
        }
        let waited = self.round(
            inner,
            sends,
            &types,
            &mut recvs,
            base,
            "exchanging the payload",
            deadline,
        );
        drop(recvs);
        drop(types);
        if let Err(e) = waited {
            std::mem::forget(recv);
            return Err(e);
        }
        Ok(recv)
    }

    /// Starts a collective: the lock, the broken check, the deadline and
    /// this collective's pair of tags.
    fn begin(&self) -> Result<(std::sync::MutexGuard<'_, Inner>, Instant, c_int)> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| self.err("group lock poisoned".into()))?;
        if let Some(b) = &guard.broken {
            return Err(self.err(format!("the MPI group is broken: {b}")));
        }
        let deadline = Instant::now() + guard.timeout;
        guard.seq += 1;
        let base = (2 * (guard.seq % TAG_SPAN)) as c_int;
        Ok((guard, deadline, base))
    }
}

fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put_str(v: &mut Vec<u8>, s: &str) {
    put_u64(v, s.len() as u64);
    v.extend_from_slice(s.as_bytes());
}

/// Parses a handshake message (bounds-checked: a malformed one is an error).
fn parse_handshake(buf: &[u8]) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pos = 0usize;
    let u64_at = |pos: &mut usize| -> std::result::Result<u64, String> {
        let b = buf
            .get(*pos..*pos + 8)
            .ok_or_else(|| format!("truncated at byte {pos}"))?;
        *pos += 8;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    };
    let version = u64_at(&mut pos)?;
    if version != HANDSHAKE_VERSION {
        return Err(format!("handshake version {version}"));
    }
    let n = u64_at(&mut pos)?;
    if n > buf.len() as u64 {
        return Err("field count exceeds the message".into());
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let mut s = [String::new(), String::new()];
        for item in &mut s {
            let len = u64_at(&mut pos)?;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| pos.checked_add(l))
                .filter(|&e| e <= buf.len())
                .ok_or_else(|| format!("truncated string at byte {pos}"))?;
            *item = String::from_utf8_lossy(&buf[pos..end]).into_owned();
            pos = end;
        }
        let [k, v] = s;
        out.push((k, v));
    }
    if pos != buf.len() {
        return Err("trailing bytes".into());
    }
    Ok(out)
}

/// The first difference between rank 0's fields and any other rank's, as
/// a sentence, or `None` when all agree.
pub fn first_difference(all: &[Vec<(String, String)>]) -> Option<String> {
    let base = all.first()?;
    for (i, (k, v)) in base.iter().enumerate() {
        for (r, other) in all.iter().enumerate().skip(1) {
            match other.get(i) {
                Some((k2, v2)) if k2 == k && v2 == v => {}
                Some((k2, v2)) if k2 == k => {
                    return Some(format!("`{k}` is {v:?} on rank 0 but {v2:?} on rank {r}"))
                }
                Some((k2, _)) => {
                    return Some(format!(
                        "rank 0 sends `{k}` where rank {r} sends `{k2}` (different deepport versions or commands?)"
                    ))
                }
                None => {
                    return Some(format!(
                        "rank 0 sends `{k}` but rank {r} has no such field (different deepport versions or commands?)"
                    ))
                }
            }
        }
    }
    for (r, other) in all.iter().enumerate().skip(1) {
        if let Some((k, _)) = other.get(base.len()) {
            return Some(format!(
                "rank {r} sends `{k}` but rank 0 has no such field (different deepport versions or commands?)"
            ));
        }
    }
    None
}

/// A send of rows that MPI gathers itself, through a derived datatype
/// (`MPI_Type_create_hindexed`, one block per run of consecutive rows),
/// freed on drop.
struct TypedSend {
    peer: usize,
    base: *const c_void,
    dtype: ffi::MPI_Datatype,
}

impl TypedSend {
    /// Rows `order` of `bytes` (rows of `row` bytes) for `peer`. The
    /// caller checked that every row lies in `bytes` and that the rows
    /// total at most [`MAX_PIECE`] bytes (so every length fits an `int`).
    fn rows(
        peer: usize,
        bytes: &[u8],
        row: usize,
        order: &[i64],
    ) -> std::result::Result<Self, c_int> {
        let mut lens: Vec<c_int> = Vec::new();
        let mut displs: Vec<ffi::MPI_Aint> = Vec::new();
        let mut prev: Option<i64> = None;
        for &j in order {
            match (prev, lens.last_mut()) {
                (Some(p), Some(l)) if j == p + 1 => *l += row as c_int,
                _ => {
                    lens.push(row as c_int);
                    displs.push(j as usize as ffi::MPI_Aint * row as ffi::MPI_Aint);
                }
            }
            prev = Some(j);
        }
        // SAFETY: a library constant.
        let mut dtype = unsafe { ffi::RSMPI_DATATYPE_NULL };
        // SAFETY: `lens` and `displs` hold `lens.len()` entries each, live
        // for the call; the out pointer is a live local.
        let code = unsafe {
            ffi::MPI_Type_create_hindexed(
                lens.len() as c_int,
                lens.as_ptr(),
                displs.as_ptr(),
                ffi::RSMPI_UINT8_T,
                &mut dtype,
            )
        };
        if code != 0 {
            return Err(code);
        }
        let mut t = TypedSend {
            peer,
            base: bytes.as_ptr() as *const c_void,
            dtype,
        };
        // SAFETY: `t.dtype` was just created.
        let code = unsafe { ffi::MPI_Type_commit(&mut t.dtype) };
        if code != 0 {
            return Err(code);
        }
        Ok(t)
    }
}

impl Drop for TypedSend {
    fn drop(&mut self) {
        // SAFETY: a datatype created in `TypedSend::rows` and freed once;
        // MPI lets pending communication that uses it complete normally.
        unsafe {
            ffi::MPI_Type_free(&mut self.dtype);
        }
    }
}

/// Starts `MPI_Isend`s of `buf` to `peer` in pieces of at most
/// [`MAX_PIECE`] bytes.
fn isend_pieces(
    comm: ffi::MPI_Comm,
    buf: &[u8],
    peer: usize,
    tag: c_int,
    reqs: &mut Vec<ffi::MPI_Request>,
    peers: &mut Vec<usize>,
) -> c_int {
    for piece in buf.chunks(MAX_PIECE) {
        // SAFETY: RSMPI_REQUEST_NULL is a library constant.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `piece` is at most MAX_PIECE (< i32::MAX) bytes of a
        // buffer the caller keeps alive, unmoved, until the request
        // completes (or leaks it on failure); `comm` is live.
        let code = unsafe {
            ffi::MPI_Isend(
                piece.as_ptr() as *const c_void,
                piece.len() as c_int,
                ffi::RSMPI_UINT8_T,
                peer as c_int,
                tag,
                comm,
                &mut req,
            )
        };
        if code != 0 {
            return code;
        }
        reqs.push(req);
        peers.push(peer);
    }
    0
}

/// Starts `MPI_Irecv`s into `buf` from `peer`, in the pieces
/// [`isend_pieces`] sends.
fn irecv_pieces(
    comm: ffi::MPI_Comm,
    buf: &mut [u8],
    peer: usize,
    tag: c_int,
    reqs: &mut Vec<ffi::MPI_Request>,
    peers: &mut Vec<usize>,
) -> c_int {
    for piece in buf.chunks_mut(MAX_PIECE) {
        // SAFETY: a library constant.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: as in `isend_pieces`; MPI writes at most `piece.len()`
        // bytes into `piece`.
        let code = unsafe {
            ffi::MPI_Irecv(
                piece.as_mut_ptr() as *mut c_void,
                piece.len() as c_int,
                ffi::RSMPI_UINT8_T,
                peer as c_int,
                tag,
                comm,
                &mut req,
            )
        };
        if code != 0 {
            return code;
        }
        reqs.push(req);
        peers.push(peer);
    }
    0
}

impl Transport for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_to_all_v(&self, mut send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let (world, me) = (self.world, self.rank);
        if send.len() != world {
            return Err(self.err(format!(
                "all_to_all_v needs {world} send buffers, got {}",
                send.len()
            )));
        }
        let (mut guard, deadline, base) = self.begin()?;
        let inner = &mut *guard;
        let mut recv: Vec<Vec<u8>> = vec![Vec::new(); world];
        recv[me] = std::mem::take(&mut send[me]);

        // Round 1: lengths.
        let send_len: Vec<[u8; 8]> = send
            .iter()
            .map(|b| (b.len() as u64).to_le_bytes())
            .collect();
        let mut recv_len: Vec<[u8; 8]> = vec![[0u8; 8]; world];
        let sends: Vec<(usize, &[u8])> = (0..world)
            .filter(|&p| p != me)
            .map(|p| (p, &send_len[p][..]))
            .collect();
        let mut recvs: Vec<(usize, &mut [u8])> = recv_len
            .iter_mut()
            .enumerate()
            .filter(|(p, _)| *p != me)
            .map(|(p, b)| (p, &mut b[..]))
            .collect();
        let waited = self.round(
            inner,
            &sends,
            &[],
            &mut recvs,
            base,
            "exchanging message lengths",
            deadline,
        );
        drop((sends, recvs));
        if let Err(e) = waited {
            // Pending requests may still touch these buffers: they are
            // never freed (the broken group aborts the process on drop).
            std::mem::forget(send_len);
            std::mem::forget(recv_len);
            std::mem::forget(send);
            return Err(e);
        }

        // Round 2: the messages.
        for p in (0..world).filter(|&p| p != me) {
            let n = u64::from_le_bytes(recv_len[p]);
            recv[p] = self.zeroed(n, &format!("the message of rank {p}"))?;
        }
        let sends: Vec<(usize, &[u8])> = (0..world)
            .filter(|&p| p != me)
            .map(|p| (p, &send[p][..]))
            .collect();
        let mut recvs: Vec<(usize, &mut [u8])> = recv
            .iter_mut()
            .enumerate()
            .filter(|(p, _)| *p != me)
            .map(|(p, b)| (p, &mut b[..]))
            .collect();
        let waited = self.round(
            inner,
            &sends,
            &[],
            &mut recvs,
            base + 1,
            "exchanging messages",
            deadline,
        );
        drop((sends, recvs));
        if let Err(e) = waited {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(e);
        }
        Ok(recv)
    }

    /// One round: the counts are known on both sides, so nothing but the
    /// payload moves, straight from `send` and into the result (a pooled
    /// buffer when one is large enough); `send` joins the pool afterwards.
    fn all_to_all_v_flat(
        &self,
        send: Vec<u8>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<u8>> {
        let (world, me) = (self.world, self.rank);
        check_flat(me, world, send.len(), send_counts, recv_counts)?;
        let mut sends = Vec::with_capacity(world);
        let mut own: &[u8] = &[];
        let mut rest = &send[..];
        for (p, &n) in send_counts.iter().enumerate() {
            let (s, tail) = rest.split_at(n);
            rest = tail;
            if p == me {
                own = s;
            } else {
                sends.push((p, s));
            }
        }
        let got = self.flat_round(&sends, &[], &[], 0, recv_counts, |r| r.copy_from_slice(own));
        drop(sends);
        match got {
            Ok(recv) => {
                // The sent rows are no longer needed: a later receive can
                // go there.
                self.pool.put(send);
                Ok(recv)
            }
            Err(e) => {
                // Pending requests may still read it.
                std::mem::forget(send);
                Err(e)
            }
        }
    }

    /// Rows for a peer that are contiguous in `src` are sent straight from
    /// it; the others are packed into a pooled buffer first, or (with
    /// `$DEEPPORT_MPI_GATHER=datatype`) gathered by MPI itself through an
    /// `MPI_Type_create_hindexed` datatype per peer.
    fn all_to_all_v_rows(
        &self,
        src: &Tensor,
        order: &[i64],
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Vec<u8>> {
        let (world, me) = (self.world, self.rank);
        let (bytes, row) = host_rows(me, src)?;
        let (sc, rc) = (
            row_counts(me, send_rows, row)?,
            row_counts(me, recv_rows, row)?,
        );
        let nrows = bytes.len().checked_div(row).unwrap_or(0);
        let total = send_rows.iter().try_fold(0usize, |a, &n| a.checked_add(n));
        if send_rows.len() != world || total != Some(order.len()) {
            return Err(self.err(format!(
                "all_to_all_v_rows: {} send counts summing to {total:?} for {} rows in a group of {world}",
                send_rows.len(),
                order.len()
            )));
        }
        if sc.get(me) != rc.get(me) {
            return Err(self.err(format!(
                "all_to_all_v_rows: rank {me} sends itself {:?} rows but receives {:?}",
                send_rows.get(me),
                recv_rows.get(me)
            )));
        }
        if let Some(j) = order.iter().find(|&&j| j < -1 || j >= nrows as i64) {
            return Err(self.err(format!(
                "all_to_all_v_rows: row {j} of a tensor of {nrows} rows"
            )));
        }
        // Each peer's rows: where they start in `order`, and the byte
        // range of `bytes` when they are contiguous there.
        let mut parts = Vec::with_capacity(world);
        let mut at = 0;
        for &n in send_rows {
            let o = &order[at..at + n];
            at += n;
            let contiguous = match o.first() {
                None => Some(0..0),
                Some(&f) if f >= 0 && o.iter().enumerate().all(|(i, &j)| j == f + i as i64) => {
                    Some(f as usize * row..(f as usize + n) * row)
                }
                Some(_) => None,
            };
            parts.push((o, contiguous));
        }
        let in_place = parts.iter().all(|(_, c)| c.is_some());
        let typed_ok =
            gather_with_datatypes() && !order.contains(&-1) && sc.iter().all(|&n| n <= MAX_PIECE);
        if !in_place && !typed_ok {
            // Pack into a pooled buffer, then one flat exchange.
            let mut send = self.pool.take(order.len() * row).unwrap_or_default();
            send.clear();
            deepport_core::comm::pack_rows(me, bytes, row, order, &mut send)?;
            return self.all_to_all_v_flat(send, &sc, &rc);
        }
        // In place: the rows stay readable until the requests complete,
        // because a view holds the storage (leaked below on failure, so a
        // pending request never reads freed memory).
        let keep = src.view(0, src.shape())?;
        let mut sends = Vec::new();
        let mut typed = Vec::new();
        for (p, (o, range)) in parts.iter().enumerate() {
            if p == me || o.is_empty() {
                continue;
            }
            match range {
                Some(r) => sends.push((p, &bytes[r.clone()])),
                None => typed.push((p, *o)),
            }
        }
        let own = parts[me].0;
        let got = self.flat_round(&sends, &typed, bytes, row, &rc, |r| {
            for (dst, &j) in r.chunks_exact_mut(row.max(1)).zip(own) {
                if j >= 0 {
                    let j = j as usize;
                    dst.copy_from_slice(&bytes[j * row..(j + 1) * row]);
                } else {
                    dst.fill(0);
                }
            }
        });
        match got {
            Ok(recv) => Ok(recv),
            Err(e) => {
                if self.broken().is_some() {
                    std::mem::forget(keep);
                }
                Err(e)
            }
        }
    }

    fn recycle(&self, buf: Vec<u8>) {
        self.pool.put(buf);
    }

    fn recycler(&self) -> Option<Recycler> {
        let pool = self.pool.clone();
        Some(Arc::new(move |buf| pool.put(buf)))
    }

    fn barrier(&self) -> Result<()> {
        self.all_to_all_v(vec![Vec::new(); self.world]).map(|_| ())
    }
}

impl Drop for MpiComm {
    /// A healthy group frees its communicator and finalizes MPI; a broken
    /// one aborts the job (see the module docs).
    fn drop(&mut self) {
        let inner = match self.inner.get_mut() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        if let Some(reason) = &inner.broken {
            eprintln!(
                "deepport-mpi: rank {}: aborting the MPI job: {reason}",
                self.rank
            );
            // SAFETY: `comm` is live (freed only below, on the healthy path).
            unsafe {
                ffi::MPI_Abort(inner.comm, 1);
            }
            std::process::exit(1);
        }
        // SAFETY: `comm` was created by MPI_Comm_dup and every request on
        // it has completed (a pending one would have broken the group).
        unsafe {
            ffi::MPI_Comm_free(&mut inner.comm);
        }
        // Finalizes MPI.
        drop(inner.universe.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn first_difference_names_field_and_rank() {
        let a = f(&[("world_size", "4"), ("experts", "256"), ("hidden", "7168")]);
        let b = f(&[("world_size", "4"), ("experts", "256"), ("hidden", "4096")]);
        assert_eq!(first_difference(&[a.clone(), a.clone()]), None);
        let d = first_difference(&[a.clone(), a.clone(), b]).unwrap();
        assert!(
            d.contains("`hidden`") && d.contains("rank 2") && d.contains("7168"),
            "{d}"
        );
        let c = f(&[("world_size", "4"), ("experts", "256")]);
        let d = first_difference(&[a.clone(), c.clone()]).unwrap();
        assert!(d.contains("no such field"), "{d}");
        let d = first_difference(&[c, a]).unwrap();
        assert!(d.contains("rank 1 sends `hidden`"), "{d}");
    }

    #[test]
    fn handshake_messages_parse_and_reject_garbage() {
        let mut m = Vec::new();
        put_u64(&mut m, HANDSHAKE_VERSION);
        put_u64(&mut m, 1);
        put_str(&mut m, "dtype");
        put_str(&mut m, "bf16");
        assert_eq!(parse_handshake(&m).unwrap(), f(&[("dtype", "bf16")]));
        assert!(parse_handshake(&m[..m.len() - 1]).is_err());
        let mut long = m.clone();
        long.push(0);
        assert!(parse_handshake(&long).is_err());
        let mut huge = Vec::new();
        put_u64(&mut huge, HANDSHAKE_VERSION);
        put_u64(&mut huge, u64::MAX);
        assert!(parse_handshake(&huge).is_err());
        let mut bad_len = Vec::new();
        put_u64(&mut bad_len, HANDSHAKE_VERSION);
        put_u64(&mut bad_len, 1);
        put_u64(&mut bad_len, u64::MAX);
        assert!(parse_handshake(&bad_len).is_err());
        assert!(parse_handshake(&[]).is_err());
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout(" 2.5 ").unwrap(), Duration::from_millis(2500));
        for bad in ["0", "-1", "nan", "inf", "x", "", "1e9"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
