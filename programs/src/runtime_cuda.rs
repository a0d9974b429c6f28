//! The model programs' device path (feature `cuda`, `--device cuda`, which the launcher passes to
//! the ranks as `TPRUN_DEVICE=cuda`): the CUDA communicator on GPU `LOCAL_RANK % device count`
//! and this rank's [`CudaQwen2`], with rank 0 saying on stderr which GPU and which CUDA library
//! files it loaded. Nothing here has run on a GPU yet.

use std::time::Instant;

use anyhow::{Context, Result};
use collectives::cuda::CudaComm;
use rank::model::cuda::CudaQwen2;
use rank::model::loader::WeightDtype;

use crate::runtime::{LoadStats, Prepared};

/// This rank's CUDA communicator (collective: every rank calls it).
pub fn comm(program: &str) -> Result<CudaComm> {
    CudaComm::from_env()
        .with_context(|| format!("{program} --device cuda: cannot set up the CUDA collectives"))
}

/// Loads and uploads this rank's shard; rank 0 prints the GPU and the libraries.
pub fn load(
    p: &Prepared,
    dtype: WeightDtype,
    program: &str,
    comm: &CudaComm,
) -> Result<(CudaQwen2, LoadStats)> {
    let t0 = Instant::now();
    let show = p.plan.rank == 0;
    if show {
        eprintln!(
            "tprun {program}: loading {} on {} rank(s), weights {}, device cuda",
            p.dir.display(),
            p.plan.world,
            dtype.name()
        );
    }
    let mut ck = p.model.weights()?;
    let model = CudaQwen2::load(&mut ck, &p.config, &p.plan, dtype, comm)?;
    let stats = LoadStats {
        seconds: t0.elapsed().as_secs_f64(),
        weight_bytes: model.weight_bytes,
        bytes_read: ck.bytes_read(),
    };
    if show {
        eprintln!("tprun {program}: rank 0 on {}", model.loaded);
        eprintln!(
            "tprun {program}: loaded in {:.2} s, {:.1} MiB of weights on rank 0's GPU",
            stats.seconds,
            stats.weight_bytes as f64 / (1 << 20) as f64
        );
    }
    Ok((model, stats))
}
