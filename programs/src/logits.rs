//! `tprun logits`: the logits of every prompt position, written by rank 0 to a safetensors file
//! (tensor `logits`, `[seq_len, vocab]`, f32), for comparison with transformers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use collectives::Communicator;

use crate::runtime::{self, ModelArgs};
use rank::model::{ForwardOptions, Logits};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt token ids, comma-separated.
    #[arg(
        long,
        value_name = "1,2,3",
        value_delimiter = ',',
        required_unless_present = "text",
        conflicts_with = "text"
    )]
    pub input_ids: Option<Vec<u32>>,
    /// Prompt text, tokenised with the checkpoint's tokenizer.json (no special tokens added).
    #[arg(long)]
    pub text: Option<String>,
    /// Output file (safetensors, tensor `logits` [seq_len, vocab] f32).
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
    /// Also write the hidden states (`hidden_states.{i}`, [seq_len, hidden] f32; transformers'
    /// output_hidden_states convention) to this file.
    #[arg(long, value_name = "FILE.safetensors")]
    pub hidden_states: Option<PathBuf>,
    /// Print one JSON object (rank 0).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    #[cfg(feature = "cuda")]
    if crate::device::cuda_requested() {
        let mut comm = crate::runtime_cuda::comm("logits")?;
        return run_on(args, &mut comm, |comm, p, ids| {
            let (mut model, load) = crate::runtime_cuda::load(p, args.model.dtype, "logits", comm)?;
            let t0 = Instant::now();
            let all = rank::model::cuda::DeviceLogits::All;
            let mut hidden = Vec::new();
            let hs = args.hidden_states.is_some().then_some(&mut hidden);
            let logits = model.forward_with(comm, ids, 0, all, hs)?;
            Ok((logits, hidden, load, t0.elapsed().as_secs_f64()))
        });
    }
    let mut comm = collectives::from_env()?;
    runtime::set_compute_options(&args.model, comm.rank());
    run_on(args, &mut *comm, |comm, p, ids| {
        let (mut model, load) = runtime::load(p, args.model.dtype, "logits")?;
        let t0 = Instant::now();
        let opts = ForwardOptions {
            logits: Logits::All,
            hidden_states: args.hidden_states.is_some(),
        };
        let out = model.forward_with(comm, ids, 0, opts)?;
        Ok((
            out.logits,
            out.hidden_states,
            load,
            t0.elapsed().as_secs_f64(),
        ))
    })
}

/// Logits, hidden states, load statistics and forward seconds of one device path.
type Computed = (Vec<f32>, Vec<Vec<f32>>, runtime::LoadStats, f64);

fn run_on<C: Communicator + ?Sized>(
    args: &Args,
    comm: &mut C,
    compute: impl FnOnce(&mut C, &runtime::Prepared, &[u32]) -> Result<Computed>,
) -> Result<()> {
    let p = runtime::prepare(&args.model, &*comm)?;
    // Every rank checks the output directories after the model check and before the (slow)
    // load, so a typo fails at once and the same way on every rank.
    for (flag, path) in [
        ("--out", Some(&args.out)),
        ("--hidden-states", args.hidden_states.as_ref()),
    ] {
        if let Some(dir) = path
            .and_then(|p| p.parent())
            .filter(|d| !d.as_os_str().is_empty())
        {
            anyhow::ensure!(
                dir.is_dir(),
                "{flag} {}: directory {} does not exist",
                path.map_or(String::new(), |p| p.display().to_string()),
                dir.display()
            );
        }
    }
    let ids = match (&args.input_ids, &args.text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => p.model.tokenizer()?.encode(text, false)?,
        (None, None) => anyhow::bail!("give --input-ids or --text"),
    };
    p.config.check_ids(&ids, 0)?;
    let (logits, hidden_states, load, forward_s) = compute(comm, &p, &ids)?;
    let (seq, vocab, hidden) = (ids.len(), p.config.vocab_size, p.config.hidden_size);

    if p.plan.rank == 0 {
        runtime::write_f32_safetensors(&args.out, &[("logits".into(), vec![seq, vocab], &logits)])?;
        if let Some(path) = &args.hidden_states {
            let t: Vec<_> = hidden_states
                .iter()
                .enumerate()
                .map(|(i, h)| (format!("hidden_states.{i}"), vec![seq, hidden], &h[..]))
                .collect();
            runtime::write_f32_safetensors(path, &t)?;
        }
        if args.json {
            let j = serde_json::json!({
                "out": args.out,
                "input_ids": ids,
                "seq_len": seq,
                "vocab": vocab,
                "world_size": p.plan.world,
                "load_s": load.seconds,
                "forward_s": forward_s,
                "weight_bytes": load.weight_bytes,
                "bytes_read": load.bytes_read,
            });
            println!("{j}");
        } else {
            eprintln!(
                "tprun logits: wrote {} ({seq} x {vocab}) in {forward_s:.2} s",
                args.out.display()
            );
        }
    }
    comm.barrier().context("final barrier")?;
    Ok(())
}
