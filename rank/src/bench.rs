//! `tprun bench`. (Skeleton.)

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
