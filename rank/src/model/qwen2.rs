//! [`Qwen2`]: one rank's shard of a Qwen2ForCausalLM, its [`DecoderLayer`]s, KV cache and
//! forward pass (docs/DESIGN.md, "Tensor-parallel layout" and "Communication per token").

use anyhow::{bail, Context, Result};
use collectives::Communicator;
use kernels::PackedWeight;

use crate::model::attention::{Attention, KvCache, LayerCache, Rope, Step};
use crate::model::config::Config;
use crate::model::layers::{ParallelLmHead, Prefixed, VocabParallelEmbedding, WeightSource};
use crate::model::loader::{Slice, WeightDtype};
use crate::model::mlp::Mlp;
use crate::model::plan::ShardPlan;
use crate::model::scratch::{buf, Profiler, Scratch, OTHER, PARTS};

/// One pre-norm decoder block: `x += attn(norm(x))`, then `x += mlp(norm(x))`.
pub struct DecoderLayer {
    input_layernorm: Vec<f32>,
    self_attn: Attention,
    post_attention_layernorm: Vec<f32>,
    mlp: Mlp,
}

/// A layer's residual stream `x` (`[m, hidden]`, updated in place), the buffer for its normed
/// copy, the norm epsilon and the layer's index (for trace spans).
struct LayerIo<'a> {
    x: &'a mut [f32],
    normed: &'a mut [f32],
    eps: f32,
    i: usize,
}

impl DecoderLayer {
    /// The layer under `w` (`model.layers.{i}`).
    pub fn load(c: &Config, plan: &ShardPlan, mut w: Prefixed) -> Result<DecoderLayer> {
        let h = c.hidden_size;
        Ok(DecoderLayer {
            input_layernorm: w.f32("input_layernorm.weight", &[h], Slice::All)?,
            self_attn: Attention::load(c, plan, w.pp("self_attn"))?,
            post_attention_layernorm: w.f32("post_attention_layernorm.weight", &[h], Slice::All)?,
            mlp: Mlp::load(c, plan, w.pp("mlp"))?,
        })
    }

    /// The block over `io.x`; the blocks leave their outputs in `sc.proj`.
    fn forward(
        &self,
        comm: &mut dyn Communicator,
        step: &Step,
        cache: &mut LayerCache,
        io: LayerIo,
        sc: &mut Scratch,
        prof: &mut Profiler,
    ) -> Result<()> {
        let LayerIo { x, normed, eps, i } = io;
        let n = x.len();
        {
            let _span = collectives::trace::layer_span("attention", i);
            kernels::rmsnorm(x, &self.input_layernorm, eps, normed);
            prof.lap(OTHER);
            self.self_attn
                .forward(comm, step, cache, normed, sc, prof)?;
            prof.start();
            kernels::add_inplace(x, &sc.proj[..n]);
        }
        let _span = collectives::trace::layer_span("mlp", i);
        kernels::rmsnorm(x, &self.post_attention_layernorm, eps, normed);
        prof.lap(OTHER);
        self.mlp.forward(comm, normed, step.m, sc, prof)?;
        prof.start();
        kernels::add_inplace(x, &sc.proj[..n]);
        Ok(())
    }

    fn bytes(&self) -> usize {
        let (a, m) = (&self.self_attn, &self.mlp);
        (self.input_layernorm.len() + self.post_attention_layernorm.len()) * 4
            + a.q_proj.bytes()
            + a.k_proj.bytes()
            + a.v_proj.bytes()
            + a.o_proj.weight.bytes()
            + m.gate_proj.bytes()
            + m.up_proj.bytes()
            + m.down_proj.weight.bytes()
    }
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
    pub plan: ShardPlan,
    embed_tokens: VocabParallelEmbedding,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: ParallelLmHead,
    rope: Rope,
    cache: KvCache,
    scratch: Scratch,
    prof: Profiler,
}

impl Qwen2 {
    /// Loads this rank's shard. `progress(done, total)` is called after each layer.
    pub fn load(
        ck: &mut dyn WeightSource,
        config: &Config,
        plan: &ShardPlan,
        dtype: WeightDtype,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Qwen2> {
        let c = config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut w = Prefixed::new(ck, dtype);
        let mut m = w.pp("model");
        let embed_tokens = VocabParallelEmbedding {
            weight: m.packed(
                "embed_tokens.weight",
                [v, h],
                Slice::Rows(plan.vocab.clone()),
            )?,
            vocab: plan.vocab.clone(),
            hidden: h,
        };
        let total = c.num_hidden_layers;
        let mut layers = Vec::with_capacity(total);
        let mut lw = m.pp("layers");
        for i in 0..total {
            layers.push(DecoderLayer::load(c, plan, lw.pp(&i.to_string()))?);
            progress(i + 1, total);
        }
        let norm = m.f32("norm.weight", &[h], Slice::All)?;
        let weight = match c.tie_word_embeddings {
            true => None,
            false => Some(w.packed("lm_head.weight", [v, h], Slice::Rows(plan.vocab.clone()))?),
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
            rope: Rope::new(c.rope_theta, c.head_dim),
            cache: KvCache::default(),
            scratch: Scratch::default(),
            prof: Profiler::default(),
        })
    }

    /// Bytes of weights resident on this rank (matrices, biases, norms).
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed_tokens.weight.bytes() + self.norm.len() * 4;
        n += self.lm_head.weight.as_ref().map_or(0, PackedWeight::bytes);
        n += self.lm_head.screen.bytes();
        n += self.layers.iter().map(DecoderLayer::bytes).sum::<usize>();
        n
    }

    /// Per [`PARTS`] entry on this rank: the bytes one decode step at `context` cached positions
    /// reads (the layers' weights, the f32 KV cache of this rank's KV heads, the LM head's int8
    /// screen) and the elements of the weight matrices a token is multiplied by (the GEMMs'
    /// flops are twice that per token). Left out: the embedding row, norms, biases and the few
    /// LM-head panels the screen re-checks exactly. What `tprun bench --roofline` holds decode
    /// and prefill against.
    pub fn part_costs(&self, context: usize) -> [(usize, usize); PARTS.len()] {
        let c = &self.config;
        let mut out = [(0, 0); PARTS.len()];
        let kv = self.plan.kv_heads.len() * c.head_dim * context * 4 * 2;
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            let parts: [(usize, &[&PackedWeight]); 4] = [
                (0, &[&a.q_proj.weight, &a.k_proj.weight, &a.v_proj.weight]),
                (2, &[&a.o_proj.weight]),
                (3, &[&m.gate_proj.weight, &m.up_proj.weight]),
                (4, &[&m.down_proj.weight]),
            ];
            for (i, ws) in parts {
                for w in ws {
                    out[i].0 += w.bytes();
                    out[i].1 += w.rows() * w.cols();
                }
            }
            out[1].0 += kv;
        }
        out[PARTS.len() - 1].0 += self.lm_head.screen.bytes();
        out
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
        self.prof.start();
        let last = &self.scratch.normed[(m - 1) * h..m * h];
        let id = self
            .lm_head
            .argmax(comm, &self.embed_tokens, last, &mut self.scratch.screen)?;
        self.prof.lap(6);
        Ok(id)
    }

    /// Turns the per-part timers on (zeroed) or off. They cost two clock reads per part.
    pub fn set_profile(&mut self, on: bool) {
        self.prof.set(on);
    }

    /// Seconds per part ([`PARTS`]) since [`Qwen2::set_profile`], if on.
    pub fn profile(&self) -> Option<Vec<(&'static str, f64)>> {
        self.prof
            .seconds
            .map(|p| PARTS.iter().copied().zip(p).collect())
    }

    /// Makes room for `positions` cached positions (KV cache and RoPE tables) up front, so that
    /// decode steps up to there do not allocate. An error (naming the bytes) when the memory is
    /// not there.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        let d = self.config.head_dim;
        let nkv = self.plan.kv_heads.len();
        let per_head = positions
            .checked_mul(d)
            .with_context(|| format!("KV cache: {positions} positions overflow"))?;
        self.cache
            .layers
            .resize(self.layers.len(), LayerCache::default());
        for l in &mut self.cache.layers {
            l.k.resize(nkv, Vec::new());
            l.v.resize(nkv, Vec::new());
            l.try_reserve_total(per_head)?;
        }
        self.rope.ensure(positions);
        Ok(())
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
        c.check_ids(ids, start_pos)?;
        if start_pos > self.cache.len {
            bail!(
                "start position {start_pos} is past the {} cached positions",
                self.cache.len
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
        let prof = &mut self.prof;
        // Taken out of the scratch so the blocks can borrow the rest of it.
        let mut x = std::mem::take(&mut sc.x);
        let mut normed = std::mem::take(&mut sc.normed);
        let r = (|| -> Result<()> {
            let x = buf(&mut x, m * h);
            let normed = buf(&mut normed, m * h);
            prof.start();
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
                if let Some(hs) = hidden_states.as_mut() {
                    hs.push(x.to_vec());
                }
                let io = LayerIo { x, normed, eps, i };
                layer.forward(comm, &step, cache, io, sc, prof)?;
            }
            kernels::rmsnorm(x, &self.norm, eps, normed);
            prof.lap(OTHER);
            Ok(())
        })();
        sc.x = x;
        sc.normed = normed;
        r?;
        self.cache.len = start_pos + m;
        Ok(())
    }
}
