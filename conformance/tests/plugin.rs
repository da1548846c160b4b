//! `--plugin LIB`: the example C plugin (built by deepport-plugin's
//! build.rs) judged by the conformance suite like a built-in backend, and
//! bad plugins refused with a clear error.
#![cfg(all(feature = "plugin", feature = "cpu"))]

use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_deepport");
const PLUGIN: &str = deepport_plugin::EXAMPLE_PLUGIN;

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deepport-plugin-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn deepport(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove(deepport_plugin::PLUGIN_ENV)
        .output()
        .expect("run deepport")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The ops the example plugin implements.
const OPS: [&str; 4] = ["add(", "silu_mul(", "rms_norm(", "embedding("];

#[test]
fn example_plugin_passes_the_smoke_profile_with_its_ops() {
    let dir = scratch("smoke");
    let report = dir.join("report");
    let o = deepport(&[
        "run",
        "--plugin",
        PLUGIN,
        "--profile",
        "smoke",
        "--jobs",
        "2",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let results = std::fs::read_to_string(report.join("results.jsonl")).unwrap();
    let mut passed = 0;
    let mut lines = 0;
    for line in results.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        lines += 1;
        let id = v["id"].as_str().unwrap();
        let outcome = v["outcome"].as_str().unwrap();
        assert_eq!(v["backend"], "example-plugin", "{line}");
        let ours = OPS.iter().any(|p| {
            id.starts_with(p)
                || id.contains(&format!(
                    "op={})",
                    p.trim_end_matches('(').replace('_', "-")
                ))
        });
        if ours {
            assert_eq!(outcome, "Pass", "{id}: {line}");
            passed += 1;
        } else {
            assert!(
                outcome == "NotSupported" || outcome == "Pass",
                "{id}: {line}"
            );
        }
    }
    assert!(lines > 40, "only {lines} results");
    // smoke has at least 2 cases per op; the plugin must pass all of them.
    assert!(passed >= 8, "only {passed} cases of the plugin's ops");
}

#[test]
fn isolated_cases_load_the_plugin_in_the_case_process() {
    let o = deepport(&[
        "run",
        "--plugin",
        PLUGIN,
        "--isolate",
        "-f",
        "add",
        "-f",
        "embedding",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("run: 4 passed, 0 quality warnings, 0 failed"),
        "{t}"
    );
}

#[test]
fn op_runs_on_the_plugin() {
    let dir = scratch("op");
    let inp = dir.join("in.safetensors");
    let out = dir.join("out.safetensors");
    let m: BTreeMap<String, HostTensor> = [
        (
            "a".to_string(),
            HostTensor::from_f32(DType::BF16, &[3], &[1.0, 2.0, -3.0]),
        ),
        (
            "b".to_string(),
            HostTensor::from_f32(DType::BF16, &[3], &[0.5, 0.25, 1.0]),
        ),
    ]
    .into_iter()
    .collect();
    write_safetensors(&inp, &m, &BTreeMap::new()).unwrap();
    let o = deepport(&[
        "op",
        "add",
        "--plugin",
        PLUGIN,
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("add on example-plugin"), "{}", text(&o));
    let f = read_safetensors(&out).unwrap();
    assert_eq!(f.tensors["out"].to_f32_vec(), [1.5, 2.25, -2.0]);
}

#[test]
fn a_plugin_op_it_lacks_is_not_supported_in_forward() {
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/../golden/model");
    let o = deepport(&[
        "forward",
        "--plugin",
        PLUGIN,
        "--checkpoint",
        golden,
        "--golden",
        golden,
        "--mode",
        "f32",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("does not support"), "{}", text(&o));
}

#[test]
fn a_file_that_is_not_a_plugin_is_a_clear_error() {
    let toml = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let o = deepport(&["run", "--plugin", toml, "-f", "add"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot load the library"), "{}", text(&o));
    let o = deepport(&["list", "--plugin", "/nonexistent/libvendor_plugin.so"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("libvendor_plugin.so"), "{}", text(&o));
}
