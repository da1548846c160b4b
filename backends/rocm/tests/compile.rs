//! Compiles every portable kernel source of the CUDA backend with hiprtc
//! for AMD architectures (`-DDP_HIP`, wavefront 64). Without hiprtc the
//! test prints `skipped: <reason>` and passes, unless `DEEPPORT_REQUIRE`
//! names `hiprtc`.

use deepport_rocm::{hiprtc, sources};
use std::time::Instant;

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split([',', ' ']).any(|t| t == "hiprtc"))
        .unwrap_or(false)
}

fn archs() -> Vec<String> {
    match std::env::var("DEEPPORT_HIP_ARCHS") {
        Ok(v) if !v.is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => vec!["gfx90a".into(), "gfx908".into()],
    }
}

#[test]
fn every_portable_source_compiles_for_amd() {
    match hiprtc::probe() {
        Err(why) => {
            assert!(!required(), "DEEPPORT_REQUIRE names hiprtc, but: {why}");
            println!("skipped: {why}");
            return;
        }
        Ok(v) => println!("{v}"),
    }
    let srcs = sources();
    assert!(!srcs.is_empty(), "no portable kernel sources");
    let mut failures = Vec::new();
    for gfx in archs() {
        for s in &srcs {
            let t = Instant::now();
            match hiprtc::compile(s.name, s.text, &gfx) {
                Ok(c) => {
                    let ms = t.elapsed().as_millis();
                    println!(
                        "{gfx} {:<12} {:>8} bytes {:>6} ms",
                        s.name,
                        c.code.len(),
                        ms
                    );
                    if !c.log.trim().is_empty() {
                        println!("  log: {}", c.log.trim());
                    }
                    if c.code.len() < 4 || &c.code[..4] != b"\x7fELF" {
                        failures.push(format!("{gfx} {}: the code object is not an ELF", s.name));
                    }
                }
                Err(e) => {
                    println!(
                        "{gfx} {:<12} FAILED after {} ms",
                        s.name,
                        t.elapsed().as_millis()
                    );
                    failures.push(format!("{gfx} {}: {e}", s.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
