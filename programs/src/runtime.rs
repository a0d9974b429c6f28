//! What every built-in rank program shares: the `--model`/`--dtype` options, finding the model,
//! loading this rank's shard with a progress line, and writing safetensors outputs. Every file
//! of the checkpoint is read through [`rank::ModelDir`].

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use collectives::Communicator;

use rank::model::config::Config;
use rank::model::loader::WeightDtype;
use rank::model::plan::ShardPlan;
use rank::model::Qwen2;
use rank::ModelDir;

/// `--model` and `--dtype`, common to generate, logits and bench.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Qwen2 checkpoint: a directory, or ORG/NAME found offline in the Hugging Face cache
    /// ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); an existing directory
    /// wins over a repo id. Default: $TPRUN_MODEL, else the tiny random-weight test model
    /// compiled into tprun (tiny-hub-bf16-tied).
    #[arg(long, value_name = "DIR|ORG/NAME")]
    pub model: Option<PathBuf>,
    /// Branch, tag or commit hash of --model ORG/NAME in the cache (default: main).
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// In-memory format of the weights; compute is always f32. auto keeps bf16 as bf16 and f32
    /// as f32, and widens f16 to f32.
    #[arg(long, default_value = "auto", value_parser = dtype_parser())]
    pub dtype: WeightDtype,
    /// Prefill products of bf16 weights use AVX512_BF16 dot products on bf16-rounded
    /// activations, as llama.cpp's BF16 and torch's bf16 paths do: about twice the f32 rate,
    /// but logits drift past 1e-3 of transformers' f32 ones. Decode is exact either way.
    #[arg(long)]
    pub bf16_dot: bool,
}

/// `--dtype`'s values, each with its help line (the model crate carries no command line).
fn dtype_parser() -> impl clap::builder::TypedValueParser<Value = WeightDtype> {
    use clap::builder::{PossibleValue, TypedValueParser};
    let help = |d: WeightDtype| match d {
        WeightDtype::Auto => {
            "bf16 stays bf16, f32 stays f32, f16 becomes f32 (no f16 kernels; bf16 would lose bits)"
        }
        WeightDtype::F32 | WeightDtype::Bf16 => "",
    };
    let values = WeightDtype::ALL.map(|d| match help(d) {
        "" => PossibleValue::new(d.name()),
        h => PossibleValue::new(d.name()).help(h),
    });
    clap::builder::PossibleValuesParser::new(values).map(|s| {
        s.parse::<WeightDtype>()
            .expect("one of the possible values")
    })
}

/// Applies the compute options of `args` (`--bf16-dot`) to this process's kernels, saying on
/// stderr (rank 0) when the CPU cannot honour them.
pub fn set_compute_options(args: &ModelArgs, rank: usize) {
    if !kernels::set_bf16_dot(args.bf16_dot) && args.bf16_dot && rank == 0 {
        eprintln!("tprun: --bf16-dot: this CPU has no AVX512_BF16; products stay exact f32");
    }
}

/// What `--model` names: itself, else `$TPRUN_MODEL`, else `None` (the bundled model).
pub fn model_spec(args: &ModelArgs) -> Option<PathBuf> {
    if let Some(m) = &args.model {
        return Some(m.clone());
    }
    std::env::var_os("TPRUN_MODEL")
        .filter(|m| !m.is_empty())
        .map(PathBuf::from)
}

/// Opens the model of `args` (see [`rank::ModelDir::resolve`]); the launcher's check and every
/// rank go through here, so they open the same model.
pub fn open_model(args: &ModelArgs) -> Result<ModelDir> {
    ModelDir::resolve(model_spec(args).as_deref(), args.revision.as_deref())
}

/// A checkpoint's validated config and this rank's plan, before any weights are read.
pub struct Prepared {
    /// The model's directory, or [`rank::checkpoint::BUNDLED_NAME`].
    pub dir: PathBuf,
    pub model: ModelDir,
    pub config: Config,
    pub plan: ShardPlan,
}

pub fn prepare<C: Communicator + ?Sized>(args: &ModelArgs, comm: &C) -> Result<Prepared> {
    let model = open_model(args)?;
    let dir = model.path().to_path_buf();
    let config = model.config().clone();
    let plan = ShardPlan::new(&config.shapes(), comm.world_size(), comm.rank())
        .with_context(|| format!("{}", dir.display()))?;
    Ok(Prepared {
        dir,
        model,
        config,
        plan,
    })
}

/// What loading cost this rank.
#[derive(Debug, Clone, Copy)]
pub struct LoadStats {
    pub seconds: f64,
    pub weight_bytes: usize,
    pub bytes_read: u64,
}

/// Loads this rank's shard; rank 0 reports progress on stderr (`program` prefixes the line).
pub fn load(p: &Prepared, dtype: WeightDtype, program: &str) -> Result<(Qwen2, LoadStats)> {
    let t0 = Instant::now();
    let show = p.plan.rank == 0;
    let tty = std::io::stderr().is_terminal();
    if show {
        eprintln!(
            "tprun {program}: loading {} on {} rank(s), weights {}",
            p.dir.display(),
            p.plan.world,
            dtype.name()
        );
    }
    let mut ck = p.model.weights()?;
    let mut progress = |done: usize, total: usize| {
        if show && tty {
            eprint!("\rtprun {program}: layer {done}/{total}");
            let _ = std::io::stderr().flush();
        }
    };
    let model = Qwen2::load(&mut ck, &p.config, &p.plan, dtype, &mut progress)?;
    let stats = LoadStats {
        seconds: t0.elapsed().as_secs_f64(),
        weight_bytes: model.weight_bytes(),
        bytes_read: ck.bytes_read(),
    };
    if show {
        if tty {
            eprintln!();
        }
        eprintln!(
            "tprun {program}: loaded in {:.2} s, {:.1} MiB of weights on rank 0",
            stats.seconds,
            stats.weight_bytes as f64 / (1 << 20) as f64
        );
    }
    Ok((model, stats))
}

/// Writes f32 tensors `(name, shape, data)` to a safetensors file.
pub fn write_f32_safetensors(path: &Path, tensors: &[(String, Vec<usize>, &[f32])]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(data),
            )
            .with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    // serialize + fs::write rather than serialize_to_file, whose I/O errors print as Debug.
    let bytes = safetensors::serialize(views, &None)
        .with_context(|| format!("cannot serialize {}", path.display()))?;
    collectives::files::write_output(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}
