//! The tensor-parallel Qwen2 forward pass (Megatron layout, DESIGN section 3).
//!
//! Layer names follow vLLM so the type says where communication happens:
//! [`ColumnParallelLinear`] (output rows split, no communication), [`RowParallelLinear`] (input
//! columns split, all-reduce of the partial sums), [`VocabParallelEmbedding`] (vocab rows split,
//! all-reduce of the looked-up rows) and [`ParallelLmHead`] (vocab rows split, all-gather of the
//! logits). Compute and accumulation are f32; the all-reduce adds the partial sums in rank order.
//! The math follows transformers' `modeling_qwen2.py`.

use std::ops::Range;

use anyhow::{bail, Context, Result};
use collectives::{Communicator, DType, ReduceOp};
use kernels::Weight;

use crate::config::Config;
use crate::loader::{Checkpoint, Slice, WeightDtype, Weights};
use crate::plan::Plan;

fn all_reduce(comm: &mut dyn Communicator, buf: &mut [f32]) -> Result<()> {
    if comm.world_size() > 1 {
        comm.all_reduce_raw(bytemuck::cast_slice_mut(buf), DType::F32, ReduceOp::Sum)
            .context("all-reduce")?;
    }
    Ok(())
}

/// `y = x · wᵀ` for `x` `[m, cols]` and a `[rows, cols]` weight.
fn matmul(w: &Weights, x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
    fn go<W: Weight>(w: &[W], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        kernels::matmul(x, w, &mut y, m, n, k);
        y
    }
    match w {
        Weights::F32(w) => go(w, x, m, rows, cols),
        Weights::BF16(w) => go(w, x, m, rows, cols),
    }
}

/// Linear layer whose output features (weight rows) are split across ranks. No communication:
/// each rank produces its own slice of the output.
pub struct ColumnParallelLinear {
    weight: Weights,
    bias: Option<Vec<f32>>,
    /// Local output features.
    rows: usize,
    cols: usize,
}

impl ColumnParallelLinear {
    fn load(
        ck: &mut Checkpoint,
        name: &str,
        shape: [usize; 2],
        rows: Range<usize>,
        bias: bool,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let weight = ck.load(
            &format!("{name}.weight"),
            &shape,
            Slice::Rows(rows.clone()),
            dtype,
        )?;
        let bias = if bias {
            Some(ck.load_f32(
                &format!("{name}.bias"),
                &shape[..1],
                Slice::Rows(rows.clone()),
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            rows: rows.len(),
            cols: shape[1],
        })
    }

    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = matmul(&self.weight, x, m, self.rows, self.cols);
        if let Some(b) = &self.bias {
            kernels::add_bias(&mut y, b);
        }
        y
    }

    fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// Linear layer whose input features (weight columns) are split across ranks: each rank's
/// product is a partial sum over its columns, all-reduced (in rank order) into the full output.
/// Qwen2's row-parallel layers (o_proj, down_proj) have no bias.
pub struct RowParallelLinear {
    weight: Weights,
    rows: usize,
    /// Local input features.
    cols: usize,
}

impl RowParallelLinear {
    fn load(
        ck: &mut Checkpoint,
        name: &str,
        shape: [usize; 2],
        cols: Range<usize>,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let weight = ck.load(
            &format!("{name}.weight"),
            &shape,
            Slice::Cols(cols.clone()),
            dtype,
        )?;
        Ok(Self {
            weight,
            rows: shape[0],
            cols: cols.len(),
        })
    }

    fn forward(&self, comm: &mut dyn Communicator, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut y = matmul(&self.weight, x, m, self.rows, self.cols);
        all_reduce(comm, &mut y)?;
        Ok(y)
    }
}

/// Embedding whose vocabulary rows are split across ranks: a rank looks up the ids in its range,
/// leaves zeros for the others, and an all-reduce assembles the full rows.
pub struct VocabParallelEmbedding {
    weight: Weights,
    vocab: Range<usize>,
    hidden: usize,
}

impl VocabParallelEmbedding {
    fn forward(&self, comm: &mut dyn Communicator, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let mut out = vec![0f32; ids.len() * h];
        for (row, &id) in out.chunks_exact_mut(h).zip(ids) {
            let id = id as usize;
            if self.vocab.contains(&id) {
                let i = (id - self.vocab.start) * h;
                match &self.weight {
                    Weights::F32(w) => f32::widen(&w[i..i + h], row),
                    Weights::BF16(w) => half::bf16::widen(&w[i..i + h], row),
                }
            }
        }
        all_reduce(comm, &mut out)?;
        Ok(out)
    }
}

/// The output projection, vocab rows split like the embedding (and the very same rows when the
/// embeddings are tied). Local logits are padded to `vocab_padded` columns so every rank sends
/// the same size, all-gathered, and the padding dropped.
pub struct ParallelLmHead {
    /// `None` when tied to the embedding.
    weight: Option<Weights>,
    vocab: usize,
    padded: usize,
}

impl ParallelLmHead {
    fn forward(
        &self,
        comm: &mut dyn Communicator,
        embed: &VocabParallelEmbedding,
        plan: &Plan,
        x: &[f32],
        m: usize,
    ) -> Result<Vec<f32>> {
        let w = self.weight.as_ref().unwrap_or(&embed.weight);
        let local = embed.vocab.len();
        let y = matmul(w, x, m, local, embed.hidden);
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
        comm.all_gather_raw(
            bytemuck::cast_slice(&send),
            bytemuck::cast_slice_mut(&mut all),
            DType::F32,
        )
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

/// cos/sin tables of the default ("rotate half") RoPE, extended on demand.
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// `inv_freq[i] = 1 / theta^((2i as f32) / d)`, every step in f32 as transformers does it.
    pub fn new(theta: f64, head_dim: usize) -> Rope {
        let base = theta as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope {
            inv_freq,
            head_dim,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }

    fn ensure(&mut self, positions: usize) {
        let d = self.head_dim;
        for p in self.cos.len() / d..positions {
            // freqs = pos ⊗ inv_freq; emb = cat(freqs, freqs).
            for _half in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    self.cos.push(a.cos());
                    self.sin.push(a.sin());
                }
            }
        }
    }

    fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let d = self.head_dim;
        (
            &self.cos[pos * d..(pos + 1) * d],
            &self.sin[pos * d..(pos + 1) * d],
        )
    }
}

/// Post-RoPE keys and values of one layer: per local KV head, `[positions, head_dim]`.
#[derive(Default, Clone)]
struct LayerCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The KV cache of every layer (this rank's KV heads only) and how many positions it holds.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets positions `len..` (to re-run from an earlier position).
    pub fn truncate(&mut self, len: usize, head_dim: usize) {
        for l in &mut self.layers {
            for c in l.k.iter_mut().chain(l.v.iter_mut()) {
                c.truncate(len * head_dim);
            }
        }
        self.len = self.len.min(len);
    }
}

/// Where a forward call is: this rank's plan, the RoPE tables, the first new position and the
/// number of new tokens.
#[derive(Clone, Copy)]
struct Step<'a> {
    plan: &'a Plan,
    rope: &'a Rope,
    start_pos: usize,
    m: usize,
}

pub struct Attention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
}

impl Attention {
    fn forward(
        &self,
        comm: &mut dyn Communicator,
        step: &Step,
        cache: &mut LayerCache,
        x: &[f32],
    ) -> Result<Vec<f32>> {
        let Step {
            plan,
            rope,
            start_pos,
            m,
        } = *step;
        let d = plan.head_dim;
        let (nq, nkv) = (plan.q_heads.len(), plan.kv_heads.len());
        let mut q = self.q_proj.forward(x, m);
        let mut k = self.k_proj.forward(x, m);
        let v = self.v_proj.forward(x, m);
        for t in 0..m {
            let (cos, sin) = rope.at(start_pos + t);
            for h in q[t * nq * d..(t + 1) * nq * d].chunks_exact_mut(d) {
                kernels::rope(h, cos, sin);
            }
            for h in k[t * nkv * d..(t + 1) * nkv * d].chunks_exact_mut(d) {
                kernels::rope(h, cos, sin);
            }
        }
        cache.k.resize(nkv, Vec::new());
        cache.v.resize(nkv, Vec::new());
        for t in 0..m {
            for j in 0..nkv {
                let s = (t * nkv + j) * d;
                cache.k[j].extend_from_slice(&k[s..s + d]);
                cache.v[j].extend_from_slice(&v[s..s + d]);
            }
        }
        // Causal GQA attention: token t sees positions 0..=start_pos+t.
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; m * nq * d];
        let mut scores = vec![0f32; start_pos + m];
        for t in 0..m {
            let len = start_pos + t + 1;
            for h in 0..nq {
                let j = plan.local_kv_of(h);
                let s = (t * nq + h) * d;
                kernels::attend(
                    &q[s..s + d],
                    &cache.k[j][..len * d],
                    &cache.v[j][..len * d],
                    scale,
                    &mut scores,
                    &mut out[s..s + d],
                );
            }
        }
        self.o_proj.forward(comm, &out, m)
    }
}

pub struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

impl Mlp {
    fn forward(&self, comm: &mut dyn Communicator, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut g = self.gate_proj.forward(x, m);
        let u = self.up_proj.forward(x, m);
        kernels::silu_mul(&mut g, &u);
        self.down_proj.forward(comm, &g, m)
    }
}

pub struct DecoderLayer {
    input_layernorm: Vec<f32>,
    self_attn: Attention,
    post_attention_layernorm: Vec<f32>,
    mlp: Mlp,
}

/// Which positions' logits a forward computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
    None,
}

#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub logits: Logits,
    /// Also return the hidden states (transformers' `output_hidden_states`).
    pub hidden_states: bool,
}

pub struct ForwardOutput {
    /// `[rows, vocab]`: every position, the last one, or empty (see [`Logits`]).
    pub logits: Vec<f32>,
    /// With `hidden_states`: `num_hidden_layers + 1` tensors of `[seq, hidden]`, as transformers
    /// returns them: the embeddings, the output of layers 0..L-1, and the final-norm output of
    /// the last layer (in place of its raw output). Full on every rank.
    pub hidden_states: Vec<Vec<f32>>,
}

/// One rank's shard of a Qwen2ForCausalLM and its KV cache.
pub struct Qwen2 {
    pub config: Config,
    pub plan: Plan,
    embed_tokens: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: ParallelLmHead,
    rope: Rope,
    cache: KvCache,
}

impl Qwen2 {
    /// Loads this rank's shard. `progress(done, total)` is called after each layer.
    pub fn load(
        ck: &mut Checkpoint,
        config: &Config,
        plan: &Plan,
        dtype: WeightDtype,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Qwen2> {
        let c = config;
        let (h, d, v) = (c.hidden_size, c.head_dim, c.vocab_size);
        let (nq, nkv, inter) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
        );
        let embed = ck.load(
            "model.embed_tokens.weight",
            &[v, h],
            Slice::Rows(plan.vocab.clone()),
            dtype,
        )?;
        let embed_tokens = VocabParallelEmbedding {
            weight: embed,
            vocab: plan.vocab.clone(),
            hidden: h,
        };
        let total = c.num_hidden_layers;
        let mut layers = Vec::with_capacity(total);
        for i in 0..total {
            let p = format!("model.layers.{i}");
            let norm = |ck: &mut Checkpoint, n: &str| {
                ck.load_f32(&format!("{p}.{n}.weight"), &[h], Slice::All)
            };
            let a = format!("{p}.self_attn");
            let mm = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: norm(ck, "input_layernorm")?,
                self_attn: Attention {
                    q_proj: ColumnParallelLinear::load(
                        ck,
                        &format!("{a}.q_proj"),
                        [nq * d, h],
                        plan.q_rows(),
                        true,
                        dtype,
                    )?,
                    k_proj: ColumnParallelLinear::load(
                        ck,
                        &format!("{a}.k_proj"),
                        [nkv * d, h],
                        plan.kv_rows(),
                        true,
                        dtype,
                    )?,
                    v_proj: ColumnParallelLinear::load(
                        ck,
                        &format!("{a}.v_proj"),
                        [nkv * d, h],
                        plan.kv_rows(),
                        true,
                        dtype,
                    )?,
                    o_proj: RowParallelLinear::load(
                        ck,
                        &format!("{a}.o_proj"),
                        [h, nq * d],
                        plan.q_rows(),
                        dtype,
                    )?,
                },
                post_attention_layernorm: norm(ck, "post_attention_layernorm")?,
                mlp: Mlp {
                    gate_proj: ColumnParallelLinear::load(
                        ck,
                        &format!("{mm}.gate_proj"),
                        [inter, h],
                        plan.intermediate.clone(),
                        false,
                        dtype,
                    )?,
                    up_proj: ColumnParallelLinear::load(
                        ck,
                        &format!("{mm}.up_proj"),
                        [inter, h],
                        plan.intermediate.clone(),
                        false,
                        dtype,
                    )?,
                    down_proj: RowParallelLinear::load(
                        ck,
                        &format!("{mm}.down_proj"),
                        [h, inter],
                        plan.intermediate.clone(),
                        dtype,
                    )?,
                },
            });
            progress(i + 1, total);
        }
        let norm = ck.load_f32("model.norm.weight", &[h], Slice::All)?;
        let weight = if c.tie_word_embeddings {
            None
        } else {
            Some(ck.load(
                "lm_head.weight",
                &[v, h],
                Slice::Rows(plan.vocab.clone()),
                dtype,
            )?)
        };
        Ok(Qwen2 {
            config: c.clone(),
            plan: plan.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head: ParallelLmHead {
                weight,
                vocab: v,
                padded: plan.vocab_padded,
            },
            rope: Rope::new(c.rope_theta, d),
            cache: KvCache::default(),
        })
    }

    /// Bytes of weights resident on this rank (matrices, biases, norms).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed_tokens.weight.bytes() + self.norm.len() * 4;
        n += self.lm_head.weight.as_ref().map_or(0, Weights::bytes);
        for l in &self.layers {
            let a = &l.self_attn;
            let m = &l.mlp;
            n += (l.input_layernorm.len() + l.post_attention_layernorm.len()) * 4;
            n += a.q_proj.bytes() + a.k_proj.bytes() + a.v_proj.bytes() + a.o_proj.weight.bytes();
            n += m.gate_proj.bytes() + m.up_proj.bytes() + m.down_proj.weight.bytes();
        }
        n
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Forgets the cached positions `len..`.
    pub fn truncate_cache(&mut self, len: usize) {
        self.cache.truncate(len, self.config.head_dim);
    }

    /// Logits `[ids.len(), vocab]` of every new position. `ids` continue the cached sequence at
    /// position `start_pos` (≤ the cached length; positions after it are dropped first).
    pub fn forward(
        &mut self,
        comm: &mut dyn Communicator,
        ids: &[u32],
        start_pos: usize,
    ) -> Result<Vec<f32>> {
        let opts = ForwardOptions {
            logits: Logits::All,
            hidden_states: false,
        };
        Ok(self.forward_with(comm, ids, start_pos, opts)?.logits)
    }

    pub fn forward_with(
        &mut self,
        comm: &mut dyn Communicator,
        ids: &[u32],
        start_pos: usize,
        opts: ForwardOptions,
    ) -> Result<ForwardOutput> {
        let c = &self.config;
        let m = ids.len();
        if m == 0 {
            bail!("no input tokens");
        }
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= c.vocab_size)
        {
            bail!(
                "token id {id} at position {i} is outside the vocabulary (vocab_size {})",
                c.vocab_size
            );
        }
        if start_pos > self.cache.len {
            bail!(
                "start position {start_pos} is past the {} cached positions",
                self.cache.len
            );
        }
        if start_pos + m > c.max_position_embeddings {
            bail!(
                "sequence of {} tokens is longer than the model's context (max_position_embeddings {})",
                start_pos + m,
                c.max_position_embeddings
            );
        }
        self.cache.truncate(start_pos, c.head_dim);
        self.cache
            .layers
            .resize(self.layers.len(), LayerCache::default());
        self.rope.ensure(start_pos + m);

        let h = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let mut hidden_states = Vec::new();
        let _fwd = collectives::trace::forward_span("forward", m, start_pos);
        let mut x = {
            let _s = collectives::trace::span("embedding");
            self.embed_tokens.forward(comm, ids)?
        };
        let mut normed = vec![0f32; m * h];
        let step = Step {
            plan: &self.plan,
            rope: &self.rope,
            start_pos,
            m,
        };
        for (i, (layer, cache)) in self.layers.iter().zip(&mut self.cache.layers).enumerate() {
            let attn_span = collectives::trace::layer_span("attention", i);
            if opts.hidden_states {
                hidden_states.push(x.clone());
            }
            kernels::rmsnorm(&x, &layer.input_layernorm, eps, &mut normed);
            let a = layer.self_attn.forward(comm, &step, cache, &normed)?;
            kernels::add_inplace(&mut x, &a);
            drop(attn_span);
            let _mlp_span = collectives::trace::layer_span("mlp", i);
            kernels::rmsnorm(&x, &layer.post_attention_layernorm, eps, &mut normed);
            let f = layer.mlp.forward(comm, &normed, m)?;
            kernels::add_inplace(&mut x, &f);
        }
        self.cache.len = start_pos + m;
        let _head_span = collectives::trace::span("lm_head");
        kernels::rmsnorm(&x, &self.norm, eps, &mut normed);
        if opts.hidden_states {
            hidden_states.push(normed.clone());
        }
        let logits = match opts.logits {
            Logits::All => {
                self.lm_head
                    .forward(comm, &self.embed_tokens, &self.plan, &normed, m)?
            }
            Logits::Last => self.lm_head.forward(
                comm,
                &self.embed_tokens,
                &self.plan,
                &normed[(m - 1) * h..],
                1,
            )?,
            Logits::None => Vec::new(),
        };
        Ok(ForwardOutput {
            logits,
            hidden_states,
        })
    }
}
