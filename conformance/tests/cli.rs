//! End-to-end tests of the `deepport` binary. Expected values are computed
//! by hand in each test, never by the code under test.

// Every test needs the CPU backends.
#![cfg(feature = "cpu")]

use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_deepport");

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deepport-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn deepport(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run deepport")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(path: &PathBuf, tensors: Vec<(&str, HostTensor)>) {
    let m: BTreeMap<String, HostTensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    write_safetensors(path, &m, &BTreeMap::new()).unwrap();
}

#[test]
fn version_and_help() {
    let o = deepport(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("deepport "), "{}", stdout(&o));
    let o = deepport(&["--help"]);
    assert!(o.status.success());
    let s = stdout(&o);
    for cmd in ["list", "op", "run", "report", "verify"] {
        assert!(s.contains(cmd), "{s}");
    }
    assert!(s.contains("DeepSeek-V3"), "{s}");
}

#[test]
fn list_shows_cpu_ref_available() {
    let o = deepport(&["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    let line = s
        .lines()
        .find(|l| l.starts_with("cpu-ref:0 "))
        .unwrap_or_else(|| panic!("no cpu-ref:0 row in\n{s}"));
    assert!(line.contains(" available "), "{line}");
    assert!(s.lines().next().unwrap().contains("DRIVER"));

    let o = deepport(&["list", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "cpu-ref:0")
        .expect("cpu-ref:0 in JSON");
    assert_eq!(row["available"], true);
    // The oracle says what arithmetic it does: f64 accumulation.
    assert!(row["description"].as_str().unwrap().contains("reference"));
    assert!(row["driver"].as_str().unwrap().contains("f64 accumulation"));
}

#[test]
fn op_act_quant_gives_hand_computed_bytes() {
    let dir = scratch("act_quant");
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    // Row 0: amax 7 → s = 7/448 = 2^-6, q = 64·x:
    //   7 → 448 (0x7e), -3.5 → -224 (0xf6), 0.5 → 32 (0x60),
    //   0.3 → 19.2 → 20 (0x5a), 0.265625 → 17, a tie between 16 and 18 → 16
    //   (even mantissa, 0x58), -0.0 → 0x80, 0 → 0x00.
    // Row 1: all zero → amax clamps to 1e-4, s = 1e-4/448, q = 0.
    let mut x = vec![0f32; 256];
    x[..6].copy_from_slice(&[7.0, -3.5, 0.5, 0.3, 0.265625, -0.0]);
    write(
        &inp,
        vec![("x", HostTensor::from_f32(DType::F32, &[2, 128], &x))],
    );
    let o = deepport(&[
        "op",
        "act-quant",
        "--backend",
        "cpu",
        "--inputs",
        inp.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = read_safetensors(&out).unwrap();
    let q = &f.tensors["q"];
    assert_eq!(q.dtype(), DType::F8E4M3);
    assert_eq!(q.shape(), &[2, 128]);
    let mut want = vec![0u8; 256];
    want[..6].copy_from_slice(&[0x7e, 0xf6, 0x60, 0x5a, 0x58, 0x80]);
    assert_eq!(q.bytes(), &want[..]);
    let s = &f.tensors["s"];
    assert_eq!((s.dtype(), s.shape()), (DType::F32, &[2usize, 1][..]));
    assert_eq!(s.get_f32(0), 0.015625);
    assert_eq!(s.get_f32(1).to_bits(), (1e-4f32 / 448.0).to_bits());
    assert_eq!(f.metadata["op"], "act-quant");
    assert_eq!(f.metadata["backend"], "cpu");
    let p: serde_json::Value = serde_json::from_str(&f.metadata["params"]).unwrap();
    assert_eq!(p["scale_fmt"], "float");
    assert_eq!(p["format"], "e4m3");

    // UE8M0: amax 10 → 10/448 rounds up to 2^-5; q = 32·x:
    //   10 → 320 (0x7a), 1 → 32 (0x60), -2.5 → -80 (0xea).
    let mut x = vec![0f32; 128];
    x[..3].copy_from_slice(&[10.0, 1.0, -2.5]);
    write(
        &inp,
        vec![("x", HostTensor::from_f32(DType::BF16, &[1, 128], &x))],
    );
    let o = deepport(&[
        "op",
        "act_quant",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-p",
        "scale_fmt=ue8m0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = read_safetensors(&out).unwrap();
    let mut want = [0u8; 128];
    want[..3].copy_from_slice(&[0x7a, 0x60, 0xea]);
    assert_eq!(f.tensors["q"].bytes(), &want[..]);
    assert_eq!(f.tensors["s"].get_f32(0), 0.03125);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn op_mla_decode_converts_inputs_and_skips_unread_slots() {
    let dir = scratch("mla_decode");
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    // d = 4, head_dim_v = 2, block_size 2, 3 blocks; tokens 0 and 1 live in
    // block 2, token 2 in slot 0 of block 0; everything else is NaN.
    // q = e0 and scale 1, so the scores are the keys' channel 0:
    // (0, ln 2, ln 3) → p = (1, 2, 3)/6, lse = ln 6;
    // out = Σ p·k[0..2] = ((2 ln 2 + 3 ln 3)/6, (6·1 + 0·2 + 12·3)/6 = 7).
    let nan = f32::NAN;
    let (l2, l3) = (2f32.ln(), 3f32.ln());
    #[rustfmt::skip]
    let kc = vec![
        // block 0: token 2, then an unread slot
        l3, 12.0, 5.0, 5.0,   nan, nan, nan, nan,
        // block 1: unused
        nan, nan, nan, nan,   nan, nan, nan, nan,
        // block 2: tokens 0 and 1
        0.0, 6.0, 5.0, 5.0,   l2, 0.0, 5.0, 5.0,
    ];
    write(
        &inp,
        vec![
            (
                "q",
                HostTensor::from_f32(DType::F32, &[1, 1, 1, 4], &[1.0, 0.0, 0.0, 0.0]),
            ),
            (
                "kcache",
                HostTensor::from_f32(DType::F32, &[3, 2, 1, 4], &kc),
            ),
            // i64 on input: the CLI converts to the i32 the op requires.
            // The third entry is unused and holds a huge index.
            (
                "block_table",
                HostTensor::from_i64(&[1, 3], &[2, 0, 1 << 30]),
            ),
            ("cache_seqlens", HostTensor::from_i64(&[1], &[3])),
        ],
    );
    let o = deepport(&[
        "op",
        "mla-decode",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-p",
        "softmax_scale=1",
        "-p",
        "head_dim_v=2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let f = read_safetensors(&out).unwrap();
    let o_t = &f.tensors["out"];
    assert_eq!(
        (o_t.dtype(), o_t.shape()),
        (DType::F32, &[1usize, 1, 1, 2][..])
    );
    let want0 = (2.0 * 2f64.ln() + 3.0 * 3f64.ln()) / 6.0;
    assert!(
        (o_t.get_f32(0) as f64 - want0).abs() < 1e-5,
        "{}",
        o_t.get_f32(0)
    );
    assert!(
        (o_t.get_f32(1) as f64 - 7.0).abs() < 1e-5,
        "{}",
        o_t.get_f32(1)
    );
    let lse = &f.tensors["lse"];
    assert!((lse.get_f32(0) as f64 - 6f64.ln()).abs() < 1e-6);
    let p: serde_json::Value = serde_json::from_str(&f.metadata["params"]).unwrap();
    assert_eq!(p["softmax_scale"], 1.0);
    assert_eq!(p["head_dim_v"], 2);
    assert_eq!(p["causal"], false);

    // A block-table value that does not fit in i32 is a usage error.
    write(
        &inp,
        vec![
            (
                "q",
                HostTensor::from_f32(DType::F32, &[1, 1, 1, 4], &[1.0, 0.0, 0.0, 0.0]),
            ),
            (
                "kcache",
                HostTensor::from_f32(DType::F32, &[3, 2, 1, 4], &kc),
            ),
            (
                "block_table",
                HostTensor::from_i64(&[1, 3], &[2, 0, 1 << 40]),
            ),
            ("cache_seqlens", HostTensor::from_i64(&[1], &[3])),
        ],
    );
    let o = deepport(&[
        "op",
        "mla-decode",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-p",
        "head_dim_v=2",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("block_table"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn op_usage_errors_exit_2_and_name_the_problem() {
    let dir = scratch("usage");
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write(
        &inp,
        vec![
            ("x", HostTensor::from_f32(DType::F32, &[1, 4], &[1.0; 4])),
            ("w", HostTensor::from_f32(DType::F32, &[4], &[1.0; 4])),
        ],
    );
    let (i, o_) = (inp.to_str().unwrap(), out.to_str().unwrap());

    // Missing tensor: names the file, the tensor and what the file holds.
    let o = deepport(&["op", "rms-norm", "-i", i, "-o", o_]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("`weight`") && e.contains("in.safetensors"),
        "{e}"
    );
    assert!(e.contains("the file holds: w, x"), "{e}");
    assert!(!out.exists(), "no output on error");

    // Unknown parameter: named, with the valid ones listed.
    let o = deepport(&["op", "add", "-i", i, "-o", o_, "-p", "alpha=2"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("alpha") && e.contains("takes no parameters"),
        "{e}"
    );
    let o = deepport(&["op", "rms-norm", "-i", i, "-o", o_, "-p", "epsilon=1"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("`epsilon`") && e.contains("eps"), "{e}");

    // Malformed value.
    let o = deepport(&["op", "rms-norm", "-i", i, "-o", o_, "-p", "eps=tiny"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("`eps`") && e.contains("tiny"), "{e}");

    // Unknown op, unknown backend, missing input file.
    let o = deepport(&["op", "softmax", "-i", i, "-o", o_]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("softmax"));
    let o = deepport(&["op", "silu-mul", "-i", i, "-o", o_, "-b", "tpu"]);
    assert_eq!(o.status.code(), Some(2));
    let o = deepport(&["op", "add", "-i", "/nonexistent/in.safetensors", "-o", o_]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/in.safetensors"));

    // Shapes the op rejects are usage errors too (x has dim 4, weight 3).
    write(
        &inp,
        vec![
            ("x", HostTensor::from_f32(DType::F32, &[1, 4], &[1.0; 4])),
            ("weight", HostTensor::from_f32(DType::F32, &[3], &[1.0; 3])),
        ],
    );
    let o = deepport(&["op", "rms-norm", "-i", i, "-o", o_]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("weight"), "{}", stderr(&o));

    // An index out of range is the op failing: exit 1.
    write(
        &inp,
        vec![
            (
                "table",
                HostTensor::from_f32(DType::F32, &[2, 3], &[0.0; 6]),
            ),
            ("ids", HostTensor::from_i64(&[1], &[5])),
        ],
    );
    let o = deepport(&["op", "embedding", "-i", i, "-o", o_]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("ids"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn op_help_documents_every_op() {
    let o = deepport(&["op", "--help"]);
    assert!(o.status.success());
    let s = stdout(&o);
    for name in [
        "act-quant",
        "fp8-gemm",
        "fp8-grouped-contiguous",
        "fp8-grouped-masked",
        "mla-decode",
        "moe-gate",
        "rms-norm",
        "rope",
        "weight-dequant",
        "gemm",
        "silu-mul",
        "add",
        "embedding",
        "mla-prefill",
        "copy-window",
    ] {
        assert!(
            s.contains(&format!("\n  {name}  ")),
            "{name} has no entry in\n{s}"
        );
    }
    // Parameters and defaults are documented.
    for needle in [
        "scale_fmt=float|ue8m0",
        "route_scale=X  (default 2.5)",
        "original_max_position_embeddings=N  (default 4096)",
        "softmax_scale=X  (default d^-0.5",
        "head_dim_v=N  (default 512)",
        "eps=X  (default 1e-6)",
    ] {
        assert!(s.contains(needle), "missing `{needle}` in\n{s}");
    }
}

#[test]
fn run_on_cpu_passes_every_smoke_case() {
    let dir = scratch("run");
    let report = dir.join("report");
    let o = deepport(&[
        "run",
        "--backend",
        "cpu",
        "--report",
        report.to_str().unwrap(),
    ]);
    let s = stdout(&o);
    assert!(
        o.status.success(),
        "deepport run failed:\n{s}\n{}",
        stderr(&o)
    );
    // The machine-readable closing line comes last.
    let last = s.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("conformance: ") && last.ends_with(" passed, 0 failed, 0 skipped"),
        "{last}"
    );
    let n: usize = last["conformance: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(n >= 20, "{last}");
    let run = s
        .lines()
        .find(|l| l.starts_with("run: "))
        .unwrap_or_else(|| panic!("no run line in\n{s}"));
    assert!(
        run.contains(" 0 failed, 0 not supported, 0 crashed, 0 timed out"),
        "{run}"
    );
    // The same cases are listed by --list-cases.
    let o = deepport(&["run", "--list-cases"]);
    assert_eq!(stdout(&o).lines().count(), n);
    // The report has one result per case, every one conformant, on cpu.
    let results = std::fs::read_to_string(report.join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), n);
    for line in results.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            v["outcome"] == "Pass" || v["outcome"] == "QualityWarning",
            "{line}"
        );
        assert_eq!(v["backend"], "cpu");
        assert!(v["seed"].as_u64().is_some(), "{line}");
    }
    // One table per op family, covering every op.
    for family in [
        "act_quant",
        "weight_dequant",
        "fp8_gemm",
        "fp8_grouped_contiguous",
        "fp8_grouped_masked",
        "gemm",
        "mla_decode",
        "mla_prefill",
        "rms_norm",
        "rope",
        "moe_gate",
        "silu_mul",
        "embedding",
        "add",
        "copy_window",
        "ep",
    ] {
        assert!(
            s.contains(&format!("\n== {family} on cpu: ")),
            "no {family} table in\n{s}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_usage_errors() {
    let o = deepport(&["run", "--backend", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope") && stderr(&o).contains("cpu-ref"));
    let o = deepport(&["run", "--filter", "no-such-case"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no-such-case"), "{}", stderr(&o));
    let o = deepport(&["run", "--profile", "nightly"]);
    assert_eq!(o.status.code(), Some(2));
    let o = deepport(&["run", "--jobs", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = deepport(&["run", "--timeout", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    let o = deepport(&["run", "--list-cases", "--filter", "mla_decode(*"]);
    assert!(o.status.success());
    let s = stdout(&o);
    assert!(
        s.lines().count() >= 2 && s.lines().all(|l| l.starts_with("mla_decode(")),
        "{s}"
    );
    // A filter without wildcards matches ids containing it.
    let o = deepport(&["run", "--list-cases", "--filter", "mla_decode"]);
    let sub = stdout(&o);
    assert!(sub.lines().all(|l| l.contains("mla_decode")), "{sub}");
    assert!(s.lines().all(|l| sub.lines().any(|m| m == l)), "{sub}");
    // Filters add up.
    let o = deepport(&[
        "run",
        "--list-cases",
        "--filter",
        "mla_decode(*",
        "--filter",
        "rope(*",
    ]);
    let s2 = stdout(&o);
    assert!(s2.lines().any(|l| l.starts_with("rope(")), "{s2}");
    assert!(s2.lines().count() > s.lines().count());
}

/// The binary's main thread joins the CPU backends' worker pool, and then
/// waits for the in-process expert-parallel ranks, whose ops need a worker:
/// with one CPU's worth of threads (`RAYON_NUM_THREADS=1`, or an MPI rank
/// bound to a core) it must stay out of the pool, or those ops never run.
/// A forward pass over 2 in-process ranks finishes (it deadlocked).
#[test]
fn in_process_ranks_run_with_a_single_worker_thread() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../golden/model");
    let model = model.to_str().unwrap();
    for threads in ["1", "2"] {
        let mut child = Command::new(BIN)
            .args(["forward", "--backend", "cpu", "--checkpoint", model])
            .args(["--mode", "f32", "--ep", "2", "--tokens", "1,2,3"])
            .env("RAYON_NUM_THREADS", threads)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run deepport");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("RAYON_NUM_THREADS={threads}: forward --ep 2 still running after 300 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        assert!(
            status.success(),
            "RAYON_NUM_THREADS={threads}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
