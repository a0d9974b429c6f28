//! `tprun`: command-line parsing and dispatch only.
//!
//! `tprun [LAUNCH OPTIONS] -- PROGRAM [ARGS]` launches any program; `tprun [LAUNCH OPTIONS]
//! SCRIPT.py [ARGS]` runs a Python script the way torchrun does (`-m MODULE`, `--no-python`);
//! `tprun [LAUNCH OPTIONS] generate|logits|bench|perf` re-executes tprun itself once per rank
//! with `TPRUN_ROLE=rank`, and that process runs the built-in program.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tprun",
    version,
    about = "Launch N rank processes torchrun-style; run tensor-parallel Qwen2 on them"
)]
struct Cli {
    #[command(flatten)]
    launch: launcher::LaunchArgs,
    /// Write a Chrome/Perfetto trace of every rank's compute and collectives to FILE.json; with
    /// DIR/, DIR/trace.json plus one PyTorch-profiler-style DIR/ranks/rank{r}.json per rank (HTA).
    /// Built-ins and any `-- PROGRAM` that links the collectives.
    #[arg(long, global = true, value_name = "FILE.json|DIR/")]
    trace: Option<PathBuf>,
    /// Run the script's name as a Python module: `python3 -u -m MODULE ARGS` (torchrun's -m).
    #[arg(short = 'm', long)]
    module: bool,
    /// Run SCRIPT as an executable, without Python (torchrun's --no-python).
    #[arg(long, conflicts_with_all = ["module", "python"])]
    no_python: bool,
    /// The Python interpreter for SCRIPT and -m [default: python3 on PATH].
    #[arg(long, value_name = "PYTHON")]
    python: Option<OsString>,
    #[command(subcommand)]
    command: Option<Cmd>,
    /// After `--`: the program to run on every rank as is, and its arguments. Without `--`,
    /// torchrun-style: the Python script (with -m a module, with --no-python an executable) and
    /// its arguments. A built-in program's name takes priority over a file of that name.
    #[arg(value_name = "PROGRAM|SCRIPT", trailing_var_arg = true)]
    program: Vec<OsString>,
}

/// True when `program` (what clap collected) came after a `--`: clap drops that `--`, so look
/// for it in argv, followed by exactly these words. (`tprun train.py -- x` keeps its `--` as an
/// argument of train.py, so it does not match.)
fn after_dashdash(program: &[OsString]) -> bool {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    argv.iter()
        .position(|a| a == "--")
        .is_some_and(|i| argv[i + 1..] == *program)
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate text with a tensor-parallel Qwen2.
    Generate(programs::generate::Args),
    /// Write the logits of every prompt position to a safetensors file.
    Logits(programs::logits::Args),
    /// Prefill and decode speed, time in collectives, weight bytes per rank.
    Bench(programs::bench::Args),
    /// nccl-tests-style table of the collectives.
    Perf(programs::perf::Args),
    /// Per-tensor diff table of two safetensors files (runs locally, no ranks).
    Compare(programs::compare::Args),
    /// Stragglers, arrival skew, exposed communication and per-layer waits of a `--trace`.
    Analyze(programs::analyze::Args),
    /// Run one built-in program as the rank an outside launcher started (`srun -n 8 tprun rank
    /// generate ...`, `mpirun -np 8 tprun rank bench ...`), without starting other ranks.
    #[command(subcommand)]
    Rank(RankCmd),
}

/// The programs `tprun rank` runs.
#[derive(Subcommand, Debug)]
enum RankCmd {
    /// Generate text with a tensor-parallel Qwen2.
    Generate(programs::generate::Args),
    /// Write the logits of every prompt position to a safetensors file.
    Logits(programs::logits::Args),
    /// Prefill and decode speed, time in collectives, weight bytes per rank.
    Bench(programs::bench::Args),
    /// nccl-tests-style table of the collectives.
    Perf(programs::perf::Args),
}

impl From<RankCmd> for Cmd {
    fn from(r: RankCmd) -> Cmd {
        match r {
            RankCmd::Generate(a) => Cmd::Generate(a),
            RankCmd::Logits(a) => Cmd::Logits(a),
            RankCmd::Bench(a) => Cmd::Bench(a),
            RankCmd::Perf(a) => Cmd::Perf(a),
        }
    }
}

const ROLE_VAR: &str = "TPRUN_ROLE";

fn main() -> ExitCode {
    if let Some(code) = launcher::guard::main_if_guard() {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            // One write, so the launcher never sees half a line from a rank.
            let line = format!("tprun: error: {e:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::from(launcher::exit_code(&e).clamp(1, 255) as u8)
        }
    }
}

fn real_main(mut cli: Cli) -> anyhow::Result<i32> {
    let in_rank = std::env::var_os(ROLE_VAR).is_some_and(|v| v == "rank");
    if let Some(code) = run_local(&cli)? {
        return Ok(code);
    }
    let program = cli.command.as_ref().map(builtin_name);
    if cli.launch.device.is_none() {
        cli.launch.device = Some(default_device(&cli, program));
    }
    // The programs in programs::device::CUDA_PROGRAMS have a device path (issue 20). Refuse
    // before any rank starts, so the user sees one line (a rank inherits the same argv and
    // would refuse the same way).
    if let (Some(program), Some(launcher::Device::Cuda)) = (program, cli.launch.device) {
        if let Some(Cmd::Bench(a) | Cmd::Rank(RankCmd::Bench(a))) = &cli.command {
            if let Some((flag, why)) = programs::bench::cuda_refuses(a) {
                return Err(usage(&format!(
                    "{flag} is not available with --device cuda: {why}"
                )));
            }
        }
        if let Some(Cmd::Perf(a) | Cmd::Rank(RankCmd::Perf(a))) = &cli.command {
            if let Some((flag, why)) = programs::perf::cuda_refuses(a) {
                return Err(usage(&format!(
                    "{flag} is not available with --device cuda: {why}"
                )));
            }
        }
        programs::device::check_cuda(program)?;
    }
    if !in_rank && !matches!(cli.command, Some(Cmd::Rank(_))) {
        refuse_nesting()?;
    }
    let dashdash = after_dashdash(&cli.program);
    let script_mode = cli.module || cli.no_python || cli.python.is_some();
    if script_mode && (cli.program.is_empty() || dashdash) {
        return Err(usage(
            "-m/--module, --no-python and --python go with `tprun [OPTIONS] SCRIPT [ARGS]`, not with a built-in program or `-- PROGRAM`",
        ));
    }
    match (cli.command, in_rank) {
        (Some(Cmd::Rank(cmd)), _) => rank_of_outside_launcher(cmd.into(), cli.trace.as_deref()),
        (Some(cmd), true) => run_rank(cmd, cli.trace.as_deref()),
        (Some(cmd), false) => launch_builtin(&cli.launch, &cmd, cli.trace.as_deref()),
        (None, _) if !cli.program.is_empty() && !dashdash => {
            let job = script_job(&cli.program, cli.module, cli.no_python, cli.python)?;
            launch_program(&cli.launch, job, cli.trace.as_deref())
        }
        (None, _) => {
            let mut it = cli.program.into_iter();
            let Some(program) = it.next() else {
                return Err(usage(
                    "nothing to run: give a built-in program (generate, logits, bench, perf), a SCRIPT.py or `-- PROGRAM [ARGS]`",
                ));
            };
            let job = launcher::Job {
                program,
                args: it.collect(),
                env: Vec::new(),
                output: launcher::Output::Relay,
            };
            launch_program(&cli.launch, job, cli.trace.as_deref())
        }
    }
}

/// torchrun's way of running `SCRIPT ARGS`: `python3 -u SCRIPT ARGS`, `python3 -u -m MODULE ARGS`
/// with `-m`, or `SCRIPT ARGS` itself with `--no-python`. A SCRIPT that is no file is refused
/// here: a bare name is most likely a mistyped built-in program (exit 2), a path a missing script
/// (exit 127, like a missing program).
fn script_job(
    script: &[OsString],
    module: bool,
    no_python: bool,
    python: Option<OsString>,
) -> anyhow::Result<launcher::Job> {
    let (first, rest) = script.split_first().expect("checked non-empty");
    let job = |program: OsString, args: Vec<OsString>| launcher::Job {
        program,
        args,
        env: Vec::new(),
        output: launcher::Output::Relay,
    };
    if no_python {
        return Ok(job(first.clone(), rest.to_vec()));
    }
    let name = first.to_string_lossy();
    if !module && !Path::new(first).is_file() {
        if name.contains('/') || name.ends_with(".py") {
            return Err(launcher::LaunchError::Program {
                program: name.into_owned(),
                reason: "no such script file".into(),
            }
            .into());
        }
        return Err(usage(&format!(
            "'{name}' is neither a built-in program (generate, logits, bench, perf, compare) nor a script file; run an executable with `tprun --no-python {name}` or `tprun -- {name}`"
        )));
    }
    let mut args: Vec<OsString> = vec!["-u".into()];
    if module {
        args.push("-m".into());
    }
    args.push(first.clone());
    args.extend(rest.iter().cloned());
    Ok(job(python.unwrap_or_else(|| "python3".into()), args))
}

/// The built-in program a command runs on its ranks, as `programs::device` names them.
fn builtin_name(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Perf(_) | Cmd::Rank(RankCmd::Perf(_)) => "perf",
        Cmd::Logits(_) | Cmd::Rank(RankCmd::Logits(_)) => "logits",
        Cmd::Generate(_) | Cmd::Rank(RankCmd::Generate(_)) => "generate",
        Cmd::Bench(_) | Cmd::Rank(RankCmd::Bench(_)) => "bench",
        _ => "",
    }
}

/// `--device` when it is not given (docs/DESIGN.md, "Command line"): cuda where a GPU is usable,
/// else cpu. For a built-in program, usable means this build, the driver and a device all serve
/// its CUDA path (`programs::device::check_cuda`), and bench's CPU-only `--profile` and
/// `--roofline` keep it on the CPU; for `-- PROGRAM` and scripts, a visible GPU where an NVIDIA
/// driver is loaded (`launcher::cpus::usable_gpus`).
fn default_device(cli: &Cli, program: Option<&str>) -> launcher::Device {
    let usable = match (program, &cli.command) {
        (_, Some(Cmd::Bench(a) | Cmd::Rank(RankCmd::Bench(a))))
            if programs::bench::cuda_refuses(a).is_some() =>
        {
            false
        }
        (Some(p), _) => programs::device::check_cuda(p).is_ok(),
        (None, _) => launcher::cpus::usable_gpus() > 0,
    };
    match usable {
        true => launcher::Device::Cuda,
        false => launcher::Device::Cpu,
    }
}

fn usage(m: &str) -> anyhow::Error {
    launcher::LaunchError::Usage(m.into()).into()
}

/// The commands that run here, without ranks: `compare`, and `perf --from` (plotting saved
/// results). `Some(exit code)` when the command was one of them.
fn run_local(cli: &Cli) -> anyhow::Result<Option<i32>> {
    match &cli.command {
        Some(Cmd::Compare(a)) => {
            if cli.trace.is_some() {
                return Err(usage("--trace works with generate, logits, bench and perf"));
            }
            programs::compare::run(a)?;
            Ok(Some(0))
        }
        Some(Cmd::Analyze(a)) => {
            programs::analyze::run(a)?;
            Ok(Some(0))
        }
        Some(Cmd::Perf(a)) if !a.from.is_empty() => {
            programs::perf::plot_saved(a)?;
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// A tprun job inside an MPI or Slurm job of several tasks would run one independent job per
/// task (each tprun's ranks take tprun's numbering first), which is never what was meant.
fn refuse_nesting() -> anyhow::Result<()> {
    use collectives::identity::{from_env, Source};
    if let Ok(Some(id)) = from_env() {
        if id.source != Source::Torchrun && id.world > 1 {
            return Err(usage(&format!(
                "tprun is one of {} tasks of {}: nesting tprun's launcher in mpirun/srun is not supported; start the ranks with `tprun rank PROGRAM ...` under that launcher instead",
                id.world,
                id.source.name()
            )));
        }
    }
    Ok(())
}

/// `tprun rank PROGRAM`: this process is one rank that srun, mpirun or a person started; its
/// identity comes from their variables (collectives::identity). A failure is printed here and
/// then ends the whole job where MPI is in charge (MPI_Abort).
fn rank_of_outside_launcher(cmd: Cmd, trace: Option<&Path>) -> anyhow::Result<i32> {
    if matches!(cmd, Cmd::Perf(ref a) if !a.from.is_empty()) {
        return Err(usage("tprun rank perf: --from plots saved results: run `tprun perf --from ...` without `rank`"));
    }
    let id = collectives::identity::from_env().map_err(|e| anyhow::anyhow!(e))?;
    if id.is_none() {
        return Err(usage(
            "tprun rank: no launcher variables (RANK/WORLD_SIZE, OMPI_COMM_WORLD_RANK/_SIZE, PMIX_RANK/PMI_RANK with PMI_SIZE, SLURM_PROCID/SLURM_NTASKS): start it with srun or mpirun, or use `tprun -n N PROGRAM`",
        ));
    }
    match run_rank(cmd, trace) {
        Ok(code) => {
            collectives::end_job(true);
            Ok(code)
        }
        Err(e) => {
            let line = format!("tprun: error: {e:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            collectives::end_job(false);
            Ok(launcher::exit_code(&e).clamp(1, 255))
        }
    }
}

/// Inside a rank process: runs the built-in program, recording its trace when asked.
fn run_rank(cmd: Cmd, trace: Option<&Path>) -> anyhow::Result<i32> {
    launcher::builtin_rank_setup()?;
    if trace.is_some() {
        collectives::trace::start_rank()?;
    }
    match cmd {
        Cmd::Generate(a) => programs::generate::run(&a)?,
        Cmd::Logits(a) => programs::logits::run(&a)?,
        Cmd::Bench(a) => programs::bench::run(&a)?,
        Cmd::Perf(a) => programs::perf::run(&a)?,
        Cmd::Compare(_) | Cmd::Analyze(_) | Cmd::Rank(_) => {
            unreachable!("compare, analyze and rank run before dispatch")
        }
    }
    if let Some(out) = trace {
        let rank = collectives::identity::from_env()
            .ok()
            .flatten()
            .map_or(0, |id| id.rank);
        collectives::trace::finish_rank(out, rank)?;
    }
    Ok(0)
}

/// The launcher side of a built-in program: checks the model against the TP degree, then
/// re-executes tprun once per rank with `TPRUN_ROLE=rank`.
fn launch_builtin(
    launch: &launcher::LaunchArgs,
    cmd: &Cmd,
    trace: Option<&Path>,
) -> anyhow::Result<i32> {
    check_model(launch, cmd)?;
    let exe = std::env::current_exe()?;
    let mut job = launcher::Job {
        program: exe.into_os_string(),
        args: std::env::args_os().skip(1).collect(),
        env: vec![(ROLE_VAR.into(), "rank".into())],
        output: launcher::Output::Results,
    };
    // The ranks append their events to one memfd they inherit; merged here on success.
    // It has no path, so nothing is left on disk even if tprun is killed.
    let trace = match trace {
        Some(out) => Some(collectives::trace::JobTrace::new(out)?),
        None => None,
    };
    if let Some(t) = &trace {
        let (k, v) = t.env();
        job.env.push((k.into(), v.into()));
    }
    let flight = trace.as_ref().map(|t| t.flight_path());
    let res = launcher::run_recording(launch, &job, flight.as_deref());
    if let Some(t) = trace {
        t.finish(matches!(res, Ok(0)))?;
    }
    res
}

/// `tprun [OPTIONS] -- PROGRAM [ARGS]` and `tprun [OPTIONS] SCRIPT [ARGS]`.
fn launch_program(
    launch: &launcher::LaunchArgs,
    mut job: launcher::Job,
    trace: Option<&Path>,
) -> anyhow::Result<i32> {
    // A program that links the collectives records from its communicator (collectives::trace).
    let trace = trace.map(collectives::trace::JobTrace::new).transpose()?;
    if let Some(t) = &trace {
        let (k, v) = t.env();
        job.env.push((k.into(), v.into()));
    }
    let flight = trace.as_ref().map(|t| t.flight_path());
    let res = launcher::run_recording(launch, &job, flight.as_deref());
    if let Some(t) = trace {
        t.finish(matches!(res, Ok(0)))?;
    }
    res
}

/// The number of ranks `-n` asks for, `auto` resolved as the launcher resolves it (one rank per
/// GPU with `--device cuda`, else one per physical core).
fn world_size(launch: &launcher::LaunchArgs) -> usize {
    match (launch.nproc_per_node, launch.device) {
        (launcher::Nproc::Count(n), _) => n,
        (launcher::Nproc::Auto, Some(launcher::Device::Cuda)) => launcher::cpus::gpu_count().max(1),
        (launcher::Nproc::Auto, _) => {
            launcher::cpus::physical_cores(&launcher::cpus::allowed_cpus())
                .len()
                .max(1)
        }
    }
}

/// Reads the model's config.json once, here, and checks that it can be split over the requested
/// ranks, so that a bad model or TP degree is one line before any rank starts rather than one
/// per rank (docs/DESIGN.md, "Tensor-parallel layout"). A missing or corrupt config is a setup
/// error (exit 1), a TP degree the model does not allow a usage error (exit 2). perf has no
/// model: its options are checked against the world size here instead.
fn check_model(launch: &launcher::LaunchArgs, cmd: &Cmd) -> anyhow::Result<()> {
    let (what, config) = match cmd {
        Cmd::Bench(a) if a.preset.is_some() => {
            let preset = a.preset.expect("checked");
            (format!("preset {}", preset.name()), preset.config())
        }
        Cmd::Generate(programs::generate::Args { model, .. })
        | Cmd::Logits(programs::logits::Args { model, .. })
        | Cmd::Bench(programs::bench::Args { model, .. }) => {
            let m = programs::runtime::open_model(model)?;
            (format!("model {}", m.path().display()), m.config().clone())
        }
        // perf's options against the world size: one line before any rank starts.
        Cmd::Perf(a) => {
            return programs::perf::check_args(a, world_size(launch))
                .map_err(|e| usage(&format!("{e:#}")));
        }
        Cmd::Compare(_) | Cmd::Analyze(_) | Cmd::Rank(_) => return Ok(()),
    };
    let n = world_size(launch);
    if let Err(e) = rank::ShardPlan::new(&config.shapes(), n, 0) {
        return Err(usage(&format!("{what}: {e:#}")));
    }
    Ok(())
}
