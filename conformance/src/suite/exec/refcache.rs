//! The on-disk cache of reference outputs.
//!
//! `cpu-ref` is slow by design (plain loops, f64 accumulation), and its
//! outputs for a case depend only on the case: its id, its seed and the
//! suite version. Each is computed once per machine and kept as a
//! safetensors file under `target/deepport-refcache/` (or
//! `$DEEPPORT_REFCACHE`; `DEEPPORT_REFCACHE=off` disables the cache).
//!
//! A cache file is never trusted blindly: its metadata records the case id,
//! seed, suite version and a checksum of every tensor (name, dtype, shape,
//! bytes); a file that does not parse or does not match is recomputed and
//! rewritten. Files are written to a temporary name and renamed into place,
//! so concurrent runs never see half a file.

use crate::opspec::Outputs;
use crate::types::{CaseSpec, SUITE_VERSION};
use deepport_core::tensor::{parse_safetensors, serialize_safetensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the cache directory (`off` disables it).
pub const ENV: &str = "DEEPPORT_REFCACHE";

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a, continued from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Checksum of a set of outputs: every name, dtype, shape and byte.
pub fn checksum(outputs: &Outputs) -> u64 {
    let mut h = FNV_OFFSET;
    for (name, t) in outputs {
        h = fnv1a(h, name.as_bytes());
        h = fnv1a(h, &[0]);
        h = fnv1a(h, t.dtype().to_string().as_bytes());
        h = fnv1a(h, &[0]);
        for &d in t.shape() {
            h = fnv1a(h, &(d as u64).to_le_bytes());
        }
        h = fnv1a(h, &(t.bytes().len() as u64).to_le_bytes());
        h = fnv1a(h, t.bytes());
    }
    h
}

/// Where the cache lives, or `None` when it is disabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefCache {
    dir: Option<PathBuf>,
    /// Entries larger than this many bytes are not stored.
    max_entry: u64,
}

/// What a lookup found (for tests and messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A valid file was read.
    Hit,
    /// No file: computed (and stored when the cache is enabled).
    Miss,
    /// A file was there but did not verify: recomputed and rewritten.
    Corrupt,
    /// The cache is disabled.
    Disabled,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// References larger than this are computed each time, not stored: a
/// multi-gigabyte entry costs more disk and memory (it is serialized in
/// one buffer) than it saves.
pub const MAX_ENTRY_BYTES: u64 = 1 << 30;

impl RefCache {
    /// A cache in `dir` (created on first store).
    pub fn at(dir: impl Into<PathBuf>) -> RefCache {
        RefCache {
            dir: Some(dir.into()),
            max_entry: MAX_ENTRY_BYTES,
        }
    }

    /// No caching: every reference is computed.
    pub fn disabled() -> RefCache {
        RefCache {
            dir: None,
            max_entry: MAX_ENTRY_BYTES,
        }
    }

    /// The same cache, storing only entries of at most `bytes`.
    pub fn with_max_entry(self, bytes: u64) -> RefCache {
        RefCache {
            max_entry: bytes,
            ..self
        }
    }

    /// The cache directory, if enabled.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The default cache: `$DEEPPORT_REFCACHE` (`off` disables), else
    /// `deepport-refcache/` in the cargo target directory this program was
    /// built in, else in the system's temporary directory.
    pub fn from_env() -> RefCache {
        match std::env::var_os(ENV) {
            Some(v) if v == "off" || v == "0" => RefCache::disabled(),
            Some(v) if !v.is_empty() => RefCache::at(PathBuf::from(v)),
            _ => RefCache::at(
                target_dir()
                    .unwrap_or_else(std::env::temp_dir)
                    .join("deepport-refcache"),
            ),
        }
    }

    /// The cache file of a case.
    pub fn path_of(&self, spec: &CaseSpec) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let key = format!("{}\0{}\0{}", spec.id, spec.seed, SUITE_VERSION);
        let h = fnv1a(FNV_OFFSET, key.as_bytes());
        // A readable prefix (the family) and a hash of the whole key.
        let stem: String = spec
            .family
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .take(40)
            .collect();
        Some(dir.join(format!("{stem}-{h:016x}.safetensors")))
    }

    fn metadata(spec: &CaseSpec, outputs: &Outputs) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("deepport.refcache".to_string(), "1".to_string()),
            ("id".to_string(), spec.id.clone()),
            ("seed".to_string(), spec.seed.to_string()),
            ("suite_version".to_string(), SUITE_VERSION.to_string()),
            (
                "checksum".to_string(),
                format!("{:016x}", checksum(outputs)),
            ),
        ])
    }

    /// Reads the cached outputs of `spec`: `Ok(None)` when there is no file,
    /// `Err(why)` when the file is there but does not verify.
    pub fn read(&self, spec: &CaseSpec) -> Result<Option<Outputs>, String> {
        let Some(path) = self.path_of(spec) else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let file = parse_safetensors(&path, &bytes).map_err(|e| e.to_string())?;
        let want = Self::metadata(spec, &file.tensors);
        for key in ["deepport.refcache", "id", "seed", "suite_version"] {
            if file.metadata.get(key) != want.get(key) {
                return Err(format!(
                    "{}: `{key}` is {:?}, expected {:?}",
                    path.display(),
                    file.metadata.get(key),
                    want.get(key)
                ));
            }
        }
        if file.metadata.get("checksum") != want.get("checksum") {
            return Err(format!(
                "{}: checksum mismatch (stored {:?}, computed {:?})",
                path.display(),
                file.metadata.get("checksum"),
                want.get("checksum")
            ));
        }
        Ok(Some(file.tensors))
    }

    /// Stores the outputs of `spec` (atomically: temporary file, then rename).
    pub fn write(&self, spec: &CaseSpec, outputs: &Outputs) -> Result<(), String> {
        let Some(path) = self.path_of(spec) else {
            return Ok(());
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let bytes = serialize_safetensors(outputs, &Self::metadata(spec, outputs))
            .map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("{}: {e}", path.display())
        })
    }

    /// The cached outputs of `spec`, or `compute()`'s (stored for next
    /// time). A file that does not verify is reported on stderr,
    /// recomputed and rewritten. A failure to store is only a warning.
    pub fn get_or_compute(
        &self,
        spec: &CaseSpec,
        compute: impl FnOnce() -> Result<Outputs, String>,
    ) -> (Result<Outputs, String>, Lookup) {
        if self.dir.is_none() {
            return (compute(), Lookup::Disabled);
        }
        let lookup = match self.read(spec) {
            Ok(Some(o)) => return (Ok(o), Lookup::Hit),
            Ok(None) => Lookup::Miss,
            Err(why) => {
                eprintln!(
                    "warning: reference cache for {}: {why}; recomputing",
                    spec.id
                );
                Lookup::Corrupt
            }
        };
        let out = compute();
        if let Ok(o) = &out {
            let bytes: u64 = o.values().map(|t| t.bytes().len() as u64).sum();
            if bytes > self.max_entry {
                // Recomputing is cheaper than storing (and serializing in
                // memory) gigabytes: DeepEP's 8-rank shapes.
                return (out, lookup);
            }
            if let Err(e) = self.write(spec, o) {
                eprintln!("warning: cannot store the reference of {}: {e}", spec.id);
            }
        }
        (out, lookup)
    }
}

/// The cargo target directory the running program was built in: the
/// parent of `debug/` or `release/` (or of their `deps/`) holding it.
fn target_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent()?;
    }
    let profile = dir.file_name()?.to_str()?;
    // `target/debug`, `target/release`, or a custom profile next to them.
    let target = dir.parent()?;
    let looks_like_cargo = target.join("CACHEDIR.TAG").is_file()
        || matches!(profile, "debug" | "release")
            && target.join(profile).join(".fingerprint").is_dir();
    looks_like_cargo.then(|| target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Source;
    use deepport_core::{DType, HostTensor};
    use std::cell::Cell;

    fn spec(id: &str, seed: u64) -> CaseSpec {
        CaseSpec {
            id: id.into(),
            family: "add".into(),
            params: BTreeMap::new(),
            seed,
            profiles: Default::default(),
            tolerances: BTreeMap::new(),
            source: Source::Generated,
            origin: "test".into(),
        }
    }

    fn outputs(v: f32) -> Outputs {
        BTreeMap::from([
            (
                "out".to_string(),
                HostTensor::from_f32(DType::BF16, &[2, 2], &[v, 1.0, -2.0, 0.5]),
            ),
            ("idx".to_string(), HostTensor::from_i64(&[3], &[0, 7, 2])),
        ])
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "deepport-refcache-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn checksum_sees_every_part() {
        let base = checksum(&outputs(3.0));
        assert_eq!(base, checksum(&outputs(3.0)));
        assert_ne!(base, checksum(&outputs(3.5)), "a value");
        let mut o = outputs(3.0);
        let t = o.remove("out").unwrap();
        o.insert("out2".into(), t.clone());
        assert_ne!(base, checksum(&o), "a name");
        let mut o = outputs(3.0);
        o.insert("out".into(), t.clone().reshape(&[4]).unwrap());
        assert_ne!(base, checksum(&o), "a shape");
        let mut o = outputs(3.0);
        o.insert("out".into(), t.to_dtype(DType::F16));
        assert_ne!(base, checksum(&o), "a dtype");
        // Known FNV-1a value: "a" hashes to 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn large_entries_are_computed_each_time() {
        let dir = scratch("large");
        let s = spec("add(n=4)", 7);
        let size: u64 = outputs(3.0).values().map(|t| t.bytes().len() as u64).sum();
        let calls = Cell::new(0);
        let compute = || {
            calls.set(calls.get() + 1);
            Ok(outputs(3.0))
        };
        let small = RefCache::at(&dir).with_max_entry(size - 1);
        for _ in 0..2 {
            let (o, l) = small.get_or_compute(&s, compute);
            assert_eq!((o.unwrap(), l), (outputs(3.0), Lookup::Miss));
        }
        assert_eq!(calls.get(), 2, "an entry over the limit is not stored");
        let fits = RefCache::at(&dir).with_max_entry(size);
        let _ = fits.get_or_compute(&s, compute);
        let (_, l) = fits.get_or_compute(&s, compute);
        assert_eq!((l, calls.get()), (Lookup::Hit, 3));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn computes_once_then_reads_back() {
        let dir = scratch("once");
        let cache = RefCache::at(&dir);
        let s = spec("add(n=4)", 7);
        let calls = Cell::new(0);
        let compute = || {
            calls.set(calls.get() + 1);
            Ok(outputs(3.0))
        };
        let (o, l) = cache.get_or_compute(&s, compute);
        assert_eq!((o.unwrap(), l), (outputs(3.0), Lookup::Miss));
        let (o, l) = cache.get_or_compute(&s, compute);
        assert_eq!((o.unwrap(), l), (outputs(3.0), Lookup::Hit));
        assert_eq!(calls.get(), 1);
        // Another seed or id is another entry.
        let (_, l) = cache.get_or_compute(&spec("add(n=4)", 8), compute);
        assert_eq!(l, Lookup::Miss);
        let (_, l) = cache.get_or_compute(&spec("add(n=5)", 7), compute);
        assert_eq!(l, Lookup::Miss);
        assert_eq!(calls.get(), 3);
        // Errors are not stored.
        let s2 = spec("add(n=6)", 7);
        let (o, _) = cache.get_or_compute(&s2, || Err("boom".into()));
        assert_eq!(o.unwrap_err(), "boom");
        assert_eq!(cache.read(&s2), Ok(None));
        // No temporary file is left behind.
        for e in std::fs::read_dir(&dir).unwrap() {
            let n = e.unwrap().file_name();
            assert!(!n.to_string_lossy().starts_with(".tmp"), "{n:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_files_are_recomputed() {
        let dir = scratch("corrupt");
        let cache = RefCache::at(&dir);
        let s = spec("add(n=4)", 7);
        cache.write(&s, &outputs(3.0)).unwrap();
        let path = cache.path_of(&s).unwrap();
        let good = std::fs::read(&path).unwrap();

        // 1. Truncated: does not parse.
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        // 2. A flipped data byte: parses, checksum differs.
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        // 3. Garbage.
        let corruptions: Vec<Vec<u8>> = vec![
            good[..good.len() - 3].to_vec(),
            flipped,
            b"not a safetensors file".to_vec(),
        ];
        for bad in corruptions {
            std::fs::write(&path, &bad).unwrap();
            assert!(cache.read(&s).is_err());
            let calls = Cell::new(0);
            let (o, l) = cache.get_or_compute(&s, || {
                calls.set(calls.get() + 1);
                Ok(outputs(3.0))
            });
            assert_eq!(l, Lookup::Corrupt);
            assert_eq!(calls.get(), 1, "recomputed");
            assert_eq!(o.unwrap(), outputs(3.0));
            // And rewritten: the next lookup hits.
            assert_eq!(cache.read(&s), Ok(Some(outputs(3.0))));
        }

        // 4. A valid file of another case under this name (e.g. a hash
        // collision or a renamed file) is not trusted either.
        let other = spec("add(n=9)", 7);
        let other_bytes = {
            let c2 = RefCache::at(dir.join("other"));
            c2.write(&other, &outputs(9.0)).unwrap();
            std::fs::read(c2.path_of(&other).unwrap()).unwrap()
        };
        std::fs::write(&path, other_bytes).unwrap();
        let e = cache.read(&s).unwrap_err();
        assert!(e.contains("`id`"), "{e}");
        let (o, l) = cache.get_or_compute(&s, || Ok(outputs(3.0)));
        assert_eq!((o.unwrap(), l), (outputs(3.0), Lookup::Corrupt));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_a_torn_entry() {
        // Many writers store the same entry while readers read it: every
        // read finds nothing or the whole, verified entry, never a part.
        let dir = scratch("concurrent");
        let cache = RefCache::at(&dir);
        let s = spec("add(n=4)", 7);
        let big = BTreeMap::from([(
            "out".to_string(),
            HostTensor::from_f32(
                DType::F32,
                &[256, 256],
                &(0..65536).map(|i| i as f32).collect::<Vec<_>>(),
            ),
        )]);
        // Readers go on until every writer is done (at least 200 reads
        // each), so the last reads find the entry however the threads are
        // scheduled on a loaded machine.
        let writers_done = std::sync::atomic::AtomicUsize::new(0);
        let (seen, missing) = std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..20 {
                        cache.write(&s, &big).unwrap();
                    }
                    writers_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    sc.spawn(|| {
                        let (mut seen, mut missing) = (0, 0);
                        for i in 0.. {
                            let done = writers_done.load(std::sync::atomic::Ordering::SeqCst) == 4;
                            match cache.read(&s) {
                                Ok(Some(o)) => {
                                    assert_eq!(o, big);
                                    seen += 1;
                                }
                                Ok(None) => missing += 1,
                                Err(e) => panic!("a torn entry was read: {e}"),
                            }
                            // This read began after the last write ended.
                            if i >= 199 && done {
                                break;
                            }
                        }
                        (seen, missing)
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        assert!(seen + missing >= 800);
        assert!(seen >= 4, "every reader finds the entry once it is written");
        for e in std::fs::read_dir(&dir).unwrap() {
            let n = e.unwrap().file_name();
            assert!(!n.to_string_lossy().starts_with(".tmp"), "{n:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn disabled_cache_always_computes() {
        let cache = RefCache::disabled();
        let s = spec("add(n=4)", 7);
        let calls = Cell::new(0);
        for _ in 0..2 {
            let (o, l) = cache.get_or_compute(&s, || {
                calls.set(calls.get() + 1);
                Ok(outputs(1.0))
            });
            assert_eq!((o.unwrap(), l), (outputs(1.0), Lookup::Disabled));
        }
        assert_eq!(calls.get(), 2);
        assert_eq!(cache.path_of(&s), None);
    }
}
