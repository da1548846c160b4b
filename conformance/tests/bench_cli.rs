//! `deepport bench` and `deepport forward --decode` end to end: the JSON
//! a CI matrix reads, clear errors on bad input, and greedy decoding that
//! agrees with a prefill of the tokens it produced.
#![cfg(feature = "cpu")]

use std::path::PathBuf;
use std::process::Command;

fn deepport(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deepport"))
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bench_json_has_one_object_per_measurement() {
    let (code, out, err) = deepport(&[
        "bench",
        "--backend",
        "cpu,cpu-ref",
        "--op",
        "fp8_gemm",
        "--shape",
        "m=4,n=256,k=256",
        "--shape",
        "m=3,n=130,k=384",
        "--format",
        "json",
        "--min-time",
        "0",
        "--min-iters",
        "2",
        "--warmup",
        "0",
        "--no-peak",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect(l))
        .collect();
    assert_eq!(lines.len(), 4, "2 shapes × 2 backends:\n{out}");
    for v in &lines {
        assert_eq!(v["op"], "fp8_gemm");
        assert!(["cpu", "cpu-ref"].contains(&v["backend"].as_str().unwrap()));
        assert!(v["device"].as_str().is_some_and(|d| !d.is_empty()));
        for k in ["m", "n", "k"] {
            assert!(v["shape"][k].as_u64().is_some_and(|x| x > 0), "{v}");
        }
        let s = v["median_s"].as_f64().unwrap();
        assert!(s > 0.0 && s.is_finite());
        // FLOP by DeepGEMM's formula over the median.
        let (m, n, k) = (
            v["shape"]["m"].as_f64().unwrap(),
            v["shape"]["n"].as_f64().unwrap(),
            v["shape"]["k"].as_f64().unwrap(),
        );
        let tflops = v["tflops"].as_f64().unwrap();
        assert!((tflops - 2.0 * m * n * k / s / 1e12).abs() <= 1e-9 * tflops.max(1.0));
        assert!(v["gbps"].as_f64().unwrap() > 0.0);
        assert!(v["iters"].as_u64().unwrap() >= 2);
        assert!(v["peak_fraction"].is_null(), "--no-peak: {v}");
    }
}

#[test]
fn bench_rejects_bad_input_clearly() {
    for (args, want) in [
        (vec!["bench", "--op", "nope"], "no benchmark for it"),
        (
            vec!["bench", "--op", "fp8_gemm", "--shape", "m=1,n=2"],
            "no `k`",
        ),
        (
            vec!["bench", "--op", "fp8_gemm", "--shape", "m=0,n=1,k=1"],
            "positive",
        ),
        (
            vec!["bench", "--op", "fp8_gemm", "--shape", "m=1,n=1,k=1,m=2"],
            "twice",
        ),
        (vec!["bench", "--shape", "m=1,n=1,k=1"], "--op"),
        (
            vec![
                "bench",
                "--op",
                "fp8_grouped_masked",
                "--shape",
                "g=1,m=4,expected_m=8,n=128,k=128",
            ],
            "exceeds",
        ),
        (
            vec!["bench", "--op", "fp8_gemm", "--warmup=-1"],
            "--warmup must be a non-negative",
        ),
        (
            vec!["bench", "--op", "fp8_gemm", "--warmup", "inf"],
            "--warmup must be a non-negative",
        ),
    ] {
        let (code, out, err) = deepport(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in\n{err}");
    }
    // Beyond the memory budget: skipped with the size and the budget, no
    // allocation attempted.
    let (code, _, err) = deepport(&[
        "bench",
        "--op",
        "fp8_gemm",
        "--shape",
        "m=100000,n=100000,k=100000",
        "--no-peak",
        "--max-memory",
        "1G",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("beyond the budget"), "{err}");
}

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../golden/model")
}

/// The tokens `forward --decode` reports.
fn decoded(err: &str) -> Vec<u32> {
    let line = err
        .lines()
        .find(|l| l.contains("tokens greedily:"))
        .unwrap_or_else(|| panic!("no decode line in\n{err}"));
    serde_json::from_str(line.split_once("greedily: ").unwrap().1).unwrap()
}

/// The top next token `forward` names after a prompt.
fn top_next(err: &str) -> u32 {
    let line = err
        .lines()
        .find(|l| l.contains("the top next token is"))
        .unwrap_or_else(|| panic!("no prediction in\n{err}"));
    line.split("the top next token is ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn greedy_decode_agrees_with_prefill_of_its_own_tokens() {
    let g = golden();
    let ck = g.to_str().unwrap();
    let prompt = "1,2,3,4,5";
    let (code, _, err) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        ck,
        "--mode",
        "f32",
        "--tokens",
        prompt,
        "--decode",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let gen = decoded(&err);
    assert_eq!(gen.len(), 3);
    assert_eq!(
        gen[0],
        top_next(&err),
        "the first decoded token is the prompt's argmax"
    );
    assert!(err.contains("tokens/s"), "{err}");
    // Prefill of prompt + gen[..2] predicts gen[2]: decode over the paged
    // cache and prefill agree on the greedy choice.
    let longer = format!("{prompt},{},{}", gen[0], gen[1]);
    let (code, _, err2) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        ck,
        "--mode",
        "f32",
        "--tokens",
        &longer,
    ]);
    assert_eq!(code, 0, "{err2}");
    assert_eq!(top_next(&err2), gen[2], "{err}\n{err2}");
    // Beyond max_position_embeddings: refused before any work.
    let (code, _, err3) = deepport(&[
        "forward",
        "--backend",
        "cpu-ref",
        "--checkpoint",
        ck,
        "--tokens",
        prompt,
        "--decode",
        "100000000",
    ]);
    assert_eq!(code, 2, "{err3}");
    assert!(err3.contains("max_position_embeddings"), "{err3}");
}
