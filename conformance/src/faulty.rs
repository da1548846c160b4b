//! `faulty`: a deliberately broken backend that proves the suite notices.
//!
//! It is registered only when `DEEPPORT_TEST_BACKENDS=1` is set, so it never
//! shows up for users. It runs every op through `cpu-ref` except four, each
//! failing in one of the ways a real port fails:
//!
//! | op | misbehaviour | outcome the suite must report |
//! |---|---|---|
//! | `rms_norm` | aborts the process | `Crash` (with `--isolate`) |
//! | `rope` | never returns | `Timeout` (with `--isolate`) |
//! | `add` | writes wrong numbers | `Fail` |
//! | `silu_mul` | claims support, then errors | `Fail` (never `NotSupported`) |
//!
//! and it honestly reports `mla_prefill` as not supported.

use deepport_core::backend::{Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::ops::*;
use deepport_core::{DType, Error, HostTensor, Result};
use deepport_cpu::CpuRef;

/// The environment variable that registers test-only backends.
pub const ENABLE_ENV: &str = "DEEPPORT_TEST_BACKENDS";

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Faulty {
    inner: CpuRef,
}

impl Faulty {
    pub const NAME: &'static str = "faulty";
}

impl Faulty {
    /// Runs a local op through `cpu-ref`, misbehaving on the four ops of
    /// the module documentation.
    fn run<A: OpArgs>(
        &self,
        op: &mut Checked<A>,
        reference: impl FnOnce(&mut Checked<A>) -> Result<()>,
    ) -> Result<()> {
        match A::KIND {
            OpKind::RmsNorm => {
                eprintln!("faulty: aborting in rms_norm, as designed");
                std::process::abort()
            }
            OpKind::Rope => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            OpKind::SiluMul => Err(Error::Device {
                backend: Self::NAME.into(),
                msg: "silu_mul kernel failed to launch (deliberate)".into(),
            }),
            OpKind::MlaPrefill => Err(self.unsupported(A::KIND)),
            OpKind::Add => {
                reference(op)?;
                for (_, out) in op.args_mut().outputs_mut() {
                    let h = self.inner.download(out)?;
                    let garbage: Vec<f32> = h
                        .to_f32_vec()
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v * 1.5 + i as f32)
                        .collect();
                    let h = HostTensor::from_f32(h.dtype(), h.shape(), &garbage);
                    self.inner.write(out, &h)?;
                }
                Ok(())
            }
            _ => reference(op),
        }
    }
}

/// Every local op through [`Faulty::run`].
macro_rules! faulty_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            self.run(op, |op| self.inner.$method(op))
        }
    )*};
}

impl Backend for Faulty {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn instance(&self) -> InstanceId {
        self.inner.instance()
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: Self::NAME.into(),
            device: "deliberately faulty test backend".into(),
            driver: "crashes on rms_norm, hangs on rope, garbage from add, errors on silu_mul"
                .into(),
            vendor: "test".into(),
        }
    }
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        match op {
            OpKind::MlaPrefill => {
                Support::NotSupported("faulty does not implement mla_prefill".into())
            }
            _ => self.inner.supports(op, dtypes),
        }
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.inner.alloc(dtype, shape)
    }
    fn alloc_output(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.inner.alloc_output(dtype, shape)
    }
    fn alloc_zeroed(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.inner.alloc_zeroed(dtype, shape)
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

    deepport_core::for_each_local_op!(faulty_local_ops);
}

/// Registers `faulty` when [`ENABLE_ENV`] is `1`.
pub fn register_if_enabled(reg: &mut deepport_core::registry::Registry) {
    if std::env::var(ENABLE_ENV).as_deref() == Ok("1") {
        reg.register(
            Faulty::NAME,
            "deliberately faulty test backend (crash, hang, garbage, error)",
            |_| Ok(Box::new(Faulty::default())),
            || deepport_core::registry::single_device(|_| Ok(Box::new(Faulty::default()))),
        );
    }
}
