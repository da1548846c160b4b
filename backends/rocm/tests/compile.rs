//! Compiles every portable kernel source of the CUDA backend with hiprtc
//! for AMD architectures (`-DDP_HIP`, wavefront 64): gfx90a and gfx908
//! (CDNA) and gfx1030 (RDNA 2, forced to wavefront 64). Each code object's
//! target, kernel list and wavefront sizes are checked. Without hiprtc the
//! test prints `skipped: <reason>` and passes, unless `DEEPPORT_REQUIRE`
//! names `hiprtc`.

use deepport_core::Error;
use deepport_rocm::{elf, hiprtc, sources};
use std::time::Instant;

fn required() -> bool {
    std::env::var("DEEPPORT_REQUIRE")
        .map(|v| v.split([',', ' ']).any(|t| t == "hiprtc"))
        .unwrap_or(false)
}

fn archs() -> Vec<String> {
    match std::env::var("DEEPPORT_HIP_ARCHS") {
        Ok(v) if !v.is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => vec!["gfx90a".into(), "gfx908".into(), "gfx1030".into()],
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
                    match elf::parse(&c.code) {
                        Err(e) => failures.push(format!("{gfx} {}: {e}", s.name)),
                        Ok(co) => {
                            if co.gfx != Some(gfx.as_str()) {
                                failures.push(format!(
                                    "{gfx} {}: code object is for mach {:#x} ({:?})",
                                    s.name, co.mach, co.gfx
                                ));
                            }
                            if co.wavefront_sizes.len() != s.entries.len()
                                || co.wavefront_sizes.iter().any(|&w| w != 64)
                            {
                                failures.push(format!(
                                    "{gfx} {}: wavefront sizes {:?} (port.cuh under DP_HIP needs 64)",
                                    s.name, co.wavefront_sizes
                                ));
                            }
                            let mut want: Vec<String> =
                                s.entries.iter().map(|e| e.to_string()).collect();
                            want.sort();
                            if co.kernels != want {
                                failures.push(format!(
                                    "{gfx} {}: kernels {:?}, declared entries {want:?}",
                                    s.name, co.kernels
                                ));
                            }
                        }
                    }
                }
                Err(Error::NotSupported { reason, .. }) => {
                    println!("{gfx} {:<12} not compiled: {reason}", s.name);
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

/// On ROCm 5.x a target its hiprtc does not know is refused with a reason
/// (hiprtc itself would abort the process).
#[test]
fn unknown_targets_are_refused_not_aborted() {
    if hiprtc::probe().is_err() || std::env::var_os("DEEPPORT_HIPRTC_ANY_ARCH").is_some() {
        println!("skipped: no hiprtc, or DEEPPORT_HIPRTC_ANY_ARCH set");
        return;
    }
    let s = sources()[0];
    match hiprtc::compile(s.name, s.text, "gfx942") {
        // ROCm 6 knows gfx942.
        Ok(c) => assert_eq!(elf::parse(&c.code).expect("an ELF").gfx, Some("gfx942")),
        Err(Error::NotSupported { reason, .. }) => {
            println!("gfx942: {reason}");
            assert!(reason.contains("gfx942"), "{reason}");
        }
        Err(e) => panic!("gfx942: {e}"),
    }
}
