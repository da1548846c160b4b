//! Recording and batching.
//!
//! # How an op runs
//!
//! A kernel module calls `Ctx::begin` with its op name and gets a `Rec`:
//! it holds the submission state, a fresh command encoder and three wgpu
//! error scopes (validation, out-of-memory, internal). `Rec::dispatch`
//! takes a `Shader` (WGSL body plus generated bindings), a `Params`
//! uniform block, the buffers and a linear workgroup count; the pipeline is
//! compiled once per (shader, generated header) and cached. `Rec::finish`
//! finishes the encoder and pops the scopes, so a validation error names the
//! op; the command buffer then waits in a batch. Batches are submitted
//! without waiting when they grow large, and on `download`/`synchronize`
//! (which then wait): no op blocks the host.

use super::checks::{Check, STATUS_SLOT};
use super::device::{pop_scopes, push_scopes};
use super::memory::padded;
use super::shader::{Access, Params, Shader};
use super::window::{Bufs, Win};
use super::{dev_err, lock, Ctx, State, BACKEND};
use deepport_core::{Error, Result};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

/// Bytes of one uniform parameter slot (and the largest `Params`).
pub(super) const PARAM_SLOT: u64 = 256;
/// Parameter slots in the uniform arena.
pub(super) const PARAM_SLOTS: u64 = 1024;
/// Command buffers batched before a (non-blocking) submit.
const MAX_PENDING: usize = 64;

/// Runs a future to completion on this thread (wgpu's native futures are
/// ready at once or after a device poll).
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

impl Ctx {
    /// Starts recording the op `op`.
    pub(crate) fn begin(&self, op: &'static str) -> Result<Rec<'_>> {
        self.check_alive(op)?;
        let st = self.state(op)?;
        *lock(&self.recorder) = Some(std::thread::current().id());
        let scopes = push_scopes(&self.device);
        let enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(op) });
        Ok(Rec {
            ctx: self,
            op,
            st,
            enc: Some(enc),
            scopes,
            slot: None,
            entries: 0,
            checks: Vec::new(),
        })
    }

    /// Submits the pending batch without waiting.
    pub(super) fn flush(&self, st: &mut State) -> Result<Option<wgpu::SubmissionIndex>> {
        let ops = std::mem::take(&mut st.pending_ops);
        let cmds = std::mem::take(&mut st.pending);
        let mut scopes = push_scopes(&self.device);
        let idx = self.queue.submit(cmds);
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!(
                "submitting {} op(s) ({}): {e}",
                ops.len(),
                summarize(&ops)
            )));
        }
        Ok(Some(idx))
    }

    /// Flushes, optionally reads a buffer and the status slots, waits, and
    /// evaluates the deferred checks.
    pub(super) fn sync_locked(
        &self,
        st: &mut State,
        what: &str,
        read: Option<(&wgpu::Buffer, u64)>,
    ) -> Result<Option<Vec<u8>>> {
        let mut scopes = push_scopes(&self.device);
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(what) });
        let mut readback = None;
        if let Some((buf, bytes)) = read {
            let size = padded(bytes);
            let rb = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("deepport readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(buf, 0, &rb, 0, size);
            readback = Some((rb, bytes));
        }
        let mut status_rb = None;
        let checks = std::mem::take(&mut st.checks);
        let used = st.next_status as u64 * STATUS_SLOT;
        if !checks.is_empty() && used > 0 {
            let rb = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("deepport status readback"),
                size: used,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(&self.status, 0, &rb, 0, used);
            status_rb = Some(rb);
        }
        if used > 0 {
            enc.clear_buffer(&self.status, 0, Some(used));
        }
        st.next_status = 0;
        st.pending.push(enc.finish());
        st.pending_ops.push("readback");
        if let Some(e) = pop_scopes(&mut scopes) {
            st.pending.clear();
            st.pending_ops.clear();
            return Err(dev_err(format!("{what}: {e}")));
        }
        let idx = self.flush(st)?;
        // Map what is read back, then wait for the submission.
        let mut scopes = push_scopes(&self.device);
        let results: Arc<Mutex<Vec<std::result::Result<(), String>>>> = Default::default();
        let mut mapped = Vec::new();
        for b in readback
            .as_ref()
            .map(|(b, _)| b)
            .into_iter()
            .chain(status_rb.as_ref())
        {
            let r = results.clone();
            b.slice(..).map_async(wgpu::MapMode::Read, move |res| {
                lock(&r).push(res.map_err(|e| e.to_string()));
            });
            mapped.push(b);
        }
        let poll = self.device.poll(wgpu::PollType::Wait {
            submission_index: idx,
            timeout: None,
        });
        if let Err(e) = poll {
            let _ = pop_scopes(&mut scopes);
            self.check_alive(what)?;
            return Err(dev_err(format!("{what}: waiting for the device: {e}")));
        }
        if let Some(e) = pop_scopes(&mut scopes) {
            return Err(dev_err(format!("{what}: {e}")));
        }
        self.check_alive(what)?;
        {
            let res = lock(&results);
            if res.len() != mapped.len() {
                return Err(dev_err(format!(
                    "{what}: {} of {} readback buffers were mapped after the wait",
                    res.len(),
                    mapped.len()
                )));
            }
            if let Some(Err(e)) = res.iter().find(|r| r.is_err()) {
                return Err(dev_err(format!("{what}: mapping a readback buffer: {e}")));
            }
        }
        let read_mapped = |b: &wgpu::Buffer, n: usize| -> Result<Vec<u8>> {
            let view = b
                .slice(..)
                .get_mapped_range()
                .map_err(|e| dev_err(format!("{what}: reading back: {e}")))?;
            let v = view[..n].to_vec();
            drop(view);
            b.unmap();
            Ok(v)
        };
        let data = match &readback {
            Some((rb, bytes)) => Some(read_mapped(rb, *bytes as usize)?),
            None => None,
        };
        let status_words: Vec<u32> = match &status_rb {
            Some(rb) => read_mapped(rb, used as usize)?
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            None => Vec::new(),
        };
        let errs = std::mem::take(&mut *lock(&self.uncaptured));
        if !errs.is_empty() {
            return Err(dev_err(format!(
                "{what}: uncaptured device error(s): {}",
                errs.join("; ")
            )));
        }
        for c in &checks {
            if let Some(e) = c.error(&status_words) {
                return Err(e);
            }
        }
        Ok(data)
    }

    /// Splits a linear workgroup count over x, y, z.
    fn split(&self, op: &str, groups: u32) -> Result<(u32, u32, u32)> {
        split_groups(groups, self.max_groups).ok_or_else(|| {
            Error::not_supported(
                BACKEND,
                op.to_string(),
                format!("{groups} workgroups exceed {}³", self.max_groups),
            )
        })
    }
}

/// (x, y, z) with every dimension ≤ `m` and x·y·z ≥ `groups` (the excess is
/// under x·y, and kernels skip it); `None` beyond m³.
fn split_groups(groups: u32, m: u32) -> Option<(u32, u32, u32)> {
    let m = m.max(1);
    if groups <= m {
        return Some((groups, 1, 1));
    }
    let rest = groups.div_ceil(m);
    let y = rest.min(m);
    let z = rest.div_ceil(y);
    if z > m {
        return None;
    }
    let x = groups.div_ceil(y * z);
    Some((x, y, z))
}

fn summarize(ops: &[&str]) -> String {
    let mut v: Vec<&str> = Vec::new();
    for o in ops {
        if !v.contains(o) {
            v.push(o);
        }
    }
    v.join(", ")
}

/// Recording of one op: see the module documentation.
pub(crate) struct Rec<'a> {
    pub(super) ctx: &'a Ctx,
    pub(super) op: &'static str,
    pub(super) st: MutexGuard<'a, State>,
    enc: Option<wgpu::CommandEncoder>,
    scopes: Vec<wgpu::ErrorScopeGuard>,
    pub(super) slot: Option<u32>,
    pub(super) entries: u32,
    pub(super) checks: Vec<Check>,
}

impl Drop for Rec<'_> {
    fn drop(&mut self) {
        *lock(&self.ctx.recorder) = None;
        // Pop the scopes innermost first (an early return discards the op).
        while let Some(s) = self.scopes.pop() {
            drop(s.pop());
        }
    }
}

impl<'a> Rec<'a> {
    pub(crate) fn ctx(&self) -> &'a Ctx {
        self.ctx
    }

    /// A small constant table (e.g. RoPE frequencies), uploaded once and
    /// cached by content.
    pub(crate) fn table(&mut self, data: &[u8]) -> Result<wgpu::Buffer> {
        if let Some(b) = self.st.tables.get(data) {
            return Ok(b.clone());
        }
        let b = self.ctx.upload_bytes(self.op, data)?;
        if self.st.tables.len() > 256 {
            self.st.tables.clear();
        }
        self.st.tables.insert(data.to_vec(), b.clone());
        Ok(b)
    }

    /// A scratch storage buffer that lives as long as the op's commands.
    pub(crate) fn scratch(&self, bytes: u64) -> Result<wgpu::Buffer> {
        self.ctx.create_buffer(self.op, bytes)
    }

    /// Records one dispatch of `shader` over `groups` workgroups (a linear
    /// count; split over y and z when it exceeds the per-dimension limit).
    pub(crate) fn dispatch(
        &mut self,
        shader: &Shader,
        params: Params,
        bufs: &Bufs<'_>,
        groups: u32,
    ) -> Result<()> {
        let wins: Vec<Win<'_>> = bufs.iter().map(|b| Win::whole(b)).collect();
        self.dispatch_win(shader, params, &wins, groups)
    }

    /// [`Rec::dispatch`] with buffer windows (see [`Win`], [`Ctx::plan_rows`]).
    pub(crate) fn dispatch_win(
        &mut self,
        shader: &Shader,
        params: Params,
        bufs: &[Win<'_>],
        groups: u32,
    ) -> Result<()> {
        let op = self.op;
        if groups == 0 {
            return Ok(());
        }
        let non_status = shader
            .binds
            .iter()
            .filter(|b| b.access != Access::Status)
            .count();
        if bufs.len() != non_status {
            return Err(dev_err(format!(
                "{op}: shader `{}` binds {non_status} buffers, {} given",
                shader.name,
                bufs.len()
            )));
        }
        if params.0.len() as u64 > PARAM_SLOT {
            return Err(dev_err(format!(
                "{op}: parameters of `{}` exceed {PARAM_SLOT} bytes",
                shader.name
            )));
        }
        let bindings = bufs
            .iter()
            .map(|w| self.ctx.binding(op, w))
            .collect::<Result<Vec<_>>>()?;
        let storage_count = shader.binds.len() as u32;
        if storage_count > self.ctx.limits.max_storage_buffers_per_shader_stage {
            return Err(Error::not_supported(
                BACKEND,
                op,
                format!(
                    "shader `{}` binds {storage_count} storage buffers; the adapter allows {}",
                    shader.name, self.ctx.limits.max_storage_buffers_per_shader_stage
                ),
            ));
        }
        let (x, y, z) = self.ctx.split(op, groups)?;
        let status_slot = if shader.has_status() {
            Some(self.slot()?)
        } else {
            None
        };
        let pipe = self.ctx.pipeline(&mut self.st, op, shader)?;
        // Parameters go to the next arena slot (queue writes land before the
        // batch that reads them; a full arena is submitted first).
        if self.st.next_param >= PARAM_SLOTS {
            let ctx = self.ctx;
            // This op's own dispatches so far read the slots about to be
            // reused: submit them too, and go on in a new encoder.
            if let Some(enc) = self.enc.take() {
                self.st.pending.push(enc.finish());
                self.enc = Some(
                    ctx.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some(op),
                        }),
                );
            }
            ctx.flush(&mut self.st)?;
            self.st.next_param = 0;
        }
        let off = self.st.next_param * PARAM_SLOT;
        self.st.next_param += 1;
        let mut bytes = params.0;
        bytes.resize(PARAM_SLOT as usize, 0);
        self.ctx.queue.write_buffer(&self.ctx.params, off, &bytes);

        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.ctx.params,
                offset: off,
                size: std::num::NonZeroU64::new(PARAM_SLOT),
            }),
        }];
        let mut it = bindings.into_iter();
        for (i, b) in shader.binds.iter().enumerate() {
            let resource = if b.access == Access::Status {
                let s = status_slot.unwrap_or(0) as u64;
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &self.ctx.status,
                    offset: s * STATUS_SLOT,
                    size: std::num::NonZeroU64::new(STATUS_SLOT),
                })
            } else {
                match it.next() {
                    Some(b) => wgpu::BindingResource::Buffer(b),
                    None => return Err(dev_err(format!("{op}: missing buffer"))),
                }
            };
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource,
            });
        }
        let bg = self
            .ctx
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(shader.name),
                layout: &pipe.layout,
                entries: &entries,
            });
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| dev_err(format!("{op}: recording already finished")))?;
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(shader.name),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(x, y, z);
        Ok(())
    }

    /// Ends the op: reports validation and memory errors naming the op, then
    /// queues its commands (submitted without waiting when the batch is full).
    pub(crate) fn finish(mut self) -> Result<()> {
        let op = self.op;
        let cmd = self.enc.take().map(|e| e.finish());
        if let Some(e) = pop_scopes(&mut self.scopes) {
            return Err(dev_err(format!("{op}: {e}")));
        }
        if let Some(cmd) = cmd {
            self.st.pending.push(cmd);
            self.st.pending_ops.push(op);
        }
        let checks = std::mem::take(&mut self.checks);
        self.st.checks.extend(checks);
        if self.st.pending.len() >= MAX_PENDING {
            let ctx = self.ctx;
            ctx.flush(&mut self.st)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::WgpuOptions;
    use super::*;

    #[test]
    fn split_covers_every_group_within_the_limit() {
        for m in [1u32, 2, 3, 4, 7, 65535] {
            for g in (0..2000u32).chain([65535, 65536, 70_000, 1 << 24, u32::MAX]) {
                match split_groups(g, m) {
                    Some((x, y, z)) => {
                        assert!(x <= m && y <= m && z <= m, "{g} on {m}: {x} {y} {z}");
                        let total = x as u64 * y as u64 * z as u64;
                        assert!(total >= g as u64, "{g} on {m}: {x} {y} {z}");
                        // The excess is less than one x·y layer.
                        assert!(total - (g as u64) < (x as u64 * y as u64).max(1));
                    }
                    None => assert!(g as u64 > (m as u64).pow(3), "{g} on {m}"),
                }
            }
        }
    }

    #[test]
    fn a_recording_thread_cannot_synchronize() {
        let Ok(ctx) = Ctx::new(&WgpuOptions::default()) else {
            eprintln!("skipping: no adapter");
            return;
        };
        let rec = ctx.begin("test").unwrap();
        let e = ctx.synchronize().unwrap_err();
        assert!(e.to_string().contains("finish the Rec"), "{e}");
        assert!(ctx.begin("nested").is_err());
        rec.finish().unwrap();
        ctx.synchronize().unwrap();
    }
}
