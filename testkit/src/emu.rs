//! Runs host-emulation harnesses: C++ programs that include a backend's
//! real kernel sources through `backends/cuda/emu/emu.h` (a host model of
//! the CUDA/HIP subset the kernels use, see `backends/cuda/emu/README.md`),
//! check them against independent references and exit non-zero on any
//! failed check. Used by `backends/cuda/tests/emulate.rs` and
//! `backends/rocm/tests/emulate.rs`.
//!
//! The harness is compiled with the system C++ compiler (`$CXX`, else
//! `c++`, else `g++`). Without one, [`Emu::run`] prints "skipped: no C++
//! compiler" and returns `None`, unless `DEEPPORT_REQUIRE` (a comma list)
//! names `emu`, which makes it a failure.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Longest a harness may run (they take seconds; the emulation itself
/// aborts on a barrier deadlock, this guards against anything else).
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// What a harness printed and whether it succeeded.
pub struct Outcome {
    /// Whether the harness exited with status 0.
    pub success: bool,
    /// Its standard output followed by its standard error.
    pub output: String,
}

/// Where a crate's harnesses live and what they depend on.
pub struct Emu {
    /// The directory of `<harness>.cpp`.
    pub harness_dir: PathBuf,
    /// Every directory whose files the harnesses include (a change in any
    /// of them recompiles).
    pub source_dirs: Vec<PathBuf>,
    /// Where executables and logs go (`CARGO_TARGET_TMPDIR` of the test).
    pub out_dir: PathBuf,
}

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split([',', ' ']).any(|s| s.trim() == "emu"))
        .unwrap_or(false)
}

/// The C++ compiler to use, if one runs.
fn compiler() -> Option<String> {
    let mut candidates = Vec::new();
    if let Ok(cxx) = std::env::var("CXX") {
        if !cxx.trim().is_empty() {
            candidates.push(cxx);
        }
    }
    candidates.push("c++".into());
    candidates.push("g++".into());
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    })
}

impl Emu {
    /// Newest modification time of the harnesses and the sources.
    fn newest_source(&self) -> SystemTime {
        let mut newest = SystemTime::UNIX_EPOCH;
        for dir in std::iter::once(&self.harness_dir).chain(&self.source_dirs) {
            for entry in fs::read_dir(dir)
                .expect("source directory readable")
                .flatten()
            {
                if let Ok(t) = entry.metadata().and_then(|m| m.modified()) {
                    newest = newest.max(t);
                }
            }
        }
        newest
    }

    /// Compiles `<harness>.cpp` with `args` (defines, include paths) and
    /// runs it; `None` when there is no compiler (and `emu` is not
    /// required).
    pub fn run(&self, harness: &str, args: &[&str]) -> Option<Outcome> {
        let Some(cxx) = compiler() else {
            assert!(
                !required(),
                "DEEPPORT_REQUIRE names `emu` but no C++ compiler runs ($CXX, c++, g++)"
            );
            println!("skipped: no C++ compiler");
            return None;
        };
        let tag: String = args
            .iter()
            .filter(|d| d.starts_with("-D"))
            .map(|d| d.trim_start_matches("-D").replace(['=', '-'], "_"))
            .collect::<Vec<_>>()
            .join("-");
        let out_dir = self.out_dir.join("emu");
        fs::create_dir_all(&out_dir).expect("tmp dir");
        let exe = out_dir.join(format!("{harness}-{tag}"));
        let fresh = fs::metadata(&exe)
            .and_then(|m| m.modified())
            .map(|t| t > self.newest_source())
            .unwrap_or(false);
        if !fresh {
            let t0 = Instant::now();
            let out = Command::new(&cxx)
                .args(["-std=c++20", "-O1", "-pthread"])
                .args(args)
                .arg(self.harness_dir.join(format!("{harness}.cpp")))
                .arg("-o")
                .arg(&exe)
                .output()
                .expect("compiler runs");
            assert!(
                out.status.success(),
                "{cxx} failed on {harness}.cpp {args:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            println!("compiled {harness} {args:?} in {:.1?}", t0.elapsed());
        }
        // Output goes to a file: a long failure listing cannot block the pipe.
        let log = out_dir.join(format!("{harness}-{tag}.log"));
        let t0 = Instant::now();
        let mut child = Command::new(&exe)
            .stdout(File::create(&log).expect("log file"))
            .stderr(File::create(log.with_extension("err")).expect("log file"))
            .spawn()
            .expect("harness starts");
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break Some(s);
            }
            if t0.elapsed() > RUN_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut output = fs::read_to_string(&log).unwrap_or_default();
        output += &fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        println!("{harness} {args:?} ran in {:.1?}:\n{output}", t0.elapsed());
        let Some(status) = status else {
            panic!("{harness} {args:?} timed out after {RUN_LIMIT:?}");
        };
        Some(Outcome {
            success: status.success(),
            output,
        })
    }

    /// Runs `harness` and asserts it passed with its summary line.
    pub fn passes(&self, harness: &str, args: &[&str]) {
        if let Some(o) = self.run(harness, args) {
            assert!(o.success, "{harness} {args:?} failed:\n{}", o.output);
            assert!(
                o.output.contains("PASSED"),
                "no summary line:\n{}",
                o.output
            );
        }
    }

    /// Runs a deliberately broken variant of `harness` and asserts it
    /// failed with `expect` in its output.
    pub fn fails(&self, harness: &str, args: &[&str], expect: &str) {
        if let Some(o) = self.run(harness, args) {
            assert!(
                !o.success,
                "{harness} {args:?}: the broken kernel passed:\n{}",
                o.output
            );
            assert!(
                o.output.contains(expect),
                "{harness} {args:?}: `{expect}` not in the output:\n{}",
                o.output
            );
        }
    }
}
