//! DeepSeek-V3.2's config fields (`index_n_heads`, `index_head_dim`,
//! `index_topk`): parsed and validated, and a V3.2 config loads (its forward
//! pass: `tests/v32_decode.rs`, `conformance/tests/forward_v32.rs`).

use deepport_core::ops::MlaForm;
use deepport_cpu::CpuRef;
use deepport_model::{Checkpoint, IndexerConfig, Model, ModelConfig, Numerics};
use serde_json::Value;
use std::path::Path;

fn v3() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/model/config.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("golden config")).expect("json")
}

fn with(fields: &[(&str, Value)]) -> Value {
    let mut v = v3();
    let o = v.as_object_mut().expect("object");
    for (k, x) in fields {
        o.insert((*k).to_string(), x.clone());
    }
    v
}

fn v32() -> Value {
    with(&[
        ("index_n_heads", 8.into()),
        ("index_head_dim", 128.into()),
        ("index_topk", 32.into()),
    ])
}

#[test]
fn v3_has_no_indexer_and_v32_parses_it() {
    assert_eq!(ModelConfig::from_value(&v3()).expect("v3").indexer, None);
    let c = ModelConfig::from_value(&v32()).expect("v3.2");
    assert_eq!(
        c.indexer,
        Some(IndexerConfig {
            n_heads: 8,
            head_dim: 128,
            topk: 32
        })
    );
}

#[test]
fn indexer_errors_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        // Partial: the first missing field is named.
        (
            with(&[("index_n_heads", 8.into()), ("index_topk", 32.into())]),
            "index_head_dim",
        ),
        (with(&[("index_head_dim", 128.into())]), "index_n_heads"),
        (
            with(&[("index_n_heads", 8.into()), ("index_head_dim", 128.into())]),
            "index_topk",
        ),
        // Out of range.
        (
            with(&[
                ("index_n_heads", 0.into()),
                ("index_head_dim", 128.into()),
                ("index_topk", 32.into()),
            ]),
            "index_n_heads",
        ),
        (
            with(&[
                ("index_n_heads", 8.into()),
                ("index_head_dim", 128.into()),
                ("index_topk", 0.into()),
            ]),
            "index_topk",
        ),
        (
            with(&[
                ("index_n_heads", 8.into()),
                ("index_head_dim", 96.into()),
                ("index_topk", 32.into()),
            ]),
            "index_head_dim",
        ),
        (
            with(&[
                ("index_n_heads", 8.into()),
                ("index_head_dim", 384.into()),
                ("index_topk", 32.into()),
            ]),
            "index_head_dim",
        ),
        (
            with(&[
                ("index_n_heads", 8.into()),
                ("index_head_dim", 128.into()),
                ("qk_rope_head_dim", 128.into()),
                ("index_topk", 32.into()),
            ]),
            "index_head_dim",
        ),
        // Wrong type.
        (
            with(&[
                ("index_n_heads", "8".into()),
                ("index_head_dim", 128.into()),
                ("index_topk", 32.into()),
            ]),
            "index_n_heads",
        ),
    ];
    for (v, field) in cases {
        let e = ModelConfig::from_value(&v).expect_err(field).to_string();
        assert!(
            e.contains(field),
            "expected an error naming {field}, got: {e}"
        );
    }
}

#[test]
fn a_v32_config_over_a_v3_checkpoint_names_the_missing_indexer() {
    // The forward pass runs V3.2 now: a V3.2 config needs each layer's
    // indexer weights, and a V3 checkpoint has none.
    let cfg = ModelConfig::from_value(&v32()).expect("v3.2");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/model");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let e = Model::load(&CpuRef, &ckpt, &cfg, Numerics::F32, MlaForm::Absorbed)
        .expect_err("no indexer weights in a V3 checkpoint")
        .to_string();
    assert!(
        e.contains("self_attn.indexer") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn the_tiny_v32_checkpoint_loads_its_indexer() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/model-v32");
    if !dir.join("config.json").is_file() {
        println!("SKIPPED: {} does not exist", dir.display());
        return;
    }
    let cfg = ModelConfig::from_file(dir.join("config.json")).expect("model-v32 config");
    let ix = cfg.indexer.clone().expect("a V3.2 config");
    let tokens: Vec<u64> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).expect("tokens"))
            .expect("token list");
    assert!(
        ix.topk < tokens.len(),
        "index_topk {} must be below the prompt length {} so the selection matters",
        ix.topk,
        tokens.len()
    );
    let ckpt = Checkpoint::open(&dir).expect("model-v32 checkpoint (sharded)");
    for layer in 0..cfg.num_hidden_layers {
        let w = deepport_model::v32::load_indexer(&ckpt, &cfg, layer).expect("indexer weights");
        assert_eq!(w.wq_b.weight.shape(), &[ix.n_heads * ix.head_dim, 256]);
        assert!(
            w.wq_b.scale.is_some() && w.wk.scale.is_some(),
            "FP8 linears"
        );
        assert_eq!(w.wk.weight.shape(), &[ix.head_dim, cfg.hidden_size]);
        assert_eq!(w.k_norm_bias.shape(), &[ix.head_dim]);
        assert_eq!(
            w.weights_proj.weight.shape(),
            &[ix.n_heads, cfg.hidden_size]
        );
    }
    // A V3 config has no indexer to load.
    let v3 = ModelConfig::from_value(&v3()).expect("v3");
    let e = deepport_model::v32::load_indexer(&ckpt, &v3, 0)
        .expect_err("V3 config")
        .to_string();
    assert!(e.contains("index_topk"), "{e}");
    // The golden files hold the indexer's selection of every layer.
    let g = deepport_core::tensor::read_safetensors(dir.join("golden_fp8.safetensors"))
        .expect("golden_fp8");
    assert_eq!(
        g.tensors["layers.2.index_topk"].shape(),
        &[tokens.len(), ix.topk]
    );
    // The forward pass loads it (its prefill is judged against these
    // goldens in conformance/tests/forward_v32.rs).
    Model::load(&CpuRef, &ckpt, &cfg, Numerics::Fp8, MlaForm::Absorbed).expect("V3.2 loads");
}
