//! `tprun logits`. (Skeleton.)

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("logits is not implemented yet")
}
