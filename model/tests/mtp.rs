//! DeepSeek-V3's multi-token-prediction layer (`Model::load_mtp`,
//! `Model::mtp_forward`) on the CPU reference backend, judged against the
//! MTP goldens of `golden/model/golden_mtp_{mode}.safetensors` (PyTorch,
//! `golden/generate.py`; the f32 file agrees with transformers' own
//! `MtpModel` within 5.3e-6). The checkpoint is `golden/model-mtp/`: the
//! tiny V3 checkpoint plus an MTP shard. Every threshold carries its
//! measurement (`golden/model/measurements_mtp.json` and the values these
//! tests print).

use deepport_core::ops::{MlaForm, ScaleFmt};
use deepport_core::tensor::{read_safetensors, TensorFile};
use deepport_core::HostTensor;
use deepport_cpu::CpuRef;
use deepport_model::{Checkpoint, LoadOptions, Model, ModelConfig, Numerics, PrefillPath};
use std::path::{Path, PathBuf};

static CPU: CpuRef = CpuRef;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden")
}

/// The MTP checkpoint and config, or `None` (printed) when the golden data
/// is absent.
fn fixture() -> Option<(ModelConfig, Checkpoint)> {
    let dir = root().join("model-mtp");
    if !dir.join("config.json").is_file() {
        println!(
            "SKIPPED: {} does not exist (run golden/generate.py)",
            dir.display()
        );
        return None;
    }
    let cfg = ModelConfig::from_file(dir.join("config.json")).expect("model-mtp/config.json");
    let ckpt = Checkpoint::open(&dir).expect("model-mtp checkpoint");
    Some((cfg, ckpt))
}

fn golden(mode: &str) -> TensorFile {
    read_safetensors(root().join(format!("model/golden_mtp_{mode}.safetensors")))
        .expect("golden_mtp safetensors")
}

fn tensor<'a>(f: &'a TensorFile, name: &str) -> &'a HostTensor {
    f.tensors
        .get(name)
        .unwrap_or_else(|| panic!("golden file lacks `{name}`"))
}

fn load(
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    numerics: Numerics,
    prefill: PrefillPath,
) -> Model<'static> {
    let opts = LoadOptions {
        numerics,
        form: MlaForm::Absorbed,
        scale_fmt: ScaleFmt::Float,
        prefill,
    };
    let mut m = Model::load_with(&CPU, ckpt, cfg, opts).expect("load the main model");
    m.load_mtp(ckpt).expect("load the MTP layer");
    m
}

fn max_abs(a: &[f32], r: &[f32]) -> f64 {
    assert_eq!(a.len(), r.len());
    a.iter()
        .zip(r)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

fn rel_rms(a: &[f32], r: &[f32]) -> f64 {
    assert_eq!(a.len(), r.len());
    let num: f64 = a
        .iter()
        .zip(r)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = r.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Runs the MTP layer on the golden's inputs (the main golden's final
/// hidden states and the next tokens); returns (tap, metric value) pairs
/// in data-flow order, metric max abs (f32) or rel_rms, and the routing
/// mismatches.
fn run(mode: Numerics, prefill: PrefillPath) -> Option<(Vec<(String, f64)>, usize)> {
    let (cfg, ckpt) = fixture()?;
    let g = golden(mode.name());
    let m = load(&cfg, &ckpt, mode, prefill);
    let next: Vec<u32> = tensor(&g, "mtp.next_tokens")
        .to_i64_vec()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let out = m
        .mtp_forward(tensor(&g, "mtp.hidden"), &next)
        .expect("mtp_forward");
    assert_eq!(out.logits.shape(), &[next.len(), cfg.vocab_size]);
    let l = cfg.num_hidden_layers;
    let mut res = Vec::new();
    let mut mism = 0;
    let names = [
        "mtp.embed_norm".to_string(),
        "mtp.hidden_norm".to_string(),
        format!("layers.{l}.input"),
        format!("layers.{l}.q"),
        format!("layers.{l}.kv_latent"),
        format!("layers.{l}.attn_core"),
        format!("layers.{l}.attn_out"),
        format!("layers.{l}.gate_logits"),
        format!("layers.{l}.topk_idx"),
        format!("layers.{l}.topk_weights"),
        format!("layers.{l}.expert_out"),
        format!("layers.{l}.shared_out"),
        format!("layers.{l}.ffn_out"),
        "mtp.norm_out".to_string(),
        "mtp.logits".to_string(),
    ];
    for name in names {
        let gold = tensor(&g, &name);
        let mine = out
            .taps
            .get(&name)
            .unwrap_or_else(|| panic!("mtp_forward produced no `{name}` tap"));
        if name.ends_with("topk_idx") {
            let k = gold.shape()[1];
            mism = mine
                .to_i64_vec()
                .chunks(k)
                .zip(gold.to_i64_vec().chunks(k))
                .filter(|(a, b)| a != b)
                .count();
            continue;
        }
        let (a, r) = (mine.to_f32_vec(), gold.to_f32_vec());
        let v = if mode == Numerics::F32 {
            max_abs(&a, &r)
        } else {
            rel_rms(&a, &r)
        };
        println!("{mode} {prefill:?} {name}: {v:.3e}");
        res.push((name, v));
    }
    assert_eq!(
        out.logits.to_f32_vec(),
        out.taps
            .get("mtp.logits")
            .map(|t| t.to_f32_vec())
            .unwrap_or_default()
    );
    println!("{mode} {prefill:?} routing mismatches: {mism}");
    Some((res, mism))
}

#[test]
fn mtp_f32_matches_the_golden() {
    // The golden agrees with transformers' MtpModel within 5.3e-6 and with
    // an exact f64 MTP within ~1e-5 (measurements_mtp.json); the main
    // model's f32 bound (1e-4 max abs on every tap) applies.
    for prefill in [PrefillPath::Fused, PrefillPath::Paged] {
        let Some((res, mism)) = run(Numerics::F32, prefill) else {
            return;
        };
        assert_eq!(mism, 0, "routing differs");
        for (name, v) in res {
            let th = if name.ends_with("topk_weights") {
                1e-5
            } else {
                1e-4
            };
            assert!(v <= th, "{prefill:?} {name}: max abs {v:.3e} > {th:.0e}");
        }
    }
}
