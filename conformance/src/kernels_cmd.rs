//! `deepport kernels`: compile a GPU backend's kernel sources for one
//! architecture, without a GPU, and write the PTX, the cubin and a
//! manifest. What CI runs to prove the kernels compile, and what a
//! developer reads (PTX, register and shared memory use) before a GPU run.

use crate::error::CliError;
use deepport_core::Error;
use std::path::PathBuf;

/// The long help of `deepport kernels` (on the subcommand in main.rs: a
/// variant's doc comment would override it here).
pub const LONG_ABOUT: &str =
    "Compile every kernel source of a GPU backend for one architecture with \
the backend's run-time compiler, as the backend does on a device, but with no GPU: \
NVRTC for `cuda`, hiprtc for `rocm`. For `cuda` it writes, under --out DIR, `<source>.<arch>.ptx` and `<source>.<arch>.cubin` \
(<source> without `.cu`) for each source that applies to the architecture (sm_90a: the \
portable sources and the Hopper ones; sm_80, sm_86, sm_89, sm_90, …: the portable ones) and \
`manifest.json` (backend, arch, compiler version and library, and per source: its target, \
entry points, files and sizes, and the compiler's log).

For `rocm` (--arch gfx90a, gfx908, gfx942, …) it writes `<source>.<arch>.hsaco` (the AMD code \
object hiprtc returns, what hipModuleLoadData loads) for the portable CUDA sources compiled \
with -DDP_HIP (wavefront 64) plus the ROCm-only MFMA sources where the architecture has \
them (gfx90a, gfx94x, gfx950), and `manifest.json`. Each code object must be for the \
architecture asked, define exactly the kernels its source declares, and use wavefront 64. \
hiprtc comes from $DEEPPORT_HIPRTC_LIB, libhiprtc.so*, or the HIP runtime ($DEEPPORT_HIP_LIB, \
libamdhip64.so*: ROCm 5.x keeps hiprtc there; Debian: libamdhip64-dev). ROCm 5's hiprtc \
cannot compile gfx94x/gfx950 (it aborts), so those fail with the reason unless ROCm is 6 or \
newer.

Every source is compiled even when one fails; each PTX must define exactly the entry points \
its source declares.

NVRTC is found through $DEEPPORT_NVRTC (a path to libnvrtc.so.*), else the dynamic loader \
(libnvrtc.so.13, libnvrtc.so.12, libnvrtc.so; LD_LIBRARY_PATH), $CUDA_HOME/lib64, and the \
PyPI wheels (`pip install nvidia-cuda-nvrtc-cu12`) of any python3 on PATH.

Exit status: 0 when every source compiled; 1 when NVRTC (hiprtc) cannot be loaded (the message names \
every place tried) or a source failed to compile (its NVRTC log is printed); 2 for a usage \
error (unknown backend or architecture).";

/// Arguments of `deepport kernels`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  deepport kernels --backend cuda --arch sm_90a --out target/kernels/sm_90a
  DEEPPORT_NVRTC=/path/to/libnvrtc.so.12 deepport kernels --arch sm_80 --out k80
  deepport kernels --backend rocm --arch gfx90a --out target/kernels/gfx90a")]
pub struct KernelsArgs {
    /// The backend whose kernels to compile: `cuda` (NVRTC) or `rocm`
    /// (hiprtc).
    #[arg(long, default_value = "cuda")]
    pub backend: String,
    /// Target architecture: sm_90a (Hopper: every source), or sm_80,
    /// sm_86, sm_87, sm_89, sm_90, sm_100, sm_120 (the portable sources);
    /// for rocm a gfx name (gfx90a, gfx908, gfx942, …).
    #[arg(long, default_value = "sm_90a")]
    pub arch: String,
    /// Directory to write the PTX, cubins and manifest.json to (created).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `deepport kernels`: `Ok(true)` when every source compiled.
pub fn run(a: &KernelsArgs) -> Result<bool, CliError> {
    match a.backend.as_str() {
        "cuda" => cuda(a),
        "rocm" => rocm(a),
        other => Err(CliError::usage(format!(
            "backend `{other}` has no kernels to compile; only `cuda` and `rocm` have kernels"
        ))),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_a: &KernelsArgs) -> Result<bool, CliError> {
    Err(CliError::Failed(Error::Other(
        "this build of deepport has no cuda backend (cargo feature `cuda`)".into(),
    )))
}

#[cfg(feature = "cuda")]
fn cuda(a: &KernelsArgs) -> Result<bool, CliError> {
    use deepport_cuda::launch::Target;
    use deepport_cuda::nvrtc;
    use serde_json::json;

    let sources = match nvrtc::sources_for(&a.arch) {
        Ok(s) => s,
        Err(_) => {
            return Err(CliError::usage(format!(
                "unknown architecture `{}` for backend cuda; known: {}",
                a.arch,
                nvrtc::KNOWN_ARCHS.join(", ")
            )))
        }
    };
    let version = nvrtc::version().map_err(|reason| {
        CliError::Failed(Error::Unavailable {
            backend: "cuda".into(),
            reason,
        })
    })?;
    let library = nvrtc::library_path()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let io = |path: &std::path::Path, source: std::io::Error| {
        CliError::Failed(Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(&a.out).map_err(|e| io(&a.out, e))?;
    eprintln!(
        "compiling {} cuda kernel sources for {} with NVRTC {}.{} ({library})",
        sources.len(),
        a.arch,
        version.0,
        version.1
    );
    let mut entries = Vec::new();
    let mut failed = Vec::new();
    for s in &sources {
        let stem = s.name.strip_suffix(".cu").unwrap_or(s.name);
        let target = match s.target {
            Target::Portable => "portable",
            Target::Sm90a => "sm90a",
        };
        let compiled = nvrtc::compile(s, &a.arch).and_then(|c| {
            nvrtc::check_entries(s, &c)?;
            Ok(c)
        });
        let c = match compiled {
            Ok(c) => c,
            Err(e) => {
                eprintln!("FAILED {}: {e}", s.name);
                failed.push(json!({"source": s.name, "target": target, "error": e.to_string()}));
                continue;
            }
        };
        let ptx_name = format!("{stem}.{}.ptx", a.arch);
        let cubin_name = format!("{stem}.{}.cubin", a.arch);
        let ptx_path = a.out.join(&ptx_name);
        let cubin_path = a.out.join(&cubin_name);
        std::fs::write(&ptx_path, c.ptx.as_bytes()).map_err(|e| io(&ptx_path, e))?;
        std::fs::write(&cubin_path, &c.cubin).map_err(|e| io(&cubin_path, e))?;
        let fp_path = a.out.join(nvrtc::prebuilt_names(s, &a.arch).2);
        std::fs::write(&fp_path, nvrtc::fingerprint(s)).map_err(|e| io(&fp_path, e))?;
        println!(
            "ok {} ({target}): {} entries, ptx {} bytes, cubin {} bytes",
            s.name,
            s.entries.len(),
            c.ptx.len(),
            c.cubin.len()
        );
        if !c.log.trim().is_empty() {
            eprintln!("{}: NVRTC log:\n{}", s.name, c.log.trim_end());
        }
        entries.push(json!({
            "source": s.name,
            "target": target,
            "entries": s.entries,
            "ptx": ptx_name,
            "ptx_bytes": c.ptx.len(),
            "cubin": cubin_name,
            "cubin_bytes": c.cubin.len(),
            "log": c.log,
        }));
    }
    let manifest = json!({
        "backend": "cuda",
        "arch": a.arch,
        "compiler": format!("NVRTC {}.{}", version.0, version.1),
        "compiler_library": library,
        "sources": entries,
        "failed": failed,
    });
    let path = a.out.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| CliError::Failed(Error::Other(e.to_string())))?;
    std::fs::write(&path, text + "\n").map_err(|e| io(&path, e))?;
    println!(
        "kernels: {} compiled, {} failed for {} -> {}",
        sources.len() - failed.len(),
        failed.len(),
        a.arch,
        a.out.display()
    );
    Ok(failed.is_empty())
}

#[cfg(not(feature = "rocm"))]
fn rocm(_a: &KernelsArgs) -> Result<bool, CliError> {
    Err(CliError::Failed(Error::Other(
        "this build of deepport has no rocm backend (cargo feature `rocm`)".into(),
    )))
}

/// `deepport kernels --backend rocm`: every source that runs on `a.arch`
/// (the portable CUDA sources, and the MFMA ones where the arch has
/// them), compiled by hiprtc, checked and written as `.hsaco`.
#[cfg(feature = "rocm")]
fn rocm(a: &KernelsArgs) -> Result<bool, CliError> {
    use deepport_rocm::{elf, hiprtc, mfma};
    use serde_json::json;

    let gfx = a.arch.as_str();
    let base = gfx.split(':').next().unwrap_or(gfx);
    let is_gfx = base
        .strip_prefix("gfx")
        .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_hexdigit()));
    if !is_gfx {
        return Err(CliError::usage(format!(
            "`{gfx}` is not an AMD GPU architecture for backend rocm (expected a gfx name: \
             {}, …)",
            hiprtc::KNOWN_ARCHS.join(", ")
        )));
    }
    let version = hiprtc::probe().map_err(|reason| {
        CliError::Failed(Error::Unavailable {
            backend: "rocm".into(),
            reason: format!("hiprtc cannot be loaded: {reason}"),
        })
    })?;
    let mut sources = deepport_rocm::sources();
    sources.extend(mfma::sources_for(gfx));
    let io = |path: &std::path::Path, source: std::io::Error| {
        CliError::Failed(Error::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(&a.out).map_err(|e| io(&a.out, e))?;
    eprintln!(
        "compiling {} rocm kernel sources for {gfx} with {version}",
        sources.len()
    );
    let mut entries = Vec::new();
    let mut failed = Vec::new();
    for s in &sources {
        let stem = s.name.strip_suffix(".cu").unwrap_or(s.name);
        let checked = hiprtc::compile(s.name, s.text, gfx).and_then(|c| {
            let co = elf::parse(&c.code)?;
            let mut want: Vec<String> = s.entries.iter().map(|e| e.to_string()).collect();
            want.sort();
            let bad = |m: String| Error::Other(format!("{}: {m}", s.name));
            if co.gfx != Some(base) {
                return Err(bad(format!(
                    "code object is for mach {:#x} ({:?}), not {base}",
                    co.mach, co.gfx
                )));
            }
            if co.kernels != want {
                return Err(bad(format!(
                    "kernels {:?}, declared entries {want:?}",
                    co.kernels
                )));
            }
            if co.wavefront_sizes.len() != want.len() || co.wavefront_sizes.iter().any(|&w| w != 64)
            {
                return Err(bad(format!(
                    "wavefront sizes {:?} (the kernels need 64)",
                    co.wavefront_sizes
                )));
            }
            Ok(c)
        });
        let c = match checked {
            Ok(c) => c,
            Err(e) => {
                eprintln!("FAILED {}: {e}", s.name);
                failed.push(json!({"source": s.name, "error": e.to_string()}));
                continue;
            }
        };
        let file = format!("{stem}.{gfx}.hsaco");
        let path = a.out.join(&file);
        std::fs::write(&path, &c.code).map_err(|e| io(&path, e))?;
        println!(
            "ok {}: {} entries, code object {} bytes",
            s.name,
            s.entries.len(),
            c.code.len()
        );
        if !c.log.trim().is_empty() {
            eprintln!("{}: hiprtc log:\n{}", s.name, c.log.trim_end());
        }
        entries.push(json!({
            "source": s.name,
            "entries": s.entries,
            "code_object": file,
            "bytes": c.code.len(),
            "log": c.log,
        }));
    }
    let manifest = json!({
        "backend": "rocm",
        "arch": gfx,
        "compiler": version,
        "options": hiprtc::options(gfx),
        "sources": entries,
        "failed": failed,
    });
    let path = a.out.join("manifest.json");
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| CliError::Failed(Error::Other(e.to_string())))?;
    std::fs::write(&path, text + "\n").map_err(|e| io(&path, e))?;
    println!(
        "kernels: {} compiled, {} failed for {gfx} -> {}",
        sources.len() - failed.len(),
        failed.len(),
        a.out.display()
    );
    Ok(failed.is_empty())
}
