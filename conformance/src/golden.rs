//! The golden data: where it lives, and `deepport golden verify`, which
//! checks every file against `golden/manifest.yaml` (SHA-256 and size) and
//! names each file that is missing or altered.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The golden directory: `$DEEPPORT_GOLDEN`, else `golden/` next to this
/// crate in the source tree.
pub fn default_dir() -> PathBuf {
    std::env::var_os("DEEPPORT_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden"))
}

#[derive(Debug, Deserialize)]
struct Manifest {
    files: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    path: String,
    sha256: String,
    size: u64,
}

/// What is wrong with one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Missing,
    /// Size or content differs from the manifest.
    Altered {
        expected_size: u64,
        actual_size: u64,
    },
}

/// Result of verifying a golden directory.
#[derive(Clone, Debug, Default)]
pub struct Verification {
    pub checked: usize,
    /// (relative path, problem), in manifest order.
    pub problems: Vec<(String, Problem)>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks every file listed in `dir/manifest.yaml`.
pub fn verify(dir: &Path) -> Result<Verification, String> {
    let mpath = dir.join("manifest.yaml");
    let text = std::fs::read_to_string(&mpath).map_err(|e| format!("{}: {e}", mpath.display()))?;
    let m: Manifest =
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", mpath.display()))?;
    if m.files.is_empty() {
        return Err(format!("{}: lists no files", mpath.display()));
    }
    let mut v = Verification::default();
    for e in &m.files {
        if e.path.contains("..") || Path::new(&e.path).is_absolute() {
            return Err(format!(
                "{}: entry `{}` leaves the golden directory",
                mpath.display(),
                e.path
            ));
        }
        v.checked += 1;
        match std::fs::read(dir.join(&e.path)) {
            Err(_) => v.problems.push((e.path.clone(), Problem::Missing)),
            Ok(bytes) => {
                if bytes.len() as u64 != e.size
                    || !sha256_hex(&bytes).eq_ignore_ascii_case(&e.sha256)
                {
                    v.problems.push((
                        e.path.clone(),
                        Problem::Altered {
                            expected_size: e.size,
                            actual_size: bytes.len() as u64,
                        },
                    ));
                }
            }
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn committed_golden_data_verifies_and_tampering_is_named() {
        let dir = default_dir();
        let v = verify(&dir).expect("manifest readable");
        assert!(v.checked >= 30, "manifest lists {} files", v.checked);
        assert!(
            v.problems.is_empty(),
            "golden data differs from the manifest: {:?}",
            v.problems
        );

        // A copy with one file altered and one removed.
        let tmp =
            std::env::temp_dir().join(format!("deepport-golden-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(tmp.join("model")).unwrap();
        std::fs::copy(dir.join("manifest.yaml"), tmp.join("manifest.yaml")).unwrap();
        let mut cfg = std::fs::read(dir.join("model/config.json")).unwrap();
        cfg[10] ^= 1;
        std::fs::write(tmp.join("model/config.json"), cfg).unwrap();
        let v = verify(&tmp).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(v
            .problems
            .iter()
            .any(|(p, pr)| p == "model/config.json" && matches!(pr, Problem::Altered { .. })));
        assert!(v
            .problems
            .iter()
            .any(|(p, pr)| p == "model/tokens.json" && *pr == Problem::Missing));
    }
}
