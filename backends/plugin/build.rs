//! Builds the example C plugin (plugin/example/example_plugin.c) into a
//! shared library, `libdeepport_example_plugin.so` (`.dylib`, `.dll`), and
//! copies it next to the binaries of this profile (`target/release/` for
//! `cargo build --release`), where `deepport run --plugin` can find it.
//! The compiler is the one the `cc` crate picks (CC, or the platform's).

use std::path::{Path, PathBuf};

fn lib_name(stem: &str) -> String {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    match os.as_str() {
        "windows" => format!("{stem}.dll"),
        "macos" | "ios" => format!("lib{stem}.dylib"),
        _ => format!("lib{stem}.so"),
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.join("../..");
    let src = root.join("plugin/example/example_plugin.c");
    let include = root.join("plugin/include");
    println!("cargo:rerun-if-changed={}", src.display());
    println!(
        "cargo:rerun-if-changed={}",
        include.join("deepport_plugin.h").display()
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let so = out.join(lib_name("deepport_example_plugin"));

    let compiler = cc::Build::new()
        .opt_level(2)
        .warnings(true)
        .cargo_metadata(false)
        .get_compiler();
    let mut cmd = compiler.to_command();
    if compiler.is_like_msvc() {
        cmd.arg("/LD")
            .arg(&src)
            .arg(format!("/I{}", include.display()));
        cmd.arg(format!("/Fe{}", so.display()));
    } else {
        cmd.args(["-shared", "-fPIC", "-O2", "-std=c11"])
            .arg("-I")
            .arg(&include)
            .arg(&src)
            .arg("-o")
            .arg(&so)
            .arg("-lm");
    }
    let status = cmd.status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("compiling the example plugin ({cmd:?}) failed: {s}"),
        Err(e) => panic!("cannot run the C compiler for the example plugin ({cmd:?}): {e}"),
    }
    println!("cargo:rustc-env=DEEPPORT_EXAMPLE_PLUGIN={}", so.display());

    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out: copy the library
    // to target/<profile>/ (best effort: a read-only target is not fatal).
    if let Some(profile_dir) = out.ancestors().nth(3) {
        let dst = profile_dir.join(lib_name("deepport_example_plugin"));
        if let Err(e) = copy_atomic(&so, &dst) {
            println!(
                "cargo:warning=could not copy the example plugin to {}: {e}",
                dst.display()
            );
        }
    }
}

fn copy_atomic(src: &Path, dst: &Path) -> std::io::Result<()> {
    let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, dst)
}
