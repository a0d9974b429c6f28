//! End-to-end tests of `tprun -n N logits`: the real binary, launcher and collectives, against
//! the transformers references in tests/fixtures, and the one-line errors of bad inputs (broken
//! files are written into a temp dir by each test).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{edit_header, edit_json, fixture, wait_limited, TempDir};

/// Any single tprun run here is killed after this, so a bug fails the test instead of hanging.
const RUN_LIMIT: Duration = Duration::from_secs(120);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `tprun -n N logits ARGS...` to completion (killing it after [`RUN_LIMIT`]).
fn tprun_logits(n: usize, args: &[&str]) -> Run {
    let out_dir = TempDir::new(
        "logits",
        &format!(
            "io-{n}-{}",
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
    );
    let stdout_path = out_dir.path().join("stdout");
    let stderr_path = out_dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tprun"))
        .arg("-n")
        .arg(n.to_string())
        .arg("logits")
        .args(args)
        .env_remove("TPRUN_MODEL")
        .env_remove("TPRUN_ROLE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_limited(&mut child, RUN_LIMIT).unwrap_or_else(|| {
        panic!("tprun -n {n} logits {args:?} did not finish within {RUN_LIMIT:?}")
    });
    Run {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&stdout_path).unwrap(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap(),
    }
}

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cases(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference/cases.json")).unwrap())
        .unwrap()
}

fn ids_arg(case: &Value) -> String {
    let ids: Vec<String> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    ids.join(",")
}

#[test]
fn every_fixture_at_tp_1_to_4_matches_transformers() {
    let tmp = TempDir::new("logits", "fixtures");
    for name in [
        "tiny-hub-bf16-tied",
        "tiny-t5-f32-untied",
        "tiny-sharded",
        "qwen25-layout",
    ] {
        let dir = fixture(name);
        let c = cases(&dir);
        // The longest prompt (34 tokens).
        let case = &c["logits"][2];
        let (shape, reference) = read_f32(
            &dir.join("reference").join(case["file"].as_str().unwrap()),
            "logits",
        );
        let mut tp1 = Vec::new();
        for n in 1..=4 {
            let out = tmp.path().join(format!("{name}-{n}.safetensors"));
            let r = tprun_logits(
                n,
                &[
                    "--model",
                    dir.to_str().unwrap(),
                    "--input-ids",
                    &ids_arg(case),
                    "--out",
                    out.to_str().unwrap(),
                ],
            );
            assert_eq!(r.code, 0, "{name} TP {n}: {}", r.stderr);
            let (s, logits) = read_f32(&out, "logits");
            assert_eq!(s, shape);
            let d = max_diff(&logits, &reference);
            assert!(
                d <= 1e-3,
                "{name} TP {n}: max |logits - transformers| = {d}"
            );
            if n == 1 {
                tp1 = logits;
            } else {
                let d1 = max_diff(&logits, &tp1);
                assert!(d1 <= 1e-4, "{name} TP {n}: max |logits - TP 1| = {d1}");
            }
        }
    }
}

/// `--bf16-dot` is an opt-in: the default products stay within 1e-3 of transformers' f32, and
/// the bf16-dot prefill (where the CPU has AVX512_BF16) changes the logits by about what
/// bf16-rounded activations cost, without breaking them.
#[test]
fn bf16_dot_is_an_opt_in_that_trades_accuracy() {
    let tmp = TempDir::new("logits", "bf16-dot");
    let dir = fixture("tiny-hub-bf16-tied");
    let case = &cases(&dir)["logits"][2];
    let (_, reference) = read_f32(
        &dir.join("reference").join(case["file"].as_str().unwrap()),
        "logits",
    );
    let ids = ids_arg(case);
    let run = |extra: &[&str], file: &str| {
        let out = tmp.path().join(file);
        let mut args = vec!["--model", dir.to_str().unwrap(), "--input-ids", &ids];
        args.extend_from_slice(extra);
        let out_s = out.to_str().unwrap().to_string();
        args.extend(["--out", &out_s]);
        let r = tprun_logits(2, &args);
        assert_eq!(r.code, 0, "{extra:?}: {}", r.stderr);
        (max_diff(&read_f32(&out, "logits").1, &reference), r.stderr)
    };
    let (exact, _) = run(&[], "exact.safetensors");
    let (dot, stderr) = run(&["--bf16-dot"], "dot.safetensors");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("max |logits - transformers|: exact {exact:.2e}, --bf16-dot {dot:.2e} (max |logit| {scale:.2})");
    assert!(exact <= 1e-3, "exact: {exact}");
    if stderr.contains("no AVX512_BF16") {
        assert_eq!(
            dot, exact,
            "without AVX512_BF16 --bf16-dot must change nothing"
        );
    } else {
        // bf16 keeps ~3 significant digits per activation: a drift of a few percent of the
        // largest logit, not noise.
        assert!(
            dot > 2.0 * exact && dot < 0.05 * scale,
            "--bf16-dot: {dot} (exact {exact}, max |logit| {scale})"
        );
    }
}

#[test]
fn default_model_text_prompt_hidden_states_and_json() {
    let tmp = TempDir::new("logits", "text");
    let dir = fixture("tiny-hub-bf16-tied");
    let c = cases(&dir);
    let hs = &c["hidden_states"];
    let case = c["logits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == hs["case"])
        .unwrap();
    let out = tmp.path().join("l.safetensors");
    let hid = tmp.path().join("h.safetensors");
    // No --model: the bundled default is this fixture.
    let r = tprun_logits(
        2,
        &[
            "--text",
            case["text"].as_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--hidden-states",
            hid.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (_, reference) = read_f32(
        &dir.join("reference").join(case["file"].as_str().unwrap()),
        "logits",
    );
    let (_, logits) = read_f32(&out, "logits");
    assert!(max_diff(&logits, &reference) <= 1e-3);
    let hfile = dir.join("reference").join(hs["file"].as_str().unwrap());
    for i in 0..hs["count"].as_u64().unwrap() {
        let name = format!("hidden_states.{i}");
        let (s, want) = read_f32(&hfile, &name);
        let (s2, got) = read_f32(&hid, &name);
        assert_eq!(s, s2);
        assert!(max_diff(&got, &want) <= 1e-3, "{name}");
    }
    // One JSON object from rank 0 (the console line may carry a rank prefix).
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains('{'))
        .expect("a JSON line");
    let j: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(j["input_ids"], case["input_ids"]);
    assert_eq!(j["world_size"], 2);
    assert!(j["weight_bytes"].as_u64().unwrap() > 0);
}

/// Runs logits on `model` expecting failure; returns stderr after checking it is a clean error.
fn expect_error(n: usize, model: &Path, ids: &str, want: &[&str]) {
    let out = model.join("out.safetensors");
    let r = tprun_logits(
        n,
        &[
            "--model",
            model.to_str().unwrap(),
            "--input-ids",
            ids,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_ne!(r.code, 0, "expected failure, stderr: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.contains("error:"), "no error in: {}", r.stderr);
    // Every expected fragment on one line (the launcher prefixes it with the rank).
    assert!(
        r.stderr.lines().any(|l| want.iter().all(|w| l.contains(w))),
        "{want:?} not on one line of: {}",
        r.stderr
    );
    assert!(!out.exists());
}

#[test]
fn bad_models_and_inputs_are_one_line_errors() {
    let ok = fixture("tiny-hub-bf16-tied");
    // Missing model directory.
    expect_error(
        1,
        Path::new("/nonexistent/tprun-model"),
        "1,2",
        &["model directory /nonexistent/tprun-model does not exist"],
    );
    // Token id out of range and TP degree past the heads (tiny-hub has vocab 448 and 4 heads).
    expect_error(2, &ok, "1,448,2", &["token id 448", "vocab_size 448"]);
    expect_error(
        5,
        &ok,
        "1,2",
        &["TP degree 5 is larger than the number of attention heads (4)"],
    );
    // Prompt longer than the context (tiny-t5 has max_position_embeddings 128).
    let long = vec!["5"; 129].join(",");
    expect_error(
        1,
        &fixture("tiny-t5-f32-untied"),
        &long,
        &["129 tokens", "max_position_embeddings 128"],
    );

    // Missing config field; inconsistent heads.
    let m = TempDir::copy_of("logits", "cfg", "tiny-hub-bf16-tied", &[]);
    edit_json(&m.path().join("config.json"), |c| {
        c.remove("num_attention_heads");
    });
    expect_error(
        1,
        m.path(),
        "1",
        &["config.json", "missing field num_attention_heads"],
    );
    edit_json(&m.path().join("config.json"), |c| {
        c.insert("num_attention_heads".into(), 4.into());
        c.insert("num_key_value_heads".into(), 3.into());
    });
    expect_error(
        1,
        m.path(),
        "1",
        &["num_attention_heads (4) is not divisible by num_key_value_heads (3)"],
    );

    let st = |m: &TempDir| m.path().join("model.safetensors");
    // Unsupported dtype (I16 has the same size as BF16, so the header stays consistent).
    let m = TempDir::copy_of("logits", "dtype", "tiny-hub-bf16-tied", &[]);
    edit_header(&st(&m), |h| {
        h["model.norm.weight"]["dtype"] = "I16".into();
    });
    expect_error(
        2,
        m.path(),
        "1",
        &[
            "tensor model.norm.weight",
            "has dtype I16, which is not supported",
        ],
    );
    // Unknown dtype name.
    edit_header(&st(&m), |h| {
        h["model.norm.weight"]["dtype"] = "Q4_K".into();
    });
    expect_error(
        1,
        m.path(),
        "1",
        &[
            "model.safetensors",
            "tensor model.norm.weight: unknown dtype \"Q4_K\"",
        ],
    );
    // Truncated file: the header length runs past the end; data offsets run past the end.
    let m = TempDir::copy_of("logits", "trunc", "tiny-hub-bf16-tied", &[]);
    let full = std::fs::read(st(&m)).unwrap();
    std::fs::write(st(&m), &full[..100]).unwrap();
    expect_error(
        1,
        m.path(),
        "1",
        &[
            "model.safetensors",
            "runs past the end of the file (100 bytes)",
        ],
    );
    std::fs::write(st(&m), &full[..full.len() - 1000]).unwrap();
    expect_error(
        1,
        m.path(),
        "1",
        &["model.safetensors", "run past the end of the data"],
    );
    // Overlapping offsets: one norm weight pointed at another's bytes.
    let m = TempDir::copy_of("logits", "overlap", "tiny-hub-bf16-tied", &[]);
    edit_header(&st(&m), |h| {
        let offs = h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
        h["model.layers.1.input_layernorm.weight"]["data_offsets"] = offs;
    });
    expect_error(1, m.path(), "1", &["model.safetensors", "overlap"]);
    // Wrong tensor shape (transposed, same bytes); missing tensor.
    let m = TempDir::copy_of("logits", "shape", "tiny-hub-bf16-tied", &[]);
    edit_header(&st(&m), |h| {
        h["model.layers.2.mlp.up_proj.weight"]["shape"] = serde_json::json!([64, 160]);
    });
    expect_error(
        2,
        m.path(),
        "1",
        &[
            "tensor model.layers.2.mlp.up_proj.weight",
            "has shape [64, 160], expected [160, 64]",
        ],
    );
    edit_header(&st(&m), |h| {
        h.remove("model.layers.2.mlp.up_proj.weight");
    });
    expect_error(
        1,
        m.path(),
        "1",
        &["tensor model.layers.2.mlp.up_proj.weight (expected shape [160, 64]) is missing"],
    );
    // index.json naming a shard that is not there.
    let m = TempDir::copy_of("logits", "shard", "tiny-sharded", &[]);
    std::fs::remove_file(m.path().join("model-00002-of-00003.safetensors")).unwrap();
    expect_error(2, m.path(), "1", &["model.safetensors.index.json names shard model-00002-of-00003.safetensors, which is missing"]);
}
