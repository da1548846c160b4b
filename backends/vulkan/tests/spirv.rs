//! The committed SPIR-V (`spirv/*.spv`, used when glslangValidator is
//! absent) must equal what glslangValidator makes of `shaders/*.comp`.
//! Refresh with `DEEPPORT_VULKAN_BLESS=1 cargo test -p deepport-vulkan --test spirv`.

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
        let o = Command::new("glslangValidator")
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
