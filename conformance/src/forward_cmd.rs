//! `deepport forward`: the DeepSeek-V3 forward pass on any backend, from a
//! Hugging Face checkpoint directory, optionally judged against golden data.

use crate::error::CliError;
use crate::model_check::{self, ForwardReport};
use deepport_core::comm::run_ranks;
use deepport_core::ops::MlaForm;
use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::{Backend, Communicator, Error, HostTensor};
use deepport_model::forward::{LoadOptions, Model, Numerics, PrefillPath, Taps};
use deepport_model::{memory, Checkpoint, ModelConfig, DEFAULT_CHUNK};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod mtp;
mod optimes;

/// Arguments of `deepport forward`.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// Backend to run on (`deepport list` shows them).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Hugging Face DeepSeek-V3 checkpoint directory: config.json plus
    /// model.safetensors or a sharded model.safetensors.index.json.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Prompt token ids: `1,2,3`, or `@file.json` holding a JSON list.
    /// Defaults to the golden prompt when --golden is given.
    #[arg(long)]
    pub tokens: Option<String>,
    /// Numerics mode (SPEC.md §8).
    #[arg(long, default_value = "bf16", value_parser = ["f32", "bf16", "fp8"])]
    pub mode: String,
    /// Attention form of the fused prefill (naive expands kv_b per head;
    /// absorb is DeepSeek's default).
    #[arg(long, default_value = "absorb", value_parser = ["naive", "absorb"])]
    pub attn: String,
    /// Prefill kernels: `fused` (mla_prefill) or `paged` (the decode
    /// kernels over the paged cache, rounding where DeepSeek rounds).
    #[arg(long, default_value = "fused", value_parser = ["fused", "paged"])]
    pub prefill: String,
    /// Write logits (and taps) here as safetensors.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write per-layer taps: layers.{i}.input/attn_out/ffn_out/topk_idx/topk_weights.
    #[arg(long)]
    pub taps: bool,
    /// Golden directory (holding golden_{mode}.safetensors): judge the run
    /// per layer and tap, and name the first layer and op that left tolerance.
    #[arg(long)]
    pub golden: Option<PathBuf>,
    /// With --golden: also write a self-contained HTML page plotting every
    /// layer's and tap's error against its threshold, first divergence marked.
    #[arg(long, value_name = "FILE", requires = "golden")]
    pub html: Option<PathBuf>,
    /// Expert parallelism: split the routed experts over N ranks (with
    /// --comm thread, one thread and one backend instance per rank in this
    /// process; with --comm mpi, one process per rank); rank 0 reports.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub ep: u64,
    /// How the expert-parallel ranks talk: `thread` (in this process) or
    /// `mpi` (this process is one rank of `mpirun -np N`, N = --ep; rank 0
    /// writes the outputs; needs a build with `--features mpi`).
    #[arg(long, default_value = "thread", value_parser = crate::comm_cmd::COMMS)]
    pub comm: String,
    /// Chunked prefill: a prompt longer than this runs in chunks of this
    /// many tokens over the paged latent cache, so memory grows with the
    /// cache, not with the square of the prompt.
    #[arg(long, default_value_t = DEFAULT_CHUNK as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk: u64,
    /// After the prompt, decode this many tokens greedily (each the argmax
    /// of the previous logits) and report per-token latency and tokens/s.
    #[arg(long, default_value_t = 0)]
    pub decode: u64,
    /// Also run DeepSeek-V3's multi-token-prediction layer (layer
    /// `num_hidden_layers` of the checkpoint) after the main pass: report
    /// its speculative next-next token, with --decode its draft acceptance
    /// rate, with --golden judge it against golden_mtp_{mode}.safetensors,
    /// with --out write its logits as `mtp.logits`.
    #[arg(long)]
    pub mtp: bool,
    /// After the first (cold) prefill, run the same prefill this many more
    /// times in the same process (weights loaded, memory warm) and report
    /// the median and fastest of those warm runs; each must give the first
    /// run's logits bit for bit. For benchmarks (PyTorch's side is timed
    /// the same way, after a warm-up run).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10000))]
    pub repeat: u32,
    /// Time every backend call (each op, alloc, upload, download) of the
    /// prefills and print where the wall time went, op by op; the rest is
    /// the model's own glue. One rank only (--ep 1).
    #[arg(long)]
    pub op_times: bool,
}

/// What one rank's run produced.
struct RankResult {
    logits: HostTensor,
    taps: Taps,
    report: Option<ForwardReport>,
    /// With --mtp: the MTP layer's drafts and, with --golden, its report.
    mtp: Option<(mtp::MtpRun, Option<ForwardReport>)>,
}

fn parse_tokens(spec: &str) -> Result<Vec<u32>, CliError> {
    if let Some(path) = spec.strip_prefix('@') {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("--tokens {path}: {e}")))?;
        parse_token_json(&text)
    } else {
        parse_token_list(spec)
    }
}

/// Parses `--tokens` given inline: comma-separated token ids (`1,2,3`).
pub fn parse_token_list(spec: &str) -> Result<Vec<u32>, CliError> {
    parse_token_json(&format!("[{spec}]"))
}

/// Parses a token file (`--tokens @file.json`): a JSON list of token ids.
/// Ids must fit in `u32`; whether they are below the vocabulary size is
/// checked by the forward pass against the checkpoint.
pub fn parse_token_json(text: &str) -> Result<Vec<u32>, CliError> {
    let v: Vec<i64> = serde_json::from_str(text.trim()).map_err(|e| {
        CliError::usage(format!(
            "--tokens: expected comma-separated ids or @file.json with a JSON list: {e}"
        ))
    })?;
    v.into_iter()
        .map(|t| {
            u32::try_from(t)
                .map_err(|_| CliError::usage(format!("--tokens: {t} is not a valid token id")))
        })
        .collect()
}

fn failed(e: Error) -> CliError {
    CliError::Failed(e)
}

/// Runs `deepport forward`; returns whether the golden checks (if any) passed.
pub fn run(args: &ForwardArgs) -> Result<bool, CliError> {
    let numerics = Numerics::parse(&args.mode)
        .ok_or_else(|| CliError::usage(format!("--mode {}", args.mode)))?;
    let form = MlaForm::parse(&args.attn)
        .ok_or_else(|| CliError::usage(format!("--attn {}", args.attn)))?;
    let prefill = PrefillPath::parse(&args.prefill)
        .ok_or_else(|| CliError::usage(format!("--prefill {}", args.prefill)))?;
    // Created before loading anything, so that a wrong name fails fast.
    let backend = crate::registry().create(&args.backend).map_err(failed)?;
    let cfg = ModelConfig::from_file(args.checkpoint.join("config.json")).map_err(failed)?;
    let ckpt = Checkpoint::open(&args.checkpoint).map_err(failed)?;
    let golden = match &args.golden {
        Some(dir) => {
            let p = dir.join(format!("golden_{}.safetensors", numerics.name()));
            Some((read_safetensors(&p).map_err(failed)?, p))
        }
        None => None,
    };
    if args.mtp && cfg.num_nextn_predict_layers == 0 {
        return Err(CliError::usage(format!(
            "--mtp: {} has no multi-token-prediction layer (num_nextn_predict_layers = 0 in \
             its config.json)",
            args.checkpoint.display()
        )));
    }
    let golden_mtp = match (&args.golden, args.mtp) {
        (Some(dir), true) => {
            let p = dir.join(format!("golden_mtp_{}.safetensors", numerics.name()));
            Some((read_safetensors(&p).map_err(failed)?, p))
        }
        _ => None,
    };
    let tokens = match (&args.tokens, &golden) {
        (Some(t), _) => parse_tokens(t)?,
        (None, Some((g, p))) => model_check::golden_tokens(g, p).map_err(failed)?,
        (None, None) => return Err(CliError::usage("--tokens is required without --golden")),
    };
    let opts = LoadOptions {
        numerics,
        form,
        scale_fmt: cfg.act_scale_fmt(),
        prefill,
    };
    let max_pos = cfg.max_position_embeddings;
    if tokens.len() > max_pos {
        return Err(CliError::usage(format!(
            "--tokens: the prompt has {} tokens, more than the checkpoint's \
             max_position_embeddings = {max_pos}",
            tokens.len()
        )));
    }
    let decode = usize::try_from(args.decode).unwrap_or(usize::MAX);
    if tokens.len().saturating_add(decode) > max_pos {
        return Err(CliError::usage(format!(
            "--decode {decode}: the prompt's {} tokens plus {decode} decoded ones exceed the \
             checkpoint's max_position_embeddings = {max_pos}",
            tokens.len()
        )));
    }
    let ep = args.ep as usize;
    if cfg.n_routed_experts > 0 && !cfg.n_routed_experts.is_multiple_of(ep) {
        return Err(CliError::usage(format!(
            "--ep {ep}: the checkpoint's {} routed experts cannot be split evenly over {ep} ranks",
            cfg.n_routed_experts
        )));
    }
    let chunk = usize::try_from(args.chunk).unwrap_or(usize::MAX);
    let all_logits = args.out.is_some() || golden.is_some();
    // Every in-process rank holds its own replicated weights and cache.
    let est = memory::estimate(&cfg, numerics, ep, tokens.len() + decode, chunk, all_logits);
    let mpi = args.comm == "mpi";
    let need = est.total().saturating_mul(if mpi { 1 } else { ep as u64 });
    // The global `--max-memory` (deepport's one memory budget), else what
    // the machine has available.
    let budget = deepport_core::budget::MemoryBudget::global().bytes();
    let what = "--max-memory, default: available on this machine";
    {
        if need > budget {
            return Err(CliError::usage(format!(
                "forward: {} tokens in chunks of {chunk} on {ep} rank(s) need {est} per rank, \
                 {:.2} GiB in all; the budget is {:.2} GiB ({what}). Use a shorter prompt, a \
                 smaller --chunk, or set --max-memory",
                tokens.len(),
                need as f64 / (1u64 << 30) as f64,
                budget as f64 / (1u64 << 30) as f64,
            )));
        }
    }
    eprintln!(
        "forward: loading {} on {}{} ({} mode, {} prefill, {} attention, chunks of {chunk}); estimate {est}…",
        args.checkpoint.display(),
        args.backend,
        if ep > 1 { format!(" × {ep} expert-parallel ranks") } else { String::new() },
        numerics,
        prefill.name(),
        form.name()
    );
    let golden_ref = golden.as_ref().map(|(g, p)| (g, p.as_path()));
    // `loaded` runs on every rank once its weights are in (MPI: a barrier,
    // then the steady-state deadline replaces the start-up one).
    if args.op_times && ep != 1 {
        return Err(CliError::usage("--op-times: only with --ep 1"));
    }
    let rank_run = |backend: &dyn Backend,
                    comm: Option<&dyn Communicator>,
                    loaded: &dyn Fn() -> Result<(), Error>|
     -> Result<RankResult, Error> {
        let times = optimes::OpTimes::default();
        let timed;
        let backend: &dyn Backend = if args.op_times {
            timed = optimes::Timed {
                inner: backend,
                times: &times,
            };
            &timed
        } else {
            backend
        };
        let t0 = std::time::Instant::now();
        let mut model = match comm {
            None => Model::load_with(backend, &ckpt, &cfg, opts)?,
            Some(c) => Model::load_ep(backend, c, &ckpt, &cfg, opts)?,
        };
        if args.mtp {
            model.load_mtp(&ckpt)?;
            model.keep_hidden(true);
        }
        loaded()?;
        let rank0 = comm.is_none_or(|c| c.rank() == 0);
        if rank0 {
            eprintln!(
                "forward: loaded in {:.1} s; prefill of {} tokens…",
                t0.elapsed().as_secs_f64(),
                tokens.len()
            );
        }
        times.clear();
        let t1 = std::time::Instant::now();
        let mut taps = Taps::new();
        let want_taps = args.taps && args.out.is_some();
        let logits =
            model.prefill_chunked(&tokens, chunk, all_logits, want_taps.then_some(&mut taps))?;
        let cold = t1.elapsed();
        let prefill_s = cold.as_secs_f64();
        if rank0 {
            eprintln!(
                "forward: prefill took {prefill_s:.4} s ({:.1} tokens/s)",
                tokens.len() as f64 / prefill_s
            );
            if args.op_times {
                times.end_run(cold);
                eprintln!("{}", times.report());
            }
        }
        if args.repeat > 0 {
            times.clear();
            let mut warm = Vec::with_capacity(args.repeat as usize);
            for _ in 0..args.repeat {
                let t = std::time::Instant::now();
                let again = model.prefill_chunked(&tokens, chunk, all_logits, None)?;
                let took = t.elapsed();
                warm.push(took);
                times.end_run(took);
                if again.bytes() != logits.bytes() {
                    return Err(Error::Other(
                        "forward --repeat: a warm prefill gave other logits than the first run"
                            .into(),
                    ));
                }
            }
            warm.sort();
            let med = warm[warm.len() / 2].as_secs_f64();
            if rank0 {
                eprintln!(
                    "forward: warm prefill: median {med:.4} s, fastest {:.4} s over {} runs ({:.1} tokens/s)",
                    warm[0].as_secs_f64(),
                    warm.len(),
                    tokens.len() as f64 / med
                );
                if args.op_times {
                    eprintln!("{}", times.report());
                }
            }
        }
        let mut decoded = Vec::new();
        if args.decode > 0 {
            let generated = greedy_decode(&mut model, &logits, args.decode as usize)?;
            if rank0 {
                eprintln!("{}", generated.summary());
            }
            decoded = generated.tokens;
        }
        // Before the golden check, which runs the golden prompt again.
        let mtp_run = match args.mtp {
            true => Some(mtp::run(&model, &tokens, &logits, &decoded)?),
            false => None,
        };
        let report = match golden_ref {
            Some((g, p)) => Some(model_check::check_forward(&mut model, g, p, prefill)?),
            None => None,
        };
        let mtp = match (mtp_run, &golden_mtp) {
            (Some(r), Some((g, p))) => Some((r, Some(mtp::check(&model, g, p, prefill)?))),
            (r, _) => r.map(|r| (r, None)),
        };
        Ok(RankResult {
            logits,
            taps,
            report,
            mtp,
        })
    };
    let result = if mpi {
        let fields = mpi_fields(args, &cfg, &tokens)?;
        let (rank, _, r) = crate::comm_cmd::with_mpi(&fields, |comm, started| {
            if comm.world_size() != ep {
                return Err(CliError::usage(format!(
                    "--comm mpi --ep {ep}: mpirun started {} processes; give -np {ep}",
                    comm.world_size()
                )));
            }
            let loaded = || {
                comm.barrier()?;
                started();
                Ok(())
            };
            rank_run(backend.as_ref(), Some(comm), &loaded).map_err(failed)
        })?;
        if rank != 0 {
            // Rank 0 reports and writes; the others are done.
            return Ok(true);
        }
        r
    } else if ep == 1 {
        rank_run(backend.as_ref(), None, &|| Ok(())).map_err(failed)?
    } else {
        let name = args.backend.clone();
        let mut all = run_ranks(ep, |_, comm| {
            let backend = crate::registry().create(&name)?;
            rank_run(backend.as_ref(), Some(comm), &|| Ok(()))
        })
        .map_err(failed)?;
        all.swap_remove(0)
    };
    let RankResult {
        logits,
        taps,
        report,
        mtp,
    } = result;
    report_logits(&logits, &tokens);
    let (mtp_run, mtp_report) = match mtp {
        Some((r, rep)) => (Some(r), rep),
        None => (None, None),
    };
    if let Some(r) = &mtp_run {
        eprintln!("{}", r.summary());
    }
    if let Some(out) = &args.out {
        let mut tensors = BTreeMap::new();
        tensors.insert("logits".to_string(), logits.clone());
        if let Some(r) = &mtp_run {
            tensors.insert("mtp.logits".to_string(), r.logits.clone());
        }
        if args.taps {
            for (k, v) in &taps.tensors {
                if k.starts_with("layers.") {
                    tensors.insert(k.clone(), v.clone());
                }
            }
        }
        let meta = BTreeMap::from([
            ("backend".to_string(), args.backend.clone()),
            ("ep".to_string(), ep.to_string()),
            ("mode".to_string(), numerics.name().to_string()),
            ("attn".to_string(), form.name().to_string()),
            ("prefill".to_string(), prefill.name().to_string()),
            (
                "tokens".to_string(),
                serde_json::to_string(&tokens).unwrap_or_default(),
            ),
        ]);
        write_safetensors(out, &tensors, &meta).map_err(failed)?;
        eprintln!("forward: wrote {}", out.display());
    }
    let mtp_passed = match (&golden_mtp, mtp_report) {
        (Some((_, p)), Some(rep)) => {
            print!("{}", rep.table());
            match rep.first_failure() {
                None => {
                    println!("forward: MTP layer within tolerance of {}", p.display());
                    true
                }
                Some(c) => {
                    println!(
                        "forward: MTP first divergence: {} ({} = {:.4e}, threshold {:.4e}) against {}",
                        c.name,
                        c.metric,
                        c.value,
                        c.threshold,
                        display(p)
                    );
                    false
                }
            }
        }
        _ => true,
    };
    let (Some((_, p)), Some(report)) = (&golden, report) else {
        return Ok(mtp_passed);
    };
    print!("{}", report.table());
    if let Some(h) = &args.html {
        use crate::suite::report::html;
        let (golden, plot) = (display(p), &report);
        let run = html::ForwardPlot {
            mode: numerics.name(),
            backend: &args.backend,
            prefill: prefill.name(),
            golden: &golden,
            report: plot,
        };
        crate::suite::report::write_atomic(h, html::forward_page(&[run]).as_bytes())
            .map_err(|e| failed(Error::Other(e.to_string())))?;
        eprintln!("forward: wrote {}", h.display());
    }
    match report.first_failure() {
        None => {
            println!(
                "forward: every layer and tap within tolerance of {}",
                p.display()
            );
            Ok(mtp_passed)
        }
        Some(c) => {
            println!(
                "forward: first divergence: {} ({} = {:.4e}, threshold {:.4e}) against {}",
                c.name,
                c.metric,
                c.value,
                c.threshold,
                display(p)
            );
            Ok(false)
        }
    }
}

/// What every MPI rank must agree on before the forward pass (the
/// handshake of [`crate::comm_cmd::with_mpi`]).
fn mpi_fields(
    args: &ForwardArgs,
    cfg: &ModelConfig,
    tokens: &[u32],
) -> Result<Vec<(&'static str, String)>, CliError> {
    Ok(vec![
        ("ep", args.ep.to_string()),
        ("experts", cfg.n_routed_experts.to_string()),
        ("hidden", cfg.hidden_size.to_string()),
        ("dtype", args.mode.clone()),
        (
            "checkpoint",
            crate::comm_cmd::checkpoint_fingerprint(&args.checkpoint)?,
        ),
        ("backend", args.backend.clone()),
        ("attn", args.attn.clone()),
        ("prefill", args.prefill.clone()),
        ("chunk", args.chunk.to_string()),
        ("decode", args.decode.to_string()),
        ("mtp", args.mtp.to_string()),
        ("tokens", crate::comm_cmd::digest(&format!("{tokens:?}"))),
        ("golden", (args.golden.is_some()).to_string()),
        ("deepport", env!("CARGO_PKG_VERSION").to_string()),
    ])
}

/// What `--decode N` produced and how fast.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The decoded tokens, in order.
    pub tokens: Vec<u32>,
    /// Seconds of each decode step (one token through every layer).
    pub step_s: Vec<f64>,
}

impl Generated {
    /// Tokens and latency, one line each.
    pub fn summary(&self) -> String {
        let mut t = self.step_s.clone();
        t.sort_by(f64::total_cmp);
        let total: f64 = t.iter().sum();
        let pct = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize] * 1e3;
        format!(
            "forward: decoded {} tokens greedily: {:?}\n\
             forward: decode latency per token: median {:.2} ms, p90 {:.2} ms, max {:.2} ms \
             ({:.1} tokens/s)",
            self.tokens.len(),
            self.tokens,
            pct(0.5),
            pct(0.9),
            pct(1.0),
            self.tokens.len() as f64 / total
        )
    }
}

/// Index of the largest finite value (the first on ties); `None` when the
/// row is empty or holds no finite value.
pub fn argmax(row: &[f32]) -> Option<usize> {
    row.iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// Decodes `n` tokens greedily after the prompt whose logits are
/// `logits` (`[T, vocab]` or `[1, vocab]`; the last row is used). Every
/// expert-parallel rank computes the same logits (core's fixed combine
/// order), so every rank picks the same token without a broadcast.
fn greedy_decode(model: &mut Model<'_>, logits: &HostTensor, n: usize) -> Result<Generated, Error> {
    let vocab = logits.shape().last().copied().unwrap_or(0);
    let last_row = |l: &HostTensor| -> Result<u32, Error> {
        let v = l.to_f32_vec();
        let row = v.get(v.len().saturating_sub(vocab)..).unwrap_or(&[]);
        argmax(row)
            .map(|i| i as u32)
            .ok_or_else(|| Error::Other("forward --decode: the logits hold no finite value".into()))
    };
    let mut next = last_row(logits)?;
    let mut out = Generated {
        tokens: Vec::with_capacity(n),
        step_s: Vec::with_capacity(n),
    };
    for _ in 0..n {
        out.tokens.push(next);
        let t0 = std::time::Instant::now();
        let l = model.decode(next)?;
        out.step_s.push(t0.elapsed().as_secs_f64());
        next = last_row(&l)?;
    }
    Ok(out)
}

/// Prints the prediction after the last prompt token.
fn report_logits(logits: &HostTensor, tokens: &[u32]) {
    let v = logits.to_f32_vec();
    let vocab = logits.shape().last().copied().unwrap_or(0);
    if vocab == 0 || v.len() < vocab {
        return;
    }
    let last = &v[v.len() - vocab..];
    let best =
        last.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        );
    eprintln!(
        "forward: after {} tokens the top next token is {} (logit {:.4})",
        tokens.len(),
        best.0,
        best.1
    );
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse() {
        assert_eq!(parse_tokens("1, 2,3").unwrap(), vec![1, 2, 3]);
        assert!(parse_tokens("1,x").is_err());
        assert!(parse_tokens("-1").is_err());
        assert!(parse_tokens("@/nonexistent/file.json").is_err());
    }

    #[test]
    fn argmax_takes_the_first_largest_finite_value() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::INFINITY, -0.5]), Some(3));
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }
}
