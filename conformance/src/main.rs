//! `deepport`: list backends, run one op on your tensors, judge a backend
//! against the CPU reference.
#![forbid(unsafe_code)]

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Parser, Subcommand};
use deepport_conformance::error::{CliError, EXIT_FAILURE};
use deepport_conformance::opspec::{self, Inputs, Params};
use deepport_conformance::{cases, list, registry, runner};
use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::Error;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

const LONG_ABOUT: &str = "\
deepport runs DeepSeek-V3 inference the way DeepSeek's own Hopper kernels \
(FlashMLA, DeepGEMM, DeepEP) do, on any accelerator, and proves it.

One Rust trait describes the operations DeepSeek-V3 needs — MLA attention \
over a paged latent cache, FP8 block-scaled GEMM (dense and grouped for MoE), \
expert-parallel dispatch/combine, and the small ops around them. Every \
backend (cpu, cpu-ref, and the GPU backends compiled into this build) \
implements it, and the conformance suite judges each backend op by op \
against the CPU reference (`cpu-ref`: plain loops, f64 accumulation) and \
golden data from an independent PyTorch reference. The semantics of every \
op are in SPEC.md.

This program:
  deepport list          which backends this build has and whether they run here
  deepport op NAME ...   run one op on tensors from a safetensors file
  deepport run ...       judge backends against cpu-ref on built-in cases";

#[derive(Parser, Debug)]
#[command(
    name = "deepport",
    version,
    about = "Run and judge DeepSeek-V3 inference ops on any backend",
    long_about = LONG_ABOUT,
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every backend compiled into this build: available or why not,
    /// device and driver.
    #[command(
        long_about = "List every backend compiled into this build, in registration order: \
whether it is available on this machine (or the reason it is not, e.g. no driver), \
and the device and driver it would run on."
    )]
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one op on tensors read from a safetensors file and write its
    /// outputs to another.
    #[command(
        long_about = "Run one op on a backend with tensors read from a safetensors file \
(tensor names as listed below) and write the outputs to a safetensors file, with \
metadata {\"op\", \"backend\", \"params\"} recording every parameter value used \
(defaults included).

Exit status: 0 on success; 2 for a usage error (unknown op or parameter, malformed \
value, missing tensor, inputs whose shapes or dtypes the op rejects); 1 when the \
backend fails (op not supported, backend unavailable, index out of range, device error).",
        after_help = "Run `deepport op --help` for every op's tensors, parameters and defaults.",
        after_long_help = opspec::help_table()
    )]
    Op(OpCmd),
    /// Judge backends against cpu-ref on the built-in cases.
    #[command(
        long_about = "Run every built-in case (small deterministic inputs covering every op: \
partial 128-blocks, NaN in cache slots that must not be read, permuted block tables, \
padding rows, YaRN, 4 in-process expert-parallel ranks, ...) on each chosen backend and \
on cpu-ref, and judge the outputs with the metrics of SPEC.md (exact bytes for \
act_quant and dispatch payloads, calc_diff and elementwise bounds for GEMMs and \
attention, set equality for routing, ulp bounds elsewhere).

Prints a table (case, outcome, metric, value, threshold, time) and a summary line. \
Outcomes: PASS, FAIL, NOT SUPPORTED (the backend lacks the op: never a pass), ERROR. \
Exit status 0 only when every case passed; 1 otherwise; 2 for a usage error."
    )]
    Run(RunCmd),
}

fn op_names() -> PossibleValuesParser {
    PossibleValuesParser::new(opspec::OPS.iter().map(|o| {
        PossibleValue::new(o.name)
            .help(o.summary)
            .alias(o.kind.name())
    }))
}

#[derive(Args, Debug)]
struct OpCmd {
    /// The op to run.
    #[arg(value_name = "OP", value_parser = op_names())]
    name: String,
    /// Backend to run on (see `deepport list`).
    #[arg(long, short, default_value = "cpu")]
    backend: String,
    /// Safetensors file holding the op's input tensors, by name.
    #[arg(long, short, value_name = "FILE")]
    inputs: PathBuf,
    /// Safetensors file to write the outputs to (overwritten).
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// An op parameter as name=value; repeat for several (see the table below).
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE")]
    params: Vec<String>,
}

#[derive(Args, Debug)]
struct RunCmd {
    /// Backend to judge; repeat to judge several in turn.
    #[arg(long, short, value_name = "NAME", default_values_t = vec!["cpu".to_string()])]
    backend: Vec<String>,
    /// Run only cases whose id contains this text; repeat to add more.
    #[arg(long, short, value_name = "TEXT")]
    filter: Vec<String>,
    /// Also write one JSON object per case and backend to this file.
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
    /// Print the ids of the built-in cases and exit.
    #[arg(long)]
    list_cases: bool,
}

fn io_err(e: std::io::Error) -> CliError {
    CliError::Failed(Error::Other(format!("writing to stdout: {e}")))
}

fn cmd_list(json: bool) -> Result<ExitCode, CliError> {
    let rows = list::probe_all(&registry());
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = rows.iter().map(|r| r.to_json()).collect();
        let s = serde_json::to_string_pretty(&v)
            .map_err(|e| CliError::Failed(Error::Other(e.to_string())))?;
        writeln!(out, "{s}").map_err(io_err)?;
    } else {
        write!(out, "{}", list::table(&rows)).map_err(io_err)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_op(c: OpCmd) -> Result<ExitCode, CliError> {
    let spec =
        opspec::find(&c.name).ok_or_else(|| CliError::usage(format!("unknown op `{}`", c.name)))?;
    let mut params = Params::parse(spec, &c.params)?;
    let file = read_safetensors(&c.inputs).map_err(|e| CliError::usage(e.to_string()))?;
    let inputs = Inputs::new(c.inputs.display().to_string(), spec.name, file.tensors);
    // Missing tensors first: they are the user's to fix, whatever the backend.
    for t in spec.inputs.iter().filter(|t| !t.optional) {
        inputs.get(t.name)?;
    }
    let unused = inputs.unused(spec);
    if !unused.is_empty() {
        eprintln!(
            "note: {} does not use tensor(s) {} of {}",
            spec.name,
            unused.join(", "),
            inputs.source
        );
    }
    let reg = registry();
    let backend = reg.create(&c.backend).map_err(|e| match e {
        Error::UnknownBackend { .. } => CliError::usage(e.to_string()),
        other => CliError::Failed(other),
    })?;
    let outputs = opspec::run(spec, backend.as_ref(), &inputs, &mut params)?;
    let meta = opspec::output_metadata(spec, backend.name(), &params);
    write_safetensors(&c.out, &outputs, &meta).map_err(CliError::Failed)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} on {}: wrote {}",
        spec.name,
        backend.name(),
        c.out.display()
    )
    .map_err(io_err)?;
    for (n, t) in &outputs {
        writeln!(out, "  {n}: {} {:?}", t.dtype(), t.shape()).map_err(io_err)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_run(c: RunCmd) -> Result<ExitCode, CliError> {
    let all = cases::builtin();
    let mut out = std::io::stdout().lock();
    if c.list_cases {
        for case in runner::select(&all, &c.filter) {
            writeln!(out, "{}", case.id).map_err(io_err)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let opts = runner::RunOptions {
        backends: c.backend,
        filters: c.filter,
        jsonl: c.jsonl,
    };
    let summary = runner::run(&registry(), &all, &opts, &mut out)?;
    Ok(if summary.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE as u8)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::List { json } => cmd_list(json),
        Command::Op(c) => cmd_op(c),
        Command::Run(c) => cmd_run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
