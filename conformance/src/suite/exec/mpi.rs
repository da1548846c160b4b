//! `deepport run --comm mpi`: the expert-parallel cases with one process
//! per rank (`mpirun -np N deepport run --comm mpi --profile ep`).
//!
//! Only cases of family `ep` whose `ranks` equal the MPI world size run
//! (the others are listed as skipped). Every rank runs its share of each
//! case ([`crate::cases::ep::run_rank`]) over [`crate::comm_cmd::with_mpi`]'s
//! transport and sends its outputs (or its error) to rank 0. After the
//! last case the job finalizes, and rank 0 alone judges: the merged
//! outputs of all ranks against `cpu-ref` on in-process ranks (the refcache
//! applies), with each case's own judge — so a pass means the MPI ranks
//! computed what in-process ranks compute — then prints the tables and
//! writes the reports (`--report DIR`). Judging after the last collective
//! keeps the reference computation out of the transport's deadline.
//!
//! `--profile ep` (also without MPI) selects the `ep` cases of
//! `v3-mustpass` ([`EP_PROFILE`]).

use super::{blank_result, classify, fail, guarded, output, select_many, RunArgs};
use crate::error::{EXIT_FAILURE, EXIT_USAGE};
use crate::opspec::Outputs;
use crate::suite::catalogue;
use crate::types::{CaseSpec, Outcome, RunInfo, SUITE_VERSION};
use deepport_core::backend::Backend;
use deepport_core::{DType, HostTensor};
use std::process::ExitCode;
use std::time::Instant;

/// The profile of the expert-parallel cases.
pub const EP_PROFILE: &str = "ep";

/// The profile whose `ep` cases [`EP_PROFILE`] selects.
const EP_BASE: &str = "v3-mustpass";

/// The specs of `--profile ep` matching `filters`: the `ep` family's cases
/// of `v3-mustpass`.
pub fn select_ep(all: &[CaseSpec], filters: &[String]) -> Vec<CaseSpec> {
    let ep: Vec<CaseSpec> = all.iter().filter(|s| s.family == "ep").cloned().collect();
    select_many(&ep, EP_BASE, filters)
}

/// The `ranks` parameter of a case, if it has one.
fn ranks_of(spec: &CaseSpec) -> Option<usize> {
    spec.params
        .get("ranks")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
}

/// What one rank sends rank 0 for one case.
fn encode(r: &Result<Outputs, deepport_core::Error>, secs: f64) -> Vec<u8> {
    let mut v = Vec::new();
    let put = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
    match r {
        Ok(o) => {
            v.push(0);
            put(&mut v, secs.to_bits());
            put(&mut v, o.len() as u64);
            for (k, t) in o {
                put(&mut v, k.len() as u64);
                v.extend_from_slice(k.as_bytes());
                let code = DType::ALL.iter().position(|&d| d == t.dtype()).unwrap_or(0);
                put(&mut v, code as u64);
                put(&mut v, t.shape().len() as u64);
                for &s in t.shape() {
                    put(&mut v, s as u64);
                }
                put(&mut v, t.bytes().len() as u64);
                v.extend_from_slice(t.bytes());
            }
        }
        Err(e) => {
            v.push(if e.is_not_supported() { 2 } else { 1 });
            put(&mut v, secs.to_bits());
            v.extend_from_slice(e.to_string().as_bytes());
        }
    }
    v
}

/// One rank's result for one case as rank 0 decodes it.
enum RankOut {
    Ok(Outputs),
    Failed { not_supported: bool, msg: String },
}

fn decode(buf: &[u8]) -> Result<(RankOut, f64), String> {
    let mut rd = Reader { buf, pos: 0 };
    let status = rd.take(1)?[0];
    let secs = f64::from_bits(rd.u64()?);
    if status != 0 {
        return Ok((
            RankOut::Failed {
                not_supported: status == 2,
                msg: String::from_utf8_lossy(&buf[rd.pos..]).into_owned(),
            },
            secs,
        ));
    }
    let n = rd.count()?;
    let mut o = Outputs::new();
    for _ in 0..n {
        let kl = rd.count()?;
        let k = String::from_utf8_lossy(rd.take(kl)?).into_owned();
        let code = rd.count()?;
        let dtype = *DType::ALL.get(code).ok_or("bad dtype")?;
        let nd = rd.count()?;
        let shape = (0..nd).map(|_| rd.count()).collect::<Result<Vec<_>, _>>()?;
        let bl = rd.count()?;
        let bytes = rd.take(bl)?.to_vec();
        let t = HostTensor::from_bytes(dtype, &shape, bytes).map_err(|e| e.to_string())?;
        o.insert(k, t);
    }
    if rd.pos != buf.len() {
        return Err("trailing bytes".into());
    }
    Ok((RankOut::Ok(o), secs))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("truncated")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A count or size: at most what the message still holds.
    fn count(&mut self) -> Result<usize, String> {
        let v = self.u64()?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= self.buf.len())
            .ok_or_else(|| format!("count {v} exceeds the message"))
    }
}

/// What rank 0 collected for one case.
struct Collected {
    spec: CaseSpec,
    ranks: Vec<Result<(RankOut, f64), String>>,
}

/// `deepport run --comm mpi` (see the module docs).
pub fn run_main(args: RunArgs) -> ExitCode {
    if args.resume.is_some() || args.isolate {
        return fail(
            EXIT_USAGE,
            "--comm mpi runs in the processes mpirun started: --resume and --isolate do not apply",
        );
    }
    if args.backend.len() > 1 {
        return fail(EXIT_USAGE, "--comm mpi judges one --backend at a time");
    }
    if args.jobs != 1 {
        return fail(
            EXIT_USAGE,
            "--comm mpi runs one case at a time on every rank (each case is a sequence of collectives over the whole MPI job): --jobs does not apply",
        );
    }
    // --timeout bounds each collective of a case (the MPI deadline): a
    // rank that is slower than that between two collectives, dead or
    // silent makes every rank fail, and the job ends (a broken MPI group
    // cannot run the next case, unlike a Timeout on in-process ranks).
    let timeout = args.timeout.map(std::time::Duration::from_secs_f64);
    let backend_name = args
        .backend
        .first()
        .cloned()
        .unwrap_or_else(|| "cpu".into());
    let profile = args.profile.clone().unwrap_or_else(|| EP_PROFILE.into());
    let cases_dir = args.cases.clone().unwrap_or_else(catalogue::default_dir);
    let all = match catalogue::load(&cases_dir) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let specs = if profile == EP_PROFILE {
        select_ep(&all, &args.filter)
    } else {
        select_many(&all, &profile, &args.filter)
    };
    let ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
    let fields = vec![
        ("command", "run".to_string()),
        ("suite", SUITE_VERSION.to_string()),
        ("backend", backend_name.clone()),
        ("profile", profile.clone()),
        ("cases", crate::comm_cmd::digest(&ids.join("\n"))),
        ("timeout", format!("{:?}", args.timeout)),
    ];
    let t0 = Instant::now();
    let started = super::utc_now();
    let run = crate::comm_cmd::with_mpi_timeout(&fields, timeout, |comm, started| {
        // Nothing to load: the steady deadline from the first case on.
        started();
        let world = comm.world_size();
        let mine: Vec<&CaseSpec> = specs
            .iter()
            .filter(|s| s.family == "ep" && ranks_of(s) == Some(world))
            .collect();
        if mine.is_empty() {
            return Err(crate::error::CliError::usage(format!(
                "no expert-parallel case of profile `{profile}` has ranks = {world} (the MPI world size); `deepport run --list-cases --profile {profile}` shows them"
            )));
        }
        let skipped = specs.len() - mine.len();
        let backend = crate::registry()
            .create(&backend_name)
            .map_err(crate::error::CliError::Failed)?;
        let info = backend.info();
        if comm.rank() == 0 {
            println!(
                "backend {backend_name}: {} | {} (judged against {}); profile {profile}, {} case(s) on {world} MPI ranks{}",
                info.device,
                info.driver,
                crate::REFERENCE_BACKEND,
                mine.len(),
                if skipped > 0 {
                    format!(" ({skipped} other case(s) need another world size or are not expert-parallel)")
                } else {
                    String::new()
                }
            );
        }
        let mut collected = Vec::new();
        for spec in mine {
            let t = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::cases::ep::run_rank(spec, backend.as_ref(), comm)
            }))
            .unwrap_or_else(|p| {
                Err(deepport_core::Error::Other(format!(
                    "panicked: {}",
                    super::panic_message(p.as_ref())
                )))
            });
            let mut send = vec![Vec::new(); world];
            send[0] = encode(&r, t.elapsed().as_secs_f64());
            let recv = comm
                .all_to_all_v(send)
                .map_err(crate::error::CliError::Failed)?;
            if comm.rank() == 0 {
                collected.push(Collected {
                    spec: spec.clone(),
                    ranks: recv.iter().map(|b| decode(b)).collect(),
                });
            }
        }
        Ok((collected, info))
    });
    let (rank, world, (collected, info)) = match run {
        Ok(x) => x,
        Err(e) => return fail(e.exit_code(), e),
    };
    if rank != 0 {
        return ExitCode::SUCCESS;
    }
    judge_and_report(
        &args,
        &profile,
        &backend_name,
        info,
        world,
        collected,
        &started,
        t0,
    )
}

#[allow(clippy::too_many_arguments)]
fn judge_and_report(
    args: &RunArgs,
    profile: &str,
    backend_name: &str,
    info: deepport_core::backend::DeviceInfo,
    world: usize,
    collected: Vec<Collected>,
    started: &str,
    t0: Instant,
) -> ExitCode {
    let reference: Box<dyn Backend> = match crate::registry().create(crate::REFERENCE_BACKEND) {
        Ok(b) => b,
        Err(e) => {
            return fail(
                EXIT_FAILURE,
                format!(
                    "the reference backend `{}` is needed to judge: {e}",
                    crate::REFERENCE_BACKEND
                ),
            )
        }
    };
    let cache = if args.no_refcache {
        super::RefCache::disabled()
    } else {
        super::RefCache::from_env()
    };
    let mut results = Vec::new();
    for c in &collected {
        let mut res = blank_result(&c.spec, backend_name, &info);
        res.duration_s = c
            .ranks
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|(_, s)| *s))
            .fold(0.0, f64::max);
        let mut merged = Outputs::new();
        let mut failure: Option<(bool, String)> = None;
        for (r, out) in c.ranks.iter().enumerate() {
            match out {
                Ok((RankOut::Ok(o), _)) => {
                    merged.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())))
                }
                Ok((RankOut::Failed { not_supported, msg }, _)) => {
                    // The first rank's own failure, not a peer's echo of it.
                    let echo = msg.contains(" failed: ");
                    if failure
                        .as_ref()
                        .is_none_or(|(_, m)| m.contains(" failed: ") && !echo)
                    {
                        failure = Some((
                            *not_supported || msg.contains("not supported"),
                            format!("rank {r}: {msg}"),
                        ));
                    }
                }
                Err(e) => {
                    failure.get_or_insert((false, format!("rank {r}: malformed result: {e}")));
                }
            }
        }
        if let Some((ns, msg)) = failure {
            res.outcome = if ns {
                Outcome::NotSupported
            } else {
                Outcome::Fail
            };
            res.message = msg;
            results.push(res);
            continue;
        }
        let case = match guarded(|| catalogue::build(&c.spec).map_err(|e| e.to_string())) {
            Ok(case) => case,
            Err(e) => {
                res.message = format!("cannot build the case ({}): {e}", c.spec.origin);
                results.push(res);
                continue;
            }
        };
        let (expected, _) = cache.get_or_compute(&c.spec, || {
            guarded(|| (case.run)(reference.as_ref()).map_err(|e| e.to_string()))
        });
        match expected {
            Err(e) => {
                res.message = format!(
                    "reference failed: {} on {}: {e}",
                    c.spec.id,
                    crate::REFERENCE_BACKEND
                )
            }
            Ok(expected) => match guarded(|| Ok((case.judge)(&merged, &expected))) {
                Ok(checks) => classify(&mut res, &checks),
                Err(e) => res.message = format!("the judge failed: {e}"),
            },
        }
        results.push(res);
    }
    let families: std::collections::BTreeMap<&str, &str> = collected
        .iter()
        .map(|c| (c.spec.id.as_str(), c.spec.family.as_str()))
        .collect();
    let mut out = output::tables(&results, &families);
    let counts = output::Counts::of(&results);
    out.push_str(&counts.notices(backend_name, &results));
    out.push_str(&format!(
        "{}  [{} s, {world} MPI ranks]\n",
        counts.run_line("run"),
        output::fmt_secs(t0.elapsed().as_secs_f64())
    ));
    out.push_str(&counts.closing_line("conformance"));
    out.push('\n');
    print!("{out}");
    if let Some(dir) = &args.report {
        let run_info = RunInfo {
            suite_version: SUITE_VERSION.to_string(),
            profile: profile.to_string(),
            backend: backend_name.to_string(),
            device: info.device.clone(),
            driver: info.driver.clone(),
            vendor: info.vendor.clone(),
            git_commit: None,
            git_dirty: None,
            started_utc: started.to_string(),
            host: super::hostname(),
            command: super::command_line(),
        };
        let w = std::fs::create_dir_all(dir)
            .and_then(|()| crate::suite::report::write_all(dir, &run_info, &results));
        if let Err(e) = w {
            return fail(
                EXIT_FAILURE,
                format!("writing the report to {}: {e}", dir.display()),
            );
        }
        eprintln!("report: wrote {}", dir.display());
    }
    if counts.run_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_and_garbage_is_rejected() {
        let mut o = Outputs::new();
        o.insert(
            "r1.x".into(),
            HostTensor::from_f32(DType::BF16, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        );
        o.insert("r1.i".into(), HostTensor::from_i64(&[1], &[-1]));
        let b = encode(&Ok(o.clone()), 1.5);
        match decode(&b).unwrap() {
            (RankOut::Ok(back), s) => {
                assert_eq!(s, 1.5);
                assert_eq!(back.len(), 2);
                for (k, v) in &o {
                    assert_eq!(back[k].bytes(), v.bytes());
                    assert_eq!(back[k].shape(), v.shape());
                }
            }
            _ => panic!("not ok"),
        }
        for cut in [0, 1, 9, b.len() - 1] {
            assert!(decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let e = encode(&Err(deepport_core::Error::Other("boom".into())), 0.0);
        match decode(&e).unwrap().0 {
            RankOut::Failed { msg, not_supported } => {
                assert!(msg.contains("boom") && !not_supported)
            }
            _ => panic!("not failed"),
        }
    }
}
