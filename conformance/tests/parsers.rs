//! Property tests over every parser of user input (issue 16 item 4): the
//! safetensors reader, the YAML catalogue, waivers, the report files that
//! `merge`/`verify` read, and the parameters of `deepport op`. From seed
//! inputs of this tree (real case files, golden tensors, a real run's
//! reports) each property derives hundreds of mutated inputs (bytes
//! flipped, cut, repeated, spliced with tokens that make parsers work:
//! huge numbers, brackets, YAML aliases, NaN) and checks that the parser
//! answers Ok or Err — never a panic, never an abort, and within the
//! memory budget (the process runs under a budget set low).
//!
//! The inputs come from a fixed-seed generator, so a failure reproduces;
//! the failing input is printed. The same parsers are the cargo-fuzz
//! targets in `fuzz/` (see `fuzz/README.md`) for open-ended fuzzing.

use deepport_conformance::suite::report::{self, result_from_json_line};
use deepport_conformance::suite::{catalogue, waivers::Waivers, RunInfo};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// xorshift64*: a small, fixed-seed generator for mutations.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens that make parsers take unusual paths.
const TOKENS: &[&str] = &[
    "99999999999999999999",
    "100000000000",
    "18446744073709551615",
    "-1",
    "1e308",
    "NaN",
    "inf",
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    ",",
    "\n- ",
    "\n  ",
    "&a ",
    "*a",
    "!!binary ",
    "\"",
    "'",
    "\\u0000",
    "\u{0}",
    "\u{feff}",
    "é",
    "null",
    "true",
    "<<: *a",
    "---\n",
    "(",
    ")",
    "=",
    "*",
    "?",
];

/// One mutation of `input`.
fn mutate(g: &mut Gen, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + g.below(4) {
        let n = v.len();
        match g.below(7) {
            0 if n > 0 => {
                let i = g.below(n);
                v[i] ^= 1 << g.below(8);
            }
            1 if n > 0 => {
                let i = g.below(n);
                let len = g.below((n - i).min(64) + 1);
                v.drain(i..i + len);
            }
            2 if n > 0 => {
                let i = g.below(n);
                let len = g.below((n - i).min(64) + 1);
                let chunk = v[i..i + len].to_vec();
                let at = g.below(n + 1);
                v.splice(at..at, chunk);
            }
            3 => {
                let t = TOKENS[g.below(TOKENS.len())].as_bytes();
                let at = g.below(n + 1);
                v.splice(at..at, t.iter().copied());
            }
            4 if n > 0 => {
                v.truncate(g.below(n));
            }
            5 if n > 0 => {
                // Replace a run of digits with a huge number.
                let i = g.below(n);
                if let Some(j) = v[i..].iter().position(u8::is_ascii_digit) {
                    let s = i + j;
                    let e = v[s..]
                        .iter()
                        .position(|c| !c.is_ascii_digit())
                        .map_or(v.len(), |k| s + k);
                    let big = ["100000000000", "4294967296", "0", "18446744073709551615"];
                    v.splice(s..e, big[g.below(big.len())].bytes());
                }
            }
            _ => {
                let at = g.below(n + 1);
                let junk: Vec<u8> = (0..g.below(8)).map(|_| g.next() as u8).collect();
                v.splice(at..at, junk);
            }
        }
    }
    v
}

/// Runs `check` on each seed and `rounds` mutations of it; a panic fails
/// the test and prints the input.
fn property(name: &str, seeds: &[Vec<u8>], rounds: usize, check: impl Fn(&[u8])) {
    assert!(!seeds.is_empty(), "{name}: no seed inputs");
    let mut g = Gen(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    for seed in seeds {
        let mut inputs = vec![seed.clone(), Vec::new()];
        inputs.extend((0..rounds).map(|_| mutate(&mut g, seed)));
        for input in inputs {
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                let shown = String::from_utf8_lossy(&input);
                let shown: String = shown.chars().take(4000).collect();
                panic!("{name}: the parser panicked on this input:\n{shown:?}");
            }
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn files(dir: &Path, ext: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v.into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Parsers here run under a small budget: no input may make them ask for
/// more (a request beyond it must be an error, not an allocation).
fn small_budget() {
    deepport_core::budget::MemoryBudget::set_global(deepport_core::budget::MemoryBudget::new(
        256 << 20,
    ));
}

#[test]
fn safetensors_reader_never_panics() {
    small_budget();
    let mut seeds: Vec<Vec<u8>> = files(&repo().join("golden/ops"), "safetensors")
        .into_iter()
        .filter(|(_, b)| b.len() < 200_000)
        .take(6)
        .map(|(_, b)| b)
        .collect();
    // A header that declares an enormous tensor over a few bytes of data.
    let header = r#"{"x":{"dtype":"F32","shape":[100000000000,7168],"data_offsets":[0,8]}}"#;
    let mut huge = (header.len() as u64).to_le_bytes().to_vec();
    huge.extend_from_slice(header.as_bytes());
    huge.extend_from_slice(&[0; 8]);
    seeds.push(huge);
    property("safetensors", &seeds, 300, |b| {
        let _ = deepport_core::tensor::parse_safetensors(Path::new("fuzz.safetensors"), b);
    });
}

#[test]
fn catalogue_parser_never_panics() {
    small_budget();
    let seeds: Vec<(PathBuf, Vec<u8>)> = files(&repo().join("conformance/cases"), "yaml");
    for (path, text) in &seeds {
        property(
            &format!("catalogue {}", path.display()),
            std::slice::from_ref(text),
            60,
            |b| {
                if let Ok(t) = std::str::from_utf8(b) {
                    let _ = catalogue::parse_file(path, t);
                }
            },
        );
    }
}

#[test]
fn waiver_parser_never_panics() {
    small_budget();
    let seed = br#"
- backend: wgpu
  device: "*RTX 40*"
  driver: "*"
  cases:
    - "mla_decode(*h_q=128*"
    - "fp8_gemm(m=1,*"
  outcomes: [Fail, Timeout]
  reason: "driver 550 miscompiles the split-k reduction (vendor bug 1234)"
  expires: 2026-12-31
- backend: "*"
  case: "add(*"
  outcomes: [NotSupported]
  reason: "r"
  expires: 2027-02-29
"#
    .to_vec();
    let real = std::fs::read(repo().join("conformance/waivers.yaml")).unwrap();
    property("waivers", &[seed, real], 400, |b| {
        if let Ok(t) = std::str::from_utf8(b) {
            let _ = Waivers::parse(t, Path::new("waivers.yaml"));
        }
    });
}

const RESULT_LINE: &str = r#"{"id":"fp8_gemm(m=64,n=576,k=256)","backend":"cpu","device":"dev0","driver":"drv","outcome":"Fail","metric":"out.calc_diff","value":"NaN","threshold":"inf","worst_index":[3,17],"seed":42,"duration_s":0.25,"message":"a < b","waiver":null}"#;

const RUN_JSON: &str = r#"{
  "suite_version": "0.1.0+suite.1",
  "profile": "v3-mustpass",
  "backend": "cpu",
  "device": "dev0",
  "driver": "drv",
  "vendor": "acme",
  "git_commit": "0123456789abcdef0123456789abcdef01234567",
  "git_dirty": false,
  "started_utc": "2026-01-02T03:04:05Z",
  "host": "h",
  "command": "deepport run"
}"#;

#[test]
fn report_files_never_panic_the_readers() {
    small_budget();
    property(
        "results.jsonl line",
        &[RESULT_LINE.as_bytes().to_vec()],
        500,
        |b| {
            if let Ok(t) = std::str::from_utf8(b) {
                let _ = result_from_json_line(t);
            }
        },
    );
    property("run.json", &[RUN_JSON.as_bytes().to_vec()], 300, |b| {
        if let Ok(t) = std::str::from_utf8(b) {
            let _ = serde_json::from_str::<RunInfo>(t);
        }
    });
    // Whole directories through read_dir, merge, verify and resume's reader.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("parsers-report");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ids: std::collections::BTreeSet<String> = ["fp8_gemm(m=64,n=576,k=256)".to_string()].into();
    let jsonl = format!("{RESULT_LINE}\n{RESULT_LINE}\n");
    let mut g = Gen(7);
    for i in 0..150 {
        let (run, res) = if i % 2 == 0 {
            (
                mutate(&mut g, RUN_JSON.as_bytes()),
                jsonl.as_bytes().to_vec(),
            )
        } else {
            (
                RUN_JSON.as_bytes().to_vec(),
                mutate(&mut g, jsonl.as_bytes()),
            )
        };
        std::fs::write(dir.join(report::RUN_JSON), &run).unwrap();
        std::fs::write(dir.join(report::RESULTS_JSONL), &res).unwrap();
        let r = catch_unwind(|| {
            let _ = report::read_dir(&dir);
            let _ = report::merge(&[dir.clone(), dir.clone()]);
            let _ = report::verify(&dir, &ids);
            let _ = report::read_partial_results(&dir);
            let _ = report::html::report_html(std::slice::from_ref(&dir));
        });
        assert!(
            r.is_ok(),
            "a report reader panicked on run.json {:?} / results.jsonl {:?}",
            String::from_utf8_lossy(&run),
            String::from_utf8_lossy(&res)
        );
    }
}

#[test]
fn op_parameters_never_panic() {
    use deepport_conformance::opspec::{self, Params};
    small_budget();
    let mut g = Gen(11);
    for spec in opspec::OPS.iter() {
        let mut seeds: Vec<Vec<u8>> = spec
            .params
            .iter()
            .map(|p| {
                let v = match p.default {
                    opspec::ParamDefault::Value(v) => v,
                    opspec::ParamDefault::Computed(_) => "1",
                };
                format!("{}={v}", p.name).into_bytes()
            })
            .collect();
        seeds.push(b"nope=1".to_vec());
        for seed in &seeds {
            for _ in 0..40 {
                let a = String::from_utf8_lossy(&mutate(&mut g, seed)).into_owned();
                let b = String::from_utf8_lossy(&mutate(&mut g, seed)).into_owned();
                let r = catch_unwind(|| {
                    let _ = Params::parse(spec, &[a.clone(), b.clone()]);
                });
                assert!(
                    r.is_ok(),
                    "{}: Params::parse panicked on {a:?} {b:?}",
                    spec.name
                );
            }
        }
    }
}

#[test]
fn token_lists_never_panic() {
    use deepport_conformance::forward_cmd::{parse_token_json, parse_token_list};
    small_budget();
    let json = std::fs::read(repo().join("golden/model/tokens.json")).expect("golden tokens");
    let golden =
        parse_token_json(std::str::from_utf8(&json).unwrap()).expect("golden tokens parse");
    assert!(!golden.is_empty());
    assert_eq!(
        parse_token_list("0, 1,4294967295").unwrap(),
        vec![0, 1, u32::MAX]
    );
    for bad in ["-1", "4294967296", "1,,2", "1.5", "x", "[1]"] {
        assert!(parse_token_list(bad).is_err(), "{bad:?} was accepted");
    }
    property(
        "token lists",
        &[json, b"0,1,2,3,127".to_vec()],
        400,
        |data| {
            let text = String::from_utf8_lossy(data);
            let _ = parse_token_list(&text);
            let _ = parse_token_json(&text);
        },
    );
}

#[test]
fn shard_index_never_panics_nor_escapes_the_directory() {
    use deepport_model::checkpoint::ShardIndex;
    small_budget();
    let at = Path::new("model.safetensors.index.json");
    let seed = br#"{"metadata": {"total_size": 10},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                       "b.weight": "model-00002-of-00002.safetensors",
                       "c.weight": "model-00001-of-00002.safetensors"}}"#;
    let ix = ShardIndex::parse(std::str::from_utf8(seed).unwrap(), at).unwrap();
    assert_eq!(ix.shard_names.len(), 2);
    assert_eq!(ix.wanted.len(), 3);
    assert_eq!(ix.metadata["total_size"], "10");
    for escape in ["../x.safetensors", "/etc/passwd", "a/b.safetensors", ".."] {
        let text = format!(r#"{{"weight_map": {{"w": "{escape}"}}}}"#);
        let e = ShardIndex::parse(&text, at).expect_err(escape);
        assert!(e.to_string().contains("not a plain file name"), "{e}");
    }
    property("shard index", &[seed.to_vec()], 400, |data| {
        if let Ok(ix) = ShardIndex::parse(&String::from_utf8_lossy(data), at) {
            for n in &ix.shard_names {
                assert_eq!(
                    Path::new(n).file_name().and_then(|f| f.to_str()),
                    Some(n.as_str())
                );
            }
            assert!(ix.wanted.iter().all(|(_, i)| *i < ix.shard_names.len()));
        }
    });
}
