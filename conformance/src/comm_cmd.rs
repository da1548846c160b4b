//! `--comm {thread,mpi}`: how expert-parallel ranks talk.
//!
//! `thread` (the default) runs every rank in this process
//! ([`deepport_core::comm::ThreadComm`]); `mpi` makes this process one rank
//! of an MPI job (`mpirun -np N deepport …`, built with `--features mpi`):
//! [`with_mpi`] initializes MPI, runs the start-up handshake (every rank
//! must have the same configuration; the first difference is named), runs
//! the work and finalizes. An error on any rank is printed as `error: rank
//! R: …` and ends the whole job (`MPI_Abort`), so no rank waits on one that
//! gave up; a rank that dies or stops answering makes the others fail
//! within the transport's deadline (`$DEEPPORT_MPI_TIMEOUT`, default 30 s).

use crate::error::CliError;
use deepport_core::{Communicator, Error};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// The values of `--comm`.
pub const COMMS: [&str; 2] = ["thread", "mpi"];

/// Whether this build can run `--comm mpi`.
pub const HAS_MPI: bool = cfg!(feature = "mpi");

/// The start-up deadline (seconds) when `$DEEPPORT_MPI_STARTUP_TIMEOUT`
/// is unset: loading a checkpoint can take minutes, and ranks load at
/// different speeds.
pub const DEFAULT_STARTUP_TIMEOUT_S: f64 = 600.0;

/// Runs `work` as this process's rank of an MPI job after the handshake on
/// `fields`; returns `(rank, world, result)`. Until `work` calls its
/// second argument (`started`: every rank has loaded what it needs), the
/// collectives use the start-up deadline (`$DEEPPORT_MPI_STARTUP_TIMEOUT`
/// seconds, default [`DEFAULT_STARTUP_TIMEOUT_S`], at least the steady
/// one); after it, the steady deadline (`$DEEPPORT_MPI_TIMEOUT`, default
/// 30 s). See the module docs for errors. Without the `mpi` feature: a
/// usage error.
pub fn with_mpi<T>(
    fields: &[(&str, String)],
    work: impl FnOnce(&dyn Communicator, &dyn Fn()) -> Result<T, CliError>,
) -> Result<(usize, usize, T), CliError> {
    with_mpi_timeout(fields, None, work)
}

/// [`with_mpi`] with the steady deadline `steady` (e.g. `deepport run
/// --timeout`) instead of `$DEEPPORT_MPI_TIMEOUT`'s when given.
pub fn with_mpi_timeout<T>(
    fields: &[(&str, String)],
    steady: Option<std::time::Duration>,
    work: impl FnOnce(&dyn Communicator, &dyn Fn()) -> Result<T, CliError>,
) -> Result<(usize, usize, T), CliError> {
    #[cfg(feature = "mpi")]
    {
        let comm = deepport_mpi::MpiComm::init().map_err(CliError::Failed)?;
        let (rank, world) = (comm.rank(), comm.world_size());
        let steady = steady.unwrap_or_else(|| comm.timeout());
        let startup = match std::env::var("DEEPPORT_MPI_STARTUP_TIMEOUT") {
            Err(_) => Ok(std::time::Duration::from_secs_f64(
                DEFAULT_STARTUP_TIMEOUT_S,
            )),
            Ok(s) => deepport_mpi::parse_timeout(&s).map_err(|e| {
                deepport_core::Error::Other(format!("$DEEPPORT_MPI_STARTUP_TIMEOUT: {e}"))
            }),
        };
        let r = startup
            .map_err(CliError::Failed)
            .and_then(|startup| {
                comm.set_timeout(startup.max(steady));
                comm.handshake(fields).map_err(CliError::Failed)
            })
            .and_then(|()| work(&comm, &|| comm.set_timeout(steady)));
        match r {
            Ok(v) => {
                drop(comm);
                Ok((rank, world, v))
            }
            Err(e) => {
                eprintln!("error: rank {rank} of {world}: {e}");
                comm.abort(e.exit_code())
            }
        }
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (fields, steady, work);
        Err(CliError::usage(
            "--comm mpi: this deepport was built without MPI (build with `cargo build --release --features mpi`)",
        ))
    }
}

/// A fingerprint of a checkpoint directory: SHA-256 over `config.json`, and
/// the name, size and first MiB (the safetensors header) of every
/// `*.safetensors` / `*.json` file, in name order. Ranks that load
/// different checkpoints disagree on it.
pub fn checkpoint_fingerprint(dir: &Path) -> Result<String, CliError> {
    let io = |p: &Path, e: std::io::Error| {
        CliError::Failed(Error::Other(format!("{}: {e}", p.display())))
    };
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "json")
        })
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for p in names {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let len = std::fs::metadata(&p).map_err(|e| io(&p, e))?.len();
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        let mut head = Vec::new();
        std::fs::File::open(&p)
            .and_then(|f| f.take(1 << 20).read_to_end(&mut head))
            .map_err(|e| io(&p, e))?;
        h.update(&head);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// SHA-256 of a text, in hex (for fields too long to print).
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_a_changed_file() {
        let dir = std::env::temp_dir().join(format!("deepport-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{\"hidden_size\": 8}").unwrap();
        std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
        let a = checkpoint_fingerprint(&dir).unwrap();
        assert_eq!(a, checkpoint_fingerprint(&dir).unwrap());
        std::fs::write(dir.join("config.json"), "{\"hidden_size\": 9}").unwrap();
        let b = checkpoint_fingerprint(&dir).unwrap();
        assert_ne!(a, b);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(checkpoint_fingerprint(&dir).is_err());
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn without_the_feature_mpi_is_a_usage_error() {
        let e = with_mpi(&[], |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("--features mpi"), "{e}");
    }
}
