//! The [`Transport`] trait (how expert-parallel ranks move bytes) and an
//! in-process implementation (threads as ranks) for tests and
//! single-machine expert parallelism.
//!
//! A transport has two paths:
//!
//! * **host-staged** ([`Transport::all_to_all_v`]): byte messages in host
//!   memory. Threads and plain MPI use it; so does every rank for the small
//!   control messages of the protocol ([`crate::ep`]).
//! * **device** ([`Transport::device`]): rows of device tensors moved
//!   without a host copy, where the transport can reach the backend's
//!   memory (NCCL, RCCL, CUDA-aware MPI). Core's protocol uses it for the
//!   payload when [`DeviceExchange::accepts`] the backend, and stages the
//!   payload through the host otherwise — so ranks of different backends can
//!   share one group.

use crate::backend::{Backend, Recycler, Tensor};
use crate::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A group of ranks that exchange data. Expert-parallel ops are written on
/// top of it once, in core; MPI, NCCL and RCCL implement it in their own
/// crates.
///
/// Every collective must return within a bounded time on every rank when a
/// peer dies or falls silent (an error, never a hang).
pub trait Transport: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// All-to-all with variable counts: `send[r]` goes to rank `r`; the
    /// result's entry `r` is what rank `r` sent here. Collective: every rank
    /// calls it in the same order.
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
    /// All-to-all of one flat buffer whose counts both sides already know
    /// (from an earlier exchange): `send` holds the bytes for ranks 0, 1, …
    /// back to back, `send_counts[r]` of them for rank `r`; the result holds
    /// the bytes from every rank in rank order, `recv_counts[r]` from rank
    /// `r`. Collective; the counts must agree pairwise (rank `a`'s
    /// `send_counts[b]` is rank `b`'s `recv_counts[a]`), and a message of
    /// another size is an error.
    ///
    /// Core's protocol moves host-staged payloads with it. The default goes
    /// through [`Transport::all_to_all_v`] (copying each message out and
    /// back); a transport that can send from and receive into one buffer
    /// (MPI) overrides it and moves each byte once.
    fn all_to_all_v_flat(
        &self,
        send: Vec<u8>,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Vec<u8>> {
        let (me, world) = (self.rank(), self.world_size());
        check_flat(me, world, send.len(), send_counts, recv_counts)?;
        let mut msgs = Vec::with_capacity(world);
        let mut at = 0;
        for &n in send_counts {
            msgs.push(send[at..at + n].to_vec());
            at += n;
        }
        drop(send);
        let recv = self.all_to_all_v(msgs)?;
        if recv.len() != world {
            return Err(Error::Comm {
                rank: me,
                msg: format!(
                    "the transport returned {} messages for {world} ranks",
                    recv.len()
                ),
            });
        }
        let mut out = Vec::with_capacity(recv_counts.iter().sum());
        for (src, (m, &n)) in recv.iter().zip(recv_counts).enumerate() {
            if m.len() != n {
                return Err(Error::Comm {
                    rank: me,
                    msg: format!(
                        "rank {src} sent {} payload bytes where {n} were announced",
                        m.len()
                    ),
                });
            }
            out.extend_from_slice(m);
        }
        Ok(out)
    }
    /// Hands back a buffer that [`Transport::all_to_all_v_flat`] returned,
    /// once its bytes are no longer needed: a transport may receive the
    /// next exchange into it (memory already mapped: no fresh pages to
    /// fault in, the way a raw MPI program reuses its buffers). Default:
    /// dropped.
    fn recycle(&self, buf: Vec<u8>) {
        drop(buf);
    }
    /// A handle that hands a buffer back to this transport from anywhere
    /// (like [`Transport::recycle`], but usable after the call that made
    /// it returned: core gives it to [`Backend::adopt`], so a received
    /// payload adopted as a tensor comes back when the tensor is dropped).
    /// Default: `None`.
    fn recycler(&self) -> Option<Recycler> {
        None
    }
    /// [`Transport::all_to_all_v_flat`] whose send buffer is rows of a
    /// host-memory tensor ([`Tensor::host_bytes`]), read in place: the
    /// rows `order` of `src` (rows along its first dimension; −1 sends a
    /// zero row), `send_rows[r]` of them for rank `r`, back to back;
    /// received rows arrive in rank order, `recv_rows[r]` from rank `r`.
    /// Collective, with the same pairwise agreement of the counts.
    ///
    /// Core's protocol sends host-memory payloads with it (no download,
    /// no pack pass where the rows for a rank are contiguous). The default
    /// packs the rows into one buffer and calls `all_to_all_v_flat`; MPI
    /// sends straight from `src`.
    fn all_to_all_v_rows(
        &self,
        src: &Tensor,
        order: &[i64],
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Vec<u8>> {
        let me = self.rank();
        let (bytes, row) = host_rows(me, src)?;
        let mut send = Vec::new();
        pack_rows(me, bytes, row, order, &mut send)?;
        let (sc, rc) = (
            row_counts(me, send_rows, row)?,
            row_counts(me, recv_rows, row)?,
        );
        self.all_to_all_v_flat(send, &sc, &rc)
    }
    /// Waits until every rank arrives.
    fn barrier(&self) -> Result<()>;
    /// The device path, if this transport has one. Default: none (every
    /// payload is staged through the host).
    fn device(&self) -> Option<&dyn DeviceExchange> {
        None
    }
}

/// Checks the arguments of [`Transport::all_to_all_v_flat`] on rank `me`
/// of `world`: one count per rank, and `send_counts` covering `send_len`.
pub fn check_flat(
    me: usize,
    world: usize,
    send_len: usize,
    send_counts: &[usize],
    recv_counts: &[usize],
) -> Result<()> {
    let total = send_counts
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n));
    let recv_total = recv_counts
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n));
    if send_counts.len() != world
        || recv_counts.len() != world
        || total != Some(send_len)
        || recv_total.is_none()
        || send_counts.get(me) != recv_counts.get(me)
    {
        return Err(Error::Comm {
            rank: me,
            msg: format!(
                "all_to_all_v_flat: {} send and {} receive counts for {world} ranks, \
                 send counts summing to {total:?} for a buffer of {send_len} bytes \
                 (and to itself, rank {me} must receive what it sends)",
                send_counts.len(),
                recv_counts.len()
            ),
        });
    }
    Ok(())
}

/// The bytes of a host-memory tensor read in place and the byte size of
/// one of its rows (along the first dimension), for
/// [`Transport::all_to_all_v_rows`] on rank `me`.
pub fn host_rows(me: usize, src: &Tensor) -> Result<(&[u8], usize)> {
    let bytes = src.host_bytes().ok_or_else(|| Error::Comm {
        rank: me,
        msg: format!("all_to_all_v_rows: {src:?} is not in host memory"),
    })?;
    let row = src.shape().iter().skip(1).product::<usize>() * src.dtype().size();
    Ok((bytes, row))
}

/// Byte counts of `rows` rows of `row` bytes each (an overflow is an
/// error).
pub fn row_counts(me: usize, rows: &[usize], row: usize) -> Result<Vec<usize>> {
    rows.iter()
        .map(|&r| {
            r.checked_mul(row).ok_or_else(|| Error::Comm {
                rank: me,
                msg: format!("{r} rows of {row} bytes overflow"),
            })
        })
        .collect()
}

/// Appends rows `order` of `bytes` (rows of `row` bytes; −1: a zero row)
/// to `out` (reserved fallibly first; an index outside `bytes` is an
/// error).
pub fn pack_rows(
    me: usize,
    bytes: &[u8],
    row: usize,
    order: &[i64],
    out: &mut Vec<u8>,
) -> Result<()> {
    let err = |msg: String| Error::Comm { rank: me, msg };
    let n = order
        .len()
        .checked_mul(row)
        .ok_or_else(|| err(format!("{} rows of {row} bytes overflow", order.len())))?;
    out.try_reserve_exact(n)
        .map_err(|_| err(format!("cannot allocate {n} bytes for the packed rows")))?;
    let rows = bytes.len().checked_div(row).unwrap_or(0);
    for &j in order {
        if j < 0 {
            out.resize(out.len() + row, 0);
            continue;
        }
        let at = usize::try_from(j)
            .ok()
            .and_then(|j| j.checked_mul(row))
            .and_then(|a| bytes.get(a..a.checked_add(row)?))
            .ok_or_else(|| err(format!("row {j} of a tensor of {rows} rows")))?;
        out.extend_from_slice(at);
    }
    Ok(())
}

/// The older name of [`Transport`].
pub use self::Transport as Communicator;

/// A transport's device-memory path (see the module docs).
pub trait DeviceExchange: Send + Sync {
    /// Whether this path can move `backend`'s memory (for every rank of the
    /// group: the answer must agree across ranks, since both sides of an
    /// exchange take the same path).
    fn accepts(&self, backend: &dyn Backend) -> bool;
    /// Collective: sends rows `[o_r, o_r + send_rows[r])` of `send` (rows
    /// along its first dimension, `o_r` the sum of the counts before `r`)
    /// to rank `r`, and returns the rows received from every rank,
    /// concatenated in rank order, as a new tensor of `backend` with
    /// `Σ recv_rows` rows. The counts come from the control exchange that
    /// precedes it, so both sides know them.
    fn exchange_rows(
        &self,
        backend: &dyn Backend,
        send: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor>;
}

struct State {
    /// mailbox[dst][src]
    mailbox: Vec<Vec<Option<Vec<u8>>>>,
    arrived: usize,
    generation: u64,
    /// Set when a rank leaves (drops its handle) while others may wait.
    broken: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
    timeout: Duration,
}

/// One rank of an in-process group. Create a group with
/// [`ThreadComm::group`] and move each handle into its own thread.
///
/// Collectives time out (default 60 s) instead of hanging, and a rank that
/// drops its handle breaks the group so the others fail fast.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// A group of `world` ranks with the default 60 s timeout.
    pub fn group(world: usize) -> Vec<ThreadComm> {
        Self::group_with_timeout(world, Duration::from_secs(60))
    }

    /// A group whose collectives fail after `timeout`.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                mailbox: vec![vec![None; world]; world],
                arrived: 0,
                generation: 0,
                broken: None,
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Comm {
            rank: self.rank,
            msg: msg.into(),
        }
    }

    /// Barrier on the shared state; `deposit` runs under the lock on arrival.
    fn rendezvous(&self, deposit: impl FnOnce(&mut State)) -> Result<()> {
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| self.err("group lock poisoned"))?;
        if let Some(r) = st.broken {
            return Err(self.err(format!("rank {r} left the group")));
        }
        deposit(&mut st);
        let gen = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(());
        }
        let deadline = std::time::Instant::now() + self.shared.timeout;
        while st.generation == gen {
            if let Some(r) = st.broken {
                return Err(self.err(format!("rank {r} left the group")));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                st.broken = Some(self.rank);
                self.shared.cv.notify_all();
                return Err(self.err(format!(
                    "collective timed out after {:?}",
                    self.shared.timeout
                )));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map_err(|_| self.err("group lock poisoned"))?
                .0;
        }
        Ok(())
    }
}

impl Drop for ThreadComm {
    /// A rank that leaves breaks the group: a rank still waiting in (or
    /// later entering) a collective that the departed rank will never join
    /// fails at once instead of waiting for the timeout. A collective the
    /// departed rank completed is unaffected (its generation already moved).
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            if st.broken.is_none() {
                st.broken = Some(self.rank);
            }
            self.shared.cv.notify_all();
        }
    }
}

impl Transport for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let world = self.shared.world;
        if send.len() != world {
            return Err(self.err(format!(
                "all_to_all_v needs {world} send buffers, got {}",
                send.len()
            )));
        }
        let me = self.rank;
        self.rendezvous(|st| {
            for (dst, buf) in send.into_iter().enumerate() {
                st.mailbox[dst][me] = Some(buf);
            }
        })?;
        let recv: Vec<Vec<u8>> = {
            let mut st = self
                .shared
                .state
                .lock()
                .map_err(|_| self.err("group lock poisoned"))?;
            st.mailbox[me]
                .iter_mut()
                .map(|m| m.take().unwrap_or_default())
                .collect()
        };
        // Second rendezvous: nobody refills a mailbox before its owner emptied it.
        self.rendezvous(|_| {})?;
        Ok(recv)
    }
    fn barrier(&self) -> Result<()> {
        self.rendezvous(|_| {})
    }
}

/// Runs `f(rank, comm)` on `world` threads and collects the results in rank
/// order: rank 0 on the calling thread (which would otherwise only wait —
/// when it is one of a thread pool's workers, as the `deepport` binary's
/// main thread is, the pool keeps it working), the others on new threads.
/// A panic in any rank becomes an error instead of a hang.
pub fn run_ranks<T: Send>(
    world: usize,
    f: impl Fn(usize, &ThreadComm) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let mut comms = ThreadComm::group(world).into_iter();
    let Some(first) = comms.next() else {
        return Ok(Vec::new());
    };
    let panicked = |rank: usize| Error::Comm {
        rank,
        msg: "rank panicked".into(),
    };
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms
            .enumerate()
            .map(|(i, c)| s.spawn(move || f(i + 1, &c)))
            .collect();
        // `first` is dropped when rank 0 ends, by return or by panic: the
        // others then fail their next collective instead of waiting.
        let r0 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let c = first;
            f(0, &c)
        }))
        .unwrap_or_else(|_| Err(panicked(0)));
        // Every rank is joined before the first error is returned (a
        // panicked thread left unjoined would make the scope panic).
        let rest: Vec<Result<T>> = handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or_else(|_| Err(panicked(i + 1))))
            .collect();
        std::iter::once(r0).chain(rest).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results come back in rank order; rank 0 runs on the caller's thread.
    #[test]
    fn run_ranks_orders_results_and_runs_rank_0_on_the_caller() {
        let caller = std::thread::current().id();
        let got = run_ranks(3, |r, c| {
            c.barrier()?;
            Ok((r, c.rank(), std::thread::current().id() == caller))
        })
        .unwrap();
        assert_eq!(got, vec![(0, 0, true), (1, 1, false), (2, 2, false)]);
        assert!(run_ranks(0, |_, _| Ok(())).unwrap().is_empty());
    }

    /// A rank that panics — on the caller's thread or another — is an
    /// error, and the ranks waiting for it in a collective fail at once
    /// instead of waiting out the timeout.
    #[test]
    fn a_panicking_rank_is_an_error_and_frees_the_others() {
        for bad in [0usize, 2] {
            let t0 = std::time::Instant::now();
            let res = run_ranks(3, |r, c| {
                if r == bad {
                    panic!("rank {r} fails (deliberate)");
                }
                c.barrier()
            });
            assert!(res.is_err(), "rank {bad} panicked, yet Ok");
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "the other ranks waited for the timeout"
            );
        }
    }
}
