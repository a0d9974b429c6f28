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
use collectives::{CommExt, Communicator, ReduceOp};
use kernels::PackedWeight;

use crate::config::Config;
use crate::loader::{Checkpoint, Slice, WeightDtype, Weights};
use crate::plan::Plan;

fn all_reduce(comm: &mut dyn Communicator, buf: &mut [f32]) -> Result<()> {
    if comm.world_size() > 1 {
        comm.all_reduce(buf, ReduceOp::Sum).context("all-reduce")?;
    }
    Ok(())
}

/// Where [`Qwen2::load`] gets each rank's slices from: a checkpoint, or (for benchmarks) random
/// values of the right shapes.
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

/// Tensor `name` (full shape `[rows, cols]`), this rank's `slice` of it, laid out for the
/// kernels (the loader's row-major copy is dropped once packed).
fn load_packed(
    ck: &mut dyn WeightSource,
    name: &str,
    shape: [usize; 2],
    slice: Slice,
    dtype: WeightDtype,
) -> Result<PackedWeight> {
    let (n, k) = match &slice {
        Slice::Rows(r) => (r.len(), shape[1]),
        Slice::Cols(c) => (shape[0], c.len()),
        Slice::All => (shape[0], shape[1]),
    };
    let packed = match ck.load(name, &shape, slice, dtype)? {
        Weights::F32(w) => PackedWeight::pack(&w, n, k),
        Weights::BF16(w) => PackedWeight::pack(&w, n, k),
    };
    packed.with_context(|| format!("packing {name} ([{n}, {k}] on this rank)"))
}

/// `y[..m * rows] = x · wᵀ` for `x` `[m, cols]`.
fn matmul_into(w: &PackedWeight, x: &[f32], m: usize, y: &mut [f32]) {
    kernels::matmul(&x[..m * w.cols()], w, &mut y[..m * w.rows()], m);
}

/// Grows `v` to at least `n` elements (never shrinks, so steady-state decode does not allocate)
/// and returns its first `n`.
fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Activation buffers reused by every forward call (sized for the largest call so far).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    screen: kernels::ScreenScratch,
    /// Seconds per [`PARTS`] entry, when profiling is on.
    profile: Option<[f64; PARTS.len()]>,
}

/// What the per-part timers of [`Qwen2::set_profile`] measure.
pub const PARTS: [&str; 7] = [
    "qkv_proj + rope + kv append",
    "attention (scores, softmax, V)",
    "o_proj matmul + all-reduce",
    "gate/up matmul + silu",
    "down_proj matmul + all-reduce",
    "embedding, norms, residuals",
    "lm_head + argmax",
];

impl Scratch {
    /// Adds the time since `*t` to part `i` and restarts `*t` (no-op unless profiling).
    #[inline]
    fn lap(&mut self, i: usize, t: &mut Option<std::time::Instant>) {
        if let (Some(p), Some(t0)) = (self.profile.as_mut(), t.as_mut()) {
            let now = std::time::Instant::now();
            p[i] += (now - *t0).as_secs_f64();
            *t0 = now;
        }
    }
    fn start(&self) -> Option<std::time::Instant> {
        self.profile.map(|_| std::time::Instant::now())
    }
}

/// Linear layer whose output features (weight rows) are split across ranks. No communication:
/// each rank produces its own slice of the output.
pub struct ColumnParallelLinear {
    /// `[local output features, in]`.
    weight: PackedWeight,
    bias: Option<Vec<f32>>,
}

impl ColumnParallelLinear {
    fn load(
        ck: &mut dyn WeightSource,
        name: &str,
        shape: [usize; 2],
        rows: Range<usize>,
        bias: bool,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let weight = load_packed(
            ck,
            &format!("{name}.weight"),
            shape,
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
        Ok(Self { weight, bias })
    }

    /// `y[..m * rows] = x · wᵀ + b`.
    fn forward_into(&self, x: &[f32], m: usize, y: &mut [f32]) {
        matmul_into(&self.weight, x, m, y);
        if let Some(b) = &self.bias {
            kernels::add_bias(&mut y[..m * self.weight.rows()], b);
        }
    }

    fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// Linear layer whose input features (weight columns) are split across ranks: each rank's
/// product is a partial sum over its columns, all-reduced (in rank order) into the full output.
/// Qwen2's row-parallel layers (o_proj, down_proj) have no bias.
pub struct RowParallelLinear {
    /// `[out, local input features]`.
    weight: PackedWeight,
}

impl RowParallelLinear {
    fn load(
        ck: &mut dyn WeightSource,
        name: &str,
        shape: [usize; 2],
        cols: Range<usize>,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let weight = load_packed(
            ck,
            &format!("{name}.weight"),
            shape,
            Slice::Cols(cols),
            dtype,
        )?;
        Ok(Self { weight })
    }

    /// `y[..m * rows]` = the all-reduced `x · wᵀ`.
    fn forward_into(
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
    weight: PackedWeight,
    vocab: Range<usize>,
    hidden: usize,
}

impl VocabParallelEmbedding {
    /// The rows of `ids` into `out` (`[ids.len(), hidden]`).
    fn forward_into(
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
    weight: Option<PackedWeight>,
    /// An int8 copy of this rank's head rows, so a greedy step reads the bf16/f32 rows only
    /// where the maximum may be (exact: see `kernels::screen`).
    screen: kernels::Screen,
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
    fn argmax(
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
    /// The local KV head of each local query head.
    kv_of: Vec<usize>,
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
}

impl Attention {
    /// Self-attention of `x` (`[m, hidden]`, normed) into `s.proj` (`[m, hidden]`).
    fn forward(
        &self,
        comm: &mut dyn Communicator,
        step: &Step,
        cache: &mut LayerCache,
        x: &[f32],
        sc: &mut Scratch,
    ) -> Result<()> {
        let Step {
            plan,
            rope,
            start_pos,
            m,
        } = *step;
        let d = plan.head_dim;
        let (nq, nkv) = (plan.q_heads.len(), plan.kv_heads.len());
        let mut t = sc.start();
        let q = buf(&mut sc.q, m * nq * d);
        let k = buf(&mut sc.k, m * nkv * d);
        let v = buf(&mut sc.v, m * nkv * d);
        self.q_proj.forward_into(x, m, q);
        self.k_proj.forward_into(x, m, k);
        self.v_proj.forward_into(x, m, v);
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
        sc.lap(0, &mut t);
        // Causal GQA attention: token t sees positions 0..=start_pos+t.
        let scale = 1.0 / (d as f32).sqrt();
        kernels::causal_attention(
            &sc.q[..m * nq * d],
            &cache.k,
            &cache.v,
            &self.kv_of,
            d,
            start_pos,
            scale,
            buf(&mut sc.scores, start_pos + m),
            buf(&mut sc.attn, m * nq * d),
        );
        sc.lap(1, &mut t);
        let proj = buf(&mut sc.proj, m * self.o_proj.weight.rows());
        let out = &sc.attn[..m * nq * d];
        self.o_proj.forward_into(comm, out, m, proj)?;
        sc.lap(2, &mut t);
        Ok(())
    }
}

pub struct Mlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
}

impl Mlp {
    /// SwiGLU MLP of `x` (`[m, hidden]`, normed) into `s.proj`.
    fn forward(
        &self,
        comm: &mut dyn Communicator,
        x: &[f32],
        m: usize,
        sc: &mut Scratch,
    ) -> Result<()> {
        let mut t = sc.start();
        let n = m * self.gate_proj.weight.rows();
        let g = buf(&mut sc.gate, n);
        let u = buf(&mut sc.up, n);
        self.gate_proj.forward_into(x, m, g);
        self.up_proj.forward_into(x, m, u);
        kernels::silu_mul(g, u);
        sc.lap(3, &mut t);
        let proj = buf(&mut sc.proj, m * self.down_proj.weight.rows());
        let g = &sc.gate[..n];
        self.down_proj.forward_into(comm, g, m, proj)?;
        sc.lap(4, &mut t);
        Ok(())
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
    scratch: Scratch,
}

impl Qwen2 {
    /// Loads this rank's shard. `progress(done, total)` is called after each layer.
    pub fn load(
        ck: &mut dyn WeightSource,
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
        let embed = load_packed(
            ck,
            "model.embed_tokens.weight",
            [v, h],
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
            let norm = |ck: &mut dyn WeightSource, n: &str| {
                ck.load_f32(&format!("{p}.{n}.weight"), &[h], Slice::All)
            };
            let a = format!("{p}.self_attn");
            let mm = format!("{p}.mlp");
            layers.push(DecoderLayer {
                input_layernorm: norm(ck, "input_layernorm")?,
                self_attn: Attention {
                    kv_of: (0..plan.q_heads.len())
                        .map(|h| plan.local_kv_of(h))
                        .collect(),
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
            Some(load_packed(
                ck,
                "lm_head.weight",
                [v, h],
                Slice::Rows(plan.vocab.clone()),
                dtype,
            )?)
        };
        let screen = kernels::Screen::new(weight.as_ref().unwrap_or(&embed_tokens.weight))
            .context("quantising the LM head for the argmax screen")?;
        Ok(Qwen2 {
            config: c.clone(),
            plan: plan.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head: ParallelLmHead {
                weight,
                screen,
                vocab: v,
                padded: plan.vocab_padded,
            },
            rope: Rope::new(c.rope_theta, d),
            cache: KvCache::default(),
            scratch: Scratch::default(),
        })
    }

    /// Bytes of weights resident on this rank (matrices, biases, norms).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed_tokens.weight.bytes() + self.norm.len() * 4;
        n += self.lm_head.weight.as_ref().map_or(0, PackedWeight::bytes);
        n += self.lm_head.screen.bytes();
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
        let m = ids.len();
        let h = self.config.hidden_size;
        let mut hidden_states = Vec::new();
        let hs = opts.hidden_states.then_some(&mut hidden_states);
        let _fwd = collectives::trace::forward_span("forward", m, start_pos);
        self.run_layers(comm, ids, start_pos, hs)?;
        let _head = collectives::trace::span("lm_head");
        let normed = &self.scratch.normed[..m * h];
        if opts.hidden_states {
            hidden_states.push(normed.to_vec());
        }
        let logits = match opts.logits {
            Logits::All => self
                .lm_head
                .forward(comm, &self.embed_tokens, &self.plan, normed, m)?,
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

    /// Runs `ids` like [`Qwen2::forward`] and returns the greedy next token after the last one,
    /// with a distributed argmax instead of gathering the logits (what decode needs). Allocates
    /// nothing once the buffers and the cache have grown ([`Qwen2::reserve`]).
    pub fn forward_argmax(
        &mut self,
        comm: &mut dyn Communicator,
        ids: &[u32],
        start_pos: usize,
    ) -> Result<u32> {
        let m = ids.len();
        let h = self.config.hidden_size;
        let _fwd = collectives::trace::forward_span("forward", m, start_pos);
        self.run_layers(comm, ids, start_pos, None)?;
        let _head = collectives::trace::span("lm_head");
        let mut t = self.scratch.start();
        let last = &self.scratch.normed[(m - 1) * h..m * h];
        let id = self
            .lm_head
            .argmax(comm, &self.embed_tokens, last, &mut self.scratch.screen)?;
        self.scratch.lap(6, &mut t);
        Ok(id)
    }

    /// Turns the per-part timers on (zeroed) or off. They cost two clock reads per part.
    pub fn set_profile(&mut self, on: bool) {
        self.scratch.profile = on.then_some([0.0; PARTS.len()]);
    }

    /// Seconds per part ([`PARTS`]) since [`Qwen2::set_profile`], if on.
    pub fn profile(&self) -> Option<Vec<(&'static str, f64)>> {
        self.scratch
            .profile
            .map(|p| PARTS.iter().copied().zip(p).collect())
    }

    /// Makes room for `positions` cached positions (KV cache and RoPE tables) up front, so that
    /// decode steps up to there do not allocate.
    pub fn reserve(&mut self, positions: usize) {
        let d = self.config.head_dim;
        let nkv = self.plan.kv_heads.len();
        self.rope.ensure(positions);
        self.cache
            .layers
            .resize(self.layers.len(), LayerCache::default());
        for l in &mut self.cache.layers {
            l.k.resize(nkv, Vec::new());
            l.v.resize(nkv, Vec::new());
            for c in l.k.iter_mut().chain(l.v.iter_mut()) {
                c.reserve(positions * d - c.len().min(positions * d));
            }
        }
    }

    /// The decoder layers over `ids`; leaves the final-norm output `[m, hidden]` in
    /// `scratch.normed`. With `hidden_states`, pushes the embeddings and every layer's output
    /// but the last.
    fn run_layers(
        &mut self,
        comm: &mut dyn Communicator,
        ids: &[u32],
        start_pos: usize,
        mut hidden_states: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<()> {
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
        let sc = &mut self.scratch;
        let mut x = std::mem::take(&mut sc.x);
        let mut normed = std::mem::take(&mut sc.normed);
        let r = (|| -> Result<()> {
            let x = buf(&mut x, m * h);
            let normed = buf(&mut normed, m * h);
            let mut t = sc.start();
            {
                let _s = collectives::trace::span("embedding");
                self.embed_tokens.forward_into(comm, ids, x)?;
            }
            let step = Step {
                plan: &self.plan,
                rope: &self.rope,
                start_pos,
                m,
            };
            for (i, (layer, cache)) in self.layers.iter().zip(&mut self.cache.layers).enumerate() {
                let attn_span = collectives::trace::layer_span("attention", i);
                if let Some(hs) = hidden_states.as_mut() {
                    hs.push(x.to_vec());
                }
                kernels::rmsnorm(x, &layer.input_layernorm, eps, normed);
                sc.lap(5, &mut t);
                layer.self_attn.forward(comm, &step, cache, normed, sc)?;
                t = sc.start();
                kernels::add_inplace(x, &sc.proj[..m * h]);
                drop(attn_span);
                let _mlp_span = collectives::trace::layer_span("mlp", i);
                kernels::rmsnorm(x, &layer.post_attention_layernorm, eps, normed);
                sc.lap(5, &mut t);
                layer.mlp.forward(comm, normed, m, sc)?;
                t = sc.start();
                kernels::add_inplace(x, &sc.proj[..m * h]);
            }
            kernels::rmsnorm(x, &self.norm, eps, normed);
            sc.lap(5, &mut t);
            Ok(())
        })();
        sc.x = x;
        sc.normed = normed;
        r?;
        self.cache.len = start_pos + m;
        Ok(())
    }
}
