//! `tprun bench`: prefill and greedy-decode throughput of the TP model, time in collectives and
//! resident weight bytes per rank (docs/DESIGN.md, "Command line"). `--preset` builds random
//! weights of a real Qwen2.5 model's shapes in memory, each rank only its shard, so no download
//! is needed.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use collectives::{CommExt, CommStats, Communicator, OpKind};

use crate::generate::StepModel;
use crate::runtime::{self, ModelArgs};
use rank::model::config::Config;
use rank::model::loader::{Slice, WeightDtype, Weights};
use rank::model::plan::ShardPlan;
use rank::model::{Qwen2, WeightSource, PARTS};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_0_5b,
    #[value(name = "qwen2.5-1.5b")]
    Qwen25_1_5b,
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
}

impl Preset {
    /// The real Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate, vocab, tied).
    pub fn config(self) -> Config {
        let (hidden, layers, heads, kv, inter, vocab, tied) = match self {
            Preset::Qwen25_0_5b => (896, 24, 14, 2, 4864, 151936, true),
            Preset::Qwen25_1_5b => (1536, 28, 12, 2, 8960, 151936, true),
            Preset::Qwen25_7b => (3584, 28, 28, 4, 18944, 152064, false),
        };
        Config {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            vocab_size: vocab,
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 1e6,
            tie_word_embeddings: tied,
            dtype: Some("bfloat16".into()),
            bos_token_id: None,
            eos_token_ids: vec![151643],
        }
    }

    /// The `--preset` value naming this preset.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Qwen25_0_5b => "qwen2.5-0.5b",
            Preset::Qwen25_1_5b => "qwen2.5-1.5b",
            Preset::Qwen25_7b => "qwen2.5-7b",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Random weights with a real model's shapes instead of a checkpoint (bf16 unless --dtype f32).
    #[arg(long, value_enum, conflicts_with = "model")]
    pub preset: Option<Preset>,
    /// Prompt tokens (random ids) for the prefill.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub prompt_len: u64,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: u64,
    /// Runs the whole measurement R times and reports the best (and the range).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Also time the parts of each decode step (per-kernel counters, rank 0's view) and print
    /// where decode time goes.
    #[arg(long)]
    pub profile: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also measure this machine's read bandwidth and FMA peaks (every rank at once, ~1-2 s
    /// after the rounds) and report decode as % of the read floor and prefill as % of the
    /// GEMM peak, per profile part with --profile.
    #[arg(long)]
    pub roofline: bool,
}

/// Uniform random weights in ±`scale`, norms 1: finite activations of a realistic size.
struct RandomWeights {
    seed: u64,
}

impl WeightSource for RandomWeights {
    fn load(
        &mut self,
        name: &str,
        shape: &[usize],
        slice: Slice,
        dtype: WeightDtype,
    ) -> Result<Weights> {
        let (rows, cols) = match *shape {
            [n] => (n, 1),
            [r, c] => (r, c),
            _ => bail!("tensor {name}: only 1-D and 2-D tensors"),
        };
        let (r, c) = match &slice {
            Slice::All => (rows, cols),
            Slice::Rows(r) => (r.len(), cols),
            Slice::Cols(c) => (rows, c.len()),
        };
        // Element (i, j) of the full tensor gets the same value whatever the shard, so every TP
        // size runs the same model: a counter-based generator (splitmix64 of the global index).
        let (r0, c0) = match &slice {
            Slice::All => (0, 0),
            Slice::Rows(r) => (r.start, 0),
            Slice::Cols(c) => (0, c.start),
        };
        let base = self.seed ^ fnv(name);
        let at = move |t: usize| {
            let (i, j) = (r0 + t / c, c0 + t % c);
            let mut z = base.wrapping_add(((i * cols + j) as u64).wrapping_mul(0x9e3779b97f4a7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^= z >> 31;
            // Uniform in [-1, 1).
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let n = r * c;
        let (norm, scale) = (name.ends_with("norm.weight"), 1.0 / (cols as f32).sqrt());
        let value = |v: f32| if norm { 1.0 } else { v * scale };
        Ok(match dtype {
            WeightDtype::F32 => Weights::F32((0..n).map(|t| value(at(t))).collect()),
            WeightDtype::Bf16 | WeightDtype::Auto => {
                Weights::BF16((0..n).map(|t| half::bf16::from_f32(value(at(t)))).collect())
            }
        })
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Seconds inside collectives.
fn comm_seconds(s: &CommStats) -> f64 {
    s.ops.iter().map(|o| o.seconds).sum()
}

#[derive(Debug, Clone, Default)]
struct Round {
    prefill_s: f64,
    decode_s: f64,
    prefill_comm_s: f64,
    decode_comm_s: f64,
    decode_all_reduce_s: f64,
    /// Prefill and decode seconds per model part (with --profile).
    prefill_profile: Vec<(&'static str, f64)>,
    profile: Vec<(&'static str, f64)>,
}

/// What bench drives: the CPU [`Qwen2`] or (feature `cuda`) the device model, on communicator
/// `C`. The profile and the part costs are the CPU model's (`--profile`, `--roofline`).
pub trait BenchModel<C: Communicator + ?Sized>: StepModel<C> {
    fn config(&self) -> &Config;
    /// Makes room for `positions` cached positions up front (an error naming the bytes).
    fn reserve(&mut self, positions: usize) -> Result<()>;
    /// Forgets the cached positions `len..`.
    fn truncate_cache(&mut self, len: usize);
    /// Bytes of weights resident on this rank.
    fn weight_bytes(&self) -> usize;
    /// Turns the per-part timers on (zeroed) or off, where the model has them.
    fn set_profile(&mut self, _on: bool) {}
    /// Seconds per part since [`BenchModel::set_profile`], if on.
    fn profile(&self) -> Option<Vec<(&'static str, f64)>> {
        None
    }
    /// Per part: bytes a decode step at `context` reads and weight elements per prefill token.
    fn part_costs(&self, _context: usize) -> Option<[(usize, usize); PARTS.len()]> {
        None
    }
}

impl<'a> BenchModel<dyn Communicator + 'a> for Qwen2 {
    fn config(&self) -> &Config {
        &self.config
    }
    fn reserve(&mut self, positions: usize) -> Result<()> {
        Qwen2::reserve(self, positions)
    }
    fn truncate_cache(&mut self, len: usize) {
        Qwen2::truncate_cache(self, len)
    }
    fn weight_bytes(&self) -> usize {
        Qwen2::weight_bytes(self)
    }
    fn set_profile(&mut self, on: bool) {
        Qwen2::set_profile(self, on)
    }
    fn profile(&self) -> Option<Vec<(&'static str, f64)>> {
        Qwen2::profile(self)
    }
    fn part_costs(&self, context: usize) -> Option<[(usize, usize); PARTS.len()]> {
        Some(Qwen2::part_costs(self, context))
    }
}

#[cfg(feature = "cuda")]
impl BenchModel<collectives::cuda::CudaComm> for rank::model::cuda::CudaQwen2 {
    fn config(&self) -> &Config {
        &self.config
    }
    fn reserve(&mut self, positions: usize) -> Result<()> {
        rank::model::cuda::CudaQwen2::reserve(self, positions)
    }
    fn truncate_cache(&mut self, len: usize) {
        rank::model::cuda::CudaQwen2::truncate_cache(self, len)
    }
    fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }
}

pub fn run(args: &Args) -> Result<()> {
    #[cfg(feature = "cuda")]
    if crate::device::cuda_requested() {
        // Refused before any set-up, the same way on every rank.
        if let Some((flag, why)) = cuda_refuses(args) {
            bail!("{flag} is not available with --device cuda: {why}");
        }
        let mut comm = crate::runtime_cuda::comm("bench")?;
        let (model, source) = load_cuda_model(args, &mut comm)?;
        let device = format!("cuda, {}", model.loaded.gpu);
        return measure(args, &mut comm, model, source, device);
    }
    let mut comm = collectives::from_env()?;
    let comm = &mut *comm;
    runtime::set_compute_options(&args.model, comm.rank());
    let (model, source) = load_model(args, comm)?;
    measure(args, comm, model, source, "cpu".into())
}

/// The first bench flag `--device cuda` cannot serve, and why: both measure the CPU model (its
/// per-part timers, this machine's read bandwidth and FMA peaks).
pub fn cuda_refuses(args: &Args) -> Option<(&'static str, &'static str)> {
    [
        (
            args.profile,
            "--profile",
            "the device model has no per-part timers",
        ),
        (
            args.roofline,
            "--roofline",
            "it measures the CPU's read bandwidth and FMA peaks",
        ),
    ]
    .into_iter()
    .find_map(|(on, flag, why)| on.then_some((flag, why)))
}

/// The rounds on a loaded model, then rank 0's report (`device` says where it ran).
fn measure<C: Communicator + ?Sized, M: BenchModel<C>>(
    args: &Args,
    comm: &mut C,
    mut model: M,
    source: String,
    device: String,
) -> Result<()> {
    let (p, k) = (args.prompt_len as usize, args.new_tokens as usize);
    if p + k > model.context() {
        bail!(
            "--prompt-len {p} + --new-tokens {k} is longer than the model's context ({})",
            model.context()
        );
    }
    let prompt = random_prompt(p, model.config().vocab_size);
    model.reserve(p + k + 1)?;

    let mut rounds = Vec::new();
    let mut tokens = Vec::with_capacity(k);
    let wall0 = Instant::now();
    for _ in 0..args.rounds {
        rounds.push(measure_round(
            &mut model,
            comm,
            &prompt,
            k,
            args.profile,
            &mut tokens,
        )?);
    }
    let wall_s = wall0.elapsed().as_secs_f64();
    // Per-op totals of all rounds, taken before the bookkeeping all-gather below.
    let ops = comm.stats();
    let weight_bytes = model.weight_bytes();
    // Every rank's resident bytes, for the per-rank maximum.
    let mut all = vec![0u64; comm.world_size()];
    comm.all_gather(&[weight_bytes as u64], &mut all)
        .context("all-gather of the weight bytes")?;
    let roofline = match args.roofline {
        // Decode's mean context is the prompt plus half the new tokens.
        true => Some((
            world_costs(comm, &model, p + k / 2)?,
            measure_roofline(comm)?,
        )),
        false => None,
    };

    if comm.rank() == 0 {
        let (costs, roofline) = roofline.unzip();
        let report = Report {
            args,
            source: &source,
            device: &device,
            world_size: comm.world_size(),
            p,
            k,
            rounds: &rounds,
            tokens: &tokens,
            ops: &ops,
            wall_s,
            weight_bytes,
            all: &all,
            costs: costs.unwrap_or_default(),
            roofline,
        };
        if args.json {
            report.print_json();
        } else {
            report.print_text();
        }
    }
    comm.barrier().context("final barrier")?;
    Ok(())
}

/// [`Qwen2::part_costs`] summed over the ranks: per profile part, the bytes a decode step at
/// `context` reads and the weight elements a prefill token is multiplied by.
fn world_costs<C: Communicator + ?Sized, M: BenchModel<C>>(
    comm: &mut C,
    model: &M,
    context: usize,
) -> Result<Vec<(f64, f64)>> {
    let mine: Vec<u64> = model
        .part_costs(context)
        .context("this model has no part costs")?
        .iter()
        .flat_map(|&(b, w)| [b as u64, w as u64])
        .collect();
    let mut all = vec![0u64; mine.len() * comm.world_size()];
    comm.all_gather(&mine, &mut all)
        .context("all-gather of the part costs")?;
    Ok((0..PARTS.len())
        .map(|i| {
            all.chunks(mine.len()).fold((0.0, 0.0), |(b, w), r| {
                (b + r[2 * i] as f64, w + r[2 * i + 1] as f64)
            })
        })
        .collect())
}

/// This machine's ceilings with the bench's layout: every rank measures with its own threads at
/// the same time (so the ranks share the memory bus as in decode), and the figures are summed.
fn measure_roofline<C: Communicator + ?Sized>(comm: &mut C) -> Result<kernels::roofline::Roofline> {
    comm.barrier().context("barrier before the roofline")?;
    let r = kernels::roofline::measure(kernels::threads());
    let mine = [r.read_gbps, r.f32_gflops, r.bf16_gflops].map(f64::to_bits);
    let mut all = vec![0u64; 3 * comm.world_size()];
    comm.all_gather(&mine, &mut all)
        .context("all-gather of the roofline")?;
    let sum = |i: usize| all.chunks(3).map(|c| f64::from_bits(c[i])).sum::<f64>();
    Ok(kernels::roofline::Roofline {
        read_gbps: sum(0),
        f32_gflops: sum(1),
        bf16_gflops: sum(2),
    })
}

/// Decode's share of the read floor and prefill's share of the FMA peak, in percent.
#[derive(Debug, Clone, Default)]
struct Roof {
    decode_floor_pct: f64,
    prefill_peak_pct: f64,
    /// Bytes read per decode token (all ranks) and GEMM flops of the prefill (all ranks).
    decode_bytes: f64,
    prefill_flops: f64,
    /// The peak prefill is held against (bf16 dot when the GEMM uses it, else f32).
    peak_gflops: f64,
    /// Per profile part: (name, % of floor in decode, % of peak in prefill); parts without
    /// bytes or flops are left out.
    parts: Vec<PartRoof>,
}

/// A profile part's name, % of the read floor in decode and % of peak in prefill.
type PartRoof = (&'static str, Option<f64>, Option<f64>);

/// [`Roof`] from the ceilings, the costs and the best rounds' times (`k` decode steps, `p`
/// prompt tokens, `world` ranks; the profiles are rank 0's, so a part's cost is one rank's
/// share: the total over `world`).
#[allow(clippy::too_many_arguments)]
fn roof(
    r: &kernels::roofline::Roofline,
    costs: &[(f64, f64)],
    bf16_dot: bool,
    p: usize,
    k: usize,
    world: usize,
    best_p: &Round,
    best_d: &Round,
) -> Roof {
    let peak = if bf16_dot {
        r.bf16_gflops
    } else {
        r.f32_gflops
    };
    let floor_pct = |bytes: f64, secs: f64| 100.0 * bytes / secs.max(1e-12) / (r.read_gbps * 1e9);
    let peak_pct = |flops: f64, secs: f64| 100.0 * flops / secs.max(1e-12) / (peak * 1e9);
    let decode_bytes: f64 = costs.iter().map(|c| c.0).sum();
    let prefill_flops = 2.0 * p as f64 * costs.iter().map(|c| c.1).sum::<f64>();
    let step_s = best_d.decode_s / k.max(1) as f64;
    let part = |prof: &[(&str, f64)], i: usize| prof.get(i).map_or(0.0, |x| x.1);
    let parts = PARTS
        .iter()
        .enumerate()
        .filter(|(i, _)| costs[*i] != (0.0, 0.0))
        .map(|(i, name)| {
            let (b, w) = costs[i];
            let (ds, ps) = (part(&best_d.profile, i), part(&best_p.prefill_profile, i));
            let w1 = world.max(1) as f64;
            (
                *name,
                (b > 0.0 && ds > 0.0).then(|| floor_pct(b / w1, ds / k.max(1) as f64) * w1),
                (w > 0.0 && ps > 0.0).then(|| peak_pct(2.0 * p as f64 * w / w1, ps) * w1),
            )
        })
        .collect();
    Roof {
        decode_floor_pct: if k > 0 {
            floor_pct(decode_bytes, step_s)
        } else {
            0.0
        },
        prefill_peak_pct: peak_pct(prefill_flops, best_p.prefill_s),
        decode_bytes,
        prefill_flops,
        peak_gflops: peak,
        parts,
    }
}

/// The model to measure and how the report names it: random preset weights (each rank builds
/// only its shard) or the checkpoint of `--model`.
fn load_model(args: &Args, comm: &mut dyn Communicator) -> Result<(Qwen2, String)> {
    Ok(match args.preset {
        Some(preset) => {
            let (config, plan, dtype, name) = preset_shard(args, preset, comm)?;
            let mut src = RandomWeights { seed: PRESET_SEED };
            let model = Qwen2::load(&mut src, &config, &plan, dtype, &mut |_, _| {})?;
            (model, name)
        }
        None => {
            let prep = runtime::prepare(&args.model, comm)?;
            let (model, _) = runtime::load(&prep, args.model.dtype, "bench")?;
            (model, prep.dir.display().to_string())
        }
    })
}

/// [`load_model`] on this rank's GPU.
#[cfg(feature = "cuda")]
fn load_cuda_model(
    args: &Args,
    comm: &mut collectives::cuda::CudaComm,
) -> Result<(rank::model::cuda::CudaQwen2, String)> {
    use rank::model::cuda::CudaQwen2;
    Ok(match args.preset {
        Some(preset) => {
            let (config, plan, dtype, name) = preset_shard(args, preset, comm)?;
            let mut src = RandomWeights { seed: PRESET_SEED };
            let model = CudaQwen2::load(&mut src, &config, &plan, dtype, comm)?;
            if plan.rank == 0 {
                eprintln!("tprun bench: rank 0 on {}", model.loaded);
            }
            (model, name)
        }
        None => {
            let prep = runtime::prepare(&args.model, &*comm)?;
            let (model, _) = crate::runtime_cuda::load(&prep, args.model.dtype, "bench", comm)?;
            (model, prep.dir.display().to_string())
        }
    })
}

/// The seed of every preset's random weights (the same model at every TP size and device).
const PRESET_SEED: u64 = 0x5eed;

/// A preset's config, this rank's plan, the weight type (bf16 unless `--dtype f32`) and the
/// report's name for it.
fn preset_shard<C: Communicator + ?Sized>(
    args: &Args,
    preset: Preset,
    comm: &C,
) -> Result<(Config, ShardPlan, WeightDtype, String)> {
    let config = preset.config();
    let plan = ShardPlan::new(&config.shapes(), comm.world_size(), comm.rank())
        .with_context(|| format!("preset {}", preset.name()))?;
    let dtype = match args.model.dtype {
        WeightDtype::F32 => WeightDtype::F32,
        _ => WeightDtype::Bf16,
    };
    let name = format!("preset {} ({})", preset.name(), dtype.name());
    Ok((config, plan, dtype, name))
}

/// `p` random prompt ids below `vocab`, the same on every rank.
fn random_prompt(p: usize, vocab: usize) -> Vec<u32> {
    let mut s = 0x9e3779b97f4a7c15u64;
    (0..p)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// One timed round: a prefill of `prompt` and `k` greedy decode steps from an empty cache; the
/// decoded ids are left in `tokens`.
fn measure_round<C: Communicator + ?Sized, M: BenchModel<C>>(
    model: &mut M,
    comm: &mut C,
    prompt: &[u32],
    k: usize,
    profile: bool,
    tokens: &mut Vec<u32>,
) -> Result<Round> {
    let p = prompt.len();
    model.truncate_cache(0);
    tokens.clear();
    comm.barrier().context("barrier before a round")?;
    let s0 = comm.stats();
    model.set_profile(profile);
    let t0 = Instant::now();
    let mut tok = model.argmax(comm, prompt, 0)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let s1 = comm.stats();
    let prefill_profile = model.profile().unwrap_or_default();
    model.set_profile(profile);
    let t1 = Instant::now();
    for i in 0..k {
        tokens.push(tok);
        tok = model.argmax(comm, &[tok], p + i)?;
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let s2 = comm.stats();
    let profile = model.profile().unwrap_or_default();
    Ok(Round {
        prefill_s,
        decode_s,
        prefill_comm_s: comm_seconds(&s1) - comm_seconds(&s0),
        decode_comm_s: comm_seconds(&s2) - comm_seconds(&s1),
        decode_all_reduce_s: s2.get(OpKind::AllReduce).seconds - s1.get(OpKind::AllReduce).seconds,
        prefill_profile,
        profile,
    })
}

/// Everything rank 0 prints about a bench run.
struct Report<'a> {
    args: &'a Args,
    source: &'a str,
    /// Where the model ran: "cpu", or "cuda, " and the GPU's name.
    device: &'a str,
    world_size: usize,
    p: usize,
    k: usize,
    rounds: &'a [Round],
    tokens: &'a [u32],
    ops: &'a CommStats,
    wall_s: f64,
    weight_bytes: usize,
    /// Every rank's resident weight bytes.
    all: &'a [u64],
    /// Per profile part, all ranks: (bytes per decode step, weight elements per prefill token).
    costs: Vec<(f64, f64)>,
    roofline: Option<kernels::roofline::Roofline>,
}

/// The best rounds and the token rates of all rounds.
struct Rates {
    best_p: Round,
    best_d: Round,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    pmin: f64,
    pmax: f64,
    dmin: f64,
    dmax: f64,
}

impl Report<'_> {
    fn rates(&self) -> Rates {
        let (p, k, rounds) = (self.p, self.k, self.rounds);
        let best_p = rounds
            .iter()
            .min_by(|a, b| a.prefill_s.total_cmp(&b.prefill_s))
            .cloned()
            .unwrap_or_default();
        let best_d = rounds
            .iter()
            .min_by(|a, b| a.decode_s.total_cmp(&b.decode_s))
            .cloned()
            .unwrap_or_default();
        let tps = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        let prefill: Vec<f64> = rounds.iter().map(|r| tps(p, r.prefill_s)).collect();
        let decode: Vec<f64> = rounds.iter().map(|r| tps(k, r.decode_s)).collect();
        let range = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            )
        };
        let (pmin, pmax) = range(&prefill);
        let (dmin, dmax) = range(&decode);
        Rates {
            best_p,
            best_d,
            prefill,
            decode,
            pmin,
            pmax,
            dmin,
            dmax,
        }
    }

    /// The roofline shares of the best rounds (with --roofline).
    fn roof(&self, r: &Rates) -> Option<Roof> {
        let rl = self.roofline.as_ref()?;
        Some(roof(
            rl,
            &self.costs,
            kernels::bf16_dot(),
            self.p,
            self.k,
            self.world_size,
            &r.best_p,
            &r.best_d,
        ))
    }

    fn max_bytes(&self) -> u64 {
        self.all.iter().copied().max().unwrap_or(0)
    }

    /// `--json`: one object on stdout, the collectives summary on stderr.
    fn print_json(&self) {
        println!("{}", self.json());
        eprint!("{}", self.ops.summary(self.wall_s));
    }

    /// The `--json` object.
    fn json(&self) -> serde_json::Value {
        let rates = self.rates();
        let roof = self.roof(&rates);
        let Rates {
            best_p,
            best_d,
            prefill,
            decode,
            pmax,
            dmax,
            ..
        } = rates;
        let profile_map = |parts: &[(&str, f64)]| {
            parts
                .iter()
                .map(|(n, s)| (n.to_string(), serde_json::json!(*s)))
                .collect::<serde_json::Map<_, _>>()
        };
        let mut j = serde_json::json!({
            "model": self.source,
            "device": self.device,
            "world_size": self.world_size,
            "threads_per_rank": kernels::threads(),
            "isa": kernels::isa().name(),
            "bf16_dot": kernels::bf16_dot(),
            "prompt_len": self.p,
            "new_tokens": self.k,
            "rounds": self.args.rounds,
            "timings": {
                "prefill_tok_s": pmax,
                "decode_tok_s": dmax,
                "prefill_s": best_p.prefill_s,
                "decode_s": best_d.decode_s,
                "prefill_tok_s_all": prefill,
                "decode_tok_s_all": decode,
            },
            "comm": {
                "prefill_s": best_p.prefill_comm_s,
                "decode_s": best_d.decode_comm_s,
                "prefill_share": best_p.prefill_comm_s / best_p.prefill_s.max(1e-12),
                "decode_share": best_d.decode_comm_s / best_d.decode_s.max(1e-12),
                "ops": self.ops,
                "wall_s": self.wall_s,
            },
            "weight_bytes_per_rank": self.all,
            "weight_bytes_rank0": self.weight_bytes,
            "weight_bytes_max": self.max_bytes(),
            "output_ids": self.tokens,
            "prefill_profile_s": profile_map(&best_p.prefill_profile),
            "decode_profile_s": profile_map(&best_d.profile),
        });
        if let (Some(rl), Some(roof)) = (&self.roofline, &roof) {
            j["roofline"] = serde_json::json!({
                "read_gbps": rl.read_gbps,
                "f32_gflops": rl.f32_gflops,
                "bf16_gflops": rl.bf16_gflops,
                "decode_bytes_per_token": roof.decode_bytes,
                "prefill_gemm_flops": roof.prefill_flops,
                "prefill_peak_gflops": roof.peak_gflops,
            });
            j["timings"]["decode_floor_pct"] = roof.decode_floor_pct.into();
            j["timings"]["prefill_peak_pct"] = roof.prefill_peak_pct.into();
            let part = |f: fn(&PartRoof) -> Option<f64>| {
                roof.parts
                    .iter()
                    .filter_map(|x| Some((x.0.to_string(), serde_json::json!(f(x)?))))
                    .collect::<serde_json::Map<_, _>>()
            };
            j["timings"]["decode_floor_pct_parts"] = part(|x| x.1).into();
            j["timings"]["prefill_peak_pct_parts"] = part(|x| x.2).into();
        }
        j
    }

    /// The human-readable report: the collectives summary on stderr, the table on stdout.
    fn print_text(&self) {
        let rates = self.rates();
        let roof = self.roof(&rates);
        let Rates {
            best_p,
            best_d,
            pmin,
            pmax,
            dmin,
            dmax,
            ..
        } = rates;
        let (p, k, source) = (self.p, self.k, self.source);
        let (isa, threads) = (kernels::isa().name(), kernels::threads());
        eprint!("{}", self.ops.summary(self.wall_s));
        println!(
            "tprun bench: {source}, {} rank(s) x {threads} thread(s), {isa}{}{}, prompt {p}, {k} new tokens, best of {}",
            self.world_size,
            match self.device {
                "cpu" => String::new(),
                d => format!(", {d}"),
            },
            if kernels::bf16_dot() { " (bf16 dot prefill)" } else { "" },
            self.args.rounds
        );
        println!(
            "  prefill  {pmax:9.1} tok/s   (range {pmin:.1}..{pmax:.1})   collectives {:.1} ms ({:.1}%)",
            best_p.prefill_comm_s * 1e3,
            100.0 * best_p.prefill_comm_s / best_p.prefill_s.max(1e-12)
        );
        println!(
            "  decode   {dmax:9.1} tok/s   (range {dmin:.1}..{dmax:.1})   collectives {:.1} ms ({:.1}%)",
            best_d.decode_comm_s * 1e3,
            100.0 * best_d.decode_comm_s / best_d.decode_s.max(1e-12)
        );
        println!(
            "  weights  {:.1} MiB per rank (max over ranks {:.1} MiB)",
            self.weight_bytes as f64 / (1 << 20) as f64,
            self.max_bytes() as f64 / (1 << 20) as f64
        );
        if let (Some(rl), Some(roof)) = (&self.roofline, &roof) {
            println!(
                "  roofline read {:.1} GB/s, f32 FMA {:.0} GFLOP/s, bf16 dot {:.0} GFLOP/s (all ranks)",
                rl.read_gbps, rl.f32_gflops, rl.bf16_gflops
            );
            println!(
                "  decode   {:.1}% of the read floor ({:.0} MB per token)   prefill {:.1}% of the {} peak ({:.2} GFLOP)",
                roof.decode_floor_pct,
                roof.decode_bytes / 1e6,
                roof.prefill_peak_pct,
                if kernels::bf16_dot() { "bf16 dot" } else { "f32 FMA" },
                roof.prefill_flops / 1e9
            );
            for (name, d, pf) in &roof.parts {
                let f = |v: &Option<f64>| v.map_or("    -".into(), |v| format!("{v:5.1}%"));
                println!(
                    "    {name:34} decode {} of floor   prefill {} of peak",
                    f(d),
                    f(pf)
                );
            }
        }
        if !best_d.profile.is_empty() {
            println!("  prefill profile (best round, rank 0, ms per prompt, % of prefill):");
            print_profile(&best_p.prefill_profile, best_p.prefill_s, 1, None);
            println!("  decode profile (best round, rank 0, ms per token, % of decode):");
            let ar = Some(best_d.decode_all_reduce_s);
            print_profile(&best_d.profile, best_d.decode_s, k, ar);
        }
    }
}

/// One `--profile` table: each part's milliseconds per `per` steps and share of `total_s`.
fn print_profile(parts: &[(&str, f64)], total_s: f64, per: usize, all_reduce_s: Option<f64>) {
    let ms = |s: f64| s * 1e3 / per.max(1) as f64;
    let pct = |s: f64| 100.0 * s / total_s.max(1e-12);
    let mut rest = total_s;
    for (name, s) in parts {
        println!("    {name:34} {:7.3} ms {:5.1}%", ms(*s), pct(*s));
        rest -= s;
    }
    if let Some(ar) = all_reduce_s {
        let name = "  of which all-reduce";
        println!("    {name:34} {:7.3} ms {:5.1}%", ms(ar), pct(ar));
    }
    println!("    {:34} {:7.3} ms {:5.1}%", "other", ms(rest), pct(rest));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rank::model::{ForwardOptions, Logits};
    use rank::testing::run_world;

    fn tiny() -> Config {
        Config {
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            // Odd, so the vocab shards differ in size.
            vocab_size: 301,
            tie_word_embeddings: true,
            ..Preset::Qwen25_0_5b.config()
        }
    }

    /// The distributed argmax picks what argmax over the gathered logits picks, step by step,
    /// at every TP size, and the greedy tokens agree across TP sizes.
    #[test]
    fn distributed_argmax_equals_argmax_of_gathered_logits() {
        let config = tiny();
        let prompt = [3u32, 300, 17, 42, 5];
        let mut per_world = Vec::new();
        for world in [1, 2, 3] {
            let out = run_world(world, |r, comm| {
                let plan = ShardPlan::new(&config.shapes(), world, r)?;
                let mut src = RandomWeights { seed: 7 };
                let mut model =
                    Qwen2::load(&mut src, &config, &plan, WeightDtype::Bf16, &mut |_, _| {})?;
                model.reserve(prompt.len() + 6)?;
                let opts = ForwardOptions {
                    logits: Logits::Last,
                    hidden_states: false,
                };
                let mut toks = Vec::new();
                let mut ids = prompt.to_vec();
                let mut pos = 0;
                for _ in 0..6 {
                    let logits = model.forward_with(comm, &ids, pos, opts)?.logits;
                    let want = logits
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                        )
                        .0 as u32;
                    let got = model.forward_argmax(comm, &ids, pos)?;
                    assert_eq!(got, want, "TP {world} step {}", toks.len());
                    toks.push(got);
                    pos += ids.len();
                    ids = vec![got];
                }
                Ok(toks)
            });
            let toks: Vec<Vec<u32>> = out.into_iter().map(|o| o.unwrap()).collect();
            assert!(toks.iter().all(|t| *t == toks[0]));
            per_world.push(toks[0].clone());
        }
        assert!(
            per_world.iter().all(|t| *t == per_world[0]),
            "{per_world:?}"
        );
    }

    /// `--roofline`'s JSON fields exist, are positive, and the percentages are the costs over
    /// the best rounds' times over the ceilings (synthetic figures: nothing here is timed).
    #[test]
    fn roofline_json_fields_come_from_the_figures() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: Args,
        }
        let args = <Cli as clap::Parser>::parse_from(["bench", "--roofline"]).bench;
        let (p, k) = (128, 32);
        let mut costs = vec![(0.0, 0.0); PARTS.len()];
        costs[3] = (600e6, 4e8);
        costs[6] = (200e6, 0.0);
        let round = Round {
            prefill_s: 0.25,
            decode_s: 1.0,
            ..Round::default()
        };
        let rl = kernels::roofline::Roofline {
            read_gbps: 40.0,
            f32_gflops: 400.0,
            bf16_gflops: 800.0,
        };
        let ops = CommStats::default();
        let report = Report {
            args: &args,
            source: "test",
            device: "cpu",
            world_size: 2,
            p,
            k,
            rounds: std::slice::from_ref(&round),
            tokens: &[],
            ops: &ops,
            wall_s: 1.0,
            weight_bytes: 1,
            all: &[1, 1],
            costs,
            roofline: Some(rl),
        };
        let j = report.json();
        let r = &j["roofline"];
        for f in ["read_gbps", "f32_gflops", "bf16_gflops"] {
            assert!(r[f].as_f64().unwrap() > 0.0, "{f}: {r}");
        }
        let t = &j["timings"];
        let (floor, peak) = (
            t["decode_floor_pct"].as_f64().unwrap(),
            t["prefill_peak_pct"].as_f64().unwrap(),
        );
        assert!(floor > 0.0 && peak > 0.0);
        // 800 MB per token at 32 tok/s over 40 GB/s.
        let want_floor = 100.0 * 800e6 * (k as f64 / 1.0) / (40.0 * 1e9);
        assert!((floor - want_floor).abs() < 1e-9, "{floor} vs {want_floor}");
        let peak_gflops = if kernels::bf16_dot() { 800.0 } else { 400.0 };
        let want_peak = 100.0 * 2.0 * p as f64 * 4e8 / 0.25 / (peak_gflops * 1e9);
        assert!((peak - want_peak).abs() < 1e-9, "{peak} vs {want_peak}");
    }

    #[test]
    fn random_shards_have_the_shard_shapes() {
        let mut src = RandomWeights { seed: 1 };
        let w = src
            .load("a.weight", &[10, 6], Slice::Cols(2..5), WeightDtype::Bf16)
            .unwrap();
        let full = src
            .load("a.weight", &[10, 6], Slice::All, WeightDtype::Bf16)
            .unwrap();
        let (Weights::BF16(w), Weights::BF16(full)) = (w, full) else {
            panic!("bf16 requested")
        };
        assert_eq!(w.len(), 30);
        // A shard is the same slice of the same full tensor.
        for i in 0..10 {
            assert_eq!(w[i * 3..i * 3 + 3], full[i * 6 + 2..i * 6 + 5]);
        }
        let n = src
            .load_f32("b.input_layernorm.weight", &[8], Slice::All)
            .unwrap();
        assert_eq!(n, vec![1.0; 8]);
    }
}
