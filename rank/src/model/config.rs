//! Qwen2 `config.json`, in both forms found in the wild: the hub's (top-level `rope_theta`,
//! `torch_dtype`, optional `rope_scaling`) and transformers 5's (`rope_parameters {rope_type,
//! rope_theta}`, `dtype`). Everything the runtime relies on is validated here, with errors that
//! name the field.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// A validated Qwen2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// The checkpoint's declared dtype (`torch_dtype` or `dtype`), informational only: the loader
    /// goes by each tensor's dtype in the safetensors header.
    pub dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (`eos_token_id` may be an int or a list).
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Config> {
        let path = dir.join("config.json");
        let text = crate::checkpoint::read_text(&path)?;
        Config::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Config> {
        let v: Value = serde_json::from_str(text).context("not valid JSON")?;
        let Value::Object(m) = v else {
            bail!("expected a JSON object at the top level");
        };
        from_map(&m)
    }

    /// The one check of token ids against the model, before anything heavy happens (programs)
    /// and in every forward: `ids` non-empty, inside the vocabulary, and positions
    /// `start_pos..start_pos + ids.len()` inside the context.
    pub fn check_ids(&self, ids: &[u32], start_pos: usize) -> Result<()> {
        if ids.is_empty() {
            bail!("no input tokens: give at least one token");
        }
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.vocab_size)
        {
            bail!(
                "token id {id} (position {i}) is outside the vocabulary (vocab_size {})",
                self.vocab_size
            );
        }
        if start_pos + ids.len() > self.max_position_embeddings {
            bail!(
                "sequence of {} tokens is longer than the model's context (max_position_embeddings {})",
                start_pos + ids.len(),
                self.max_position_embeddings
            );
        }
        Ok(())
    }

    /// The model's shapes, as the sharding plan needs them.
    pub fn shapes(&self) -> crate::model::plan::Shapes {
        crate::model::plan::Shapes {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            intermediate: self.intermediate_size,
            vocab: self.vocab_size,
        }
    }
}

fn from_map(m: &Map<String, Value>) -> Result<Config> {
    check_supported(m)?;
    let hidden_size = positive(m, "hidden_size")?;
    let num_attention_heads = positive(m, "num_attention_heads")?;
    let num_key_value_heads = kv_heads(m, num_attention_heads)?;
    let head_dim = head_dim(m, hidden_size, num_attention_heads)?;
    let rms_norm_eps = match opt_f64(m, "rms_norm_eps")? {
        Some(e) if e.is_finite() && e >= 0.0 => e,
        Some(e) => bail!("rms_norm_eps must be a non-negative number, got {e}"),
        None => 1e-6,
    };
    let dtype = match opt_str(m, "dtype")? {
        Some(d) => Some(d.to_string()),
        None => opt_str(m, "torch_dtype")?.map(str::to_string),
    };
    Ok(Config {
        hidden_size,
        intermediate_size: positive(m, "intermediate_size")?,
        num_hidden_layers: positive(m, "num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size: positive(m, "vocab_size")?,
        max_position_embeddings: positive(m, "max_position_embeddings")?,
        rms_norm_eps,
        rope_theta: rope_theta(m)?,
        tie_word_embeddings: opt_bool(m, "tie_word_embeddings")?.unwrap_or(false),
        dtype,
        bos_token_id: opt_u32(m, "bos_token_id")?,
        eos_token_ids: eos_token_ids(m)?.unwrap_or_default(),
    })
}

/// Refuses architectures this runtime does not implement, rather than running them wrongly.
fn check_supported(m: &Map<String, Value>) -> Result<()> {
    if let Some(t) = opt_str(m, "model_type")? {
        if t != "qwen2" {
            bail!("model_type {t:?} is not supported (only \"qwen2\")");
        }
    }
    if let Some(act) = opt_str(m, "hidden_act")? {
        if act != "silu" {
            bail!("hidden_act {act:?} is not supported (only \"silu\")");
        }
    }
    if opt_bool(m, "use_sliding_window")? == Some(true) {
        bail!("use_sliding_window is true: sliding-window attention is not supported");
    }
    if let Some(types) = m.get("layer_types").filter(|v| !v.is_null()) {
        let Value::Array(types) = types else {
            bail!("layer_types: expected a list of strings");
        };
        if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            bail!("layer_types contains {t}: only \"full_attention\" layers are supported");
        }
    }
    Ok(())
}

/// `num_key_value_heads` (default: one per attention head), which must divide the heads.
fn kv_heads(m: &Map<String, Value>, num_attention_heads: usize) -> Result<usize> {
    let k = match opt_usize(m, "num_key_value_heads")? {
        Some(0) => bail!("num_key_value_heads must be positive, got 0"),
        Some(k) => k,
        None => num_attention_heads,
    };
    if !num_attention_heads.is_multiple_of(k) {
        bail!(
            "num_attention_heads ({num_attention_heads}) is not divisible by num_key_value_heads ({k})"
        );
    }
    Ok(k)
}

/// `head_dim`, else hidden_size / heads; even, for rotary embeddings.
fn head_dim(m: &Map<String, Value>, hidden_size: usize, heads: usize) -> Result<usize> {
    let head_dim = match opt_usize(m, "head_dim")? {
        Some(0) => bail!("head_dim must be positive, got 0"),
        Some(d) => d,
        None => {
            if !hidden_size.is_multiple_of(heads) {
                bail!(
                    "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({heads}) and head_dim is not given"
                );
            }
            hidden_size / heads
        }
    };
    if head_dim % 2 != 0 {
        bail!("head_dim ({head_dim}) must be even for rotary embeddings");
    }
    Ok(head_dim)
}

/// `rope_theta` from the top level (hub form) or `rope_parameters` (transformers 5); only the
/// default RoPE type is supported, so any scaling is an error rather than a silent mismatch.
fn rope_theta(m: &Map<String, Value>) -> Result<f64> {
    let check_type = |field: &str, obj: &Map<String, Value>| -> Result<()> {
        let t = match (opt_str(obj, "rope_type")?, opt_str(obj, "type")?) {
            (Some(t), _) | (None, Some(t)) => t,
            (None, None) => "default",
        };
        if t != "default" {
            bail!("{field}: rope_type {t:?} is not supported (only \"default\")");
        }
        Ok(())
    };
    match m.get("rope_scaling") {
        None | Some(Value::Null) => {}
        Some(Value::Object(s)) => check_type("rope_scaling", s)?,
        Some(other) => bail!("rope_scaling: expected an object or null, got {other}"),
    }
    let mut theta = opt_f64(m, "rope_theta")?;
    match m.get("rope_parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(p)) => {
            check_type("rope_parameters", p)?;
            if let Some(t) = opt_f64(p, "rope_theta").context("rope_parameters")? {
                theta = Some(t);
            }
        }
        Some(other) => bail!("rope_parameters: expected an object, got {other}"),
    }
    // transformers' Qwen2Config default.
    let theta = theta.unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        bail!("rope_theta must be a positive number, got {theta}");
    }
    Ok(theta)
}

fn positive(m: &Map<String, Value>, field: &str) -> Result<usize> {
    match opt_usize(m, field)? {
        None => bail!("missing field {field}"),
        Some(0) => bail!("{field} must be positive, got 0"),
        Some(v) => Ok(v),
    }
}

fn opt_usize(m: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(u) => Ok(Some(usize::try_from(u)?)),
            None => bail!("{field}: expected a non-negative integer, got {v}"),
        },
    }
}

fn opt_u32(m: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(token_id(v).context(field.to_string())?)),
    }
}

/// `eos_token_id` of config.json or generation_config.json: an int or a list (`None` when
/// absent or null). The one parser of it.
pub(crate) fn eos_token_ids(m: &Map<String, Value>) -> Result<Option<Vec<u32>>> {
    Ok(Some(match m.get("eos_token_id") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| token_id(v).context("eos_token_id: expected a list of token ids"))
            .collect::<Result<_>>()?,
        Some(v) => {
            vec![token_id(v).context("eos_token_id: expected a token id or a list of them")?]
        }
    }))
}

fn token_id(v: &Value) -> Result<u32> {
    match v.as_u64().and_then(|u| u32::try_from(u).ok()) {
        Some(u) => Ok(u),
        None => bail!("expected a token id, got {v}"),
    }
}

fn opt_f64(m: &Map<String, Value>, field: &str) -> Result<Option<f64>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(f) => Ok(Some(f)),
            None => bail!("{field}: expected a number, got {v}"),
        },
    }
}

fn opt_bool(m: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => bail!("{field}: expected true or false, got {v}"),
    }
}

fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => bail!("{field}: expected a string, got {v}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-0.5B-Instruct's config.json as on the hub.
    pub const HUB: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
      "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
      "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
      "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
      "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1", "use_cache": true, "use_sliding_window": false,
      "vocab_size": 151936}"#;

    fn edit(base: &str, f: impl FnOnce(&mut Map<String, Value>)) -> String {
        let mut v: Value = serde_json::from_str(base).unwrap();
        f(v.as_object_mut().unwrap());
        v.to_string()
    }

    fn err(text: &str) -> String {
        format!("{:#}", Config::from_json(text).unwrap_err())
    }

    #[test]
    fn hub_form() {
        let c = Config::from_json(HUB).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.rope_theta, 1e6);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn transformers5_form() {
        let t = edit(HUB, |m| {
            m.remove("rope_theta");
            m.remove("torch_dtype");
            m.insert("dtype".into(), "float32".into());
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "default", "rope_theta": 5000.0}),
            );
            m.insert("eos_token_id".into(), serde_json::json!([151645, 151643]));
            m.insert("head_dim".into(), 32.into());
            m.insert(
                "layer_types".into(),
                serde_json::json!(["full_attention", "full_attention"]),
            );
        });
        let c = Config::from_json(&t).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(&edit(HUB, |m| {
            m.remove("hidden_size");
        }));
        assert!(e.contains("missing field hidden_size"), "{e}");
        let e = err(&edit(HUB, |m| {
            m.insert("num_key_value_heads".into(), 3.into());
        }));
        assert!(
            e.contains("num_attention_heads (14) is not divisible by num_key_value_heads (3)"),
            "{e}"
        );
        let e = err(&edit(HUB, |m| {
            m.insert("num_attention_heads".into(), 6.into());
            m.insert("num_key_value_heads".into(), 2.into());
            m.insert("hidden_size".into(), 100.into());
        }));
        assert!(
            e.contains("hidden_size (100) is not divisible by num_attention_heads (6)"),
            "{e}"
        );
        let e = err(&edit(HUB, |m| {
            m.insert("vocab_size".into(), 0.into());
        }));
        assert!(e.contains("vocab_size must be positive"), "{e}");
        let e = err(&edit(HUB, |m| {
            m.insert("use_sliding_window".into(), true.into());
        }));
        assert!(
            e.contains("use_sliding_window") && e.contains("not supported"),
            "{e}"
        );
        let e = err(&edit(HUB, |m| {
            m.insert(
                "rope_scaling".into(),
                serde_json::json!({"type": "yarn", "factor": 4.0}),
            );
        }));
        assert!(
            e.contains("rope_scaling: rope_type \"yarn\" is not supported"),
            "{e}"
        );
        let e = err(&edit(HUB, |m| {
            m.insert(
                "rope_parameters".into(),
                serde_json::json!({"rope_type": "linear", "rope_theta": 1.0}),
            );
        }));
        assert!(e.contains("rope_parameters: rope_type \"linear\""), "{e}");
        let e = err(&edit(HUB, |m| {
            m.insert("hidden_size".into(), "big".into());
        }));
        assert!(
            e.contains("hidden_size: expected a non-negative integer"),
            "{e}"
        );
        let e = err(&edit(HUB, |m| {
            m.insert("model_type".into(), "llama".into());
        }));
        assert!(e.contains("model_type \"llama\""), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = format!(
            "{:#}",
            Config::from_dir(Path::new("/nonexistent/model")).unwrap_err()
        );
        assert!(e.contains("/nonexistent/model/config.json"), "{e}");
    }
}
