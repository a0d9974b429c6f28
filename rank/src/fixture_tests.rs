//! Acceptance against transformers: every fixture in tests/fixtures at TP 1..4 (threads), all
//! positions' logits within 1e-3 of the reference and within 1e-4 of TP 1, hidden states, and
//! `--text` tokenisation equal to the reference input ids.

use std::path::Path;

use serde_json::Value;

use crate::model::config::Config;
use crate::model::loader::{Checkpoint, WeightDtype};
use crate::model::plan::ShardPlan;
use crate::model::{ForwardOptions, Logits, Qwen2};
use crate::testing::{fixture, run_world, FIXTURES};
use crate::tests::max_diff;

fn cases(dir: &Path) -> Value {
    let p = dir.join("reference/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Tensor `name` of a reference safetensors file, as f32.
pub(crate) fn read_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
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

fn ids_of(case: &Value) -> Vec<u32> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Runs every logits case (and the hidden-states case) of `dir` at TP `world`; returns rank 0's
/// logits per case after checking all ranks agree.
fn run_cases(dir: &Path, world: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let c = cases(dir);
    let hs_case = c["hidden_states"]["case"].as_str().unwrap().to_string();
    let out = run_world(world, |r, comm| {
        let config = Config::from_dir(dir)?;
        let plan = ShardPlan::new(&config.shapes(), world, r)?;
        let mut model = Qwen2::load(
            &mut Checkpoint::open(dir)?,
            &config,
            &plan,
            WeightDtype::Auto,
            &mut |_, _| {},
        )?;
        let mut logits = Vec::new();
        let mut hidden = Vec::new();
        for case in c["logits"].as_array().unwrap() {
            let want_hs = case["name"] == hs_case.as_str();
            let opts = ForwardOptions {
                logits: Logits::All,
                hidden_states: want_hs,
            };
            let o = model.forward_with(comm, &ids_of(case), 0, opts)?;
            logits.push(o.logits);
            if want_hs {
                hidden = o.hidden_states;
            }
        }
        Ok((logits, hidden))
    });
    let out: Vec<_> = out.into_iter().map(|o| o.unwrap()).collect();
    for o in &out[1..] {
        assert!(o.0 == out[0].0 && o.1 == out[0].1, "ranks disagree");
    }
    out.into_iter().next().unwrap()
}

#[test]
fn logits_match_transformers_at_tp_1_to_4() {
    let mut report = String::new();
    for name in FIXTURES {
        let dir = fixture(name);
        let c = cases(&dir);
        let cfg = Config::from_dir(&dir).unwrap();
        let first = run_cases(&dir, 1);
        let tp1 = first.0.clone();
        let mut first = Some(first);
        for world in 1..=4 {
            let (logits, hidden) = match first.take() {
                Some(f) => f,
                None => run_cases(&dir, world),
            };
            let (mut vs_ref, mut vs_tp1) = (0f64, 0f64);
            for (i, case) in c["logits"].as_array().unwrap().iter().enumerate() {
                let file = dir.join("reference").join(case["file"].as_str().unwrap());
                let (shape, reference) = read_tensor(&file, "logits");
                assert_eq!(shape, vec![ids_of(case).len(), cfg.vocab_size]);
                vs_ref = vs_ref.max(max_diff(&logits[i], &reference));
                vs_tp1 = vs_tp1.max(max_diff(&logits[i], &tp1[i]));
            }
            let hs = &c["hidden_states"];
            let file = dir.join("reference").join(hs["file"].as_str().unwrap());
            assert_eq!(hidden.len() as u64, hs["count"].as_u64().unwrap());
            let mut vs_hidden = 0f64;
            for (i, h) in hidden.iter().enumerate() {
                let (_, reference) = read_tensor(&file, &format!("hidden_states.{i}"));
                vs_hidden = vs_hidden.max(max_diff(h, &reference));
            }
            report += &format!(
                "{name} TP {world}: logits vs transformers {vs_ref:.2e}, vs TP 1 {vs_tp1:.2e}, hidden states {vs_hidden:.2e}\n"
            );
            assert!(
                vs_ref <= 1e-3,
                "{name} TP {world}: logits differ from transformers by {vs_ref}"
            );
            assert!(
                vs_tp1 <= 1e-4,
                "{name} TP {world}: logits differ from TP 1 by {vs_tp1}"
            );
            assert!(
                vs_hidden <= 1e-4,
                "{name} TP {world}: hidden states differ by {vs_hidden}"
            );
        }
    }
    eprint!("{report}");
}

#[test]
fn qwen25_layout_at_tp_7_and_14() {
    // 14 heads over 7 ranks (2 each) and 14 (one each), 2 KV heads replicated.
    let dir = fixture("qwen25-layout");
    let c = cases(&dir);
    let case = &c["logits"][0];
    let (_, reference) = read_tensor(
        &dir.join("reference").join(case["file"].as_str().unwrap()),
        "logits",
    );
    for world in [7, 14] {
        let (logits, _) = run_cases(&dir, world);
        let d = max_diff(&logits[0], &reference);
        assert!(d <= 1e-3, "TP {world}: {d}");
    }
}

#[test]
fn text_tokenizes_to_the_reference_ids() {
    for name in FIXTURES {
        let dir = fixture(name);
        for case in cases(&dir)["logits"].as_array().unwrap() {
            let tok = crate::text::tokenizer::Tokenizer::load(&dir).unwrap();
            let ids = tok.encode(case["text"].as_str().unwrap(), false).unwrap();
            assert_eq!(ids, ids_of(case), "{name} {}", case["name"]);
        }
    }
}

#[test]
fn every_fixture_config_parses() {
    let c = Config::from_dir(&fixture("tiny-t5-f32-untied")).unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.eos_token_ids, vec![389, 387]);
    assert!(!c.tie_word_embeddings);
    let c = Config::from_dir(&fixture("tiny-hub-bf16-tied")).unwrap();
    assert_eq!(
        (c.rope_theta, c.head_dim, c.eos_token_ids.clone()),
        (10000.0, 16, vec![389])
    );
    assert!(c.tie_word_embeddings);
}

#[test]
fn tp2_ranks_hold_and_read_about_half_of_each_fixture() {
    for name in FIXTURES {
        let dir = fixture(name);
        let sizes = |world: usize| -> Vec<(usize, u64)> {
            run_world(world, |r, _comm| {
                let config = Config::from_dir(&dir)?;
                let plan = ShardPlan::new(&config.shapes(), world, r)?;
                let mut ck = Checkpoint::open(&dir)?;
                let model =
                    Qwen2::load(&mut ck, &config, &plan, WeightDtype::Auto, &mut |_, _| {})?;
                Ok((model.weight_bytes(), ck.bytes_read()))
            })
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
        };
        let (held1, read1) = sizes(1)[0];
        // TP 1 reads each stored byte once.
        assert_eq!(
            read1,
            Checkpoint::open(&dir).unwrap().total_bytes(),
            "{name}"
        );
        for (r, (held, read)) in sizes(2).into_iter().enumerate() {
            let (h, b) = (held as f64 / held1 as f64, read as f64 / read1 as f64);
            eprintln!("{name} TP 2 rank {r}: resident {h:.3}, read {b:.3} of TP 1");
            assert!(
                h <= 0.55 && b <= 0.55,
                "{name} rank {r}: resident {h:.3}, read {b:.3}"
            );
        }
    }
}
