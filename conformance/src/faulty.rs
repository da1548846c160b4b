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

    fn rms_norm(&self, _op: &mut Checked<RmsNorm<'_>>) -> Result<()> {
        eprintln!("faulty: aborting in rms_norm, as designed");
        std::process::abort()
    }
    fn rope(&self, _op: &mut Checked<Rope<'_>>) -> Result<()> {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    fn add(&self, op: &mut Checked<Add<'_>>) -> Result<()> {
        self.inner.add(op)?;
        let out = &mut *op.args_mut().out;
        let mut h = self.inner.download(out)?;
        let garbage: Vec<f32> = h
            .to_f32_vec()
            .iter()
            .enumerate()
            .map(|(i, v)| v * 1.5 + i as f32)
            .collect();
        h = HostTensor::from_f32(h.dtype(), h.shape(), &garbage);
        self.inner.write(out, &h)
    }
    fn silu_mul(&self, _op: &mut Checked<SiluMul<'_>>) -> Result<()> {
        Err(Error::Device {
            backend: Self::NAME.into(),
            msg: "silu_mul kernel failed to launch (deliberate)".into(),
        })
    }

    fn act_quant(&self, op: &mut Checked<ActQuant<'_>>) -> Result<()> {
        self.inner.act_quant(op)
    }
    fn weight_dequant(&self, op: &mut Checked<WeightDequant<'_>>) -> Result<()> {
        self.inner.weight_dequant(op)
    }
    fn fp8_gemm(&self, op: &mut Checked<Fp8Gemm<'_>>) -> Result<()> {
        self.inner.fp8_gemm(op)
    }
    fn fp8_grouped_contiguous(&self, op: &mut Checked<Fp8GroupedContiguous<'_>>) -> Result<()> {
        self.inner.fp8_grouped_contiguous(op)
    }
    fn fp8_grouped_masked(&self, op: &mut Checked<Fp8GroupedMasked<'_>>) -> Result<()> {
        self.inner.fp8_grouped_masked(op)
    }
    fn gemm(&self, op: &mut Checked<Gemm<'_>>) -> Result<()> {
        self.inner.gemm(op)
    }
    fn mla_decode(&self, op: &mut Checked<MlaDecode<'_>>) -> Result<()> {
        self.inner.mla_decode(op)
    }
    fn moe_gate(&self, op: &mut Checked<MoeGate<'_>>) -> Result<()> {
        self.inner.moe_gate(op)
    }
    fn embedding(&self, op: &mut Checked<Embedding<'_>>) -> Result<()> {
        self.inner.embedding(op)
    }
    fn copy_window(&self, op: &mut Checked<CopyWindow<'_>>) -> Result<()> {
        self.inner.copy_window(op)
    }
    fn get_dispatch_layout(&self, op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
        self.inner.get_dispatch_layout(op)
    }
    fn gather_rows(&self, op: &mut Checked<GatherRows<'_>>) -> Result<()> {
        self.inner.gather_rows(op)
    }
    fn reduce_rows(&self, op: &mut Checked<ReduceRows<'_>>) -> Result<()> {
        self.inner.reduce_rows(op)
    }
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
