//! `tprun perf`: the nccl-tests table for tprun's collectives. (Skeleton.)

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("perf is not implemented yet")
}
