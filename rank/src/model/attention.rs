//! Qwen2 self-attention with RoPE and this rank's share of the KV cache (docs/DESIGN.md,
//! "Tensor-parallel layout": whole query heads per rank, KV heads with them).

use anyhow::Result;
use collectives::Communicator;

use crate::model::config::Config;
use crate::model::layers::{ColumnParallelLinear, Prefixed, RowParallelLinear};
use crate::model::plan::ShardPlan;
use crate::model::scratch::{buf, Profiler, Scratch};

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

    /// `inv_freq[head_dim / 2]` (the device path uploads it, so both compute the same angles).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    pub(crate) fn ensure(&mut self, positions: usize) {
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
pub(crate) struct LayerCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
}

impl LayerCache {
    /// Room for `n` more f32 in every head's keys and values (amortised growth, so a decode step
    /// only allocates when a buffer doubles), or an error naming the bytes instead of an abort.
    pub(crate) fn try_reserve(&mut self, n: usize) -> Result<()> {
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.try_reserve(n).map_err(|_| {
                anyhow::anyhow!(
                    "KV cache: cannot allocate {} bytes for {} more positions' values",
                    (c.len().saturating_add(n)).saturating_mul(4),
                    n
                )
            })?;
        }
        Ok(())
    }

    /// Capacity for exactly `n` f32 per head, fallibly (see [`LayerCache::try_reserve`]).
    pub(crate) fn try_reserve_total(&mut self, n: usize) -> Result<()> {
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            let more = n - c.len().min(n);
            c.try_reserve_exact(more).map_err(|_| {
                anyhow::anyhow!(
                    "KV cache: cannot allocate {} bytes ({n} values per head)",
                    n.saturating_mul(4)
                )
            })?;
        }
        Ok(())
    }
}

/// The KV cache of every layer (this rank's KV heads only) and how many positions it holds.
#[derive(Default, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    pub(crate) len: usize,
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
pub(crate) struct Step<'a> {
    pub(crate) plan: &'a ShardPlan,
    pub(crate) rope: &'a Rope,
    pub(crate) start_pos: usize,
    pub(crate) m: usize,
}

/// Qwen2 self-attention: q/k/v projections with bias (column-parallel: this rank's heads),
/// RoPE, causal GQA over the KV cache, and o_proj (row-parallel: all-reduce).
pub struct Attention {
    /// The local KV head of each local query head.
    kv_of: Vec<usize>,
    pub(crate) q_proj: ColumnParallelLinear,
    pub(crate) k_proj: ColumnParallelLinear,
    pub(crate) v_proj: ColumnParallelLinear,
    pub(crate) o_proj: RowParallelLinear,
}

impl Attention {
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj` under `w` (`model.layers.{i}.self_attn`).
    pub fn load(c: &Config, plan: &ShardPlan, mut w: Prefixed) -> Result<Attention> {
        let (h, d) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        Ok(Attention {
            kv_of: (0..plan.q_heads.len())
                .map(|h| plan.local_kv_of(h))
                .collect(),
            q_proj: ColumnParallelLinear::load(w.pp("q_proj"), [nq * d, h], plan.q_rows(), true)?,
            k_proj: ColumnParallelLinear::load(w.pp("k_proj"), [nkv * d, h], plan.kv_rows(), true)?,
            v_proj: ColumnParallelLinear::load(w.pp("v_proj"), [nkv * d, h], plan.kv_rows(), true)?,
            o_proj: RowParallelLinear::load(w.pp("o_proj"), [h, nq * d], plan.q_rows())?,
        })
    }

    /// Self-attention of `x` (`[m, hidden]`, normed) into `s.proj` (`[m, hidden]`).
    pub(crate) fn forward(
        &self,
        comm: &mut dyn Communicator,
        step: &Step,
        cache: &mut LayerCache,
        x: &[f32],
        sc: &mut Scratch,
        prof: &mut Profiler,
    ) -> Result<()> {
        let Step {
            plan,
            rope,
            start_pos,
            m,
        } = *step;
        let d = plan.head_dim;
        let (nq, nkv) = (plan.q_heads.len(), plan.kv_heads.len());
        prof.start();
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
        cache.try_reserve(m * d)?;
        for t in 0..m {
            for j in 0..nkv {
                let s = (t * nkv + j) * d;
                cache.k[j].extend_from_slice(&k[s..s + d]);
                cache.v[j].extend_from_slice(&v[s..s + d]);
            }
        }
        prof.lap(0);
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
        prof.lap(1);
        let proj = buf(&mut sc.proj, m * self.o_proj.weight.rows());
        let out = &sc.attn[..m * nq * d];
        self.o_proj.forward_into(comm, out, m, proj)?;
        prof.lap(2);
        Ok(())
    }
}
