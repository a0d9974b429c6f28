//! Starts N rank processes with the torchrun environment, relays their output, and supervises them
//! (fail-fast teardown, signal forwarding, timeout). `tprun`'s `main` only parses the command line
//! and calls [`run`].
//!
//! Layout: [`cpus`] (affinity and core shares), `spawn` (environment, program lookup, the child
//! setup between fork and exec), `output` (line-whole console relay and log files), `signals`
//! (SIGINT/SIGTERM/SIGHUP counters), `supervise` (the monitor loop and the summary table).

pub mod cpus;
mod output;
mod signals;
mod spawn;
mod supervise;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Launch options shared by `tprun -- PROGRAM` and the built-in programs (DESIGN section 1).
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Ranks to start: a number, or `auto` (one per GPU with --device cuda, else one per physical
    /// core tprun may run on).
    #[arg(short = 'n', long = "nproc-per-node", value_name = "N|auto", default_value = "1",
          value_parser = parse_nproc)]
    pub nproc_per_node: Nproc,
    /// Device the ranks compute on; passed to them as TPRUN_DEVICE [default: cpu].
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Pin rank r to its share of the allowed CPUs [default: cores when ranks <= physical cores,
    /// else none].
    #[arg(long, value_enum, value_name = "MODE")]
    pub cpu_bind: Option<CpuBind>,
    /// Also write rank r's output, unprefixed, to DIR/rank{r}/stdout.log and stderr.log.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Show only rank R's output on the console (log files still get every rank's).
    #[arg(long, value_name = "R")]
    pub only_rank: Option<usize>,
    /// Console lines without the `[rank{r}]: ` prefix.
    #[arg(long)]
    pub no_prefix: bool,
    /// Seconds between SIGTERM and SIGKILL when the job is torn down.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    pub grace_period: Duration,
    /// Stop the whole job after SECS seconds; tprun then exits 124 (like timeout(1)).
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

/// `-n`: a rank count or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nproc {
    Auto,
    Count(usize),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuBind {
    None,
    Cores,
}

fn parse_nproc(s: &str) -> Result<Nproc, String> {
    if s == "auto" {
        return Ok(Nproc::Auto);
    }
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(Nproc::Count(n)),
        Err(_) => Err("expected a positive number or `auto`".into()),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| "expected a number of seconds".to_string())?;
    Duration::try_from_secs_f64(v).map_err(|_| "expected a non-negative number of seconds".into())
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// What each rank runs.
#[derive(Debug, Clone)]
pub struct Job {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra environment for every rank, on top of the torchrun variables (which win on a clash).
    pub env: Vec<(OsString, OsString)>,
}

/// A launch error that maps to a specific exit code (anything else exits 1).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The program does not exist or cannot be executed (exit 127, like a shell's "not found").
    #[error("cannot run '{program}': {reason}")]
    Program { program: String, reason: String },
    /// A launch option that clap could not reject by itself (exit 2, like clap's usage errors).
    #[error("{0}")]
    Usage(String),
}

impl LaunchError {
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Program { .. } => 127,
            LaunchError::Usage(_) => 2,
        }
    }
}

/// tprun's exit code for an error returned by [`run`].
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<LaunchError>()
        .map_or(1, LaunchError::exit_code)
}

/// Runs the job to completion and returns tprun's exit code: 0 when every rank exited 0, else the
/// first failing rank's code (128+N for signal N), 128+N when tprun got signal N, 124 on
/// `--timeout`. Errors before any rank starts (bad options, missing program, log dir) are `Err`.
///
/// Must be called from the thread that lives for the whole job (normally main): PR_SET_PDEATHSIG
/// fires when the thread that spawned a rank exits.
pub fn run(launch: &LaunchArgs, job: &Job) -> anyhow::Result<i32> {
    let plan = spawn::Plan::new(launch, job)?;
    let segment = collectives::shm::JobSegment::create(plan.world_size).map_err(|e| {
        anyhow::anyhow!(
            "cannot set up the job's shared memory for {} ranks: {e}",
            plan.world_size
        )
    })?;
    supervise::run(plan, launch, &segment)
    // `segment` drops here, after every rank has been reaped.
}
