//! The Qwen2 forward pass on one GPU per rank (feature `cuda`, issue 20): [`CudaQwen2`] uploads
//! this rank's shard as [`super::cuda_weights::device_tensors`] lists it, keeps an f32 KV cache
//! on the device and runs the CPU [`crate::Qwen2`]'s layer sequence with model.cu/attention.cu
//! kernels ([`super::cuda_plan`] launches), cuBLAS products ([`kernels::cuda::blas::linear`]) and
//! the device collectives of [`CudaComm`].
//!
//! Activations, norm weights, biases and the embedding table are f32; the projection matrices
//! keep the checkpoint's type after `--dtype` (bf16 activations are rounded by
//! `f32_to_bf16_kernel` before a bf16 GEMM, with f32 accumulation). Nothing here has run on a
//! GPU yet.

mod forward;
mod launch;
mod output;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use collectives::cuda::cudarc::driver::{CudaFunction, CudaSlice, CudaStream};
use collectives::cuda::CudaComm;

use kernels::cuda::blas::Blas;

use super::config::Config;
use super::cuda_weights::{device_tensors, Kind};
use super::layers::WeightSource;
use super::loader::{WeightDtype, Weights};
use super::plan::ShardPlan;

pub use forward::DeviceLogits;

/// A projection matrix on the device, in the checkpoint's type (bf16 as its raw bits).
pub(crate) enum Mat {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// One uploaded tensor before it is placed in a layer.
enum Up {
    Mat(Mat),
    Vec(CudaSlice<f32>),
}

pub(crate) struct Layer {
    ln1: CudaSlice<f32>,
    q: (Mat, CudaSlice<f32>),
    k: (Mat, CudaSlice<f32>),
    v: (Mat, CudaSlice<f32>),
    o: Mat,
    ln2: CudaSlice<f32>,
    gate: Mat,
    up: Mat,
    down: Mat,
}

/// The KV cache: per layer `[capacity, kv_heads, head_dim]` f32 keys and values.
#[derive(Default)]
pub(crate) struct Cache {
    layers: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    capacity: usize,
    len: usize,
}

/// This rank's model on its GPU.
pub struct CudaQwen2 {
    pub config: Config,
    pub plan: ShardPlan,
    stream: Arc<CudaStream>,
    blas: Blas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Positions one attention launch can hold (the GPU's opt-in shared memory).
    max_positions: usize,
    /// RoPE's `inv_freq[head_dim / 2]`, the CPU path's table.
    inv_freq: CudaSlice<f32>,
    /// Whether any matrix is bf16 (then the products need the split's scratch).
    bf16: bool,
    /// `[local vocab, hidden]` f32, for `embedding_gather`.
    embed: CudaSlice<f32>,
    layers: Vec<Layer>,
    norm: CudaSlice<f32>,
    /// The LM head rows of this rank (the embedding's own when tied), matrix type.
    head: Mat,
    cache: Cache,
    /// Bytes uploaded for the weights (the f32 embedding table included).
    pub weight_bytes: usize,
    /// What this process loaded: the GPU's name and the CUDA library files.
    pub loaded: Loaded,
}

/// Which GPU and CUDA libraries a rank uses (rank 0 prints it).
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub gpu: String,
    pub ordinal: usize,
    pub libraries: Vec<(String, String)>,
}

impl std::fmt::Display for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let libs: Vec<String> = self
            .libraries
            .iter()
            .map(|(l, file)| format!("{l}={file}"))
            .collect();
        if kernels::cuda::emulated() {
            write!(
                f,
                "an EMULATED device (TPRUN_CUDA_EMULATE=1: no GPU ran this), "
            )?;
        }
        write!(
            f,
            "GPU {} ({}); CUDA libraries: {}",
            self.ordinal,
            self.gpu,
            if libs.is_empty() {
                "found by the loader's default search".into()
            } else {
                libs.join(", ")
            }
        )
    }
}

impl Up {
    fn bytes(&self) -> usize {
        match self {
            Up::Mat(Mat::F32(m)) | Up::Vec(m) => m.len() * 4,
            Up::Mat(Mat::Bf16(m)) => m.len() * 2,
        }
    }
}

fn upload(stream: &Arc<CudaStream>, w: Weights) -> Result<Mat> {
    Ok(match w {
        Weights::F32(v) => Mat::F32(stream.memcpy_stod(&v)?),
        Weights::BF16(v) => {
            let bits: &[u16] = bytemuck::cast_slice(&v);
            Mat::Bf16(stream.memcpy_stod(bits)?)
        }
    })
}

impl CudaQwen2 {
    /// Loads this rank's shard from `src` and uploads it to the communicator's GPU, on its
    /// stream. `progress(layers done, layers)` as the CPU loader calls it.
    pub fn load(
        src: &mut dyn WeightSource,
        config: &Config,
        plan: &ShardPlan,
        dtype: WeightDtype,
        comm: &CudaComm,
    ) -> Result<CudaQwen2> {
        let stream = comm.stream().clone();
        let kernels = launch::load_kernels(comm.context())
            .map_err(|e| anyhow::anyhow!("compiling the model kernels: {e}"))?;
        let blas = Blas::new(&stream).map_err(|e| anyhow::anyhow!("cuBLAS: {e}"))?;
        let rope = crate::model::Rope::new(config.rope_theta, config.head_dim);
        let inv_freq = stream
            .memcpy_stod(rope.inv_freq())
            .context("uploading RoPE's inv_freq")?;
        let mut t = upload_all(src, config, plan, dtype, &stream)?;
        // Every uploaded tensor, before they are taken apart into layers.
        let weight_bytes = t.values().map(Up::bytes).sum();
        let bf16 = t.values().any(|u| matches!(u, Up::Mat(Mat::Bf16(_))));
        let embed = take_vec(&mut t, "model.embed_tokens.weight#f32")?;
        let norm = take_vec(&mut t, "model.norm.weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| take_layer(&mut t, i))
            .collect::<Result<Vec<_>>>()?;
        let head_name = match config.tie_word_embeddings {
            true => "model.embed_tokens.weight",
            false => "lm_head.weight",
        };
        let head = take_mat(&mut t, head_name)?;
        let ordinal = comm.context().ordinal();
        let loaded = Loaded {
            gpu: comm.context().name().unwrap_or_else(|e| format!("{e:?}")),
            ordinal,
            libraries: kernels::cuda::libs::loaded(),
        };
        Ok(CudaQwen2 {
            config: config.clone(),
            plan: plan.clone(),
            stream,
            blas,
            funcs: kernels.funcs,
            max_positions: kernels.max_positions,
            inv_freq,
            bf16,
            embed,
            layers,
            norm,
            head,
            cache: Cache::default(),
            weight_bytes,
            loaded,
        })
    }

    /// Positions in the KV cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len
    }

    /// Makes room for `positions` cached positions up front (the CPU `Qwen2::reserve`), so
    /// decode steps up to there do not reallocate the cache.
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.ensure_cache(positions)
            .with_context(|| format!("KV cache for {positions} positions on the GPU"))
    }

    /// Forgets cached positions from `len` on (the next forward starts there).
    pub fn truncate_cache(&mut self, len: usize) {
        self.cache.len = self.cache.len.min(len);
    }
}

/// Every tensor of `device_tensors`, uploaded: matrices in the checkpoint's type after `dtype`,
/// vectors in f32; the embedding also as an f32 table under `NAME#f32`.
fn upload_all(
    src: &mut dyn WeightSource,
    c: &Config,
    plan: &ShardPlan,
    dtype: WeightDtype,
    stream: &Arc<CudaStream>,
) -> Result<HashMap<String, Up>> {
    let mut out = HashMap::new();
    for s in device_tensors(c, plan) {
        let ctx = || format!("uploading {}", s.name);
        if s.name == "model.embed_tokens.weight" {
            let table = src.load_f32(&s.name, &s.shape, s.slice.clone())?;
            let dev = stream.memcpy_stod(&table).with_context(ctx)?;
            out.insert(format!("{}#f32", s.name), Up::Vec(dev));
            if !c.tie_word_embeddings {
                continue;
            }
        }
        let up = match s.kind {
            Kind::Matrix => Up::Mat(upload(
                stream,
                src.load(&s.name, &s.shape, s.slice, dtype)?,
            )?),
            Kind::Vector => Up::Vec(
                stream
                    .memcpy_stod(&src.load_f32(&s.name, &s.shape, s.slice)?)
                    .with_context(ctx)?,
            ),
        };
        out.insert(s.name, up);
    }
    Ok(out)
}

fn take_mat(t: &mut HashMap<String, Up>, n: &str) -> Result<Mat> {
    match t.remove(n) {
        Some(Up::Mat(m)) => Ok(m),
        _ => bail!("{n}: not uploaded as a matrix"),
    }
}

fn take_vec(t: &mut HashMap<String, Up>, n: &str) -> Result<CudaSlice<f32>> {
    match t.remove(n) {
        Some(Up::Vec(v)) => Ok(v),
        _ => bail!("{n}: not uploaded as a vector"),
    }
}

fn take_layer(t: &mut HashMap<String, Up>, i: usize) -> Result<Layer> {
    let p = |s: &str| format!("model.layers.{i}.{s}");
    let mut proj = |x: &str| -> Result<(Mat, CudaSlice<f32>)> {
        let n = p(&format!("self_attn.{x}_proj"));
        Ok((
            take_mat(t, &format!("{n}.weight"))?,
            take_vec(t, &format!("{n}.bias"))?,
        ))
    };
    let (q, k, v) = (proj("q")?, proj("k")?, proj("v")?);
    Ok(Layer {
        ln1: take_vec(t, &p("input_layernorm.weight"))?,
        q,
        k,
        v,
        o: take_mat(t, &p("self_attn.o_proj.weight"))?,
        ln2: take_vec(t, &p("post_attention_layernorm.weight"))?,
        gate: take_mat(t, &p("mlp.gate_proj.weight"))?,
        up: take_mat(t, &p("mlp.up_proj.weight"))?,
        down: take_mat(t, &p("mlp.down_proj.weight"))?,
    })
}
