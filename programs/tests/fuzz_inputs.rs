//! Property-based fuzzing of what tprun reads from a checkpoint directory before anything else:
//! config.json (then the sharding plan of whatever config passes) and safetensors headers (the
//! loader's check and `tprun compare`). Arbitrary and mutated bytes and JSON must give `Err`,
//! never a panic, and whatever passes must be consistent (byte ranges inside the file, sizes
//! matching shapes, shard ranges inside the dimensions). `PROPTEST_CASES=N` runs more cases.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use rank::model::config::Config;
use rank::model::loader::parse_header;
use rank::model::plan::ShardPlan;
use serde_json::{Map, Value};

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(path),
    )
    .unwrap()
}

/// A real checkpoint file (bf16, tied) to mutate.
fn st_file() -> &'static [u8] {
    static F: OnceLock<Vec<u8>> = OnceLock::new();
    F.get_or_init(|| fixture("tiny-hub-bf16-tied/model.safetensors"))
}

fn config_map() -> &'static Map<String, Value> {
    static C: OnceLock<Map<String, Value>> = OnceLock::new();
    C.get_or_init(|| {
        let v: Value = serde_json::from_slice(&fixture("tiny-hub-bf16-tied/config.json")).unwrap();
        v.as_object().unwrap().clone()
    })
}

/// JSON values, biased towards the small numbers and short strings that configs and headers hold.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[A-Za-z0-9_]{0,8}".prop_map(Value::from),
        prop_oneof![
            Just("F32"),
            Just("BF16"),
            Just("F16"),
            Just("I64"),
            Just("F8_E4M3")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const CONFIG_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "eos_token_id",
    "bos_token_id",
    "model_type",
    "hidden_act",
    "use_sliding_window",
    "layer_types",
    "dtype",
    "torch_dtype",
];

/// One edit of a JSON object: set a known or random key to a value, or remove it.
fn arb_edit(keys: &'static [&'static str]) -> impl Strategy<Value = (String, Option<Value>)> {
    let key = prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_string),
        1 => "[a-z_]{1,12}",
    ];
    (key, prop::option::weighted(0.85, arb_json()))
}

/// A safetensors file from a header value and `data_len` data bytes.
fn with_header(header: &Value, data_len: usize) -> Vec<u8> {
    let h = header.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.resize(out.len() + data_len, 0);
    out
}

/// What every accepted header must satisfy.
fn check_accepted(buf: &[u8]) {
    if let Ok(tensors) = parse_header(buf) {
        for (name, t) in &tensors {
            assert!(
                t.bytes.start <= t.bytes.end && t.bytes.end <= buf.len(),
                "{name}: {t:?}"
            );
            let numel: usize = t.shape.iter().product();
            assert_eq!(t.bytes.len(), numel * t.dtype.size(), "{name}: {t:?}");
        }
    }
}

/// Both the loader's check and `tprun compare`'s reading, on the same bytes.
fn read_both_ways(buf: &[u8]) {
    check_accepted(buf);
    let good = st_file();
    let _ = programs::compare::compare_files(Path::new("a"), good, Path::new("b"), buf);
    let _ = programs::compare::compare_files(Path::new("b"), buf, Path::new("b"), buf);
}

/// A config that passes must give a valid sharding plan, or a clean error, for every TP degree.
fn plans_for(c: &Config) {
    let s = c.shapes();
    for world in 1..=6 {
        for r in 0..world {
            if let Ok(p) = ShardPlan::new(&s, world, r) {
                assert!(p.q_heads.end <= s.heads, "{p:?}");
                assert!(p.intermediate.end <= s.intermediate, "{p:?}");
                assert!(p.vocab.end <= s.vocab, "{p:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_as_a_safetensors_file(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        read_both_ways(&bytes);
    }

    #[test]
    fn a_length_prefix_and_arbitrary_header_text(len in any::<u64>(), text in ".{0,200}") {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(text.as_bytes());
        read_both_ways(&b);
    }

    #[test]
    fn a_real_file_with_bytes_flipped_or_cut(
        flips in prop::collection::vec((0usize..4096, any::<u8>()), 1..8),
        cut in prop::option::of(0usize..320_000),
    ) {
        let mut b = st_file().to_vec();
        for (at, v) in flips {
            let at = at % b.len();
            b[at] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.min(b.len()));
        }
        read_both_ways(&b);
    }

    #[test]
    fn a_real_header_with_entries_edited(
        edits in prop::collection::vec(
            (any::<prop::sample::Index>(), arb_edit(&["dtype", "shape", "data_offsets"])),
            1..5,
        ),
        data_len in prop_oneof![Just(None), (0usize..400_000).prop_map(Some)],
    ) {
        let b = st_file();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut h: Map<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
        let names: Vec<String> = h.keys().cloned().collect();
        for (which, (field, value)) in edits {
            let name = which.get(&names);
            let entry = h.get_mut(name).and_then(Value::as_object_mut).unwrap();
            match value {
                Some(v) => { entry.insert(field, v); }
                None => { entry.remove(&field); }
            }
        }
        let buf = with_header(&Value::Object(h), data_len.unwrap_or(b.len() - 8 - n));
        read_both_ways(&buf);
    }

    #[test]
    fn arbitrary_text_as_config_json(text in ".{0,300}") {
        if let Ok(c) = Config::from_json(&text) {
            plans_for(&c);
        }
    }

    #[test]
    fn arbitrary_json_as_config_json(v in arb_json()) {
        if let Ok(c) = Config::from_json(&v.to_string()) {
            plans_for(&c);
        }
    }

    #[test]
    fn a_real_config_with_fields_edited(edits in prop::collection::vec(arb_edit(CONFIG_KEYS), 1..6)) {
        let mut m = config_map().clone();
        for (k, v) in edits {
            match v {
                Some(v) => { m.insert(k, v); }
                None => { m.remove(&k); }
            }
        }
        if let Ok(c) = Config::from_json(&Value::Object(m).to_string()) {
            plans_for(&c);
        }
    }
}
