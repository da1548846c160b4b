//! capi/examples/greedy.c, compiled with the system C compiler (`$CC` or
//! `cc`) against libdeepport (this crate's cdylib) and run: it greedily
//! decodes tokens of the golden checkpoint through the C ABI. The first
//! token must be the argmax of the golden (PyTorch) logits, and all of
//! them must be what the Rust API decodes.

use deepport_core::tensor::read_safetensors;
use deepport_model::{Checkpoint, Model, ModelConfig, Numerics};
use std::path::{Path, PathBuf};
use std::process::Command;

const PROMPT: [u32; 8] = [801, 876, 688, 107, 244, 730, 185, 870];
const DECODE: usize = 4;

fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    for d in [deps.parent().map(Path::to_path_buf), Some(deps.clone())]
        .into_iter()
        .flatten()
    {
        if d.join("libdeepport.so").exists() {
            return d;
        }
    }
    panic!("libdeepport.so not found next to {}", deps.display());
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The greedy continuation through the Rust API.
fn rust_greedy(ckpt_dir: &Path) -> Vec<u32> {
    let b = deepport_conformance::registry().create("cpu").expect("cpu");
    let cfg = ModelConfig::from_file(ckpt_dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(ckpt_dir).unwrap();
    let mut m = Model::load(b.as_ref(), &ckpt, &cfg, Numerics::F32, Default::default()).unwrap();
    let l = m.prefill(&PROMPT).unwrap().to_f32_vec();
    let v = cfg.vocab_size;
    let mut next = argmax(&l[(PROMPT.len() - 1) * v..]);
    let mut out = vec![next];
    while out.len() < DECODE {
        next = argmax(&m.decode(next).unwrap().to_f32_vec());
        out.push(next);
    }
    out
}

#[test]
fn greedy_c_program_decodes_the_golden_checkpoint() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ckpt = root.join("golden/model");
    let lib = lib_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("greedy");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(root.join("capi/examples/greedy.c"))
        .arg("-I")
        .arg(root.join("capi/include"))
        .arg("-L")
        .arg(&lib)
        .arg("-ldeepport")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(st.success(), "compiling greedy.c failed");

    let mut cmd = Command::new(&exe);
    cmd.arg(&ckpt).args(["cpu", "f32", &DECODE.to_string()]);
    cmd.args(PROMPT.iter().map(|t| t.to_string()));
    let o = cmd.output().expect("run greedy");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "greedy failed:\n{out}\n{err}");
    assert!(
        out.contains("backends:") && out.contains(" cpu-ref"),
        "{out}"
    );
    assert!(
        out.contains("unknown backend: status 4: unknown backend `no-such-backend`"),
        "{out}"
    );
    let tokens: Vec<u32> = out
        .lines()
        .find_map(|l| l.strip_prefix("tokens:"))
        .unwrap_or_else(|| panic!("no tokens line in\n{out}"))
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(tokens.len(), DECODE, "{out}");

    // The first token against the golden f32 logits of PyTorch's forward.
    let g = read_safetensors(ckpt.join("golden_f32.safetensors")).unwrap();
    let logits = g.tensors["logits"].to_f32_vec();
    let vocab = g.tensors["logits"].shape()[1];
    let row = &logits[(PROMPT.len() - 1) * vocab..PROMPT.len() * vocab];
    assert_eq!(tokens[0], argmax(row), "first token vs golden argmax");
    assert_eq!(tokens, rust_greedy(&ckpt), "C ABI vs Rust API");
}

/// capi/examples/device_ops.c: ops launched by name on device tensors from
/// C, checked against the host path byte for byte, and the error codes.
#[test]
fn device_ops_c_program() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = lib_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device_ops");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(root.join("capi/examples/device_ops.c"))
        .arg("-I")
        .arg(root.join("capi/include"))
        .arg("-L")
        .arg(&lib)
        .arg("-ldeepport")
        .arg("-lm")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(st.success(), "compiling device_ops.c failed");
    let o = Command::new(&exe)
        .arg("cpu")
        .output()
        .expect("run device_ops");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "device_ops failed:\n{out}\n{err}");
    assert!(
        out.contains("ok: device path == host path, byte for byte"),
        "{out}"
    );
    assert!(out.contains("ok: an expert-parallel op"), "{out}");
    assert!(out.contains("all checks passed"), "{out}");
}
