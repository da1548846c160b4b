//! `deepport`: list backends, run one op on your tensors, judge a backend
//! against the CPU reference.
#![forbid(unsafe_code)]

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, Parser, Subcommand};
use deepport_conformance::error::CliError;
use deepport_conformance::opspec::{self, Inputs, Params};
use deepport_conformance::suite::{exec, report};
use deepport_conformance::{list, registry};
use deepport_core::budget::MemoryBudget;
use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::Error;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[cfg(feature = "plugin")]
mod plugin_hook {
    //! `--plugin LIB`: loads and checks each plugin, makes it the default
    //! backend of the command, and passes it on to case processes through
    //! `$DEEPPORT_PLUGIN` (which `registry()` reads).
    use super::{Cli, Command};
    use deepport_conformance::error::CliError;

    pub fn apply(cli: &mut Cli, m: &clap::ArgMatches) -> Result<(), CliError> {
        if cli.plugins.is_empty() {
            return Ok(());
        }
        std::env::remove_var(deepport_plugin::PLUGIN_ENV);
        let names = deepport_plugin::check_plugins(&deepport_conformance::registry(), &cli.plugins)
            .map_err(CliError::Failed)?;
        let joined = std::env::join_paths(&cli.plugins)
            .map_err(|e| CliError::usage(format!("--plugin: {e}")))?;
        // Before any thread starts: the case processes inherit it.
        std::env::set_var(deepport_plugin::PLUGIN_ENV, joined);
        let given = m.subcommand().is_some_and(|(_, s)| {
            s.ids().any(|id| id == "backend")
                && s.value_source("backend") == Some(clap::parser::ValueSource::CommandLine)
        });
        if !given {
            let first = names[0].to_string();
            match &mut cli.command {
                Command::Run(a) => a.backend = names.iter().map(|n| n.to_string()).collect(),
                Command::Op(c) => c.backend = first,
                Command::Forward(a) => a.backend = first,
                #[cfg(feature = "cpu")]
                Command::Bench(a) => a.backend = names.iter().map(|n| n.to_string()).collect(),
                _ => {}
            }
        }
        Ok(())
    }
}
#[cfg(not(feature = "plugin"))]
mod plugin_hook {
    pub fn apply(cli: &mut super::Cli, _: &clap::ArgMatches) -> Result<(), super::CliError> {
        if cli.plugins.is_empty() {
            Ok(())
        } else {
            Err(super::CliError::usage(
                "--plugin: this build has no plugin support (cargo feature `plugin`)",
            ))
        }
    }
}

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
  deepport run ...       judge backends with the conformance suite (profiles smoke,
                         full, v3-mustpass; --isolate, --report DIR)
  deepport report merge  merge run reports into a cases x backends matrix
  deepport report html   the same as one self-contained HTML page with plots
  deepport verify DIR    check a v3-mustpass submission
  deepport mutants       judge the suite itself: profiles against a library of
                         realistic one-bug backends (the mutant x profile matrix)
  deepport forward ...   the DeepSeek-V3 forward pass from a Hugging Face checkpoint,
                         optionally judged per layer against golden data
  deepport bench ...     measure ops on DeepSeek's shapes (TFLOP/s, GB/s, roofline)
  deepport kernels ...   compile a GPU backend's kernels (PTX, cubin) without a GPU
  deepport golden verify check the golden data against its manifest";

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
    /// Memory budget for every size that comes from your input (case
    /// parameters, tensor files, op parameters): a request beyond it is an
    /// error naming the input, the size and the budget. E.g. 8G, 512M,
    /// unlimited. Default: the memory this machine has available.
    #[arg(long, global = true, value_name = "SIZE", value_parser = MemoryBudget::parse)]
    max_memory: Option<MemoryBudget>,
    /// Load an out-of-tree backend: a shared library implementing
    /// plugin/include/deepport_plugin.h (repeat for several). It is
    /// registered under its own name and becomes the default --backend.
    #[arg(long = "plugin", global = true, value_name = "LIB")]
    plugins: Vec<PathBuf>,
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
    /// Judge backends against cpu-ref on the conformance suite's cases.
    #[command(
        long_about = "Run the cases of a profile of the conformance suite (conformance/cases/*.yaml: \
DeepGEMM's, FlashMLA's and DeepEP's shape grids, the small ops, golden data from an \
independent PyTorch reference) on each chosen backend and judge the outputs against \
cpu-ref (or the stored golden outputs) with the metrics of SPEC.md.

Outcomes: Pass; QualityWarning (outside the pass threshold, inside the warning \
threshold: still conformant); Fail (wrong numbers, NaN/inf in the wrong places, an \
error from a backend that claimed support); NotSupported (the backend lacks the op: \
never a pass); Crash and Timeout (with --isolate, each case runs in its own process, so \
a segfault or a hang is recorded and the run goes on).

Prints a progress line on stderr, then a table per op family and the summary lines \
`run: N passed, N quality warnings, N failed, N not supported, N crashed, N timed out` \
and `conformance: N passed, N failed, N skipped` (skipped = not supported or waived).

With --report DIR, results.jsonl gets a line as each case finishes and the directory is \
locked while the run lasts; `deepport run --resume DIR` continues a run that was killed, \
running only the cases it had not finished, and ends with the same reports. A case whose \
sizes exceed the memory budget (--max-memory; default: the memory available) is a Fail \
naming them, and the run goes on.

Exit status: 0 when nothing is Fail, Crash or Timeout (waived results excepted) and no \
waiver is unneeded; 1 otherwise; 2 for a usage error (unknown backend or profile, no \
matching case, a malformed waiver file)."
    )]
    Run(exec::RunArgs),
    /// Judge the suite itself: run profiles against a library of
    /// realistic one-bug backends and print the mutant × profile matrix.
    #[cfg(feature = "cpu")]
    Mutants(exec::mutants::matrix::MutantsArgs),
    /// Reports: merge several runs into one cases x backends matrix.
    #[command(subcommand)]
    Report(ReportCmd),
    /// Check a submission (a `run --profile v3-mustpass --report DIR` directory).
    Verify(report::VerifyArgs),
    /// Run the DeepSeek-V3 forward pass from a Hugging Face checkpoint, and
    /// optionally judge it per layer and tap against golden data.
    #[command(
        long_about = "Run the DeepSeek-V3 forward pass (prefill from position 0) on a backend, \
from a Hugging Face checkpoint directory (FP8 weights with 128x128 weight_scale_inv, or bf16), \
in a numerics mode of SPEC.md §8. Writes `logits` [T, vocab] f32 and, with --taps, \
layers.{i}.input/attn_out/ffn_out/topk_idx/topk_weights.

With --golden DIR (holding golden_{mode}.safetensors, e.g. golden/model) it judges the run: \
f32 tightly end to end; bf16 and fp8 per layer with teacher forcing and end to end \
statistically. It prints each layer and tap with its metric and verdict and names the first \
layer and op that left tolerance. Exit status 1 when a check fails.",
        after_help = "Example: deepport forward --backend cpu --checkpoint golden/model --golden golden/model --mode fp8"
    )]
    Forward(deepport_conformance::forward_cmd::ForwardArgs),
    /// Measure ops on DeepSeek's shapes: TFLOP/s, GB/s and the fraction of
    /// this machine's roofline, several backends side by side.
    #[cfg(feature = "cpu")]
    Bench(deepport_conformance::bench_cmd::BenchArgs),
    /// Compile a GPU backend's kernel sources for one architecture
    /// (PTX, cubin, manifest.json), no GPU needed.
    #[command(long_about = deepport_conformance::kernels_cmd::LONG_ABOUT)]
    Kernels(deepport_conformance::kernels_cmd::KernelsArgs),
    /// Golden data: verify it against its manifest.
    #[command(subcommand)]
    Golden(GoldenCmd),
    /// Run one case in this process and print its result (used by `run --isolate`).
    #[command(name = "case-exec", hide = true)]
    CaseExec(exec::child::CaseExecArgs),
}

#[derive(Subcommand, Debug)]
enum GoldenCmd {
    /// Check every golden file against golden/manifest.yaml (SHA-256 and
    /// size); names each file that is missing or altered.
    Verify {
        /// Golden directory (default: golden/ of this source tree, or $DEEPPORT_GOLDEN).
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ReportCmd {
    /// Merge run directories into a Markdown matrix of cases x backends.
    Merge(report::MergeArgs),
    /// One self-contained HTML page from run directories: the cases x
    /// backends matrix, how close each metric runs to its threshold, the runs' facts.
    Html(report::html::HtmlArgs),
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
    /// Expert-parallel ops: run on N in-process ranks of the backend, with
    /// tensors named r{rank}.{name} in both files.
    #[arg(long, value_name = "N", default_value_t = 1)]
    ranks: usize,
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
    inputs.check_present(spec, c.ranks)?;
    let unused = inputs.unused(spec, c.ranks);
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
    let outputs = opspec::run_on_ranks(spec, backend.as_ref(), &inputs, &mut params, c.ranks)?;
    let meta = opspec::output_metadata(spec, backend.name(), &params, c.ranks);
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

fn cmd_golden_verify(dir: Option<PathBuf>) -> Result<ExitCode, CliError> {
    use deepport_conformance::golden;
    let dir = dir.unwrap_or_else(golden::default_dir);
    let v = golden::verify(&dir).map_err(CliError::usage)?;
    for (path, problem) in &v.problems {
        match problem {
            golden::Problem::Missing => println!("MISSING  {path}"),
            golden::Problem::Altered {
                expected_size,
                actual_size,
            } => {
                println!("ALTERED  {path} (size {actual_size}, manifest {expected_size}, or SHA-256 differs)")
            }
        }
    }
    let bad = v.problems.len();
    println!("golden verify: {} passed, {} failed", v.checked - bad, bad);
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Whether `command` runs its ops on the main thread (`case-exec` runs its
/// one case there).
#[cfg(feature = "cpu")]
fn ops_on_main_thread(command: &Command) -> bool {
    matches!(
        command,
        Command::Op(_) | Command::Forward(_) | Command::Bench(_) | Command::CaseExec(_)
    )
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Err(e) = plugin_hook::apply(&mut cli, &matches) {
        eprintln!("error: {e}");
        return ExitCode::from(e.exit_code() as u8);
    }
    if let Some(b) = cli.max_memory {
        MemoryBudget::set_global(b);
    }
    // The commands whose ops run on this thread run them with the CPU
    // backends' workers (see `join_worker_pool`): no hand-over and wake-up
    // per op. Not `run` or `mutants`: their cases run on threads of their
    // own while this one waits, so a pool that counted it would have one
    // worker fewer for every op (the full profile ran `cpu` on one of two
    // cores that way).
    #[cfg(feature = "cpu")]
    if ops_on_main_thread(&cli.command) {
        deepport_cpu::join_worker_pool();
    }
    let result = match cli.command {
        Command::List { json } => cmd_list(json),
        Command::Op(c) => cmd_op(c),
        Command::Run(a) => return exec::run_main(a),
        #[cfg(feature = "cpu")]
        Command::Mutants(a) => return exec::mutants::matrix::mutants_main(a),
        Command::Report(ReportCmd::Merge(a)) => return report::merge_main(a),
        Command::Report(ReportCmd::Html(a)) => return report::html::html_main(a),
        Command::Verify(a) => return report::verify_main(a),
        Command::CaseExec(a) => return exec::child::case_exec_main(a),
        Command::Forward(a) => match deepport_conformance::forward_cmd::run(&a) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => Err(e),
        },
        #[cfg(feature = "cpu")]
        Command::Bench(a) => match deepport_conformance::bench_cmd::run(&a) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => Err(e),
        },
        Command::Kernels(a) => match deepport_conformance::kernels_cmd::run(&a) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => Err(e),
        },
        Command::Golden(GoldenCmd::Verify { dir }) => cmd_golden_verify(dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

#[cfg(all(test, feature = "cpu"))]
mod tests {
    use super::*;
    use clap::Parser;

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from(args).expect("arguments").command
    }

    /// `run` and `mutants` call the ops from case threads while the main
    /// thread waits: counting it as a CPU worker left the suite's ops one
    /// worker (the full profile's `cpu` ran on one of two cores).
    #[test]
    fn only_commands_that_call_ops_on_the_main_thread_join_the_pool() {
        assert!(!ops_on_main_thread(&command(&["deepport", "run"])));
        assert!(!ops_on_main_thread(&command(&["deepport", "list"])));
        assert!(ops_on_main_thread(&command(&["deepport", "bench"])));
        assert!(ops_on_main_thread(&command(&[
            "deepport",
            "forward",
            "--checkpoint",
            "x"
        ])));
    }
}
