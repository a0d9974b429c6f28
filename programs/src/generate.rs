//! `tprun generate`: prefill the prompt in one forward, then one token per step against the KV
//! cache; rank 0 streams the text to stdout.
//!
//! Choices worth knowing:
//! - Greedy is the default. Sampling happens when `--temperature` (> 0), `--top-k` or `--top-p`
//!   is given (temperature 1 when only top-k/top-p are); `--temperature 0` means greedy, and
//!   `--greedy` refuses the sampling options. (transformers would sample by default for Qwen2.5
//!   because its generation_config says `do_sample: true`; a reproducible default is more useful
//!   for a runtime that is checked against references.)
//! - Rank 0 alone picks each token and broadcasts it (4 bytes) to the others. The all-gathered
//!   logits are the same bits on every rank today, so every rank could sample for itself, but the
//!   broadcast makes the ranks agree by construction, whatever a future transport or a
//!   gather-to-rank-0 lm_head does, for one tiny collective next to the 2 per layer a step
//!   already costs. It also means only rank 0 needs the generator, so a default seed (from the
//!   clock) needs no agreement; it is printed so the run can be repeated with `--seed`.
//! - Plain prompts are encoded like transformers' `tokenizer(text)` (the post-processor runs,
//!   which adds nothing for Qwen2); chats like `apply_chat_template` (no special tokens added:
//!   the template wrote them).
//! - The prompt plus the new tokens must fit `max_position_embeddings`: a prompt that leaves no
//!   room is an error, and generation stops at the context limit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use collectives::{CommExt, Communicator};

use crate::runtime::{self, ModelArgs};
use rank::model::{ForwardOptions, Logits, Qwen2};
use rank::text::chat;
use rank::text::chat::Message;
use rank::text::sampling::{Sampler, Strategy};
use rank::text::tokenizer::{StreamDecoder, Tokenizer};
use rank::ModelDir;

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("input").args(["prompt", "chat", "messages", "input_ids"])))]
#[command(
    after_help = "Without --prompt, --chat, --messages or --input-ids, in a terminal: an \
interactive chat (each line a user turn, the whole conversation rendered each turn; Ctrl-D ends)."
)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plain prompt text (no chat template).
    #[arg(long)]
    pub prompt: Option<String>,
    /// A user message, rendered with the checkpoint's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// A conversation to continue: a JSON list of {"role": "system"|"user"|"assistant",
    /// "content": "..."} (OpenAI style), rendered with the chat template.
    #[arg(long, value_name = "FILE.json")]
    pub messages: Option<PathBuf>,
    /// Prompt token ids, comma-separated (no tokenizer needed; the text of the output is
    /// printed only when the checkpoint has one, else the ids).
    #[arg(long, value_name = "1,2,3", value_delimiter = ',')]
    pub input_ids: Option<Vec<u32>>,
    /// A system message before the --chat message or the interactive chat (default: the
    /// template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many new tokens.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_new_tokens: u64,
    /// Sample with this temperature (0 = greedy).
    #[arg(long, value_parser = parse_temperature, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens only.
    #[arg(long, value_parser = parse_top_k)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P, 0 < P <= 1.
    #[arg(long, value_parser = parse_top_p)]
    pub top_p: Option<f32>,
    /// Seed of the sampler (default: from the clock, printed on stderr).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Always pick the most likely token (the default unless a sampling option is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Keep going past end-of-sequence tokens (until --max-new-tokens or the context limit).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (rank 0) instead of streaming the text.
    #[arg(long)]
    pub json: bool,
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    let t: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !t.is_finite() || t < 0.0 {
        return Err(format!("{s} must be a finite number >= 0 (0 = greedy)"));
    }
    Ok(t)
}

fn parse_top_k(s: &str) -> Result<usize, String> {
    let k: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if k == 0 {
        return Err("0: top-k must be at least 1".into());
    }
    Ok(k)
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    let p: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(p > 0.0 && p <= 1.0) {
        return Err(format!("{s} is outside (0, 1]"));
    }
    Ok(p)
}

/// What the prompt is.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompt(String),
    Chat {
        user: String,
        system: Option<String>,
    },
    /// `--messages FILE.json`: the file's conversation.
    Messages(PathBuf, Vec<Message>),
    Ids(Vec<u32>),
    /// No input option and a terminal on rank 0's stdin: chat turn by turn.
    Interactive {
        system: Option<String>,
    },
}

impl Input {
    pub fn from_args(args: &Args) -> Result<Input> {
        let chatty = args.chat.is_some() || !args.any_input();
        if args.system.is_some() && !chatty {
            bail!(
                "--system goes with --chat or the interactive chat (a --prompt, --messages or \
                 --input-ids input has no separate system turn)"
            );
        }
        if let Some(path) = &args.messages {
            return Ok(Input::Messages(path.clone(), read_messages(path)?));
        }
        Ok(match (&args.prompt, &args.chat, &args.input_ids) {
            (Some(p), None, None) => Input::Prompt(p.clone()),
            (None, Some(c), None) => Input::Chat {
                user: c.clone(),
                system: args.system.clone(),
            },
            (None, None, Some(ids)) => Input::Ids(ids.clone()),
            (None, None, None) if std::env::var_os(STDIN_TERMINAL).is_some() => {
                Input::Interactive {
                    system: args.system.clone(),
                }
            }
            (None, None, None) => bail!(
                "give one of --prompt, --chat, --messages, --input-ids (or run tprun in a \
                 terminal for an interactive chat)"
            ),
            _ => bail!("give exactly one of --prompt, --chat, --messages, --input-ids"),
        })
    }
}

impl Args {
    fn any_input(&self) -> bool {
        self.prompt.is_some()
            || self.chat.is_some()
            || self.messages.is_some()
            || self.input_ids.is_some()
    }
}

/// What tprun's launcher sets in every rank when rank 0's stdin is the relayed terminal
/// (launcher/src/spawn.rs, `STDIN_TERMINAL`).
const STDIN_TERMINAL: &str = "TPRUN_STDIN_TERMINAL";

/// Reads `--messages FILE.json`: a non-empty JSON list of `{"role", "content"}` objects, role
/// system, user or assistant; an error names the file and the entry.
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = rank::checkpoint::read_text(path).context("--messages")?;
    parse_messages(&text).with_context(|| format!("--messages {}", path.display()))
}

fn parse_messages(text: &str) -> Result<Vec<Message>> {
    let v: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let Some(list) = v.as_array() else {
        bail!("expected a JSON list of {{\"role\", \"content\"}} objects");
    };
    if list.is_empty() {
        bail!("the list is empty: give at least one message");
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| m.get(k).and_then(|v| v.as_str());
            let role = field("role").with_context(|| format!("entry {i}: no \"role\" string"))?;
            if !["system", "user", "assistant"].contains(&role) {
                bail!("entry {i}: role {role:?} is not one of system, user, assistant");
            }
            let content =
                field("content").with_context(|| format!("entry {i}: no \"content\" string"))?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// The prompt's ids, and for a chat the rendered text they came from.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: Option<String>,
}

/// Encodes the input with `model`'s chat template; `tok` may be `None` only for token ids.
pub fn encode_input(model: &ModelDir, tok: Option<&Tokenizer>, input: &Input) -> Result<Prompt> {
    let need_tok = || {
        tok.with_context(|| {
            format!(
                "missing tokenizer: {} does not exist",
                model.path().join("tokenizer.json").display()
            )
        })
    };
    let prompt = match input {
        Input::Prompt(text) => {
            if text.is_empty() {
                bail!("--prompt is empty: give some text");
            }
            Prompt {
                ids: need_tok()?.encode(text, true)?,
                text: None,
            }
        }
        Input::Chat { user, system } => {
            if user.is_empty() {
                bail!("--chat is empty: give a message");
            }
            render_chat(model, need_tok()?, &chat::messages(user, system.as_deref()))?
        }
        Input::Messages(_, messages) => render_chat(model, need_tok()?, messages)?,
        Input::Ids(ids) => {
            if ids.is_empty() {
                bail!("--input-ids is empty: give at least one id");
            }
            Prompt {
                ids: ids.clone(),
                text: None,
            }
        }
        Input::Interactive { .. } => bail!("an interactive chat has no prompt up front"),
    };
    if prompt.ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    Ok(prompt)
}

/// A conversation rendered with the chat template (ending with the assistant header) and its
/// ids, encoded like `apply_chat_template` (no special tokens added: the template wrote them).
pub fn render_chat(model: &ModelDir, tok: &Tokenizer, messages: &[Message]) -> Result<Prompt> {
    let template = model.chat_template()?;
    let text = template.render(messages, true)?;
    if text.is_empty() {
        bail!(
            "the chat template from {} rendered an empty prompt",
            template.origin()
        );
    }
    Ok(Prompt {
        ids: tok.encode(&text, false)?,
        text: Some(text),
    })
}

/// The token choice from the command line (see the module docs for the rules).
pub fn strategy(args: &Args) -> Strategy {
    if args.greedy {
        return Strategy::Greedy;
    }
    let any = args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some();
    let t = args.temperature.unwrap_or(1.0);
    if !any || t == 0.0 {
        return Strategy::Greedy;
    }
    Strategy::Sample {
        temperature: t,
        top_k: args.top_k,
        top_p: args.top_p.unwrap_or(1.0),
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Eos,
    MaxNewTokens,
    Context,
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Eos => "eos",
            Stop::MaxNewTokens => "max_new_tokens",
            Stop::Context => "context",
        }
    }
}

/// How to decode.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_new_tokens: usize,
    pub eos: Vec<u32>,
    pub ignore_eos: bool,
}

/// The new tokens and what they cost.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// New tokens only, including a final eos when one ended the generation.
    pub output_ids: Vec<u32>,
    pub stop: Stop,
    /// Prefill forward plus the first token's choice.
    pub prefill_s: f64,
    /// Every later step.
    pub decode_s: f64,
    /// Forwards after the prefill (one per token after the first).
    pub decode_steps: usize,
}

/// What a generation needs from a model: the CPU [`Qwen2`], or with the `cuda` feature the
/// device model (`rank::model::cuda::CudaQwen2`) on its CUDA communicator.
/// `C` is the communicator the model's collectives run on.
pub trait StepModel<C: Communicator + ?Sized> {
    /// Positions the model can attend to (max_position_embeddings).
    fn context(&self) -> usize;
    /// The greedy next token after `ids` at positions `pos..` (the same on every rank).
    fn argmax(&mut self, comm: &mut C, ids: &[u32], pos: usize) -> Result<u32>;
    /// The last position's logits over the whole vocabulary (the same on every rank).
    fn last_logits(&mut self, comm: &mut C, ids: &[u32], pos: usize) -> Result<Vec<f32>>;
}

impl<'a> StepModel<dyn Communicator + 'a> for Qwen2 {
    fn context(&self) -> usize {
        self.config.max_position_embeddings
    }
    fn argmax(
        &mut self,
        comm: &mut (dyn Communicator + 'a),
        ids: &[u32],
        pos: usize,
    ) -> Result<u32> {
        self.forward_argmax(comm, ids, pos)
    }
    fn last_logits(
        &mut self,
        comm: &mut (dyn Communicator + 'a),
        ids: &[u32],
        pos: usize,
    ) -> Result<Vec<f32>> {
        let last = ForwardOptions {
            logits: Logits::Last,
            hidden_states: false,
        };
        Ok(self.forward_with(comm, ids, pos, last)?.logits)
    }
}

#[cfg(feature = "cuda")]
impl StepModel<collectives::cuda::CudaComm> for rank::model::cuda::CudaQwen2 {
    fn context(&self) -> usize {
        self.config.max_position_embeddings
    }
    fn argmax(
        &mut self,
        comm: &mut collectives::cuda::CudaComm,
        ids: &[u32],
        pos: usize,
    ) -> Result<u32> {
        self.forward_argmax(comm, ids, pos)
    }
    fn last_logits(
        &mut self,
        comm: &mut collectives::cuda::CudaComm,
        ids: &[u32],
        pos: usize,
    ) -> Result<Vec<f32>> {
        self.forward(comm, ids, pos, rank::model::cuda::DeviceLogits::Last)
    }
}

/// Runs the generation on this rank. Rank 0 picks each token with `sampler` and broadcasts it;
/// `on_token` sees every new token (on every rank) as soon as it is known.
pub fn generate<C: Communicator + ?Sized, M: StepModel<C> + ?Sized>(
    model: &mut M,
    comm: &mut C,
    prompt: &[u32],
    settings: &Settings,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> Result<()>,
) -> Result<Decoded> {
    let context = model.context();
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if settings.max_new_tokens == 0 {
        bail!("max_new_tokens must be at least 1");
    }
    if prompt.len() >= context {
        bail!(
            "the prompt has {} tokens but the model's context is {} (max_position_embeddings): \
             no room to generate",
            prompt.len(),
            context
        );
    }
    // Greedy steps use the model's distributed argmax (8 bytes per rank instead of the gathered
    // vocabulary, and the screened LM head); every rank gets the same id from it.
    let greedy = matches!(sampler.strategy, Strategy::Greedy);
    let mut step = |model: &mut M, ids: &[u32], pos: usize| -> Result<u32> {
        if greedy {
            return model.argmax(comm, ids, pos);
        }
        let logits = model.last_logits(comm, ids, pos)?;
        choose(comm, sampler, &logits)
    };
    let t0 = Instant::now();
    let mut next = step(model, prompt, 0).context("prefill")?;
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut output = Vec::new();
    let mut steps = 0;
    let stop = loop {
        output.push(next);
        on_token(next)?;
        if !settings.ignore_eos && settings.eos.contains(&next) {
            break Stop::Eos;
        }
        if output.len() >= settings.max_new_tokens {
            break Stop::MaxNewTokens;
        }
        let pos = prompt.len() + output.len() - 1;
        if pos + 1 >= context {
            break Stop::Context;
        }
        next =
            step(model, &[next], pos).with_context(|| format!("decode step at position {pos}"))?;
        steps += 1;
    };
    Ok(Decoded {
        output_ids: output,
        stop,
        prefill_s,
        decode_s: if steps > 0 {
            t1.elapsed().as_secs_f64()
        } else {
            0.0
        },
        decode_steps: steps,
    })
}

/// Rank 0 picks, everyone gets rank 0's pick.
fn choose<C: Communicator + ?Sized>(
    comm: &mut C,
    sampler: &mut Sampler,
    logits: &[f32],
) -> Result<u32> {
    let mut id = [0u32];
    if comm.rank() == 0 {
        let _s = collectives::trace::span("sample");
        id[0] = sampler.sample(logits)?;
    }
    if comm.world_size() > 1 {
        comm.broadcast(&mut id, 0)
            .context("broadcast of the next token")?;
    }
    Ok(id[0])
}

fn default_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 32)
}

/// Everything a generation needs besides the prompt, set up once per run.
struct Session<C: Communicator + ?Sized, M: StepModel<C>> {
    comm: Box<C>,
    model: M,
    p: runtime::Prepared,
    tok: Option<Tokenizer>,
    settings: Settings,
    sampler: Sampler,
    load: runtime::LoadStats,
    started: Instant,
}

pub fn run(args: &Args) -> Result<()> {
    let input = Input::from_args(args)?;
    #[cfg(feature = "cuda")]
    if crate::device::cuda_requested() {
        let comm = Box::new(crate::runtime_cuda::comm("generate")?);
        return run_with(args, input, comm, |p, comm| {
            crate::runtime_cuda::load(p, args.model.dtype, "generate", comm)
        });
    }
    let comm = collectives::from_env()?;
    runtime::set_compute_options(&args.model, comm.rank());
    run_with(args, input, comm, |p, _| {
        runtime::load(p, args.model.dtype, "generate")
    })
}

/// The run after the communicator is made: prompt, settings, the model `load` gives, then one
/// reply or the chat.
fn run_with<C: Communicator + ?Sized, M: StepModel<C>>(
    args: &Args,
    input: Input,
    comm: Box<C>,
    load: impl FnOnce(&runtime::Prepared, &C) -> Result<(M, runtime::LoadStats)>,
) -> Result<()> {
    let started = Instant::now();
    let p = runtime::prepare(&args.model, &*comm)?;
    // Token ids need no tokenizer: only the text of the output does.
    let tok = match input {
        Input::Ids(_) => p.model.tokenizer_if_present()?,
        _ => Some(p.model.tokenizer()?),
    };
    let prompt = match input {
        Input::Interactive { .. } => None,
        _ => Some(encode_input(&p.model, tok.as_ref(), &input)?),
    };
    if let Some(prompt) = &prompt {
        p.config.check_ids(&prompt.ids, 0)?;
    }
    let settings = Settings {
        max_new_tokens: usize::try_from(args.max_new_tokens).unwrap_or(usize::MAX),
        eos: p.model.eos_ids()?,
        ignore_eos: args.ignore_eos,
    };
    let sampler = make_sampler(args, p.plan.rank == 0);
    let (model, load) = load(&p, &comm)?;
    let mut s = Session {
        comm,
        model,
        p,
        tok,
        settings,
        sampler,
        load,
        started,
    };
    match (prompt, input) {
        (Some(prompt), _) => one_shot(&mut s, &prompt, args.json),
        (None, Input::Interactive { system }) => interactive(&mut s, system),
        (None, _) => unreachable!("every other input has a prompt"),
    }
}

/// The sampler of the command line; rank 0 says on stderr how tokens are chosen.
fn make_sampler(args: &Args, rank0: bool) -> Sampler {
    let strategy = strategy(args);
    let seed = args.seed.unwrap_or_else(default_seed);
    if rank0 {
        match &strategy {
            Strategy::Greedy => eprintln!("tprun generate: greedy"),
            Strategy::Sample {
                temperature,
                top_k,
                top_p,
            } => eprintln!(
                "tprun generate: sampling with temperature {temperature}, top-k {}, top-p {top_p}, \
                 seed {seed}",
                top_k.map_or("off".to_string(), |k| k.to_string())
            ),
        }
    }
    Sampler::new(strategy, seed)
}

/// Generates a reply to `prompt`, rank 0 streaming it to stdout when `stream`: its text, or
/// without a tokenizer its ids, space-separated.
fn reply<C: Communicator + ?Sized, M: StepModel<C>>(
    s: &mut Session<C, M>,
    prompt: &[u32],
    stream: bool,
) -> Result<Decoded> {
    let mut dec = s.tok.as_ref().map(|t| StreamDecoder::new(t, true));
    let stdout = std::io::stdout();
    let mut on_token = |id: u32| -> Result<()> {
        if stream {
            let piece = match dec.as_mut() {
                Some(d) => d.push(id)?,
                None => format!("{id} "),
            };
            let mut out = stdout.lock();
            out.write_all(piece.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    };
    let d = generate(
        &mut s.model,
        &mut *s.comm,
        prompt,
        &s.settings,
        &mut s.sampler,
        &mut on_token,
    )?;
    if stream {
        let rest = match dec.as_mut() {
            Some(d) => d.finish()?,
            None => String::new(),
        };
        let mut out = stdout.lock();
        out.write_all(rest.as_bytes())?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(d)
}

/// `--prompt`, `--chat`, `--messages`, `--input-ids`: one reply, then the statistics.
fn one_shot<C: Communicator + ?Sized, M: StepModel<C>>(
    s: &mut Session<C, M>,
    prompt: &Prompt,
    json: bool,
) -> Result<()> {
    let rank0 = s.p.plan.rank == 0;
    let d = reply(s, &prompt.ids, rank0 && !json)?;
    if rank0 {
        report(s, prompt, &d, json)?;
    }
    Ok(())
}

/// Rank 0's statistics on stderr, and with `json` the one JSON object on stdout.
fn report<C: Communicator + ?Sized, M: StepModel<C>>(
    s: &Session<C, M>,
    prompt: &Prompt,
    d: &Decoded,
    json: bool,
) -> Result<()> {
    let prefill_tok_s = prompt.ids.len() as f64 / d.prefill_s.max(1e-12);
    let decode_tok_s = if d.decode_steps > 0 {
        d.decode_steps as f64 / d.decode_s.max(1e-12)
    } else {
        0.0
    };
    if d.stop == Stop::Context {
        eprintln!(
            "tprun generate: stopped at the model's context limit ({} tokens)",
            s.p.config.max_position_embeddings
        );
    }
    eprintln!(
        "tprun generate: load {:.2} s, prefill {} tok {:.1} tok/s, decode {} tok {:.1} tok/s, \
         stop: {}",
        s.load.seconds,
        prompt.ids.len(),
        prefill_tok_s,
        d.decode_steps,
        decode_tok_s,
        d.stop.as_str()
    );
    // Collectives since the communicator was made (load, prefill, decode) against the wall
    // time since then.
    let wall_s = s.started.elapsed().as_secs_f64();
    let stats = s.comm.stats();
    eprint!(
        "tprun generate: collectives on rank 0\n{}",
        stats.summary(wall_s)
    );
    if json {
        // Without a tokenizer (--input-ids) there is no text: null.
        let text = match &s.tok {
            Some(t) => Some(t.decode(&d.output_ids, true)?),
            None => None,
        };
        let j = serde_json::json!({
            "prompt_ids": prompt.ids,
            "output_ids": d.output_ids,
            "text": text,
            "stop": d.stop.as_str(),
            "world_size": s.p.plan.world,
            "timings": {
                "load_s": s.load.seconds,
                "prefill_tok_s": prefill_tok_s,
                "decode_tok_s": decode_tok_s,
                "prefill_s": d.prefill_s,
                "decode_s": d.decode_s,
            },
            // Rank 0's collectives since its communicator was made (load, prefill, decode):
            // {op: {count, bytes, seconds, wait_seconds}}; wall_s is the time since then.
            "comm": stats,
            "wall_s": wall_s,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{j}")?;
        out.flush()?;
    }
    Ok(())
}

/// The interactive chat: rank 0 reads a user turn per line from its stdin (tprun's terminal),
/// renders the whole conversation and broadcasts its ids (length, then the ids); every rank
/// prefills the conversation and decodes the reply, which joins the history. End of input
/// (Ctrl-D) is a length of 0: every rank ends cleanly.
fn interactive<C: Communicator + ?Sized, M: StepModel<C>>(
    s: &mut Session<C, M>,
    system: Option<String>,
) -> Result<()> {
    let rank0 = s.p.plan.rank == 0;
    let mut history: Vec<Message> = system.iter().map(|t| Message::new("system", t)).collect();
    if rank0 {
        eprintln!("tprun generate: interactive chat: type a message and Enter; Ctrl-D ends");
    }
    let mut lines = std::io::stdin().lines();
    loop {
        let mut ids = Vec::new();
        if rank0 {
            ids = next_turn(s, &mut lines, &mut history)?;
        }
        let mut len = [ids.len() as u32];
        s.comm
            .broadcast(&mut len, 0)
            .context("broadcast of the turn's length")?;
        if len[0] == 0 {
            return Ok(());
        }
        ids.resize(len[0] as usize, 0);
        s.comm
            .broadcast(&mut ids, 0)
            .context("broadcast of the turn's ids")?;
        let d = reply(s, &ids, rank0)?;
        if rank0 {
            let tok = s.tok.as_ref().expect("a chat has a tokenizer");
            history.push(Message::new("assistant", &tok.decode(&d.output_ids, true)?));
        }
    }
}

/// Rank 0: the next user line appended to `history` and the conversation's ids; empty at the
/// end of input, or when the conversation no longer fits the context (said on stderr).
fn next_turn<C: Communicator + ?Sized, M: StepModel<C>>(
    s: &Session<C, M>,
    lines: &mut std::io::Lines<std::io::StdinLock<'static>>,
    history: &mut Vec<Message>,
) -> Result<Vec<u32>> {
    let tok = s.tok.as_ref().expect("a chat has a tokenizer");
    loop {
        let Some(line) = lines.next() else {
            return Ok(Vec::new());
        };
        let line = line.context("reading the chat from stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        history.push(Message::new("user", line.trim_end()));
        let prompt = render_chat(&s.p.model, tok, history)?;
        let context = s.p.config.max_position_embeddings;
        if prompt.ids.len() >= context {
            eprintln!(
                "tprun generate: the conversation has {} tokens, the model's context is {context}: \
                 ending the chat",
                prompt.ids.len()
            );
            return Ok(Vec::new());
        }
        s.p.config.check_ids(&prompt.ids, 0)?;
        return Ok(prompt.ids);
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use rank::model::config::Config;
    use rank::model::loader::WeightDtype;
    use rank::testing::{fixture, run_world, FIXTURES};

    #[derive(Debug, Clone)]
    struct Case {
        name: String,
        input: Input,
        prompt_ids: Vec<u32>,
        prompt_text: Option<String>,
        max_new_tokens: usize,
        output_ids: Vec<u32>,
        text: String,
    }

    fn cases(dir: &Path) -> Vec<Case> {
        let path = dir.join("reference/cases.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ids = |x: &serde_json::Value| -> Vec<u32> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        };
        v["generate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let prompt = c["prompt"].as_str().unwrap().to_string();
                let input = match c["kind"].as_str().unwrap() {
                    "prompt" => Input::Prompt(prompt),
                    "chat" => Input::Chat {
                        user: prompt,
                        system: c["system"].as_str().map(str::to_string),
                    },
                    k => panic!("unknown case kind {k}"),
                };
                Case {
                    name: c["name"].as_str().unwrap().to_string(),
                    input,
                    prompt_ids: ids(&c["prompt_ids"]),
                    prompt_text: c
                        .get("prompt_text")
                        .and_then(|t| t.as_str())
                        .map(str::to_string),
                    max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
                    output_ids: ids(&c["output_ids"]),
                    text: c["text"].as_str().unwrap().to_string(),
                }
            })
            .collect()
    }

    #[test]
    fn prompts_chats_and_texts_match_transformers() {
        let mut kinds = std::collections::HashSet::new();
        for name in FIXTURES {
            let dir = fixture(name);
            let tok = Tokenizer::load(&dir).unwrap();
            for c in cases(&dir) {
                let p = encode_input(&rank::ModelDir::open(&dir).unwrap(), Some(&tok), &c.input)
                    .unwrap();
                assert_eq!(p.ids, c.prompt_ids, "{name}/{}: prompt ids", c.name);
                assert_eq!(p.text, c.prompt_text, "{name}/{}: rendered chat", c.name);
                assert_eq!(
                    tok.decode(&c.output_ids, true).unwrap(),
                    c.text,
                    "{name}/{}",
                    c.name
                );
                // Streaming the output ids gives the same text, piece by piece.
                let mut dec = StreamDecoder::new(&tok, true);
                let mut s = String::new();
                for &id in &c.output_ids {
                    s.push_str(&dec.push(id).unwrap());
                }
                s.push_str(&dec.finish().unwrap());
                assert_eq!(s, c.text, "{name}/{}: streamed text", c.name);
                kinds.insert(match &c.input {
                    Input::Chat {
                        system: Some(_), ..
                    } => "chat+system",
                    Input::Chat { .. } => "chat",
                    _ => "prompt",
                });
            }
        }
        assert_eq!(
            kinds.len(),
            3,
            "the references cover prompts, chats, chats with a system"
        );
    }

    #[test]
    fn multibyte_prompt_round_trips_through_the_fixture_tokenizer() {
        let tok = Tokenizer::load(&fixture("tiny-hub-bf16-tied")).unwrap();
        let text = "naïve café — 日本語 🦀";
        let ids = tok.encode(text, true).unwrap();
        let mut dec = StreamDecoder::new(&tok, true);
        let mut s = String::new();
        for &id in &ids {
            let piece = dec.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
            s.push_str(&piece);
        }
        s.push_str(&dec.finish().unwrap());
        assert_eq!(s, text);
    }

    fn load(dir: &Path, comm: &dyn Communicator) -> Result<(Qwen2, Config)> {
        let args = ModelArgs {
            model: Some(dir.to_path_buf()),
            revision: None,
            dtype: WeightDtype::Auto,
            bf16_dot: false,
        };
        let p = runtime::prepare(&args, comm)?;
        let (m, _) = runtime::load(&p, WeightDtype::Auto, "test")?;
        Ok((m, p.config))
    }

    /// Output ids of every reference case at TP `world`, in-process on threads.
    fn greedy_outputs(dir: &Path, world: usize) -> Vec<Vec<u32>> {
        let cs = cases(dir);
        let outs = run_world(world, |_, comm| {
            let (mut model, _config) = load(dir, comm)?;
            let eos = rank::ModelDir::open(dir)?.eos_ids()?;
            let mut all = Vec::new();
            for c in &cs {
                let settings = Settings {
                    max_new_tokens: c.max_new_tokens,
                    eos: eos.clone(),
                    ignore_eos: false,
                };
                let mut sampler = Sampler::greedy();
                let d = generate(
                    &mut model,
                    comm,
                    &c.prompt_ids,
                    &settings,
                    &mut sampler,
                    &mut |_| Ok(()),
                )?;
                all.push(d.output_ids);
            }
            Ok(all)
        });
        let mut outs: Vec<Vec<Vec<u32>>> = outs.into_iter().map(|o| o.unwrap()).collect();
        let first = outs.remove(0);
        for o in outs {
            assert_eq!(o, first, "every rank saw the same tokens");
        }
        first
    }

    #[test]
    fn greedy_matches_transformers_at_tp_1_2_3() {
        for name in FIXTURES {
            let dir = fixture(name);
            let cs = cases(&dir);
            for world in [1, 2, 3] {
                let outs = greedy_outputs(&dir, world);
                for (c, out) in cs.iter().zip(&outs) {
                    assert_eq!(out, &c.output_ids, "{name}/{} at TP {world}", c.name);
                }
            }
        }
    }

    fn sampled(dir: &Path, world: usize, seed: u64) -> Vec<u32> {
        let outs = run_world(world, |_, comm| {
            let (mut model, _) = load(dir, comm)?;
            let settings = Settings {
                max_new_tokens: 24,
                eos: vec![],
                ignore_eos: true,
            };
            let strategy = Strategy::Sample {
                temperature: 1.0,
                top_k: Some(50),
                top_p: 0.95,
            };
            let mut sampler = Sampler::new(strategy, seed);
            let prompt = [10, 20, 30, 40];
            Ok(generate(
                &mut model,
                comm,
                &prompt,
                &settings,
                &mut sampler,
                &mut |_| Ok(()),
            )?
            .output_ids)
        });
        let outs: Vec<Vec<u32>> = outs.into_iter().map(|o| o.unwrap()).collect();
        for o in &outs[1..] {
            assert_eq!(o, &outs[0]);
        }
        outs[0].clone()
    }

    #[test]
    fn same_seed_same_tokens_at_tp_1_and_2() {
        let dir = fixture("tiny-hub-bf16-tied");
        let a = sampled(&dir, 1, 1234);
        assert_eq!(a.len(), 24);
        assert_eq!(a, sampled(&dir, 2, 1234));
        assert_eq!(a, sampled(&dir, 1, 1234));
        assert_ne!(a, sampled(&dir, 1, 1235));
    }

    #[test]
    fn generation_stops_at_the_context_limit() {
        // tiny-t5-f32-untied has max_position_embeddings 128.
        let dir = fixture("tiny-t5-f32-untied");
        let outs = run_world(1, |_, comm| {
            let (mut model, config) = load(&dir, comm)?;
            assert_eq!(config.max_position_embeddings, 128);
            let settings = Settings {
                max_new_tokens: 1000,
                eos: vec![],
                ignore_eos: true,
            };
            let prompt: Vec<u32> = (0..100).map(|i| (i * 7 % 300) as u32).collect();
            let d = generate(
                &mut model,
                comm,
                &prompt,
                &settings,
                &mut Sampler::greedy(),
                &mut |_| Ok(()),
            )?;
            let full: Vec<u32> = (0..128).map(|i| (i % 300) as u32).collect();
            let err = generate(
                &mut model,
                comm,
                &full,
                &settings,
                &mut Sampler::greedy(),
                &mut |_| Ok(()),
            )
            .unwrap_err()
            .to_string();
            Ok((d, err))
        });
        let (d, err) = outs.into_iter().next().unwrap().unwrap();
        assert_eq!(d.stop, Stop::Context);
        assert_eq!(d.output_ids.len(), 28);
        assert!(err.contains("no room to generate"), "{err}");
    }

    #[test]
    fn eos_ids_prefer_generation_config() {
        let dir = fixture("tiny-hub-bf16-tied");
        let config = Config::from_dir(&dir).unwrap();
        assert_eq!(config.eos_token_ids, vec![389]);
        assert_eq!(
            rank::ModelDir::open(&dir).unwrap().eos_ids().unwrap(),
            vec![389, 387]
        );
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            a: Args,
        }
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("generate").chain(argv.iter().copied())).map(|c| c.a)
    }

    #[test]
    fn command_line_rules() {
        let a = parse(&["--prompt", "x"]).unwrap();
        assert_eq!(strategy(&a), Strategy::Greedy);
        assert_eq!(a.max_new_tokens, 128);
        let a = parse(&["--prompt", "x", "--temperature", "0.7"]).unwrap();
        assert!(matches!(strategy(&a), Strategy::Sample { top_k: None, .. }));
        let a = parse(&["--prompt", "x", "--temperature", "0", "--top-k", "5"]).unwrap();
        assert_eq!(strategy(&a), Strategy::Greedy);
        let a = parse(&["--prompt", "x", "--top-p", "0.9"]).unwrap();
        assert_eq!(
            strategy(&a),
            Strategy::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: 0.9
            }
        );
        let a = parse(&["--input-ids", "1,2,3"]).unwrap();
        assert_eq!(Input::from_args(&a).unwrap(), Input::Ids(vec![1, 2, 3]));
        let a = parse(&["--chat", "hi", "--system", "s"]).unwrap();
        assert_eq!(
            Input::from_args(&a).unwrap(),
            Input::Chat {
                user: "hi".into(),
                system: Some("s".into())
            }
        );

        for bad in [
            &["--prompt", "x", "--top-p", "0"][..],
            &["--prompt", "x", "--top-p", "1.5"],
            &["--prompt", "x", "--top-p", "nan"],
            &["--prompt", "x", "--temperature", "-1"],
            &["--prompt", "x", "--temperature", "inf"],
            &["--prompt", "x", "--top-k", "0"],
            &["--prompt", "x", "--max-new-tokens", "0"],
            &["--prompt", "x", "--greedy", "--temperature", "1"],
            &["--prompt", "x", "--chat", "y"],
            &["--input-ids", "1,x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        // No input: an interactive chat on a relayed terminal, else an error saying what to give
        // (this test process is not started by tprun: no TPRUN_STDIN_TERMINAL).
        let err = Input::from_args(&parse(&[]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("give one of --prompt, --chat, --messages"),
            "{err}"
        );
        let a = parse(&["--prompt", "x", "--system", "y"]).unwrap();
        let err = Input::from_args(&a).unwrap_err().to_string();
        assert!(err.contains("--system goes with --chat"), "{err}");
        let err = parse(&["--prompt", "x", "--top-p", "1.5"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--top-p") && err.contains("(0, 1]"), "{err}");
    }

    #[test]
    fn empty_inputs_are_clear_errors() {
        let dir = fixture("tiny-hub-bf16-tied");
        let tok = Tokenizer::load(&dir).unwrap();
        for (input, want) in [
            (Input::Prompt(String::new()), "--prompt is empty"),
            (
                Input::Chat {
                    user: String::new(),
                    system: None,
                },
                "--chat is empty",
            ),
            (Input::Ids(vec![]), "--input-ids is empty"),
        ] {
            let m = rank::ModelDir::open(&dir).unwrap();
            let err = encode_input(&m, Some(&tok), &input)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    /// Each kind of mistake in a --messages file is named with its entry.
    #[test]
    fn bad_messages_name_the_entry() {
        for (text, want) in [
            (r#"{"role": "user"}"#, "expected a JSON list"),
            ("[]", "the list is empty"),
            (
                r#"[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]"#,
                "entry 1: role \"bot\" is not one of system, user, assistant",
            ),
            (r#"[{"role": "user"}]"#, "entry 0: no \"content\" string"),
            (r#"[{"content": "x"}]"#, "entry 0: no \"role\" string"),
            ("[", "not valid JSON"),
        ] {
            let e = format!("{:#}", parse_messages(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
        let ok = parse_messages(
            r#"[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![Message::new("system", "s"), Message::new("user", "u")]
        );
    }

    /// The bundled model reads exactly as its fixture directory does.
    #[test]
    fn the_bundled_model_is_the_fixture() {
        let b = rank::ModelDir::bundled();
        let d = rank::ModelDir::open(&fixture("tiny-hub-bf16-tied")).unwrap();
        assert_eq!(format!("{:?}", b.config()), format!("{:?}", d.config()));
        assert_eq!(b.eos_ids().unwrap(), d.eos_ids().unwrap());
        let chat = Input::Chat {
            user: "hi".into(),
            system: None,
        };
        let (tb, td) = (b.tokenizer().unwrap(), d.tokenizer().unwrap());
        assert_eq!(
            encode_input(&b, Some(&tb), &chat).unwrap().ids,
            encode_input(&d, Some(&td), &chat).unwrap().ids
        );
        assert_eq!(
            b.weights().unwrap().total_bytes(),
            d.weights().unwrap().total_bytes()
        );
    }
}
