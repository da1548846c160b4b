//! A memory budget for allocations whose size comes from user input.
//!
//! A catalogue case with `m: 100000000000`, a safetensors header that
//! declares a 10^12-element tensor, a token list of two million entries: a
//! size that comes from outside the program is checked against a
//! [`MemoryBudget`] *before* memory is taken, and the request beyond it is
//! an [`Error::OverBudget`] that names the input, the size and the budget.
//! Memory that is within the budget is still reserved fallibly
//! ([`MemoryBudget::try_vec`], `Vec::try_reserve_exact`), so a machine that
//! runs out anyway gives an [`Error::OutOfMemory`], never an abort.
//!
//! The default budget is the memory the machine has available
//! (`MemAvailable` of `/proc/meminfo`, read once); the command line sets
//! another with `--max-memory 8G` ([`MemoryBudget::parse`],
//! [`MemoryBudget::set_global`]). The budget bounds each request on its own:
//! it is a guard against sizes no machine can hold, not an accountant of
//! every byte the process owns.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A limit, in bytes, on one allocation sized by user input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemoryBudget {
    bytes: u64,
}

/// The process-wide budget set by [`MemoryBudget::set_global`]; 0 = unset.
static GLOBAL: AtomicU64 = AtomicU64::new(0);
/// The machine's available memory, read once.
static MACHINE: OnceLock<MemoryBudget> = OnceLock::new();

/// Used when `/proc/meminfo` cannot be read: 16 GiB.
pub const FALLBACK_BYTES: u64 = 16 << 30;

impl MemoryBudget {
    /// A budget of `bytes` (at least one byte).
    pub const fn new(bytes: u64) -> MemoryBudget {
        MemoryBudget {
            bytes: if bytes == 0 { 1 } else { bytes },
        }
    }

    /// No limit (every request passes the check; reservation may still fail).
    pub const fn unlimited() -> MemoryBudget {
        MemoryBudget { bytes: u64::MAX }
    }

    /// The limit in bytes.
    pub fn bytes(self) -> u64 {
        self.bytes
    }

    /// The memory the machine has available now: `MemAvailable` of
    /// `/proc/meminfo` (else `MemFree`), or [`FALLBACK_BYTES`] when that
    /// cannot be read.
    pub fn available() -> MemoryBudget {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| meminfo_available(&t))
            .map_or(MemoryBudget::new(FALLBACK_BYTES), MemoryBudget::new)
    }

    /// The machine's available memory, read on first use and then kept.
    pub fn machine() -> MemoryBudget {
        *MACHINE.get_or_init(MemoryBudget::available)
    }

    /// The process-wide budget: the one [`set_global`](Self::set_global)
    /// set, else [`machine`](Self::machine).
    pub fn global() -> MemoryBudget {
        match GLOBAL.load(Ordering::Relaxed) {
            0 => MemoryBudget::machine(),
            b => MemoryBudget::new(b),
        }
    }

    /// Sets the process-wide budget (e.g. from `--max-memory`).
    pub fn set_global(budget: MemoryBudget) {
        GLOBAL.store(budget.bytes, Ordering::Relaxed);
    }

    /// Parses a size: a number of bytes with an optional binary suffix
    /// `K`, `M`, `G`, `T` (also `KB`, `KiB`, …; case-insensitive; `1.5G`
    /// allowed), or `unlimited`.
    pub fn parse(text: &str) -> std::result::Result<MemoryBudget, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("none") {
            return Ok(MemoryBudget::unlimited());
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => {
                return Err(format!(
                "`{text}` is not a size: use a number of bytes with K, M, G or T (e.g. 8G, 512M)"
            ))
            }
        };
        let v: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size: `{num}` is not a number"))?;
        let bytes = v * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
            return Err(format!(
                "`{text}` is not a usable memory budget (at least 1 byte)"
            ));
        }
        Ok(MemoryBudget::new(bytes as u64))
    }

    /// Fails with [`Error::OverBudget`] when `bytes` (needed by `what`) is
    /// over the budget.
    pub fn check(self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.bytes {
            return Err(Error::OverBudget {
                what: what.to_string(),
                bytes,
                budget: self.bytes,
            });
        }
        Ok(())
    }

    /// Checks `n` elements of `T` against the budget, then reserves them
    /// fallibly: an empty vector with capacity for `n`.
    pub fn try_vec<T>(self, what: &str, n: usize) -> Result<Vec<T>> {
        let bytes = (n as u64)
            .checked_mul(std::mem::size_of::<T>() as u64)
            .ok_or_else(|| Error::OverBudget {
                what: what.to_string(),
                bytes: u64::MAX,
                budget: self.bytes,
            })?;
        self.check(what, bytes)?;
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|e| Error::OutOfMemory {
            what: what.to_string(),
            bytes,
            reason: e.to_string(),
        })?;
        Ok(v)
    }

    /// Checks the byte size of a `dtype` tensor of `shape` (see
    /// [`tensor_bytes`]) against the budget and returns it.
    pub fn check_tensor(self, what: &str, dtype: DType, shape: &[usize]) -> Result<u64> {
        let bytes = tensor_bytes(what, dtype, shape)?;
        self.check(what, bytes)?;
        Ok(bytes)
    }
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.bytes == u64::MAX {
            f.write_str("unlimited")
        } else {
            f.write_str(&fmt_bytes(self.bytes))
        }
    }
}

/// `MemAvailable` (else `MemFree`) of a `/proc/meminfo` text, in bytes.
pub fn meminfo_available(text: &str) -> Option<u64> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?.trim();
            let (n, unit) = rest.split_once(' ').unwrap_or((rest, ""));
            let n: u64 = n.trim().parse().ok()?;
            match unit.trim() {
                "kB" | "KB" | "kb" => n.checked_mul(1024),
                "" | "B" => Some(n),
                _ => None,
            }
        })
    };
    field("MemAvailable")
        .or_else(|| field("MemFree"))
        .filter(|&b| b > 0)
}

/// The byte size of a `dtype` tensor of `shape`, or [`Error::OverBudget`]
/// (with the size `u64::MAX`) when it overflows.
pub fn tensor_bytes(what: &str, dtype: DType, shape: &[usize]) -> Result<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| Error::OverBudget {
            what: format!("{what} ({dtype} {shape:?})"),
            bytes: u64::MAX,
            budget: MemoryBudget::global().bytes,
        })
}

/// Bytes for people: `512 B`, `1.50 KiB`, `93.1 GiB`, `651 TiB` (the exact
/// count is given alongside wherever it matters).
pub fn fmt_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "more than 16 EiB (the size overflows)".into();
    }
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v < 10.0 {
        format!("{v:.2} {}", UNITS[u])
    } else if v < 100.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(MemoryBudget::parse("8G").unwrap().bytes(), 8 << 30);
        assert_eq!(MemoryBudget::parse("512M").unwrap().bytes(), 512 << 20);
        assert_eq!(MemoryBudget::parse("512mib").unwrap().bytes(), 512 << 20);
        assert_eq!(MemoryBudget::parse("1.5K").unwrap().bytes(), 1536);
        assert_eq!(MemoryBudget::parse("4096").unwrap().bytes(), 4096);
        assert_eq!(MemoryBudget::parse(" 2 TB ").unwrap().bytes(), 2 << 40);
        assert_eq!(
            MemoryBudget::parse("unlimited").unwrap(),
            MemoryBudget::unlimited()
        );
        for bad in ["", "G", "8X", "-1G", "0", "1e400", "8 G B", "0.1"] {
            assert!(MemoryBudget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_meminfo() {
        let t = "MemTotal:       32768 kB\nMemFree:         1024 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(meminfo_available(t), Some(2048 * 1024));
        assert_eq!(
            meminfo_available("MemFree:  4 kB\n"),
            Some(4096),
            "MemFree when MemAvailable is missing"
        );
        assert_eq!(meminfo_available("nothing here"), None);
        assert_eq!(meminfo_available("MemAvailable: x kB"), None);
        assert!(MemoryBudget::available().bytes() > 0);
    }

    #[test]
    fn checks_name_what_size_and_budget() {
        let b = MemoryBudget::new(1 << 20);
        assert!(b.check("x", 1 << 20).is_ok());
        let e = b.check("case foo input `a`", (1 << 20) + 1).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, Error::OverBudget { .. }), "{e:?}");
        assert!(s.contains("case foo input `a`"), "{s}");
        assert!(s.contains("1048577 bytes"), "{s}");
        assert!(s.contains("1048576 bytes"), "{s}");
        // A size that overflows is over any budget.
        let e = b
            .check_tensor("t", DType::F32, &[usize::MAX, 2])
            .unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        assert!(MemoryBudget::unlimited()
            .check_tensor("t", DType::F32, &[1 << 40])
            .is_ok());
        // try_vec reserves, or refuses before reserving.
        let v: Vec<u32> = b.try_vec("v", 1000).unwrap();
        assert!(v.capacity() >= 1000 && v.is_empty());
        let e = b.try_vec::<u64>("v", 1 << 20).unwrap_err();
        assert!(matches!(e, Error::OverBudget { bytes, .. } if bytes == 8 << 20));
        // An unlimited budget still fails cleanly where the allocator refuses.
        let e = MemoryBudget::unlimited()
            .try_vec::<u8>("huge", usize::MAX)
            .unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    }

    #[test]
    fn formats_bytes() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.50 KiB");
        assert_eq!(fmt_bytes(100_000_000_000 * 7168), "652 TiB");
        assert_eq!(MemoryBudget::new(8 << 30).to_string(), "8.00 GiB");
    }
}
