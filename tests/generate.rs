//! `tprun generate` end to end, through the real binary: greedy output against the transformers
//! references at TP 1, 2 and 3, streaming, seeded sampling, and the errors a user can hit.
//!
//! Runs with `TPRUN_ROLE=rank` execute the rank program directly (a world of one, exactly what
//! a single rank does under the launcher); the others go through the launcher.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::{fixture, TempDir};

const TPRUN: &str = env!("CARGO_BIN_EXE_tprun");

const FIXTURES: [&str; 4] = [
    "tiny-hub-bf16-tied",
    "tiny-t5-f32-untied",
    "tiny-sharded",
    "qwen25-layout",
];

fn cases(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("reference/cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["generate"].as_array().unwrap().clone()
}

/// The generate arguments that reproduce a reference case.
fn case_args(dir: &Path, c: &Value) -> Vec<String> {
    let mut a = vec!["--model".to_string(), dir.display().to_string()];
    let prompt = c["prompt"].as_str().unwrap().to_string();
    match c["kind"].as_str().unwrap() {
        "prompt" => a.extend(["--prompt".into(), prompt]),
        "chat" => {
            a.extend(["--chat".into(), prompt]);
            if let Some(s) = c["system"].as_str() {
                a.extend(["--system".into(), s.to_string()]);
            }
        }
        k => panic!("unknown kind {k}"),
    }
    a.extend([
        "--max-new-tokens".into(),
        c["max_new_tokens"].as_u64().unwrap().to_string(),
    ]);
    a
}

/// `tprun generate ARGS` as one rank process, without the launcher.
fn rank_generate(args: &[String]) -> Output {
    Command::new(TPRUN)
        .arg("generate")
        .args(args)
        .env("TPRUN_ROLE", "rank")
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .output()
        .unwrap()
}

/// `tprun -n N generate ARGS` through the launcher, showing only rank 0's unprefixed output.
fn launch_generate(n: usize, args: &[String]) -> Output {
    Command::new(TPRUN)
        .args([
            "-n",
            &n.to_string(),
            "--only-rank",
            "0",
            "--no-prefix",
            "generate",
        ])
        .args(args)
        .env_remove("TPRUN_ROLE")
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "tprun failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON object on stdout: {stdout:?}"));
    serde_json::from_str(line).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn check_against_references(world: usize) {
    for name in FIXTURES {
        let dir = fixture(name);
        for c in cases(&dir) {
            let mut args = case_args(&dir, &c);
            args.push("--json".into());
            let out = if world == 1 {
                rank_generate(&args)
            } else {
                launch_generate(world, &args)
            };
            let j = json_of(&out);
            let what = format!("{name}/{} at TP {world}", c["name"]);
            assert_eq!(
                ids(&j["prompt_ids"]),
                ids(&c["prompt_ids"]),
                "{what}: prompt ids"
            );
            assert_eq!(
                ids(&j["output_ids"]),
                ids(&c["output_ids"]),
                "{what}: output ids"
            );
            assert_eq!(j["text"], c["text"], "{what}: text");
            assert_eq!(j["world_size"], world, "{what}");
            for k in ["load_s", "prefill_tok_s", "decode_tok_s"] {
                assert!(j["timings"][k].is_number(), "{what}: timings.{k}");
            }
            let comm = j["comm"].as_object().unwrap();
            if world == 1 {
                assert!(
                    comm.is_empty(),
                    "{what}: a world of one makes no collectives: {comm:?}"
                );
            } else {
                // Greedy: every new token after the first costs a forward (all-reduces) and
                // every token one all-gather of each rank's best (logit, id): 8 bytes per
                // rank, no logits gathered and nothing broadcast.
                let n_out = ids(&c["output_ids"]).len() as u64;
                assert!(comm.get("broadcast").is_none(), "{what}: {comm:?}");
                assert_eq!(comm["all_gather"]["count"], n_out, "{what}: {comm:?}");
                assert_eq!(
                    comm["all_gather"]["bytes"],
                    8 * world as u64 * n_out,
                    "{what}: {comm:?}"
                );
                assert!(
                    comm["all_reduce"]["count"].as_u64().unwrap() >= n_out,
                    "{what}"
                );
                assert!(comm["all_reduce"]["seconds"].is_number(), "{what}");
            }
        }
    }
}

#[test]
fn greedy_matches_references_tp1() {
    check_against_references(1);
}

#[test]
fn greedy_matches_references_tp2() {
    check_against_references(2);
}

#[test]
fn greedy_matches_references_tp3() {
    check_against_references(3);
}

#[test]
fn streamed_text_is_the_decode_of_the_output() {
    // g3 of the default fixture ends in eos; its text has multi-byte and replacement characters.
    let dir = fixture("tiny-hub-bf16-tied");
    for c in cases(&dir) {
        let out = rank_generate(&case_args(&dir, &c));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = format!("{}\n", c["text"].as_str().unwrap());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            want,
            "case {}",
            c["name"]
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("prefill") && err.contains("tok/s"),
            "timing line: {err}"
        );
    }
}

#[test]
fn streaming_over_the_launcher_matches_too() {
    let dir = fixture("tiny-sharded");
    let c = &cases(&dir)[0];
    let out = launch_generate(2, &case_args(&dir, c));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!("{}\n", c["text"].as_str().unwrap());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
}

fn sample_args(seed: u64) -> Vec<String> {
    [
        "--model",
        fixture("tiny-hub-bf16-tied").to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--ignore-eos",
        "--max-new-tokens",
        "24",
        "--seed",
        &seed.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn same_seed_same_text_at_tp1() {
    let a = json_of(&rank_generate(&sample_args(42)));
    let b = json_of(&rank_generate(&sample_args(42)));
    let c = json_of(&rank_generate(&sample_args(43)));
    assert_eq!(ids(&a["output_ids"]).len(), 24);
    assert_eq!(a["output_ids"], b["output_ids"]);
    assert_eq!(a["text"], b["text"]);
    assert_ne!(a["output_ids"], c["output_ids"]);
}

#[test]
fn same_seed_same_text_at_tp2() {
    let a = json_of(&rank_generate(&sample_args(42)));
    let b = json_of(&launch_generate(2, &sample_args(42)));
    assert_eq!(a["output_ids"], b["output_ids"]);
}

fn failure(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure, got {}",
        out.status
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !err.contains("panicked"),
        "a panic, not a clear error: {err}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    err
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn empty_prompt_is_a_clear_error() {
    let dir = fixture("tiny-hub-bf16-tied");
    let d = dir.to_str().unwrap();
    let err = failure(&rank_generate(&args(&["--model", d, "--prompt", ""])));
    assert!(err.contains("--prompt is empty"), "{err}");
    let err = failure(&rank_generate(&args(&["--model", d, "--chat", ""])));
    assert!(err.contains("--chat is empty"), "{err}");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let m = TempDir::copy_of("gen", "notok", "tiny-hub-bf16-tied", &["tokenizer.json"]);
    let err = failure(&rank_generate(&args(&[
        "--model",
        m.0.to_str().unwrap(),
        "--prompt",
        "hello",
    ])));
    assert!(
        err.contains("tokenizer.json") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn a_chat_template_that_fails_is_a_clear_error() {
    let m = TempDir::copy_of("gen", "badtmpl", "tiny-t5-f32-untied", &[]);
    std::fs::write(
        m.0.join("chat_template.jinja"),
        "{%- if messages[0].role != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}\n\
         {% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         <|im_start|>assistant\n",
    )
    .unwrap();
    let d = m.0.to_str().unwrap();
    let err = failure(&rank_generate(&args(&["--model", d, "--chat", "hi"])));
    assert!(err.contains("a system message is required"), "{err}");
    assert!(err.contains("chat_template.jinja"), "{err}");
    // With a system message the same template renders.
    let out = rank_generate(&args(&[
        "--model",
        d,
        "--chat",
        "hi",
        "--system",
        "s",
        "--max-new-tokens",
        "2",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::write(
        m.0.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }",
    )
    .unwrap();
    let err = failure(&rank_generate(&args(&["--model", d, "--chat", "hi"])));
    assert!(
        err.contains("chat template") && err.contains("chat_template.jinja"),
        "{err}"
    );
}

#[test]
fn bad_sampling_options_are_clear_errors() {
    let dir = fixture("tiny-hub-bf16-tied");
    let d = dir.to_str().unwrap();
    for (opt, val) in [
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--temperature", "-0.5"),
        ("--top-k", "0"),
    ] {
        // Refused while parsing, by the launcher's parse as much as the rank's.
        for role in [None, Some("rank")] {
            let mut cmd = Command::new(TPRUN);
            cmd.args(["generate", "--model", d, "--prompt", "x", opt, val]);
            match role {
                Some(r) => cmd.env("TPRUN_ROLE", r),
                None => cmd.env_remove("TPRUN_ROLE"),
            };
            let out = cmd.output().unwrap();
            let err = failure(&out);
            assert!(err.contains(opt) && err.contains(val), "{opt} {val}: {err}");
        }
    }
}

#[test]
fn a_prompt_past_the_context_is_a_clear_error() {
    // tiny-t5-f32-untied has max_position_embeddings 128.
    let dir = fixture("tiny-t5-f32-untied");
    let ids: Vec<String> = (0..200).map(|i| (i % 300).to_string()).collect();
    let err = failure(&rank_generate(&args(&[
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &ids.join(","),
    ])));
    assert!(err.contains("128") && err.contains("200"), "{err}");
}

#[test]
fn generation_stops_at_the_context_limit() {
    let dir = fixture("tiny-t5-f32-untied");
    let ids: Vec<String> = (0..120).map(|i| (i % 300).to_string()).collect();
    let j = json_of(&rank_generate(&args(&[
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &ids.join(","),
        "--ignore-eos",
        "--max-new-tokens",
        "50",
        "--json",
    ])));
    assert_eq!(ids_len(&j["output_ids"]), 8);
    assert_eq!(j["stop"], "context");
}

fn ids_len(v: &Value) -> usize {
    v.as_array().unwrap().len()
}
