//! The model reads nothing it did not write. [`Backend::alloc`] promises
//! uninitialised memory, and a device allocator returns whatever was there;
//! the CPU backends happen to return zeros. Here every `alloc` and
//! `alloc_output` comes back poisoned (NaN for floats, all-ones bytes for
//! integers), and the forward pass — prefill, then decode steps in the
//! masked expert layout, on one rank and on two in-process ranks, V3 in
//! f32 and FP8 and V3.2 (one rank) in f32 and FP8 — must give cpu-ref's logits bit for bit.

use deepport_core::backend::{poison_host, Backend, DeviceInfo, InstanceId, Support, Tensor};
use deepport_core::comm::run_ranks;
use deepport_core::ops::*;
use deepport_core::tensor::read_safetensors;
use deepport_core::{DType, HostTensor, Result};
use deepport_cpu::CpuRef;
use deepport_model::{Checkpoint, LoadOptions, Model, ModelConfig, Numerics, PrefillPath};
use std::path::{Path, PathBuf};

/// cpu-ref whose allocations hold poison until an op or a write fills them.
struct Poisoned(CpuRef);

static CPU: CpuRef = CpuRef;
static POISONED: Poisoned = Poisoned(CpuRef);

impl Poisoned {
    fn poisoned(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let mut t = self.0.alloc(dtype, shape)?;
        self.0.write(&mut t, &poison_host(dtype, shape))?;
        Ok(t)
    }
}

macro_rules! forward_local_ops {
    ([] $($kind:ident => $method:ident),* $(,)?) => {$(
        fn $method(&self, op: &mut Checked<$kind<'_>>) -> Result<()> {
            self.0.$method(op)
        }
    )*};
}

impl Backend for Poisoned {
    fn name(&self) -> &str {
        "poisoned-cpu-ref"
    }
    fn instance(&self) -> InstanceId {
        self.0.instance()
    }
    fn info(&self) -> DeviceInfo {
        self.0.info()
    }
    fn supports(&self, op: OpKind, dtypes: &[DType]) -> Support {
        self.0.supports(op, dtypes)
    }
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.poisoned(dtype, shape)
    }
    fn alloc_output(&self, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.poisoned(dtype, shape)
    }
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        self.0.upload(host)
    }
    fn download(&self, t: &Tensor) -> Result<HostTensor> {
        self.0.download(t)
    }
    fn write(&self, dst: &mut Tensor, src: &HostTensor) -> Result<()> {
        self.0.write(dst, src)
    }
    fn synchronize(&self) -> Result<()> {
        self.0.synchronize()
    }

    deepport_core::for_each_local_op!(forward_local_ops);
}

fn golden_dir(name: &str) -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../golden")
        .join(name);
    if d.join("config.json").is_file() {
        Some(d)
    } else {
        println!("SKIPPED: {} does not exist", d.display());
        None
    }
}

fn opts(numerics: Numerics) -> LoadOptions {
    LoadOptions {
        numerics,
        form: MlaForm::Absorbed,
        scale_fmt: ScaleFmt::Float,
        prefill: PrefillPath::Fused,
    }
}

/// Prefill logits of `prompt`, then the logits of a decode step per token
/// of `next`.
fn run(model: &mut Model<'_>, prompt: &[u32], next: &[u32]) -> Result<Vec<HostTensor>> {
    let mut out = vec![model.prefill(prompt)?];
    for &t in next {
        out.push(model.decode(t)?);
    }
    Ok(out)
}

fn assert_same(what: &str, got: &[HostTensor], want: &[HostTensor]) {
    assert_eq!(got.len(), want.len(), "{what}: step count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.shape(), w.shape(), "{what}: step {i} shapes");
        assert!(g.bytes() == w.bytes(), "{what}: step {i} logits differ");
    }
}

/// One model directory in one numeric mode, on 1 and 2 ranks.
fn check(dir: &Path, numerics: Numerics, ranks: &[usize]) {
    let cfg = ModelConfig::from_file(dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(dir).expect("checkpoint");
    let g = read_safetensors(dir.join("golden_f32.safetensors")).expect("golden");
    let tokens: Vec<u32> = g.tensors["tokens"]
        .to_i64_vec()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let (prompt, next) = (&tokens[..12], &tokens[12..15]);
    let o = opts(numerics);
    let mut clean = Model::load_with(&CPU, &ckpt, &cfg, o).expect("load");
    let want = run(&mut clean, prompt, next).expect("cpu-ref forward");
    let tag = format!("{} {numerics}", dir.display());
    let mut poisoned = Model::load_with(&POISONED, &ckpt, &cfg, o).expect("load");
    let got = run(&mut poisoned, prompt, next)
        .unwrap_or_else(|e| panic!("{tag}, one rank, poisoned allocations: {e}"));
    assert_same(&format!("{tag}, one rank"), &got, &want);
    for &world in ranks {
        let results = run_ranks(world, |_, comm| {
            let mut m = Model::load_ep(&POISONED, comm, &ckpt, &cfg, o)?;
            run(&mut m, prompt, next)
        })
        .unwrap_or_else(|e| panic!("{tag}, {world} ranks, poisoned allocations: {e}"));
        for (r, got) in results.iter().enumerate() {
            assert_same(&format!("{tag}, rank {r} of {world}"), got, &want);
        }
    }
}

#[test]
fn v3_reads_only_what_it_wrote() {
    let Some(dir) = golden_dir("model") else {
        return;
    };
    check(&dir, Numerics::F32, &[2]);
    check(&dir, Numerics::Fp8, &[2]);
}

#[test]
fn v32_reads_only_what_it_wrote() {
    let Some(dir) = golden_dir("model-v32") else {
        return;
    };
    check(&dir, Numerics::F32, &[]);
    check(&dir, Numerics::Fp8, &[]);
}
