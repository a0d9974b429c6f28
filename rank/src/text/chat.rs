//! The checkpoint's chat template, rendered with minijinja the way transformers renders it.
//!
//! transformers (`chat_template_utils._compile_jinja_template` and `apply_chat_template`) renders
//! in an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
//! `loopcontrols` extension, its own `tojson` filter (`json.dumps` with `ensure_ascii=False`, so
//! no HTML escaping, and `indent`/`separators`/`sort_keys` options), the globals
//! `raise_exception(msg)` and `strftime_now(fmt)`, and the variables `messages`, `tools=None`,
//! `documents=None`, `add_generation_prompt` plus the tokenizer's special-token map (`bos_token`,
//! `eos_token`, ...). This module sets up the same: the pycompat method callback supplies the
//! Python string/dict methods templates call (`.strip()`, `.split()`, `.items()`, ...).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use crate::checkpoint::read_optional_text;

/// Template instructions one render may execute: thousands for any real chat, so a template
/// with runaway nested loops stops in well under a second instead of running for hours.
pub const RENDER_FUEL: u64 = 5_000_000;

/// One chat turn.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The messages for `--chat TEXT [--system TEXT]`: an optional system turn, then the user turn.
/// Without a system turn the template's own default system prompt (if any) applies.
pub fn messages(user: &str, system: Option<&str>) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(Message::new("system", s));
    }
    m.push(Message::new("user", user));
    m
}

/// The special tokens transformers puts in the template's scope (`special_tokens_map`).
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the variables it gets besides the messages.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    origin: String,
    /// `bos_token`, `eos_token`, ... as strings (absent when null in tokenizer_config.json).
    special: Vec<(String, Value)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// The template of a checkpoint directory: `DIR/chat_template.jinja` when present (it wins,
    /// as in transformers 5), else `chat_template` of `DIR/tokenizer_config.json` (a string, or a
    /// list of `{name, template}` of which "default" is used).
    pub fn load(model_dir: &Path) -> Result<ChatTemplate> {
        ChatTemplate::load_with(model_dir, &read_optional_text)
    }

    /// [`ChatTemplate::load`] with the files read by `read` (`None` = absent), so that the
    /// bundled model's in-memory files go through the same rules.
    pub fn load_with(
        model_dir: &Path,
        read: &dyn Fn(&Path) -> Result<Option<String>>,
    ) -> Result<ChatTemplate> {
        let config_path = model_dir.join("tokenizer_config.json");
        let config: serde_json::Value = match read(&config_path)? {
            Some(text) => serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?,
            None => serde_json::Value::Null,
        };
        let jinja_path = model_dir.join("chat_template.jinja");
        let (source, origin) = if let Some(text) = read(&jinja_path)? {
            (text, jinja_path)
        } else {
            (template_from_config(&config, &config_path)?, config_path)
        };
        ChatTemplate::new(source, &origin, &config)
    }

    /// Compiles `source`; `tokenizer_config` supplies the special tokens (may be `Null`).
    pub fn new(
        source: String,
        origin: &Path,
        tokenizer_config: &serde_json::Value,
    ) -> Result<ChatTemplate> {
        let origin = origin.display().to_string();
        let mut env = Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| anyhow::anyhow!("compiling the chat template from {origin}: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            origin,
            special: special_tokens(tokenizer_config),
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The prompt text for `messages`, ending with the assistant header when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut vars: Vec<(String, Value)> = self.special.clone();
        vars.push(("messages".into(), Value::from_serialize(messages)));
        vars.push(("tools".into(), Value::from(())));
        vars.push(("documents".into(), Value::from(())));
        vars.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx = Value::from_iter(vars);
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow::anyhow!("chat template from {}: {e}", self.origin))?;
        tmpl.render(ctx).map_err(|e| {
            if e.kind() == ErrorKind::OutOfFuel {
                return anyhow::anyhow!(
                    "rendering the chat template from {}: stopped after {RENDER_FUEL} template \
                     steps (a runaway loop?)",
                    self.origin
                );
            }
            anyhow::anyhow!(
                "rendering the chat template from {}: {}",
                self.origin,
                describe(&e)
            )
        })
    }
}

/// One line for a render error: the template's own message for `raise_exception`, the kind and
/// line for anything else.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

fn template_from_config(config: &serde_json::Value, config_path: &Path) -> Result<String> {
    let dir = config_path.parent().unwrap_or(Path::new("."));
    match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(|n| n.as_str()).unwrap_or("");
                if name == "default" {
                    return match item.get("template").and_then(|t| t.as_str()) {
                        Some(t) => Ok(t.to_string()),
                        None => bail!(
                            "{}: chat_template \"default\" has no template string",
                            config_path.display()
                        ),
                    };
                }
                names.push(name.to_string());
            }
            bail!(
                "{}: chat_template lists no \"default\" template (has: {})",
                config_path.display(),
                names.join(", ")
            )
        }
        Some(other) => bail!(
            "{}: chat_template must be a string or a list of {{name, template}}, not {other}",
            config_path.display()
        ),
        None => bail!(
            "no chat template: {} has no chat_template.jinja and {} has no \"chat_template\" \
             (use --prompt for plain text)",
            PathBuf::from(dir).display(),
            config_path.display()
        ),
    }
}

/// A token in tokenizer_config.json is a string or an AddedToken object `{content, ...}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn special_tokens(config: &serde_json::Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(t) = config.get(key).and_then(token_text) {
            out.push((key.to_string(), Value::from(t)));
        }
    }
    if let Some(list) = config
        .get("additional_special_tokens")
        .and_then(|v| v.as_array())
    {
        let toks: Vec<Value> = list
            .iter()
            .filter_map(token_text)
            .map(Value::from)
            .collect();
        if !toks.is_empty() {
            out.push(("additional_special_tokens".into(), Value::from(toks)));
        }
    }
    out
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Python's `datetime.now().strftime(fmt)`: the C library's strftime on local time, which is
/// what CPython calls.
fn strftime_now(format: String) -> Result<String, Error> {
    let bad = |m: &str| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {m}"));
    let fmt = std::ffi::CString::new(format).map_err(|_| bad("format contains a NUL byte"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad("the clock is before 1970"))?
        .as_secs() as libc::time_t;
    // SAFETY: `libc::tm` is plain old data, all-zero is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call; localtime_r is reentrant.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return Err(bad("localtime_r failed"));
    }
    let mut buf = vec![0u8; 256 + 16 * fmt.as_bytes().len()];
    // SAFETY: `buf` is writable for `buf.len()` bytes, `fmt` is NUL-terminated and `tm` was
    // filled by localtime_r; strftime writes at most `buf.len()` bytes and returns the count.
    let n = unsafe {
        libc::strftime(
            buf.as_mut_ptr().cast::<libc::c_char>(),
            buf.len(),
            fmt.as_ptr(),
            &tm,
        )
    };
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, i.e. Python's spacing (`", "` and `": "`) and no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii: bool = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let indent: Option<String> = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => match v.as_i64() {
                Some(n) => Some(" ".repeat(n.max(0) as usize)),
                None => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or a string",
                    ))
                }
            },
        },
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) if !v.is_none() => {
            let items: Vec<Value> = v.try_iter()?.collect();
            match (
                items.first().and_then(|x| x.as_str()),
                items.get(1).and_then(|x| x.as_str()),
            ) {
                (Some(a), Some(b)) if items.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ => {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_string(), ": ".to_string())
        }
    };
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        ensure_ascii,
        sort_keys,
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(out)
}

struct JsonOpts {
    ensure_ascii: bool,
    sort_keys: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

fn newline(out: &mut String, opts: &JsonOpts, depth: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

fn write_json(out: &mut String, v: &Value, opts: &JsonOpts, depth: usize) -> Result<(), Error> {
    let unsupported = |what: &str| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: a {what} is not JSON serializable"),
        )
    };
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or(""), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                write_json(out, item, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let val = v.get_item(&key)?;
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or("").to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.into(),
                    _ => key.to_string(),
                };
                pairs.push((k, val));
            }
            if opts.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, val)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, depth + 1);
                write_json_str(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, val, opts, depth + 1)?;
            }
            newline(out, opts, depth);
            out.push('}');
        }
        ValueKind::Undefined => return Err(unsupported("undefined value")),
        ValueKind::Bytes => return Err(unsupported("bytes value")),
        _ => return Err(unsupported(&format!("{} value", v.kind()))),
    }
    Ok(())
}

/// A JSON string the way Python's json module writes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, scientific when the exponent is below -4
/// or at least 16, `NaN`/`Infinity` as json.dumps writes them.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}"); // e.g. "1.5e16", "-2e-5"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str, config: serde_json::Value) -> ChatTemplate {
        ChatTemplate::new(src.to_string(), Path::new("test.jinja"), &config).unwrap()
    }

    /// The Qwen2.5-Instruct chat template (from its tokenizer_config.json): tools
    /// branch, tojson, `message.role` and `message['role']`, a default system prompt.
    pub(crate) const QWEN25_TEMPLATE: &str = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn qwen25_template_default_and_custom_system() {
        let t = tmpl(
            QWEN25_TEMPLATE,
            serde_json::json!({"eos_token": "<|im_end|>"}),
        );
        let out = t.render(&messages("Hi there", None), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
             assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&messages("Hi", Some("Be brief.")), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let out = t.render(&messages("Hi", Some("S")), false).unwrap();
        assert!(out.ends_with("<|im_start|>user\nHi<|im_end|>\n"), "{out}");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        // With trim_blocks the newline after a block tag goes; with lstrip_blocks the indentation
        // before it goes. Without them this template would render "\n  A\n  \n".
        let t = tmpl(
            "{% if true %}\n  {% if true %}\nA\n  {% endif %}\n{% endif %}\nB",
            serde_json::Value::Null,
        );
        assert_eq!(t.render(&[], true).unwrap(), "A\nB");
        // Like jinja2 (keep_trailing_newline=False) a single trailing newline is dropped.
        let t = tmpl("x\n", serde_json::Value::Null);
        assert_eq!(t.render(&[], true).unwrap(), "x");
    }

    #[test]
    fn special_tokens_and_python_methods() {
        let config = serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
        });
        let t = tmpl(
            "{{ bos_token }}{% for m in messages %}[{{ m['role'].upper() }}]{{ m.content.strip() }}\
             {% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}{{ pad_token }}|\
             {{ tools is none }}|{{ 'a,b'.split(',')|length }}\
             {% for x in [1,2,3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}",
            config,
        );
        let out = t.render(&messages("  hi  ", Some("sys")), true).unwrap();
        assert_eq!(out, "<s>[SYSTEM]sys[USER]hi</s>|True|21");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = tmpl(
            "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ y|tojson(separators=(',', ':')) }}|\
             {{ {'b': 1, 'a': 2}|tojson(sort_keys=true) }}|{{ 'é\"<>&'|tojson(ensure_ascii=true) }}",
            serde_json::Value::Null,
        );
        let env_vars = Value::from_iter([
            (
                "x",
                Value::from_iter([
                    ("name", Value::from("<b>&'x'</b>")),
                    ("n", Value::from(3)),
                    ("f", Value::from(0.5)),
                    ("l", Value::from(vec![Value::from(true), Value::from(())])),
                    ("e", Value::from(1e20)),
                ]),
            ),
            ("y", Value::from(vec![1, 2])),
        ]);
        let out = t
            .env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(env_vars)
            .unwrap();
        assert_eq!(
            out,
            "{\"name\": \"<b>&'x'</b>\", \"n\": 3, \"f\": 0.5, \"l\": [true, null], \"e\": 1e+20}|\
             {\n  \"name\": \"<b>&'x'</b>\",\n  \"n\": 3,\n  \"f\": 0.5,\n  \"l\": [\n    true,\n    \
             null\n  ],\n  \"e\": 1e+20\n}|[1,2]|{\"a\": 2, \"b\": 1}|\"\\u00e9\\\"<>&\""
        );
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(1.5e16), "1.5e+16");
        assert_eq!(python_float_repr(-2.25), "-2.25");
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let t = tmpl(
            "{% if messages[0].role != 'system' %}{{ raise_exception('System role required') }}{% endif %}",
            serde_json::Value::Null,
        );
        let err = t
            .render(&messages("hi", None), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("System role required"), "{err}");
        assert!(err.contains("test.jinja"), "{err}");
        assert!(t.render(&messages("hi", Some("s")), true).is_ok());
    }

    #[test]
    fn a_broken_template_fails_to_compile_with_its_origin() {
        let err = ChatTemplate::new(
            "{% for %}".into(),
            Path::new("x/chat_template.jinja"),
            &serde_json::Value::Null,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x/chat_template.jinja"), "{err}");
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tprun-chat-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn load_prefers_the_jinja_file_and_handles_named_lists() {
        let d = temp_dir("load");
        let cfg = serde_json::json!({
            "eos_token": "E",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "DEFAULT{{ eos_token }}"}
            ]
        });
        std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::load(&d).unwrap();
        assert_eq!(t.render(&[], true).unwrap(), "DEFAULTE");
        std::fs::write(d.join("chat_template.jinja"), "FILE{{ eos_token }}\n").unwrap();
        let t = ChatTemplate::load(&d).unwrap();
        assert_eq!(t.render(&[], true).unwrap(), "FILEE");
        assert!(t.origin().ends_with("chat_template.jinja"));

        std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
        std::fs::write(
            d.join("tokenizer_config.json"),
            serde_json::json!({"chat_template": [{"name": "x", "template": "X"}]}).to_string(),
        )
        .unwrap();
        let err = ChatTemplate::load(&d).unwrap_err().to_string();
        assert!(err.contains("no \"default\""), "{err}");
        std::fs::write(d.join("tokenizer_config.json"), "{}").unwrap();
        let err = ChatTemplate::load(&d).unwrap_err().to_string();
        assert!(err.contains("no chat template"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn strftime_now_formats_the_date() {
        let t = tmpl("{{ strftime_now('%Y') }}", serde_json::Value::Null);
        let year: i32 = t.render(&[], true).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }

    /// Without fuel this renders 10^8 loop bodies (minutes, 100 MB of output).
    #[test]
    fn a_runaway_template_stops_with_a_clear_error() {
        let src = "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}";
        let t = tmpl(src, serde_json::Value::Null);
        let start = std::time::Instant::now();
        let e = format!("{:#}", t.render(&messages("hi", None), true).err().unwrap());
        assert!(e.contains("template steps (a runaway loop?)"), "{e}");
        assert!(start.elapsed().as_secs() < 20);
    }
}
