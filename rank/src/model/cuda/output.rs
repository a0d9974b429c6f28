//! The public forward calls of [`CudaQwen2`]: gathered logits (every rank's vocabulary shard,
//! padded to `vocab_padded` so every rank sends the same size, all-gathered on the device and
//! unpadded on the host as the CPU `ParallelLmHead::forward` does) or the greedy token (the
//! argmax kernel per shard, then an all-gather of (value, id) pairs; ties to the lowest id).

use anyhow::{bail, Result};
use collectives::cuda::CudaComm;
use collectives::Communicator;

use super::forward::DeviceLogits;
use super::launch::ptr;
use super::CudaQwen2;
use crate::model::cuda_plan as plan;

impl CudaQwen2 {
    /// The logits of `ids` at positions `start..` (`[rows, vocab]`, rows = `ids.len()` or 1),
    /// the same on every rank; appends the positions to the KV cache.
    pub fn forward(
        &mut self,
        comm: &mut CudaComm,
        ids: &[u32],
        start: usize,
        which: DeviceLogits,
    ) -> Result<Vec<f32>> {
        self.forward_with(comm, ids, start, which, None)
    }

    /// [`CudaQwen2::forward`], and with `hidden_states` transformers' `output_hidden_states`
    /// (`num_hidden_layers + 1` tensors of `[seq, hidden]`, the last after the final norm) as
    /// the CPU `Qwen2::forward_with` gives them.
    pub fn forward_with(
        &mut self,
        comm: &mut CudaComm,
        ids: &[u32],
        start: usize,
        which: DeviceLogits,
        mut hidden_states: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<f32>> {
        let b = self.run_layers(comm, ids, start, hidden_states.as_deref_mut())?;
        if let Some(hs) = hidden_states {
            hs.push(self.stream.memcpy_dtov(&b.normed)?);
        }
        let (first, rows) = match which {
            DeviceLogits::All => (0, b.m),
            DeviceLogits::Last => (b.m - 1, 1),
        };
        let y = self.head(&b, first, rows)?;
        let (world, vocab) = (comm.world_size(), self.config.vocab_size);
        if world == 1 {
            return Ok(self.stream.memcpy_dtov(&y)?);
        }
        let (local, p) = (self.plan.vocab.len(), self.plan.vocab_padded);
        let mut send = self.stream.alloc_zeros::<f32>(rows * p)?;
        for t in (0..rows).filter(|_| local > 0) {
            let src = y.slice(t * local..(t + 1) * local);
            self.stream
                .memcpy_dtod(&src, &mut send.slice_mut(t * p..t * p + local))?;
        }
        let mut all = self.stream.alloc_zeros::<f32>(world * rows * p)?;
        comm.all_gather_dev(&send, &mut all)?;
        let all = self.stream.memcpy_dtov(&all)?;
        let mut logits = vec![0f32; rows * vocab];
        for r in 0..world {
            let range = self.plan.vocab_of(r, vocab);
            let block = &all[r * rows * p..(r + 1) * rows * p];
            for t in 0..rows {
                logits[t * vocab + range.start..t * vocab + range.end]
                    .copy_from_slice(&block[t * p..t * p + range.len()]);
            }
        }
        Ok(logits)
    }

    /// The greedy next token after `ids` (the CPU `Qwen2::forward_argmax`).
    pub fn forward_argmax(
        &mut self,
        comm: &mut CudaComm,
        ids: &[u32],
        start: usize,
    ) -> Result<u32> {
        let b = self.run_layers(comm, ids, start, None)?;
        let local = self.plan.vocab.len();
        let y = self.head(&b, b.m - 1, 1)?;
        let s = &self.stream;
        // (value bits, id) of this shard's maximum.
        let mut pair = s.alloc_zeros::<u32>(2)?;
        if local > 0 {
            let l = plan::argmax(local, self.plan.vocab.start);
            let bufs = [ptr(s, &y, 0), ptr(s, &pair, 0), ptr(s, &pair, 1)];
            // SAFETY: y holds `local` f32; pair two 4-byte slots (f32 value, int id).
            unsafe { self.launch(&l, &bufs)? };
        } else {
            s.memcpy_htod(&[f32::NEG_INFINITY.to_bits(), u32::MAX], &mut pair)?;
        }
        let world = comm.world_size();
        let all = match world {
            1 => s.memcpy_dtov(&pair)?,
            _ => {
                let mut all = s.alloc_zeros::<u32>(2 * world)?;
                comm.all_gather_dev(&pair, &mut all)?;
                s.memcpy_dtov(&all)?
            }
        };
        let mut out = (f32::NEG_INFINITY, u32::MAX);
        for p in all.chunks_exact(2) {
            let v = f32::from_bits(p[0]);
            if p[1] != u32::MAX && (v > out.0 || (v == out.0 && p[1] < out.1)) {
                out = (v, p[1]);
            }
        }
        if out.1 == u32::MAX {
            bail!("no token to pick: every logit is NaN");
        }
        Ok(out.1)
    }
}
