//! Starts N rank processes with the torchrun environment, relays their output, and supervises them
//! (fail-fast teardown, signal forwarding, timeout). `tprun`'s `main` only parses the command line
//! and calls [`run`].
//!
//! Layout: [`cpus`] (affinity and core shares), `spawn` (environment, program lookup, the child
//! setup between fork and exec), `output` (line-whole console relay and log files), `signals`
//! (SIGINT/SIGTERM/SIGHUP counters), `supervise` (the monitor loop and the summary table).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cpus;
mod errors;
pub mod guard;
mod output;
mod reaper;
mod signals;
mod spawn;
mod supervise;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Launch options shared by `tprun -- PROGRAM` and the built-in programs (docs/DESIGN.md, "Command line").
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Ranks to start: a number, or `auto` (one per GPU with --device cuda, else one per physical
    /// core tprun may run on).
    #[arg(short = 'n', long = "nproc-per-node", value_name = "N|auto", default_value = "1",
          value_parser = parse_nproc)]
    pub nproc_per_node: Nproc,
    /// Device the ranks compute on; passed to them as TPRUN_DEVICE [default: cuda where a GPU is
    /// usable (for the built-in programs: the cuda build, a driver and a device), else cpu].
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Pin rank r to its share of the allowed CPUs [default: cores when ranks <= physical cores,
    /// else none].
    #[arg(long, value_enum, value_name = "MODE")]
    pub cpu_bind: Option<CpuBind>,
    /// Also write rank r's output, unprefixed, to DIR/rank{r}/stdout.log and stderr.log.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Show only rank R's output on the console (log files still get every rank's; a built-in
    /// program's result on stdout is always shown).
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
    /// Restart the whole job up to N times after a rank fails (torchrun's --max-restarts); the
    /// ranks see TORCHELASTIC_RESTART_COUNT and TORCHELASTIC_MAX_RESTARTS.
    #[arg(long, value_name = "N", default_value = "0",
          value_parser = clap::value_parser!(u32).range(0..=MAX_RESTARTS as i64))]
    pub max_restarts: u32,
    /// The job's id, passed to the ranks as TORCHELASTIC_RUN_ID and TPRUN_RUN_ID [default: a
    /// fresh one].
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
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

/// Most ranks `-n` accepts: far beyond any machine, small enough that the per-rank tables tprun
/// builds before starting them cannot exhaust memory.
pub const MAX_RANKS: usize = 4096;
/// Most `--max-restarts`: enough for any flaky job, and a typo cannot loop for days.
pub const MAX_RESTARTS: u32 = 1000;
/// Longest `--grace-period` / `--timeout` (about 3 years): later deadlines would overflow the clock.
pub const MAX_SECS: f64 = 1e8;

fn parse_nproc(s: &str) -> Result<Nproc, String> {
    if s == "auto" {
        return Ok(Nproc::Auto);
    }
    match s.parse::<usize>() {
        Ok(n @ 1..=MAX_RANKS) => Ok(Nproc::Count(n)),
        _ => Err(format!(
            "expected `auto` or a number of ranks in 1..={MAX_RANKS}"
        )),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let range = || format!("expected a number of seconds in 0..={MAX_SECS:.0}");
    let v: f64 = s.trim().parse().map_err(|_| range())?;
    if !(0.0..=MAX_SECS).contains(&v) {
        return Err(range());
    }
    Duration::try_from_secs_f64(v).map_err(|_| range())
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d.is_zero() {
        return Err(format!(
            "expected a number of seconds in 0..={MAX_SECS:.0}, more than 0"
        ));
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
    /// How the ranks' output reaches the console.
    pub output: Output,
}

/// Where the ranks' output goes on tprun's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    /// `-- PROGRAM`: every line of every rank, `[rank{r}]: `-prefixed, on the stream it came on.
    #[default]
    Relay,
    /// Built-in programs: rank 0's stdout is the result (text, `--json`, tables) and goes to
    /// stdout as is, so it can be piped to `jq` or a file; everything else (logs, progress,
    /// other ranks' stdout) goes to stderr, prefixed only when the job has several ranks.
    Results,
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

/// For a built-in program's rank (tprun re-executed): SIGXFSZ ignored, so an output that hits
/// RLIMIT_FSIZE fails its write with EFBIG, which the program reports and cleans up after, instead
/// of dying mid-write and leaving a temp file behind. `-- PROGRAM` ranks keep the default.
pub fn builtin_rank_setup() -> anyhow::Result<()> {
    signals::ignore_sigxfsz()
}

/// Runs the job to completion and returns tprun's exit code: 0 when every rank exited 0, else the
/// first failing rank's code (128+N for signal N), 128+N when tprun got signal N, 124 on
/// `--timeout`. Errors before any rank starts (bad options, missing program, log dir) are `Err`.
/// After a rank failure the whole group starts again, up to `--max-restarts` times, each time
/// with a fresh shared-memory segment; `--timeout` counts from the first start.
///
/// Must be called from the thread that lives for the whole job (normally main): PR_SET_PDEATHSIG
/// fires when the thread that spawned a rank exits.
pub fn run(launch: &LaunchArgs, job: &Job) -> anyhow::Result<i32> {
    run_recording(launch, job, None)
}

/// [`run`], and when the job is torn down (a rank failed, a signal, `--timeout`) writes every
/// rank's flight recorder (its last collective calls) as JSON to `flight_out`, if given.
pub fn run_recording(
    launch: &LaunchArgs,
    job: &Job,
    flight_out: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    // Before anything that can hit an inherited limit or disposition (the segment, the logs).
    signals::reset_inherited()?;
    // Once for every attempt, so a signal between two attempts is not lost (or fatal).
    let mut handlers = signals::Handlers::install()?;
    let run_id = launch.run_id.clone().unwrap_or_else(spawn::run_id);
    let deadline = launch.timeout.map(|t| {
        let now = Instant::now();
        now.checked_add(t)
            .unwrap_or(now + Duration::from_secs(86_400 * 365 * 30))
    });
    let mut attempt = 0;
    loop {
        let elastic = spawn::Elastic {
            run_id: run_id.clone(),
            restart: attempt,
            max_restarts: launch.max_restarts,
        };
        let plan = spawn::LaunchPlan::new(launch, job, elastic)?;
        let segment = collectives::shm::JobSegment::create(plan.world_size).map_err(|e| {
            anyhow::anyhow!(
                "cannot set up the job's shared memory for {} ranks: {e}",
                plan.world_size
            )
        })?;
        let end = supervise::run(
            plan,
            launch,
            job.output,
            &segment,
            &mut handlers,
            deadline,
            flight_out,
        )?;
        // The segment goes here, after every rank of this attempt has been reaped.
        drop(segment);
        if !end.rank_failed || attempt >= launch.max_restarts {
            return Ok(end.code);
        }
        attempt += 1;
        let line = format!(
            "tprun: restarting the job (restart {attempt} of {})\n",
            launch.max_restarts
        );
        output::write_stderr_bounded(line.as_bytes(), Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_numbers_are_refused_with_the_range() {
        for bad in ["1e19", "inf", "NaN", "-1", "1e300", "100000001"] {
            let e = parse_secs(bad).unwrap_err();
            assert!(e.contains("0..=100000000"), "{bad}: {e}");
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_secs("1e8").unwrap(), Duration::from_secs(100_000_000));
        assert!(parse_timeout("0").is_err());
        for bad in ["0", "4097", "18446744073709551615", "99999999999999999999"] {
            assert!(parse_nproc(bad).unwrap_err().contains("1..=4096"), "{bad}");
        }
        assert_eq!(parse_nproc("4096"), Ok(Nproc::Count(4096)));
    }
}
