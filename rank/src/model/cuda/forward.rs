//! [`CudaQwen2`]'s forward pass, layer for layer as the CPU `Qwen2::forward_with`: embedding
//! (vocab-parallel gather + all-reduce), per layer RMSNorm → q/k/v (+ bias) → RoPE → KV append →
//! attention → o_proj → all-reduce → residual, RMSNorm → gate/up → SiLU-gate → down →
//! all-reduce → residual; the final norm; the LM head, then the logits' all-gather or the
//! distributed argmax.

use anyhow::{anyhow, ensure, Context, Result};
use collectives::cuda::cudarc::driver::{CudaSlice, CudaStream};
use collectives::cuda::CudaComm;
use collectives::{Communicator, DType, ReduceOp};

use super::launch::{ptr, Split};
use super::{CudaQwen2, Layer};
use crate::model::cuda_plan::{self as plan, Heads};

/// Which rows of logits [`CudaQwen2::forward`] returns (the CPU's `Logits::All` / `Last`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceLogits {
    All,
    Last,
}

/// The activations of one forward call, sized exactly for its tokens (the device collectives
/// reduce whole slices).
pub(super) struct Bufs {
    /// Tokens of this call.
    pub(super) m: usize,
    start: usize,
    x: CudaSlice<f32>,
    pub(super) normed: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    /// bf16 weights only: the activations as two bf16 terms and the two products
    /// ([`CudaQwen2::linear`]), sized for the widest product of a layer.
    xb: CudaSlice<u16>,
    halves: CudaSlice<f32>,
    ids: CudaSlice<i32>,
    pos: CudaSlice<i32>,
}

impl Bufs {
    /// The bf16 products' scratch ([`CudaQwen2::linear`]).
    fn split(&self, s: &CudaStream) -> Split {
        Split {
            xb: ptr(s, &self.xb, 0),
            halves: ptr(s, &self.halves, 0),
        }
    }
}

fn all_reduce(comm: &mut CudaComm, buf: &mut CudaSlice<f32>) -> Result<()> {
    if comm.world_size() > 1 {
        comm.all_reduce_dev(buf, DType::F32, ReduceOp::Sum)
            .context("all-reduce")?;
    }
    Ok(())
}

impl CudaQwen2 {
    fn heads(&self) -> Heads {
        Heads::of(&self.plan, self.max_positions)
    }

    fn bufs(&self, ids: &[u32], start: usize) -> Result<Bufs> {
        let (m, h) = (ids.len(), self.config.hidden_size);
        let hd = self.heads();
        let (nq, nkv) = (hd.heads * hd.head_dim, hd.kv_heads * hd.head_dim);
        let il = self.plan.intermediate.len();
        let s = &self.stream;
        let z = |n: usize| s.alloc_zeros::<f32>(n.max(1));
        let ids32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let pos: Vec<i32> = (start..start + m).map(|p| p as i32).collect();
        Ok(Bufs {
            m,
            start,
            x: z(m * h)?,
            normed: z(m * h)?,
            q: z(m * nq)?,
            k: z(m * nkv)?,
            v: z(m * nkv)?,
            attn: z(m * nq)?,
            proj: z(m * h)?,
            gate: z(m * il)?,
            up: z(m * il)?,
            xb: s.alloc_zeros::<u16>(self.split_len(m * h.max(nq).max(il)))?,
            halves: z(self.split_len(m * h.max(nq).max(il)))?,
            ids: s.memcpy_stod(&ids32)?,
            pos: s.memcpy_stod(&pos)?,
        })
    }

    /// Grows every layer's cache to hold `needed` positions, keeping the cached ones.
    pub(super) fn ensure_cache(&mut self, needed: usize) -> Result<()> {
        if needed <= self.cache.capacity && self.cache.layers.len() == self.layers.len() {
            return Ok(());
        }
        let cap = needed.max(2 * self.cache.capacity).max(16);
        let row = self.plan.kv_heads.len() * self.config.head_dim;
        let keep = self.cache.len * row;
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let mut k = self.stream.alloc_zeros::<f32>(cap * row)?;
            let mut v = self.stream.alloc_zeros::<f32>(cap * row)?;
            if let Some((ok, ov)) = self.cache.layers.get(i).filter(|_| keep > 0) {
                self.stream
                    .memcpy_dtod(&ok.slice(..keep), &mut k.slice_mut(..keep))?;
                self.stream
                    .memcpy_dtod(&ov.slice(..keep), &mut v.slice_mut(..keep))?;
            }
            layers.push((k, v));
        }
        self.cache.layers = layers;
        self.cache.capacity = cap;
        Ok(())
    }

    /// Embedding and every layer; `b.normed` ends as the final norm of every position. With
    /// `hidden_states`, pushes the embeddings and every layer's output but the last (copied to
    /// the host), as the CPU `Qwen2` does.
    pub(super) fn run_layers(
        &mut self,
        comm: &mut CudaComm,
        ids: &[u32],
        start: usize,
        mut hidden_states: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Bufs> {
        ensure!(!ids.is_empty(), "forward of no tokens");
        ensure!(
            start <= self.cache.len,
            "forward at position {start} but the KV cache holds {}",
            self.cache.len
        );
        self.ensure_cache(start + ids.len())?;
        let mut b = self.bufs(ids, start)?;
        let (m, h) = (b.m, self.config.hidden_size);
        let s = &self.stream;
        let l = plan::embedding_gather(m, h, self.plan.vocab.clone());
        // SAFETY: table [local vocab, h], ids [m], x [m, h], all live until the end of forward.
        unsafe {
            self.launch(
                &l,
                &[ptr(s, &self.embed, 0), ptr(s, &b.ids, 0), ptr(s, &b.x, 0)],
            )?
        };
        all_reduce(comm, &mut b.x)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(hs) = hidden_states.as_mut() {
                hs.push(self.stream.memcpy_dtov(&b.x)?);
            }
            self.attention(comm, i, layer, &mut b)?;
            self.mlp(comm, layer, &mut b)?;
        }
        let eps = self.config.rms_norm_eps as f32;
        let bufs = [ptr(s, &b.x, 0), ptr(s, &self.norm, 0), ptr(s, &b.normed, 0)];
        // SAFETY: x and normed [m, h], norm [h].
        unsafe { self.launch(&plan::rms_norm(m, h, eps), &bufs)? };
        self.cache.len = start + m;
        Ok(b)
    }

    /// The attention half of layer `i`, residual included.
    fn attention(&self, comm: &mut CudaComm, i: usize, ly: &Layer, b: &mut Bufs) -> Result<()> {
        let (m, h, s) = (b.m, self.config.hidden_size, &self.stream);
        let hd = self.heads();
        let (nq, nkv, d) = (
            hd.heads * hd.head_dim,
            hd.kv_heads * hd.head_dim,
            hd.head_dim,
        );
        let (x, normed, sp) = (ptr(s, &b.x, 0), ptr(s, &b.normed, 0), b.split(s));
        let (q, k, v) = (ptr(s, &b.q, 0), ptr(s, &b.k, 0), ptr(s, &b.v, 0));
        let (kc, vc) = &self.cache.layers[i];
        let (kc, vc) = (ptr(s, kc, 0), ptr(s, vc, 0));
        let eps = self.config.rms_norm_eps as f32;
        let attend = match m {
            1 => plan::attention_decode(b.start + 1, hd),
            _ => plan::attention_prefill(m, b.start, hd),
        }
        .ok_or_else(|| {
            anyhow!(
                "attention over {} positions: this GPU's shared memory holds the scores of at \
                 most {}",
                b.start + m,
                hd.max_positions
            )
        })?;
        // SAFETY: every buffer was sized for these m tokens in `bufs`, the cache for
        // start + m positions in `ensure_cache`; the weights are [out, in] of this rank's shard.
        unsafe {
            self.launch(&plan::rms_norm(m, h, eps), &[x, ptr(s, &ly.ln1, 0), normed])?;
            for ((w, bias), y, out) in [(&ly.q, q, nq), (&ly.k, k, nkv), (&ly.v, v, nkv)] {
                self.linear(w, (m, out, h), normed, sp, y)?;
                self.launch(&plan::bias_add(m, out), &[y, ptr(s, bias, 0)])?;
            }
            let (pos, inv_freq) = (ptr(s, &b.pos, 0), ptr(s, &self.inv_freq, 0));
            self.launch(&plan::rope(m, hd.heads, d), &[q, pos, inv_freq])?;
            self.launch(&plan::rope(m, hd.kv_heads, d), &[k, pos, inv_freq])?;
            let append = plan::kv_append(m, b.start, hd.kv_heads, d);
            self.launch(&append, &[k, v, kc, vc])?;
            self.launch(&attend, &[q, kc, vc, ptr(s, &b.attn, 0)])?;
            self.linear(
                &ly.o,
                (m, h, nq),
                ptr(s, &b.attn, 0),
                sp,
                ptr(s, &b.proj, 0),
            )?;
        }
        all_reduce(comm, &mut b.proj)?;
        // SAFETY: x and proj [m, h].
        unsafe { self.launch(&plan::add_inplace(m * h), &[x, ptr(s, &b.proj, 0)]) }
    }

    /// The MLP half of a layer, residual included.
    fn mlp(&self, comm: &mut CudaComm, ly: &Layer, b: &mut Bufs) -> Result<()> {
        let (m, h, s) = (b.m, self.config.hidden_size, &self.stream);
        let il = self.plan.intermediate.len();
        let eps = self.config.rms_norm_eps as f32;
        let (x, normed, sp) = (ptr(s, &b.x, 0), ptr(s, &b.normed, 0), b.split(s));
        let (gate, up) = (ptr(s, &b.gate, 0), ptr(s, &b.up, 0));
        // SAFETY: buffers sized for m tokens in `bufs`; gate/up [il, h], down [h, il].
        unsafe {
            self.launch(&plan::rms_norm(m, h, eps), &[x, ptr(s, &ly.ln2, 0), normed])?;
            self.linear(&ly.gate, (m, il, h), normed, sp, gate)?;
            self.linear(&ly.up, (m, il, h), normed, sp, up)?;
            self.launch(&plan::silu_gate(m * il), &[gate, up, gate])?;
            self.linear(&ly.down, (m, h, il), gate, sp, ptr(s, &b.proj, 0))?;
        }
        all_reduce(comm, &mut b.proj)?;
        // SAFETY: x and proj [m, h].
        unsafe { self.launch(&plan::add_inplace(m * h), &[x, ptr(s, &b.proj, 0)]) }
    }

    /// Elements of the bf16 split's scratch for products of `n` elements: twice that with bf16
    /// weights, none (one, for the allocator) with f32.
    fn split_len(&self, n: usize) -> usize {
        if self.bf16 {
            2 * n
        } else {
            1
        }
    }

    /// This rank's LM head rows for `rows` normed positions from `first`: `[rows, local vocab]`.
    /// In pieces of rows whose element counts the kernels' `int` sizes hold (a prefill of
    /// 14,000 positions over Qwen2's 151,936-token vocabulary is more).
    pub(super) fn head(&self, b: &Bufs, first: usize, rows: usize) -> Result<CudaSlice<f32>> {
        let (h, local, s) = (self.config.hidden_size, self.plan.vocab.len(), &self.stream);
        let y = s.alloc_zeros::<f32>((rows * local).max(1))?;
        let piece = plan::rows_per_piece(2 * local.max(h));
        let halves = s.alloc_zeros::<f32>(self.split_len(piece.min(rows) * local).max(1))?;
        let sp = Split {
            xb: ptr(s, &b.xb, 0),
            halves: ptr(s, &halves, 0),
        };
        for r0 in (0..rows).step_by(piece) {
            let n = piece.min(rows - r0);
            let (x, out) = (ptr(s, &b.normed, (first + r0) * h), ptr(s, &y, r0 * local));
            // SAFETY: normed holds m ≥ first + rows rows of h; xb 2 * m * h ≥ 2 * n * h u16
            // (bf16); halves 2 * n * local (bf16); y rows * local from row r0.
            unsafe { self.linear(&self.head, (n, local, h), x, sp, out)? };
        }
        Ok(y)
    }
}
