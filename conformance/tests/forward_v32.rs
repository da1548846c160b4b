//! `deepport forward` on the tiny DeepSeek-V3.2 checkpoint
//! (`golden/model-v32`: V3 weights plus the lightning indexer, index_topk
//! 16 below the 40-token prompt): every tap, the indexer's included
//! (`index_q`, `index_k`, `index_score`, `index_topk` as sets), judged
//! against `golden_{f32,bf16,fp8}.safetensors` in data-flow order; and the
//! clear error of the paths V3.2 does not run yet.
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

#[test]
fn forward_v32_refuses_the_paths_it_does_not_run_yet() {
    let g = golden();
    let (code, text) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        &g,
        "--tokens",
        "1,2,3",
        "--mode",
        "bf16",
        "--prefill",
        "paged",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("DeepSeek-V3.2 sparse attention"), "{text}");
}
