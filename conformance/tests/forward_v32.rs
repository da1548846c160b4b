//! `deepport forward` on the tiny DeepSeek-V3.2 checkpoint
//! (`golden/model-v32`: V3 weights plus the lightning indexer, index_topk
//! 16 below the 40-token prompt): every tap, the indexer's included
//! (`index_q`, `index_k`, `index_score`, `index_topk` as sets), judged
//! against `golden_{f32,bf16,fp8}.safetensors` in data-flow order; chunked
//! prefill with greedy decode, and the paged prefill, over the index-k
//! cache (`model/tests/v32_decode.rs` judges those paths tap by tap).
#![cfg(feature = "cpu")]

use std::path::PathBuf;
use std::process::Command;

fn golden() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../golden/model-v32")
        .to_string_lossy()
        .into_owned()
}

fn deepport(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deepport"))
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .expect("run deepport");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn forward_v32_matches_the_goldens_in_every_mode() {
    let g = golden();
    for mode in ["f32", "bf16", "fp8"] {
        let (code, text) = deepport(&[
            "forward",
            "--backend",
            "cpu-ref",
            "--checkpoint",
            &g,
            "--golden",
            &g,
            "--mode",
            mode,
        ]);
        assert_eq!(code, 0, "{mode}: {text}");
        assert!(
            text.contains("every layer and tap within tolerance"),
            "{mode}: {text}"
        );
        for tap in [
            "layers.0.index_q",
            "layers.0.index_k",
            "layers.1.index_score",
            "layers.2.index_topk",
            "layers.2.attn_core",
        ] {
            assert!(text.contains(tap), "{mode}: no {tap} check in\n{text}");
        }
    }
}

/// `--chunk 7 --decode 26`: the golden prompt in chunks (the third one
/// crosses index_topk = 16), then 26 greedy decode steps (past position 64:
/// the latent and index-k caches grow to a second block), with latency
/// reported; the chunked logits (`--out`) agree with the golden's like the
/// fused prefill's (fp8 bounds of model_check: cosine min 0.7, top-1 0.75).
#[test]
fn forward_v32_prefills_in_chunks_and_decodes() {
    let g = golden();
    let out = std::env::temp_dir().join(format!(
        "deepport-v32-chunk-{}.safetensors",
        std::process::id()
    ));
    let (code, text) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        &g,
        "--golden",
        &g,
        "--mode",
        "fp8",
        "--chunk",
        "7",
        "--decode",
        "26",
        "--out",
        out.to_str().expect("utf-8 temp path"),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("decoded 26 tokens greedily"), "{text}");
    assert!(text.contains("decode latency per token"), "{text}");
    assert!(
        text.contains("every layer and tap within tolerance"),
        "{text}"
    );
    let mine = deepport_core::tensor::read_safetensors(&out).expect("--out");
    std::fs::remove_file(&out).expect("remove --out");
    let gold =
        deepport_core::tensor::read_safetensors(PathBuf::from(&g).join("golden_fp8.safetensors"))
            .expect("golden_fp8");
    let (a, r) = (&mine.tensors["logits"], &gold.tensors["logits"]);
    assert_eq!(a.shape(), r.shape());
    let (cmin, cmean, top1) = deepport_conformance::model_check::logits_stats(a, r);
    assert!(
        cmin >= 0.7 && cmean >= 0.97 && top1 >= 0.75,
        "chunked fp8 logits: {cmin} {cmean} {top1}"
    );
}

/// `--prefill paged` runs V3.2 through the index-k cache from position 0;
/// judged against the bf16 golden with the paged path's (tighter) bounds.
#[test]
fn forward_v32_paged_prefill_matches_the_golden() {
    let g = golden();
    let (code, text) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        &g,
        "--golden",
        &g,
        "--mode",
        "bf16",
        "--prefill",
        "paged",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("every layer and tap within tolerance"),
        "{text}"
    );
    assert!(text.contains("layers.2.index_topk"), "{text}");
}
