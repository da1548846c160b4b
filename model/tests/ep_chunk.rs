//! Expert parallelism and chunked prefill on the golden checkpoint
//! (`golden/model/`), on the CPU reference backend:
//!
//! * the experts split over 2 and 4 in-process ranks give the logits and
//!   the routing of one rank bit for bit in f32 (and in fp8: every
//!   per-token computation is the same), in prefill (contiguous grouped
//!   layout) and in decode (masked layout);
//! * a prompt many times longer than one chunk, run in chunks, gives the
//!   one-shot prefill's logits: exactly in f32 on the paged path (the same
//!   arithmetic per token), within the golden tolerance otherwise;
//! * prompts beyond `max_position_embeddings` are refused with a clear
//!   error, and the memory estimate grows linearly with the prompt.

use deepport_core::comm::run_ranks;
use deepport_core::ops::{MlaForm, ScaleFmt};
use deepport_core::tensor::read_safetensors;
use deepport_core::HostTensor;
use deepport_cpu::CpuRef;
use deepport_model::{
    memory, Checkpoint, LoadOptions, Model, ModelConfig, Numerics, PrefillPath, Taps,
};
use std::path::{Path, PathBuf};

static CPU: CpuRef = CpuRef;

struct Fixture {
    cfg: ModelConfig,
    ckpt: Checkpoint,
    tokens: Vec<u32>,
}

fn fixture() -> Option<Fixture> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/model");
    if !dir.is_dir() {
        println!("SKIPPED: {} does not exist", dir.display());
        return None;
    }
    let cfg = ModelConfig::from_file(dir.join("config.json")).expect("config");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let g = read_safetensors(dir.join("golden_f32.safetensors")).expect("golden");
    let tokens = g.tensors["tokens"]
        .to_i64_vec()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    Some(Fixture { cfg, ckpt, tokens })
}

fn opts(numerics: Numerics, prefill: PrefillPath) -> LoadOptions {
    LoadOptions {
        numerics,
        form: MlaForm::Absorbed,
        scale_fmt: ScaleFmt::Float,
        prefill,
    }
}

/// Prefill logits + taps, then the logits of two decode steps.
fn run_one(fx: &Fixture, model: &mut Model<'_>) -> (HostTensor, Taps, Vec<HostTensor>) {
    let mut taps = Taps::new();
    let prompt = &fx.tokens[..40];
    let logits = model.prefill_with_taps(prompt, &mut taps).expect("prefill");
    let decoded = fx.tokens[40..42]
        .iter()
        .map(|&t| model.decode(t).expect("decode"))
        .collect();
    (logits, taps, decoded)
}

fn assert_same(what: &str, a: &HostTensor, b: &HostTensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    assert!(a.bytes() == b.bytes(), "{what}: not bit-identical");
}

fn check_ep(numerics: Numerics) {
    let Some(fx) = fixture() else { return };
    let o = opts(numerics, PrefillPath::Fused);
    let mut single = Model::load_with(&CPU, &fx.ckpt, &fx.cfg, o).expect("load");
    let (l1, t1, d1) = run_one(&fx, &mut single);
    for world in [2usize, 4] {
        let results = run_ranks(world, |_, comm| {
            let mut m = Model::load_ep(&CPU, comm, &fx.ckpt, &fx.cfg, o)?;
            Ok(run_one(&fx, &mut m))
        })
        .expect("expert-parallel ranks");
        for (r, (l, t, d)) in results.iter().enumerate() {
            let tag = format!("{numerics} ep={world} rank {r}");
            assert_same(&format!("{tag} prefill logits"), l, &l1);
            for li in 1..fx.cfg.num_hidden_layers {
                for k in ["topk_idx", "topk_weights", "ffn_out"] {
                    let name = format!("layers.{li}.{k}");
                    assert_same(
                        &format!("{tag} {name}"),
                        &t.tensors[&name],
                        &t1.tensors[&name],
                    );
                }
            }
            for (i, (a, b)) in d.iter().zip(&d1).enumerate() {
                assert_same(&format!("{tag} decode step {i} logits"), a, b);
            }
        }
    }
}

#[test]
fn f32_expert_parallel_equals_one_rank_bit_for_bit() {
    check_ep(Numerics::F32);
}

#[test]
fn fp8_expert_parallel_equals_one_rank_bit_for_bit() {
    check_ep(Numerics::Fp8);
}

fn max_abs(a: &HostTensor, b: &HostTensor) -> f64 {
    a.to_f32_vec()
        .iter()
        .zip(b.to_f32_vec())
        .map(|(x, y)| (*x as f64 - y as f64).abs())
        .fold(0.0, f64::max)
}

fn cos_min(a: &HostTensor, b: &HostTensor) -> f64 {
    let v = *a.shape().last().unwrap();
    let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
    a.chunks(v)
        .zip(b.chunks(v))
        .map(|(x, y)| {
            let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
            for (p, q) in x.iter().zip(y) {
                xy += *p as f64 * *q as f64;
                xx += *p as f64 * *p as f64;
                yy += *q as f64 * *q as f64;
            }
            xy / (xx.sqrt() * yy.sqrt())
        })
        .fold(1.0, f64::min)
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let Some(fx) = fixture() else { return };
    let t = fx.tokens.len(); // 53 tokens in chunks of 7: 8 chunks.
    let chunk = 7;
    for (numerics, prefill) in [
        (Numerics::F32, PrefillPath::Paged),
        (Numerics::F32, PrefillPath::Fused),
        (Numerics::Bf16, PrefillPath::Paged),
        (Numerics::Fp8, PrefillPath::Fused),
    ] {
        let mut m =
            Model::load_with(&CPU, &fx.ckpt, &fx.cfg, opts(numerics, prefill)).expect("load");
        let one = m.prefill(&fx.tokens).expect("one-shot prefill");
        let mut taps = Taps::new();
        let chunked = m
            .prefill_chunked(&fx.tokens, chunk, true, Some(&mut taps))
            .expect("chunked prefill");
        assert_eq!(chunked.shape(), &[t, fx.cfg.vocab_size]);
        assert_eq!(m.seq_len(), t);
        assert_eq!(taps.tensors["logits"].shape(), chunked.shape());
        assert_eq!(taps.tensors["layers.0.input"].shape()[0], t);
        let last = m
            .prefill_chunked(&fx.tokens, chunk, false, None)
            .expect("chunked prefill, last logits");
        assert_eq!(last.shape(), &[1, fx.cfg.vocab_size]);
        let v = fx.cfg.vocab_size;
        assert!(
            last.bytes() == &chunked.bytes()[(t - 1) * v * 4..],
            "last row"
        );
        let (d, c) = (max_abs(&chunked, &one), cos_min(&chunked, &one));
        println!(
            "{numerics} {}: chunked vs one-shot max abs {d:.3e}, cos min {c:.8}",
            prefill.name()
        );
        match (numerics, prefill) {
            (Numerics::F32, PrefillPath::Paged) => {
                assert!(
                    chunked.bytes() == one.bytes(),
                    "f32 paged: chunked must be bit-identical"
                )
            }
            // Fused first chunk vs paged rest: naive/absorbed/paged agree
            // to ≤ 1.6e-6 in f32 (golden/README.md); the golden bound is 1e-4.
            (Numerics::F32, _) => assert!(d <= 1e-4, "f32 fused: {d}"),
            // bf16/fp8 round differently in the fused and paged kernels; the
            // golden end-to-end bounds (cos min ≥ 0.9995 bf16, 0.85 fp8 paged).
            (Numerics::Bf16, _) => assert!(c >= 0.9995, "bf16: cos min {c}"),
            // A fused first chunk and paged later chunks round differently
            // from a one-shot fused prefill; fp8 amplifies that (act_quant is
            // discontinuous). The golden's fp8 fused end-to-end bound (cos min
            // ≥ 0.7, golden/README.md) applies; measured 0.819.
            _ => assert!(c >= 0.7, "fp8: cos min {c}"),
        }
        // Decoding after a chunked prefill continues the same sequence.
        let next = m.decode(fx.tokens[0]).expect("decode after chunks");
        assert_eq!(next.shape(), &[1, v]);
    }
}

#[test]
fn prompts_beyond_max_positions_are_refused() {
    let Some(fx) = fixture() else { return };
    let mut cfg = fx.cfg.clone();
    cfg.max_position_embeddings = 50;
    let mut m = Model::load_with(
        &CPU,
        &fx.ckpt,
        &cfg,
        opts(Numerics::F32, PrefillPath::Fused),
    )
    .expect("load");
    for r in [
        m.prefill(&fx.tokens),
        m.prefill_chunked(&fx.tokens, 8, false, None),
    ] {
        let e = r.expect_err("53 tokens > 50 positions").to_string();
        assert!(
            e.contains("max_position_embeddings = 50") && e.contains("53"),
            "{e}"
        );
    }
    m.prefill(&fx.tokens[..50]).expect("50 tokens fit");
    let e = m.decode(1).expect_err("position 51").to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn memory_estimate_is_linear_in_the_prompt() {
    let Some(fx) = fixture() else { return };
    let est = |t: usize| memory::estimate(&fx.cfg, Numerics::Bf16, 1, t, 512, false);
    let (a, b) = (est(1 << 16), est(1 << 17));
    assert_eq!(a.weights, b.weights);
    assert!(b.cache >= 2 * a.cache - 64 * 576 * 2 * 3 && b.cache <= 2 * a.cache + 64 * 576 * 2 * 3);
    // Chunked: one chunk's activations, scores against the cache only.
    assert!(b.activations < 3 * a.activations);
    // The case: 2,000,000 tokens of the real model is hundreds of GB
    // with all logits kept, and absurd sizes saturate instead of overflowing.
    let huge = memory::estimate(&fx.cfg, Numerics::F32, 1, usize::MAX / 2, 512, true);
    assert!(huge.total() > 1 << 50, "{huge}");
}
