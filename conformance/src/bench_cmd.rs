//! `deepport bench`: DeepSeek's kernel shapes on one or more backends,
//! side by side in one run, in TFLOP/s and GB/s by DeepSeek's formulas and
//! as a fraction of this machine's roofline (peak FMA throughput and
//! streaming bandwidth, measured at start).

use crate::error::CliError;
use deepport_benches::setup::{self, Prepared, BENCH_OPS};
use deepport_benches::{grid, Grid, Shape};
use deepport_core::budget::MemoryBudget;
use deepport_core::{Backend, Error};
use serde_json::json;
use std::time::Instant;

/// Arguments of `deepport bench`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Examples:
  deepport bench                                  # the quick grid on `cpu`
  deepport bench --backend cpu,cpu-ref --op fp8_gemm --shape m=16,n=2112,k=7168
  deepport bench --grid deepseek --format json > bench.jsonl

Ops and their shape parameters:
  fp8_gemm                m, n, k
  fp8_grouped_contiguous  g (groups), m (rows per group), n, k
  fp8_grouped_masked      g, m (rows per group), expected_m (valid rows), n, k
  gemm                    m, n, k (bf16)
  mla_decode              b, s_q, h_q, s_k (d = 576, dv = 512, block 64)

FLOP and bytes follow DeepGEMM's and FlashMLA's benchmark formulas; the
peak fraction is the roofline bound (max of FLOP/peak FLOP/s and
bytes/peak bandwidth) over the measured median time.")]
pub struct BenchArgs {
    /// Backends to measure, comma-separated (`cpu,cpu-ref`); each shape is
    /// measured on all of them in turn, so their ratio is meaningful.
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    pub backend: Vec<String>,
    /// Only this op (see the list below).
    #[arg(long)]
    pub op: Option<String>,
    /// Shapes to measure instead of the grid's (needs --op), e.g.
    /// `m=128,n=2112,k=7168`; repeat the flag for several.
    #[arg(long, requires = "op")]
    pub shape: Vec<String>,
    /// Grid of shapes when --shape is not given: `quick` (the performance
    /// targets of benches/README.md; minutes on a CPU) or `deepseek`
    /// (DeepGEMM's and FlashMLA's grids; sized for GPUs).
    #[arg(long, default_value = "quick", value_parser = ["quick", "deepseek"])]
    pub grid: String,
    /// `text` (a table) or `json` (one object per measurement per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// Keep timing a case until this many seconds have passed…
    #[arg(long, default_value_t = 1.0)]
    pub min_time: f64,
    /// Untimed warm-up before each case: runs until this many seconds
    /// have passed (at least one run). A single run is not enough for a
    /// sub-millisecond op on a CPU: the first tens of milliseconds can run
    /// at half speed while the threads settle (benches/README.md, run 7).
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
    /// …and at least this many timed runs (after the warm-up)…
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub min_iters: u32,
    /// …but no more than this many.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_iters: u32,
    /// Skip measuring the machine's peaks (no peak fraction is reported).
    #[arg(long)]
    pub no_peak: bool,
    /// Also write a self-contained HTML page: the roofline of the measured
    /// peaks with every measured shape as a point, one plot per backend.
    #[arg(long, value_name = "FILE")]
    pub html: Option<std::path::PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub op: String,
    pub backend: String,
    pub device: String,
    pub shape: Shape,
    pub median_s: f64,
    /// Median device-measured kernel time (timestamp queries), when the
    /// backend measures it (`Backend::take_device_seconds`).
    pub device_s: Option<f64>,
    pub iters: u32,
    pub tflops: f64,
    pub gbps: f64,
    /// Roofline bound over the measured time, when the peaks are known.
    pub peak_fraction: Option<f64>,
    /// `compute` or `memory`: what bounds this shape on this machine.
    pub bound: Option<&'static str>,
}

impl Measurement {
    /// The JSON object `--format json` prints.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "op": self.op,
            "backend": self.backend,
            "device": self.device,
            "shape": self.shape.0,
            "median_s": self.median_s,
            "device_seconds": self.device_s,
            "iters": self.iters,
            "tflops": self.tflops,
            "gbps": self.gbps,
            "peak_fraction": self.peak_fraction,
            "bound": self.bound,
        })
    }
}

/// Times `launch` + `synchronize`: warm-up runs for `warmup` seconds (at
/// least one), then runs until both
/// `min_time` and `min_iters` are reached or `max_iters` is; returns the
/// median, the median device time (when the backend measures it) and the
/// count.
fn time_case(
    be: &dyn Backend,
    p: &mut Prepared,
    args: &BenchArgs,
) -> Result<(f64, Option<f64>, u32), Error> {
    let timed = be.set_device_timing(true);
    let r = time_runs(be, p, args);
    if timed {
        be.set_device_timing(false);
    }
    r
}

fn median_of(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn time_runs(
    be: &dyn Backend,
    p: &mut Prepared,
    args: &BenchArgs,
) -> Result<(f64, Option<f64>, u32), Error> {
    let warm = Instant::now();
    loop {
        p.launch(be)?;
        be.synchronize()?;
        if warm.elapsed().as_secs_f64() >= args.warmup {
            break;
        }
    }
    be.take_device_seconds();
    let mut device = Vec::new();
    let mut times = Vec::new();
    let start = Instant::now();
    while (times.len() as u32) < args.max_iters
        && ((times.len() as u32) < args.min_iters || start.elapsed().as_secs_f64() < args.min_time)
    {
        let t0 = Instant::now();
        p.launch(be)?;
        be.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        device.extend(be.take_device_seconds());
    }
    let n = times.len();
    let device = if device.len() == n {
        median_of(device)
    } else {
        None
    };
    Ok((median_of(times).unwrap_or(0.0), device, n as u32))
}

/// Runs `deepport bench`.
pub fn run(args: &BenchArgs) -> Result<bool, CliError> {
    if let Some(op) = &args.op {
        if !BENCH_OPS.iter().any(|(o, _)| o == op) {
            return Err(CliError::usage(format!(
                "--op {op}: no benchmark for it (known: {})",
                BENCH_OPS
                    .iter()
                    .map(|(o, _)| *o)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    if !(args.min_time.is_finite() && args.min_time >= 0.0) {
        return Err(CliError::usage(
            "--min-time must be a non-negative number of seconds",
        ));
    }
    if !(args.warmup.is_finite() && args.warmup >= 0.0) {
        return Err(CliError::usage(
            "--warmup must be a non-negative number of seconds",
        ));
    }
    let cases: Vec<(String, Shape)> = if args.shape.is_empty() {
        let g = if args.grid == "deepseek" {
            Grid::DeepSeek
        } else {
            Grid::Quick
        };
        grid(g, args.op.as_deref())
            .into_iter()
            .map(|(o, s)| (o.to_string(), s))
            .collect()
    } else {
        let op = args.op.clone().unwrap_or_default();
        let mut v = Vec::new();
        for s in &args.shape {
            let shape =
                Shape::parse(s).map_err(|e| CliError::usage(format!("--shape {s}: {e}")))?;
            setup::workload(&op, &shape)
                .map_err(|e| CliError::usage(format!("--shape {s}: {e}")))?;
            v.push((op.clone(), shape));
        }
        v
    };
    let reg = crate::registry();
    let mut backends: Vec<Box<dyn Backend>> = Vec::new();
    for name in &args.backend {
        backends.push(reg.create(name).map_err(CliError::Failed)?);
    }
    let json_out = args.format == "json";
    let peak = if args.no_peak {
        None
    } else {
        eprintln!("bench: measuring this machine's peaks (FMA throughput, streaming bandwidth)…");
        let p = deepport_cpu::peak::measure(None);
        eprintln!(
            "bench: host peak {:.1} GFLOP/s f32 ({} on {} threads), {:.1} GB/s streaming read",
            p.flops_f32 / 1e9,
            p.isa,
            p.threads,
            p.read_bytes_per_s / 1e9
        );
        Some(p)
    };
    if !json_out {
        println!(
            "{:<24} {:<40} {:<10} {:>11} {:>9} {:>9} {:>8} {:>7}",
            "op", "shape", "backend", "median ms", "TFLOP/s", "GB/s", "bound", "peak%"
        );
    }
    let budget = MemoryBudget::global().bytes();
    let mut all_ok = true;
    let mut measured: Vec<Measurement> = Vec::new();
    for (op, shape) in &cases {
        let need = setup::footprint(op, shape).map_err(CliError::Failed)?;
        let mut first: Option<f64> = None;
        for be in &backends {
            let be = be.as_ref();
            if need > budget {
                eprintln!(
                    "bench: {op}({shape}) on {}: needs about {:.2} GiB, beyond the budget of {:.2} GiB (--max-memory); skipped",
                    be.name(),
                    need as f64 / (1u64 << 30) as f64,
                    budget as f64 / (1u64 << 30) as f64
                );
                continue;
            }
            let result = Prepared::new(be, op, shape).and_then(|mut p| {
                let (median, device_s, iters) = time_case(be, &mut p, args)?;
                Ok((p.workload.clone(), median, device_s, iters))
            });
            let (w, median, device_s, iters) = match result {
                Ok(r) => r,
                Err(e @ Error::NotSupported { .. }) => {
                    eprintln!("bench: {op}({shape}) on {}: {e}", be.name());
                    continue;
                }
                Err(e) => {
                    eprintln!("bench: {op}({shape}) on {}: failed: {e}", be.name());
                    all_ok = false;
                    continue;
                }
            };
            let (peak_fraction, bound) = match &peak {
                Some(p) => (
                    Some(w.bound_seconds(p.flops_f32, p.read_bytes_per_s) / median),
                    Some(if w.compute_bound(p.flops_f32, p.read_bytes_per_s) {
                        "compute"
                    } else {
                        "memory"
                    }),
                ),
                None => (None, None),
            };
            let m = Measurement {
                op: op.clone(),
                backend: be.name().to_string(),
                device: be.info().device,
                shape: shape.clone(),
                median_s: median,
                device_s,
                iters,
                tflops: w.flops / median / 1e12,
                gbps: w.bytes / median / 1e9,
                peak_fraction,
                bound,
            };
            if json_out {
                println!("{}", m.to_json());
            } else {
                let mut ratio = match first {
                    Some(f) => format!("  {:.2}× the time of {}", median / f, args.backend[0]),
                    None => String::new(),
                };
                if let Some(d) = device_s {
                    ratio.push_str(&format!("  (device {:.3} ms)", d * 1e3));
                }
                println!(
                    "{:<24} {:<40} {:<10} {:>11.3} {:>9.4} {:>9.2} {:>8} {:>7}{ratio}",
                    m.op,
                    m.shape.to_string(),
                    m.backend,
                    median * 1e3,
                    m.tflops,
                    m.gbps,
                    m.bound.unwrap_or("-"),
                    m.peak_fraction
                        .map_or("-".to_string(), |f| format!("{:.1}", f * 100.0)),
                );
            }
            first.get_or_insert(median);
            measured.push(m);
        }
    }
    if let Some(path) = &args.html {
        crate::suite::report::html::write_bench(path, peak.as_ref(), &measured)
            .map_err(|e| CliError::Failed(Error::Other(e.to_string())))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(all_ok)
}
