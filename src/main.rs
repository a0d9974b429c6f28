//! `tprun`: command-line parsing and dispatch only.
//!
//! `tprun [LAUNCH OPTIONS] -- PROGRAM [ARGS]` launches any program; `tprun [LAUNCH OPTIONS]
//! generate|logits|bench|perf` re-executes tprun itself once per rank with `TPRUN_ROLE=rank`, and
//! that process runs the built-in program.

use std::ffi::OsString;
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
    #[command(subcommand)]
    command: Option<Cmd>,
    /// The program to run on every rank, and its arguments (after `--`).
    #[arg(last = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate text with a tensor-parallel Qwen2.
    Generate(rank::generate::Args),
    /// Write the logits of every prompt position to a safetensors file.
    Logits(rank::logits::Args),
    /// Prefill and decode speed, time in collectives, weight bytes per rank.
    Bench(rank::bench::Args),
    /// nccl-tests-style table of the collectives.
    Perf(collectives::perf::Args),
}

const ROLE_VAR: &str = "TPRUN_ROLE";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("tprun: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<i32> {
    let in_rank = std::env::var_os(ROLE_VAR).is_some_and(|v| v == "rank");
    match (cli.command, in_rank) {
        (Some(cmd), true) => {
            match cmd {
                Cmd::Generate(a) => rank::generate::run(&a)?,
                Cmd::Logits(a) => rank::logits::run(&a)?,
                Cmd::Bench(a) => rank::bench::run(&a)?,
                Cmd::Perf(a) => collectives::perf::run(&a)?,
            }
            Ok(0)
        }
        (Some(_), false) => {
            let exe = std::env::current_exe()?;
            let job = launcher::Job {
                program: exe.into_os_string(),
                args: std::env::args_os().skip(1).collect(),
                env: vec![(ROLE_VAR.into(), "rank".into())],
            };
            launcher::run(&cli.launch, &job)
        }
        (None, _) => {
            let mut it = cli.program.into_iter();
            let Some(program) = it.next() else {
                anyhow::bail!("nothing to run: give a built-in program (generate, logits, bench, perf) or `-- PROGRAM [ARGS]`");
            };
            let job = launcher::Job {
                program,
                args: it.collect(),
                env: Vec::new(),
            };
            launcher::run(&cli.launch, &job)
        }
    }
}
