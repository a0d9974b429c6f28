//! Starts N rank processes with the torchrun environment and supervises them. (Skeleton.)

use std::ffi::OsString;
use std::path::PathBuf;

/// Launch options shared by `tprun -- PROGRAM` and the built-in programs (DESIGN section 1).
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Ranks to start.
    #[arg(short = 'n', long = "nproc-per-node", default_value = "1")]
    pub nproc_per_node: String,
    /// Also write rank r's output to DIR/rank{r}/stdout.log and stderr.log.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

/// What each rank runs.
#[derive(Debug, Clone)]
pub struct Job {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra environment for every rank, on top of the torchrun variables.
    pub env: Vec<(OsString, OsString)>,
}

/// Runs the job to completion; returns tprun's exit code.
pub fn run(_launch: &LaunchArgs, _job: &Job) -> anyhow::Result<i32> {
    anyhow::bail!("launcher not implemented yet")
}
