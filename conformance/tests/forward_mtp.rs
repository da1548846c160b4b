//! `deepport forward --mtp`: DeepSeek-V3's multi-token-prediction layer on
//! the committed MTP checkpoint (`golden/model-mtp`), judged against
//! `golden/model/golden_mtp_{mode}.safetensors` in every numerics mode,
//! its draft acceptance over `--decode`, and the error for a checkpoint
//! without an MTP layer.
#![cfg(feature = "cpu")]

use std::path::PathBuf;
use std::process::Command;

fn golden(dir: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../golden")
        .join(dir)
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
fn forward_mtp_matches_the_mtp_goldens_in_every_mode() {
    let (ck, g) = (golden("model-mtp"), golden("model"));
    for (mode, prefill) in [
        ("f32", "fused"),
        ("bf16", "fused"),
        ("bf16", "paged"),
        ("fp8", "paged"),
    ] {
        let (code, text) = deepport(&[
            "forward",
            "--backend",
            "cpu-ref",
            "--checkpoint",
            &ck,
            "--golden",
            &g,
            "--mode",
            mode,
            "--prefill",
            prefill,
            "--mtp",
        ]);
        assert_eq!(code, 0, "{mode} {prefill}: {text}");
        assert!(
            text.contains("MTP layer within tolerance"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("every layer and tap within tolerance"),
            "{mode}: {text}"
        );
        // The MTP report judges the decoder layer's taps and the logits.
        for tap in [
            "layers.3.attn_out",
            "layers.3.topk_idx",
            "layers.3.ffn_out",
            "mtp.logits",
        ] {
            assert!(text.contains(tap), "{mode}: no {tap} check in\n{text}");
        }
        assert!(text.contains("MTP drafts token"), "{text}");
    }
}

#[test]
fn forward_mtp_reports_draft_acceptance_and_writes_mtp_logits() {
    let ck = golden("model-mtp");
    let out = std::env::temp_dir().join(format!("deepport-mtp-{}.safetensors", std::process::id()));
    let (code, text) = deepport(&[
        "forward",
        "--backend",
        "cpu",
        "--checkpoint",
        &ck,
        "--mode",
        "f32",
        "--tokens",
        "5,17,300,42,7,99",
        "--decode",
        "4",
        "--mtp",
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("MTP draft acceptance over the decoded tokens"),
        "{text}"
    );
    assert!(
        text.contains(" of 3 ("),
        "4 decoded tokens give 3 checked drafts: {text}"
    );
    let f = deepport_core::tensor::read_safetensors(&out).expect("output file");
    let _ = std::fs::remove_file(&out);
    // 6 prompt + 4 decoded positions; the last decoded token has no successor
    // yet, so 9 rows pair a hidden state with its next token.
    assert_eq!(f.tensors["mtp.logits"].shape(), &[9, 1024]);
}

#[test]
fn forward_mtp_without_an_mtp_layer_is_a_clear_error() {
    let (code, text) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        &golden("model"),
        "--tokens",
        "1,2,3",
        "--mtp",
    ]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no multi-token-prediction layer"), "{text}");
    assert!(text.contains("num_nextn_predict_layers = 0"), "{text}");
}
