//! Where the model comes from and what a run needs of it, end to end through the binary: the
//! bundled model with the source tree out of sight, `--model ORG/NAME` from a Hugging Face cache
//! layout built here, `--input-ids` without a tokenizer, `--messages` and the interactive chat
//! on a pseudo-terminal.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{fixture, run_cmd, tprun, Finished, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

/// The reference case `name` of the bundled model's fixture.
fn case(name: &str) -> Value {
    let path = fixture("tiny-hub-bf16-tied").join("reference/cases.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["generate"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

fn ids_arg(v: &Value) -> String {
    let ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    ids.join(",")
}

/// The JSON object on the last `{` line of stdout of a successful run.
fn json_of(f: &Finished) -> Value {
    assert_eq!(f.code, 0, "tprun failed:\n{}", f.stderr);
    let line = f.stdout.lines().rev().find(|l| l.starts_with('{'));
    serde_json::from_str(line.unwrap_or_else(|| panic!("no JSON in {:?}", f.stdout))).unwrap()
}

/// `tprun -n 2 --only-rank 0 --no-prefix generate ARGS` with no model in the environment.
fn generate(args: &[&str]) -> Command {
    let mut c = tprun();
    c.args(["-n", "2", "--only-rank", "0", "--no-prefix", "generate"])
        .args(args)
        .env_remove("TPRUN_MODEL")
        .env_remove("TPRUN_ROLE");
    c
}

/// g0 of the fixture as --input-ids, greedy, as JSON.
fn g0_args() -> Vec<String> {
    let c = case("g0");
    vec![
        "--input-ids".into(),
        ids_arg(&c["prompt_ids"]),
        "--max-new-tokens".into(),
        c["max_new_tokens"].to_string(),
        "--json".into(),
    ]
}

#[test]
fn the_bundled_model_runs_with_the_source_tree_hidden() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = TempDir::new("tprun-bundled", "bin");
    let bin = tmp.join("tprun");
    std::fs::copy(common::tprun_bin(), &bin).unwrap();
    // In a private mount namespace an empty tmpfs covers the whole source tree (fixtures
    // included); the check that config.json is gone keeps the test from passing vacuously.
    let fixture_cfg = fixture("tiny-hub-bf16-tied").join("config.json");
    let script = format!(
        "mount -t tmpfs none '{}' && test ! -e '{}' && cd / && exec '{}' \"$@\"",
        repo.display(),
        fixture_cfg.display(),
        bin.display()
    );
    let probe = Command::new("unshare").args(["--mount", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        common::skip(
            "model_source the_bundled_model_runs_with_the_source_tree_hidden",
            "unshare --mount is refused here (needs root or user namespaces)",
        );
        return;
    }
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .args(["-n", "2", "--only-rank", "0", "--no-prefix", "generate"])
    .args(g0_args())
    .env_remove("TPRUN_MODEL")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let f = run_cmd(&mut cmd, LIMIT);
    let j = json_of(&f);
    assert_eq!(j["output_ids"], case("g0")["output_ids"], "{}", f.stderr);
    assert_eq!(j["text"], case("g0")["text"]);
    assert!(
        f.stderr.contains("(bundled) tiny-hub-bf16-tied"),
        "{}",
        f.stderr
    );
}

/// A Hugging Face cache in `hub` holding the fixture as `test-org/tiny`: blobs, a snapshot of
/// symlinks into them, refs/main and refs/v1 naming the snapshot. Returns the commit hash.
fn make_cache(hub: &Path) -> String {
    let hash = "0123456789abcdef0123456789abcdef01234567".to_string();
    let repo = hub.join("models--test-org--tiny");
    let snap = repo.join("snapshots").join(&hash);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("tiny-hub-bf16-tied")).unwrap() {
        let e = e.unwrap();
        if !e.file_type().unwrap().is_file() {
            continue;
        }
        let blob = format!("blob-{}", e.file_name().to_string_lossy());
        std::fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(e.file_name()))
            .unwrap();
    }
    for r in ["main", "v1"] {
        std::fs::write(repo.join("refs").join(r), &hash).unwrap();
    }
    hash
}

#[test]
fn a_repo_id_resolves_in_the_hugging_face_cache() {
    let home = TempDir::new("tprun-hf", "home");
    let hash = make_cache(&home.join("hub"));
    let want = case("g0")["output_ids"].clone();
    // HF_HUB_CACHE, then HF_HOME/hub; refs/main, a tag and a commit hash.
    for (var, val, rev) in [
        ("HF_HUB_CACHE", home.join("hub"), None),
        ("HF_HOME", home.0.clone(), Some("v1")),
        ("HF_HOME", home.0.clone(), Some(hash.as_str())),
    ] {
        let mut c = generate(&["--model", "test-org/tiny"]);
        c.args(g0_args()).current_dir(home.path());
        c.env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env(var, &val);
        if let Some(r) = rev {
            c.args(["--revision", r]);
        }
        let f = run_cmd(&mut c, LIMIT);
        assert_eq!(
            json_of(&f)["output_ids"],
            want,
            "{var} {rev:?}: {}",
            f.stderr
        );
        assert!(
            f.stderr.contains(&format!("snapshots/{hash}")),
            "{}",
            f.stderr
        );
    }
    // Missing: one line with the path looked at and the command that fetches it.
    for (id, rev, path, fetch) in [
        (
            "test-org/other",
            None,
            "models--test-org--other",
            "huggingface-cli download test-org/other`",
        ),
        (
            "test-org/tiny",
            Some("v9"),
            "models--test-org--tiny/refs/v9",
            "huggingface-cli download test-org/tiny --revision v9`",
        ),
    ] {
        let mut c = generate(&["--model", id, "--prompt", "x"]);
        c.env("HF_HUB_CACHE", home.join("hub"))
            .current_dir(home.path());
        if let Some(r) = rev {
            c.args(["--revision", r]);
        }
        let f = run_cmd(&mut c, LIMIT);
        assert_ne!(f.code, 0);
        let lines: Vec<&str> = f.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}", f.stderr);
        assert!(
            lines[0].contains(&home.join("hub").join(path).display().to_string()),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(fetch), "{}", lines[0]);
    }
    // An existing directory of that name wins over the repo id.
    let local = home.join("test-org/tiny");
    std::fs::create_dir_all(home.join("test-org")).unwrap();
    std::os::unix::fs::symlink(fixture("tiny-hub-bf16-tied"), &local).unwrap();
    let mut c = generate(&["--model", "test-org/tiny"]);
    c.args(g0_args())
        .env("HF_HUB_CACHE", home.join("nothing"))
        .current_dir(home.path());
    let f = run_cmd(&mut c, LIMIT);
    assert_eq!(json_of(&f)["output_ids"], want, "{}", f.stderr);
}

#[test]
fn input_ids_need_no_tokenizer() {
    let dir = TempDir::copy_of(
        "tprun-notok",
        "dir",
        "tiny-hub-bf16-tied",
        &["tokenizer.json"],
    );
    assert!(!dir.join("tokenizer.json").exists());
    let c0 = case("g0");
    let f = run_cmd(generate(&["--model", &dir.s()]).args(g0_args()), LIMIT);
    let j = json_of(&f);
    assert_eq!(j["output_ids"], c0["output_ids"], "{}", f.stderr);
    assert!(j["text"].is_null());
    // Streamed: the ids, space-separated, instead of text.
    let args: Vec<String> = g0_args().into_iter().filter(|a| a != "--json").collect();
    let f = run_cmd(generate(&["--model", &dir.s()]).args(&args), LIMIT);
    assert_eq!(f.code, 0, "{}", f.stderr);
    let want: Vec<String> = c0["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect();
    assert_eq!(f.stdout.trim(), want.join(" "));
    // Text still needs the tokenizer, and says so.
    let f = run_cmd(
        &mut generate(&["--model", &dir.s(), "--prompt", "x"]),
        LIMIT,
    );
    assert_ne!(f.code, 0);
    assert!(
        f.stderr.contains("tokenizer.json does not exist"),
        "{}",
        f.stderr
    );
}

#[test]
fn messages_file_continues_a_conversation() {
    let tmp = TempDir::new("tprun-messages", "dir");
    let g2 = case("g2");
    let file = tmp.join("m.json");
    let msgs = serde_json::json!([
        {"role": "system", "content": g2["system"]},
        {"role": "user", "content": g2["prompt"]},
    ]);
    std::fs::write(&file, msgs.to_string()).unwrap();
    let f = run_cmd(
        &mut generate(&[
            "--messages",
            &file.display().to_string(),
            "--max-new-tokens",
            "12",
            "--json",
        ]),
        LIMIT,
    );
    let j = json_of(&f);
    assert_eq!(j["prompt_ids"], g2["prompt_ids"]);
    assert_eq!(j["output_ids"], g2["output_ids"]);
    for (text, want) in [
        (r#"{"role": "user"}"#, "expected a JSON list"),
        (
            r#"[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]"#,
            "entry 1: role \"bot\"",
        ),
        (r#"[{"role": "user"}]"#, "entry 0: no \"content\" string"),
    ] {
        std::fs::write(&file, text).unwrap();
        let f = run_cmd(
            &mut generate(&["--messages", &file.display().to_string()]),
            LIMIT,
        );
        assert_ne!(f.code, 0);
        assert!(
            f.stderr.contains(&file.display().to_string()) && f.stderr.contains(want),
            "{}",
            f.stderr
        );
    }
}

/// Runs `tprun ARGS` with stdin a pseudo-terminal (its controlling terminal, tprun in the
/// foreground), types `input` and then Ctrl-D; returns (exit code, stdout, stderr).
const PTY_RUN: &str = r#"
import os, subprocess, sys, termios, fcntl
master, slave = os.openpty()
attrs = termios.tcgetattr(slave)
attrs[3] &= ~termios.ECHO
termios.tcsetattr(slave, termios.TCSANOW, attrs)
def ctty():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
p = subprocess.Popen(sys.argv[2:], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     start_new_session=True, preexec_fn=ctty)
os.close(slave)
os.write(master, sys.argv[1].encode() + b"\x04")
out, err = p.communicate(timeout=100)
sys.stdout.buffer.write(out)
sys.stderr.buffer.write(err)
sys.exit(p.returncode)
"#;

#[test]
fn interactive_chat_on_a_terminal_keeps_the_history() {
    if Command::new("python3")
        .arg("-c")
        .arg("import pty")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        common::skip(
            "model_source interactive_chat_on_a_terminal_keeps_the_history",
            "no python3 (with its pty module) to make a pseudo-terminal",
        );
        return;
    }
    let (u1, u2) = ("Write a haiku about autumn.", "Tell me about ship.");
    let mut c = Command::new("python3");
    c.args(["-c", PTY_RUN, &format!("{u1}\n\n{u2}\n")])
        .arg(common::tprun_bin())
        .args([
            "-n",
            "2",
            "--only-rank",
            "0",
            "--no-prefix",
            "generate",
            "--max-new-tokens",
            "12",
        ])
        .env_remove("TPRUN_MODEL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let chat = run_cmd(&mut c, LIMIT);
    assert_eq!(chat.code, 0, "{}", chat.stderr);
    // Turn 1 is `--chat u1`; turn 2 is the whole conversation so far as --messages.
    let one = run_cmd(
        &mut generate(&["--chat", u1, "--max-new-tokens", "12"]),
        LIMIT,
    );
    assert_eq!(one.code, 0, "{}", one.stderr);
    let reply1 = one.stdout.strip_suffix('\n').unwrap();
    let tmp = TempDir::new("tprun-interactive", "dir");
    let file = tmp.join("m.json");
    let msgs = serde_json::json!([
        {"role": "user", "content": u1},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": u2},
    ]);
    std::fs::write(&file, msgs.to_string()).unwrap();
    let two = run_cmd(
        &mut generate(&[
            "--messages",
            &file.display().to_string(),
            "--max-new-tokens",
            "12",
        ]),
        LIMIT,
    );
    assert_eq!(two.code, 0, "{}", two.stderr);
    assert_eq!(
        chat.stdout,
        format!("{}{}", one.stdout, two.stdout),
        "{}",
        chat.stderr
    );
}
