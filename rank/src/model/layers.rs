//! The tensor-parallel layers (Megatron layout, docs/DESIGN.md "Tensor-parallel layout"), named
//! as in vLLM so the type says where communication happens: [`ColumnParallelLinear`] (output
//! rows split, no communication), [`RowParallelLinear`] (input columns split, all-reduce of the
//! partial sums), [`VocabParallelEmbedding`] (vocab rows split, all-reduce of the looked-up
//! rows) and [`ParallelLmHead`] (vocab rows split, all-gather of the logits). Compute and
//! accumulation are f32; the all-reduce adds the partial sums in rank order.

use std::ops::Range;

use anyhow::{bail, Context, Result};
use collectives::{CommExt, Communicator, ReduceOp};
use kernels::PackedWeight;

use crate::model::loader::{Checkpoint, Slice, WeightDtype, Weights};
use crate::model::plan::ShardPlan;

fn all_reduce(comm: &mut dyn Communicator, buf: &mut [f32]) -> Result<()> {
    if comm.world_size() > 1 {
        comm.all_reduce(buf, ReduceOp::Sum).context("all-reduce")?;
    }
    Ok(())
}

/// Where [`crate::Qwen2::load`] gets each rank's slices from: a checkpoint, or (for benchmarks)
/// random values of the right shapes.
pub trait WeightSource {
    /// Tensor `name` of full shape `shape`, sliced for this rank, in `dtype`.
    fn load(
        &mut self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: WeightDtype,
    ) -> Result<Weights>;
    fn load_f32(&mut self, name: &str, shape: &[usize], slice: Slice) -> Result<Vec<f32>> {
        match self.load(name, shape, slice, WeightDtype::F32)? {
            Weights::F32(v) => Ok(v),
            Weights::BF16(v) => Ok(v.iter().map(|x| x.to_f32()).collect()),
        }
    }
}

impl WeightSource for Checkpoint {
    fn load(
        &mut self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: WeightDtype,
    ) -> Result<Weights> {
        Checkpoint::load(self, name, shape, slice, dtype)
    }
    fn load_f32(&mut self, name: &str, shape: &[usize], slice: Slice) -> Result<Vec<f32>> {
        Checkpoint::load_f32(self, name, shape, slice)
    }
}

/// A [`WeightSource`] seen under a name prefix, as candle's `VarBuilder`: each block loads its
/// own tensors by their short names (`q_proj.weight`) and the checkpoint's full names
/// (`model.layers.0.self_attn.q_proj.weight`) come from the prefixes ([`Prefixed::pp`]).
pub struct Prefixed<'a> {
    src: &'a mut dyn WeightSource,
    prefix: String,
    dtype: WeightDtype,
}

impl<'a> Prefixed<'a> {
    /// The root (no prefix); matrices are kept in `dtype`, vectors in f32.
    pub fn new(src: &'a mut dyn WeightSource, dtype: WeightDtype) -> Prefixed<'a> {
        Prefixed {
            src,
            prefix: String::new(),
            dtype,
        }
    }

    /// The same source under `prefix.name`.
    pub fn pp(&mut self, name: &str) -> Prefixed<'_> {
        let prefix = self.name(name);
        Prefixed {
            src: &mut *self.src,
            prefix,
            dtype: self.dtype,
        }
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A vector (norm weight, bias) as f32.
    pub fn f32(&mut self, name: &str, shape: &[usize], slice: Slice) -> Result<Vec<f32>> {
        let name = self.name(name);
        self.src.load_f32(&name, shape, slice)
    }

    /// Matrix `name` (full shape `[rows, cols]`), this rank's `slice` of it, laid out for the
    /// kernels (the loader's row-major copy is dropped once packed).
    pub fn packed(&mut self, name: &str, shape: [usize; 2], slice: Slice) -> Result<PackedWeight> {
        let (n, k) = match &slice {
            Slice::Rows(r) => (r.len(), shape[1]),
            Slice::Cols(c) => (shape[0], c.len()),
            Slice::All => (shape[0], shape[1]),
        };
        let name = self.name(name);
        let packed = match self.src.load(&name, &shape, slice, self.dtype)? {
            Weights::F32(w) => PackedWeight::pack(&w, n, k),
            Weights::BF16(w) => PackedWeight::pack(&w, n, k),
        };
        packed.with_context(|| format!("packing {name} ([{n}, {k}] on this rank)"))
    }
}

/// `y[..m * rows] = x · wᵀ` for `x` `[m, cols]`.
fn matmul_into(w: &PackedWeight, x: &[f32], m: usize, y: &mut [f32]) {
    kernels::matmul(&x[..m * w.cols()], w, &mut y[..m * w.rows()], m);
}

/// Linear layer whose output features (weight rows) are split across ranks. No communication:
/// each rank produces its own slice of the output.
pub struct ColumnParallelLinear {
    /// `[local output features, in]`.
    pub(crate) weight: PackedWeight,
    bias: Option<Vec<f32>>,
}

impl ColumnParallelLinear {
    /// `weight` (and `bias`) of `w`, output rows `rows` of the full `shape`.
    pub fn load(
        mut w: Prefixed,
        shape: [usize; 2],
        rows: Range<usize>,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.packed("weight", shape, Slice::Rows(rows.clone()))?;
        let bias = if bias {
            Some(w.f32("bias", &shape[..1], Slice::Rows(rows))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `y[..m * rows] = x · wᵀ + b`.
    pub fn forward_into(&self, x: &[f32], m: usize, y: &mut [f32]) {
        matmul_into(&self.weight, x, m, y);
        if let Some(b) = &self.bias {
            kernels::add_bias(&mut y[..m * self.weight.rows()], b);
        }
    }

    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// Linear layer whose input features (weight columns) are split across ranks: each rank's
/// product is a partial sum over its columns, all-reduced (in rank order) into the full output.
/// Qwen2's row-parallel layers (o_proj, down_proj) have no bias.
pub struct RowParallelLinear {
    /// `[out, local input features]`.
    pub(crate) weight: PackedWeight,
}

impl RowParallelLinear {
    /// `weight` of `w`, input columns `cols` of the full `shape`.
    pub fn load(mut w: Prefixed, shape: [usize; 2], cols: Range<usize>) -> Result<Self> {
        Ok(Self {
            weight: w.packed("weight", shape, Slice::Cols(cols))?,
        })
    }

    /// `y[..m * rows]` = the all-reduced `x · wᵀ`.
    pub fn forward_into(
        &self,
        comm: &mut dyn Communicator,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        matmul_into(&self.weight, x, m, y);
        all_reduce(comm, &mut y[..m * self.weight.rows()])
    }
}

/// Embedding whose vocabulary rows are split across ranks: a rank looks up the ids in its range,
/// leaves zeros for the others, and an all-reduce assembles the full rows.
pub struct VocabParallelEmbedding {
    /// `[local vocab, hidden]`, in the kernels' layout because tied embeddings are the LM head.
    pub(crate) weight: PackedWeight,
    pub(crate) vocab: Range<usize>,
    pub(crate) hidden: usize,
}

impl VocabParallelEmbedding {
    /// The rows of `ids` into `out` (`[ids.len(), hidden]`).
    pub fn forward_into(
        &self,
        comm: &mut dyn Communicator,
        ids: &[u32],
        out: &mut [f32],
    ) -> Result<()> {
        let h = self.hidden;
        let out = &mut out[..ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
            let id = id as usize;
            row.fill(0.0);
            if self.vocab.contains(&id) {
                self.weight.row_into(id - self.vocab.start, row);
            }
        }
        all_reduce(comm, out)
    }
}

/// The output projection, vocab rows split like the embedding (and the very same rows when the
/// embeddings are tied). Local logits are padded to `vocab_padded` columns so every rank sends
/// the same size, all-gathered, and the padding dropped.
pub struct ParallelLmHead {
    /// `None` when tied to the embedding.
    pub(crate) weight: Option<PackedWeight>,
    /// An int8 copy of this rank's head rows, so a greedy step reads the bf16/f32 rows only
    /// where the maximum may be (exact: see `kernels::screen`).
    pub(crate) screen: kernels::Screen,
    pub(crate) vocab: usize,
    pub(crate) padded: usize,
}

impl ParallelLmHead {
    pub fn forward(
        &self,
        comm: &mut dyn Communicator,
        embed: &VocabParallelEmbedding,
        plan: &ShardPlan,
        x: &[f32],
        m: usize,
    ) -> Result<Vec<f32>> {
        let w = self.weight.as_ref().unwrap_or(&embed.weight);
        let local = embed.vocab.len();
        let mut y = vec![0f32; m * local];
        matmul_into(w, x, m, &mut y);
        let world = comm.world_size();
        if world == 1 {
            return Ok(y);
        }
        let p = self.padded;
        let mut send = vec![0f32; m * p];
        for (dst, src) in send.chunks_exact_mut(p).zip(y.chunks_exact(local.max(1))) {
            dst[..local].copy_from_slice(&src[..local]);
        }
        let mut all = vec![0f32; world * m * p];
        comm.all_gather(&send, &mut all)
            .context("all-gather of logits")?;
        let mut logits = vec![0f32; m * self.vocab];
        for r in 0..world {
            let range = plan.vocab_of(r, self.vocab);
            let block = &all[r * m * p..(r + 1) * m * p];
            for t in 0..m {
                logits[t * self.vocab + range.start..t * self.vocab + range.end]
                    .copy_from_slice(&block[t * p..t * p + range.len()]);
            }
        }
        Ok(logits)
    }
}

impl ParallelLmHead {
    /// The greedy next token for one hidden row `x` without gathering the logits: each rank
    /// takes the maximum of its vocab shard, then the (value, id) pairs are all-gathered (8 bytes
    /// per rank instead of the vocabulary). Ties go to the lowest id, like `argmax`.
    pub fn argmax(
        &self,
        comm: &mut dyn Communicator,
        embed: &VocabParallelEmbedding,
        x: &[f32],
        scratch: &mut kernels::ScreenScratch,
    ) -> Result<u32> {
        let w = self.weight.as_ref().unwrap_or(&embed.weight);
        let found = kernels::argmax_screened(w, &self.screen, x, scratch).best;
        let best = match found {
            Some((v, i)) => (v, (embed.vocab.start + i) as u32),
            None => (f32::NEG_INFINITY, u32::MAX),
        };
        let world = comm.world_size();
        if world == 1 {
            return chosen(best.1);
        }
        let mine = [best.0.to_bits(), best.1];
        let mut all = [0u32; 2 * 64];
        let all = &mut all[..2 * world.min(64)];
        if world > 64 {
            bail!("distributed argmax supports at most 64 ranks");
        }
        comm.all_gather(&mine, all)
            .context("all-gather of the argmax")?;
        let mut out = (f32::NEG_INFINITY, u32::MAX);
        for p in all.chunks_exact(2) {
            let v = f32::from_bits(p[0]);
            if p[1] != u32::MAX && (v > out.0 || (v == out.0 && p[1] < out.1)) {
                out = (v, p[1]);
            }
        }
        chosen(out.1)
    }
}

/// The greedy token, or an error when every logit was NaN (`u32::MAX`: nothing won).
fn chosen(id: u32) -> Result<u32> {
    if id == u32::MAX {
        bail!("no token to pick: every logit is NaN");
    }
    Ok(id)
}
