//! The lock of a report directory: one run writes into a directory at a
//! time.
//!
//! `deepport run --report DIR` holds an exclusive lock
//! ([`std::fs::File::try_lock`], `flock(2)`) on `DIR/.deepport-run.lock`
//! for as long as it runs, and writes its process id, host and start time
//! into the file. Another run into `DIR` meanwhile is refused with an error
//! naming that process. The kernel drops the lock when its process dies,
//! however it dies (SIGKILL included), so a lock left by a dead run is
//! never stale: the next run takes it over and says whose it was. The file
//! itself stays (deleting it would let two runs lock two different files).

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside a report directory.
pub const LOCK_FILE: &str = ".deepport-run.lock";

/// A held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    file: File,
}

/// Who holds (or last held) a lock, as its file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub since: String,
}

impl Holder {
    /// Parses the lock file's text (`None` when empty or torn).
    pub fn parse(text: &str) -> Option<Holder> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Holder {
            pid: u32::try_from(v.get("pid")?.as_u64()?).ok()?,
            host: v.get("host")?.as_str()?.to_string(),
            since: v
                .get("since")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_string(),
        })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "process {} on {}, since {}",
            self.pid, self.host, self.since
        )
    }
}

/// This machine's name (for lock files).
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    Holder::parse(&text)
}

impl RunLock {
    /// Locks `dir` (created if missing) for this run, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let who = read_holder(&mut file).map_or_else(
                    || "a process that is starting".to_string(),
                    |h| h.to_string(),
                );
                return Err(format!(
                    "the report directory {} is in use by another deepport run ({who}); \
                     wait for it to finish or choose another --report directory",
                    dir.display()
                ));
            }
            Err(TryLockError::Error(e)) => {
                return Err(format!("locking {}: {e}", path.display()));
            }
        }
        if let Some(prev) = read_holder(&mut file) {
            eprintln!(
                "note: {}: taking over the lock left by a run that ended without releasing it ({prev})",
                dir.display()
            );
        }
        let body = serde_json::json!({
            "pid": std::process::id(),
            "host": this_host(),
            "since": crate::suite::exec::utc_now(),
        })
        .to_string()
            + "\n";
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(|_| ()))
            .and_then(|()| file.write_all(body.as_bytes()))
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(RunLock { path, file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Empty the file (a clean release), then let go of the lock.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("deepport-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let d = scratch("one");
        let a = RunLock::acquire(&d).unwrap();
        let text = std::fs::read_to_string(a.path()).unwrap();
        let h = Holder::parse(&text).unwrap();
        assert_eq!(h.pid, std::process::id());
        let e = RunLock::acquire(&d).unwrap_err();
        assert!(e.contains("in use by another deepport run"), "{e}");
        assert!(
            e.contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        drop(a);
        assert_eq!(std::fs::read_to_string(d.join(LOCK_FILE)).unwrap(), "");
        let b = RunLock::acquire(&d).unwrap();
        drop(b);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_lock_left_by_a_dead_run_is_taken_over() {
        let d = scratch("stale");
        std::fs::create_dir_all(&d).unwrap();
        // What a run killed with SIGKILL leaves: the file with its pid,
        // and no lock (the kernel dropped it).
        std::fs::write(
            d.join(LOCK_FILE),
            r#"{"pid":999999999,"host":"h","since":"x"}"#,
        )
        .unwrap();
        let a = RunLock::acquire(&d).unwrap();
        let h = Holder::parse(&std::fs::read_to_string(a.path()).unwrap()).unwrap();
        assert_eq!(h.pid, std::process::id());
        // A torn file is no obstacle either.
        drop(a);
        std::fs::write(d.join(LOCK_FILE), r#"{"pid":12"#).unwrap();
        drop(RunLock::acquire(&d).unwrap());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn racing_threads_get_exactly_one_lock() {
        let d = scratch("race");
        let barrier = std::sync::Barrier::new(8);
        let won: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let r = RunLock::acquire(&d);
                        // Hold the lock, if won, until every thread tried.
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        r.is_ok()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(won.iter().filter(|&&w| w).count(), 1, "{won:?}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
