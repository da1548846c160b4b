//! DeepSeek-V3.2's config fields (`index_n_heads`, `index_head_dim`,
//! `index_topk`): parsed and validated; the forward pass refuses them
//! until sparse attention exists.

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
fn the_forward_pass_refuses_a_v32_config() {
    let cfg = ModelConfig::from_value(&v32()).expect("v3.2");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/model");
    let ckpt = Checkpoint::open(&dir).expect("checkpoint");
    let e = Model::load(&CpuRef, &ckpt, &cfg, Numerics::F32, MlaForm::Absorbed)
        .expect_err("V3.2 is not implemented")
        .to_string();
    assert!(e.contains("index_topk = 32"), "{e}");
}
