//! The suite can fail: a backend that runs `cpu-ref` but breaks one op in
//! one way must fail the check of that op (wrong numbers, a swallowed index
//! error, a broken EP kernel), and an op it honestly does not support is
//! recorded as skipped, not failed and not silently passed.

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;
use deepport_testkit::harness::skipped;
use deepport_testkit::{ep, heavy, local, Harness};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Every output element of this op is wrong.
    Corrupt(OpKind),
    /// This op's index errors are dropped.
    Swallow(OpKind),
    /// This op is honestly not supported.
    Unsupported(OpKind),
    /// `supports` says yes, the op says `NotSupported`.
    Dishonest(OpKind),
    /// Every second run of this op is off by one ulp somewhere.
    Flaky(OpKind),
    /// `alloc` hands out stale bytes (as a pool or arena does) and
    /// `alloc_zeroed` returns them without the clear.
    SkipsClear,
}

struct Broken {
    inner: CpuRef,
    mode: Mode,
    runs: AtomicUsize,
}

impl Broken {
    fn run<A: OpArgs>(
        &self,
        op: &mut Checked<A>,
        reference: impl FnOnce(&mut Checked<A>) -> Result<()>,
    ) -> Result<()> {
        match self.mode {
            Mode::Unsupported(k) | Mode::Dishonest(k) if k == A::KIND => Err(self.unsupported(k)),
            Mode::Swallow(k) if k == A::KIND => match reference(op) {
                Err(Error::IndexOutOfRange { .. }) => Ok(()),
                other => other,
            },
            Mode::Flaky(k) if k == A::KIND => {
                reference(op)?;
                if self.runs.fetch_add(1, Ordering::Relaxed) % 2 == 1 {
                    for (_, out) in op.args_mut().outputs_mut() {
                        let mut h = self.inner.download(out)?;
                        if let Some(b) = h.bytes_mut().first_mut() {
                            *b ^= 1;
                        }
                        self.inner.write(out, &h)?;
                    }
                }
                Ok(())
            }
            Mode::Corrupt(k) if k == A::KIND => {
                reference(op)?;
                for (_, out) in op.args_mut().outputs_mut() {
                    let h = self.inner.download(out)?;
                    let bad = if h.dtype().is_float() {
                        let v: Vec<f32> = h.to_f32_vec().iter().map(|v| v * 1.5 + 1.0).collect();
                        HostTensor::from_f32(h.dtype(), h.shape(), &v)
                    } else {
                        let b = h.bytes().iter().map(|b| b ^ 1).collect();
                        HostTensor::from_bytes(h.dtype(), h.shape(), b)?
                    };
                    self.inner.write(out, &bad)?;
                }
                Ok(())
            }
            _ => reference(op),
        }
    }
}

macro_rules! broken_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            self.run(op, |op| self.inner.$method(op))
        }
    )*};
}

impl Backend for Broken {
    fn name(&self) -> &str {
        "broken"
    }
    fn instance(&self) -> InstanceId {
        self.inner.instance()
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo::default()
    }
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        match self.mode {
            Mode::Unsupported(k) if k == op => Support::NotSupported("test".into()),
            _ => self.inner.supports(op, dtypes),
        }
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let mut t = self.inner.alloc(dtype, shape)?;
        if let Mode::SkipsClear = self.mode {
            let stale = vec![0xab; t.nbytes()];
            self.inner
                .write(&mut t, &HostTensor::from_bytes(dtype, shape, stale)?)?;
        }
        Ok(t)
    }
    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        match self.mode {
            Mode::SkipsClear => self.alloc(dtype, shape),
            _ => self.inner.alloc_zeroed(dtype, shape),
        }
    }
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        self.inner.upload(host)
    }
    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        self.inner.download(t)
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        self.inner.write(dst, src)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    deepport_core::for_each_local_op!(broken_local_ops);
}

fn harness(mode: Mode) -> Harness {
    Harness::new("broken", move |_| {
        Ok(Box::new(Broken {
            inner: CpuRef,
            mode,
            runs: AtomicUsize::new(0),
        }) as Box<dyn Backend>)
    })
}

/// `check` fails on a backend broken by `mode`.
fn fails(mode: Mode, check: fn(&Harness)) {
    let h = harness(mode);
    let r = catch_unwind(AssertUnwindSafe(|| check(&h)));
    assert!(r.is_err(), "{mode:?} was not caught");
}

#[test]
fn wrong_numbers_fail_the_op_s_check() {
    fails(Mode::Corrupt(OpKind::Add), local::add_is_exact);
    fails(Mode::Corrupt(OpKind::Rope), local::rope_matches_reference);
    fails(
        Mode::Corrupt(OpKind::MoeGate),
        local::moe_gate_matches_reference,
    );
    fails(
        Mode::Corrupt(OpKind::Fp8Gemm),
        heavy::fp8_gemm_matches_reference,
    );
    fails(
        Mode::Corrupt(OpKind::MlaDecode),
        heavy::mla_decode_varlen_matches_reference,
    );
    fails(
        Mode::Corrupt(OpKind::GetDispatchLayout),
        ep::layout_matches_cpu_ref,
    );
}

/// Core's protocol packs host-staged payloads on the host (one download
/// of the source), so `gather_rows` runs where rows are placed on the
/// device: the low-latency dispatch's expert slots (and, on a device
/// path, the packing). `reduce_rows` is every combine.
#[test]
fn a_broken_ep_kernel_fails_the_ep_checks() {
    fails(Mode::Corrupt(OpKind::GatherRows), ep::ep_low_latency);
    fails(Mode::Corrupt(OpKind::ReduceRows), ep::ep_low_latency);
    fails(
        Mode::Corrupt(OpKind::ReduceRows),
        ep::ep_dispatch_and_combine,
    );
}

#[test]
fn swallowed_index_errors_fail() {
    fails(
        Mode::Swallow(OpKind::Embedding),
        local::embedding_out_of_range_is_an_error,
    );
    fails(
        Mode::Swallow(OpKind::MlaDecode),
        heavy::mla_decode_bad_indices_are_errors,
    );
}

#[test]
fn unsupported_ops_are_skipped_and_recorded() {
    let h = harness(Mode::Unsupported(OpKind::Rope));
    local::rope_matches_reference(&h);
    assert!(
        skipped()
            .iter()
            .any(|s| s.contains("broken") && s.contains("rope")),
        "{:?}",
        skipped()
    );
}

#[test]
fn nondeterminism_fails() {
    fails(
        Mode::Flaky(OpKind::Gemm),
        local::local_ops_are_deterministic,
    );
    fails(
        Mode::Flaky(OpKind::MlaDecode),
        local::local_ops_are_deterministic,
    );
    fails(Mode::Flaky(OpKind::ReduceRows), ep::ep_low_latency);
}

#[test]
fn an_alloc_zeroed_without_the_clear_fails() {
    fails(Mode::SkipsClear, local::alloc_zeroed_is_zero_after_reuse);
}

#[test]
fn supports_must_agree_with_the_op() {
    fails(Mode::Dishonest(OpKind::Rope), local::rope_matches_reference);
}

/// The unbroken wrapper passes what the broken ones fail.
#[test]
fn the_unbroken_wrapper_passes() {
    let h = harness(Mode::Unsupported(OpKind::SiluMul));
    local::add_is_exact(&h);
    heavy::fp8_gemm_matches_reference(&h);
    ep::layout_matches_cpu_ref(&h);
    local::embedding_out_of_range_is_an_error(&h);
    local::local_ops_are_deterministic(&h);
    local::alloc_zeroed_is_zero_after_reuse(&h);
}
