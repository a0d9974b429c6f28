//! Model tests on small synthetic checkpoints written by the test itself: the TP forward at
//! degrees 1..4 (in threads, with [`crate::testing`]) against an independent f64 reference
//! implementation, against TP 1, prefill vs step-by-step decode, shard sizes and bytes read,
//! and the errors of bad inputs. The comparison with transformers' own outputs is in
//! `fixture_tests` (real fixtures).

use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::json;

use crate::model::config::Config;
use crate::model::loader::{Checkpoint, WeightDtype};
use crate::model::plan::ShardPlan;
use crate::model::{ForwardOptions, Logits, Qwen2};
use crate::testing::run_world;

pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Tiny {
    pub hidden: usize,
    pub heads: usize,
    pub kv: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub vocab: usize,
    pub layers: usize,
    pub tied: bool,
    pub bf16: bool,
}

/// A scratch directory, removed when dropped (also when the test fails).
pub(crate) struct TmpDir(PathBuf);
impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tmpdir(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("tprun-rank-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn config_json(t: &Tiny) -> serde_json::Value {
    json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": t.hidden, "intermediate_size": t.inter, "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads, "num_key_value_heads": t.kv, "head_dim": t.head_dim,
        "vocab_size": t.vocab, "max_position_embeddings": 32, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": t.tied, "use_sliding_window": false,
        "torch_dtype": if t.bf16 { "bfloat16" } else { "float32" }, "eos_token_id": [1, 2]
    })
}

/// The tensors of a random Qwen2 with shapes `t`: (name, shape, values already rounded to the
/// stored dtype).
pub(crate) fn tiny_tensors(t: &Tiny, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let x = offset + scale * rng.f();
                if t.bf16 {
                    bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
            .collect();
        out.push((name, shape, v));
    };
    let (h, d) = (t.hidden, t.head_dim);
    add(
        "model.embed_tokens.weight".into(),
        vec![t.vocab, h],
        1.0,
        0.0,
    );
    let w = 1.0 / (h as f32).sqrt();
    for i in 0..t.layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 0.2, 1.0);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.2,
            1.0,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![t.heads * d, h],
            2.0 * w,
            0.0,
        );
        add(
            format!("{p}.self_attn.q_proj.bias"),
            vec![t.heads * d],
            0.5,
            0.0,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![t.kv * d, h],
            2.0 * w,
            0.0,
        );
        add(
            format!("{p}.self_attn.k_proj.bias"),
            vec![t.kv * d],
            0.5,
            0.0,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![t.kv * d, h],
            w,
            0.0,
        );
        add(
            format!("{p}.self_attn.v_proj.bias"),
            vec![t.kv * d],
            0.1,
            0.0,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, t.heads * d],
            w,
            0.0,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![t.inter, h],
            w,
            0.0,
        );
        add(format!("{p}.mlp.up_proj.weight"), vec![t.inter, h], w, 0.0);
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, t.inter],
            1.0 / (t.inter as f32).sqrt(),
            0.0,
        );
    }
    add("model.norm.weight".into(), vec![h], 0.2, 1.0);
    if !t.tied {
        add("lm_head.weight".into(), vec![t.vocab, h], w, 0.0);
    }
    out
}

pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    as_bf16: bool,
) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| {
            if as_bf16 {
                v.iter()
                    .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                    .collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    let dt = if as_bf16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views: Vec<_> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// Writes a random tiny checkpoint; returns its tensors (for the reference implementation).
pub(crate) fn write_tiny(dir: &Path, t: &Tiny, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let tensors = tiny_tensors(t, seed);
    std::fs::write(dir.join("config.json"), config_json(t).to_string()).unwrap();
    write_safetensors(&dir.join("model.safetensors"), &tensors, t.bf16);
    tensors
}

/// A plain f64 Qwen2 forward (transformers' math, no sharding, no cache): logits [seq, vocab].
fn reference_logits(t: &Tiny, tensors: &[(String, Vec<usize>, Vec<f32>)], ids: &[u32]) -> Vec<f64> {
    let get = |n: &str| -> Vec<f64> {
        tensors
            .iter()
            .find(|x| x.0 == n)
            .unwrap()
            .2
            .iter()
            .map(|v| *v as f64)
            .collect()
    };
    let (h, d, m) = (t.hidden, t.head_dim, ids.len());
    let lin = |x: &[f64], w: &[f64], b: Option<&[f64]>, n: usize, k: usize| -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                y[i * n + j] = s + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    };
    let norm = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let mut y = x.to_vec();
        for r in y.chunks_mut(h) {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for (v, g) in r.iter_mut().zip(w) {
                *v *= inv * g;
            }
        }
        y
    };
    let rope = |x: &mut [f64], pos: usize| {
        for i in 0..d / 2 {
            let a = pos as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
            let (x1, x2) = (x[i], x[i + d / 2]);
            x[i] = x1 * a.cos() - x2 * a.sin();
            x[i + d / 2] = x2 * a.cos() + x1 * a.sin();
        }
    };
    let emb = get("model.embed_tokens.weight");
    let mut x: Vec<f64> = ids
        .iter()
        .flat_map(|&i| emb[i as usize * h..(i as usize + 1) * h].to_vec())
        .collect();
    let g = t.heads / t.kv;
    for l in 0..t.layers {
        let p = format!("model.layers.{l}");
        let a = |n: &str| get(&format!("{p}.{n}"));
        let xn = norm(&x, &a("input_layernorm.weight"));
        let mut q = lin(
            &xn,
            &a("self_attn.q_proj.weight"),
            Some(&a("self_attn.q_proj.bias")),
            t.heads * d,
            h,
        );
        let mut k = lin(
            &xn,
            &a("self_attn.k_proj.weight"),
            Some(&a("self_attn.k_proj.bias")),
            t.kv * d,
            h,
        );
        let v = lin(
            &xn,
            &a("self_attn.v_proj.weight"),
            Some(&a("self_attn.v_proj.bias")),
            t.kv * d,
            h,
        );
        for i in 0..m {
            for hh in 0..t.heads {
                rope(
                    &mut q[(i * t.heads + hh) * d..(i * t.heads + hh + 1) * d],
                    i,
                );
            }
            for hh in 0..t.kv {
                rope(&mut k[(i * t.kv + hh) * d..(i * t.kv + hh + 1) * d], i);
            }
        }
        let mut att = vec![0.0; m * t.heads * d];
        for i in 0..m {
            for hh in 0..t.heads {
                let kv = hh / g;
                let qv = &q[(i * t.heads + hh) * d..][..d];
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|c| qv[c] * k[(j * t.kv + kv) * d + c])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    att[(i * t.heads + hh) * d + c] =
                        (0..=i).map(|j| e[j] / z * v[(j * t.kv + kv) * d + c]).sum();
                }
            }
        }
        let o = lin(&att, &a("self_attn.o_proj.weight"), None, h, t.heads * d);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xn = norm(&x, &a("post_attention_layernorm.weight"));
        let gt = lin(&xn, &a("mlp.gate_proj.weight"), None, t.inter, h);
        let up = lin(&xn, &a("mlp.up_proj.weight"), None, t.inter, h);
        let act: Vec<f64> = gt
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let dn = lin(&act, &a("mlp.down_proj.weight"), None, h, t.inter);
        x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
    }
    let xn = norm(&x, &get("model.norm.weight"));
    let head = if t.tied { emb } else { get("lm_head.weight") };
    lin(&xn, &head, None, t.vocab, h)
}

/// Loads `dir` at TP `world` in threads and returns each rank's (logits, weight bytes, bytes read).
fn run_tp(
    dir: &Path,
    world: usize,
    ids: &[u32],
    dtype: WeightDtype,
) -> Vec<(Vec<f32>, usize, u64)> {
    run_world(world, |r, comm| {
        let config = Config::from_dir(dir)?;
        let plan = ShardPlan::new(&config.shapes(), world, r)?;
        let mut ck = Checkpoint::open(dir)?;
        let mut model = Qwen2::load(&mut ck, &config, &plan, dtype, &mut |_, _| {})?;
        let logits = model.forward(comm, ids, 0)?;
        Ok((logits, model.weight_bytes(), ck.bytes_read()))
    })
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()
    .unwrap()
}

pub(crate) fn max_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| ((*x).into() - (*y).into()).abs())
        .fold(0.0, f64::max)
}

const SHAPES: [Tiny; 3] = [
    // GQA, group 2; TP 3 splits heads 2/1/1 and replicates a KV head.
    Tiny {
        hidden: 32,
        heads: 4,
        kv: 2,
        head_dim: 8,
        inter: 40,
        vocab: 37,
        layers: 2,
        tied: true,
        bf16: true,
    },
    // Group 3 with N > kv heads at TP 3 and 4; untied head, f32 storage, head_dim != hidden/heads.
    Tiny {
        hidden: 24,
        heads: 6,
        kv: 2,
        head_dim: 6,
        inter: 30,
        vocab: 50,
        layers: 2,
        tied: false,
        bf16: false,
    },
    // Plain multi-head attention.
    Tiny {
        hidden: 16,
        heads: 4,
        kv: 4,
        head_dim: 4,
        inter: 21,
        vocab: 29,
        layers: 1,
        tied: true,
        bf16: false,
    },
];

#[test]
fn tp_1_to_4_matches_reference_and_tp1() {
    let ids = [3u32, 17, 0, 5, 28, 9, 9, 1];
    for (si, t) in SHAPES.iter().enumerate() {
        let dir = tmpdir(&format!("ref{si}"));
        let tensors = write_tiny(&dir, t, 42 + si as u64);
        let reference = reference_logits(t, &tensors, &ids);
        let tp1 = run_tp(&dir, 1, &ids, WeightDtype::Auto).remove(0).0;
        assert_eq!(tp1.len(), ids.len() * t.vocab);
        let d = max_diff(&tp1, &reference);
        assert!(d < 1e-4, "shape {si}: TP 1 vs f64 reference {d}");
        for world in 2..=4 {
            let ranks = run_tp(&dir, world, &ids, WeightDtype::Auto);
            for (r, (logits, _, _)) in ranks.iter().enumerate() {
                let d1 = max_diff(logits, &tp1);
                let dr = max_diff(logits, &reference);
                assert!(
                    d1 <= 1e-4 && dr < 1e-4,
                    "shape {si} TP {world} rank {r}: vs TP1 {d1}, vs reference {dr}"
                );
            }
            // Every rank returns the same gathered logits.
            assert!(ranks.iter().all(|x| x.0 == ranks[0].0));
        }
    }
}

#[test]
fn decode_step_by_step_equals_prefill() {
    let t = SHAPES[1];
    let dir = tmpdir("decode");
    write_tiny(&dir, &t, 7);
    let ids = [1u32, 2, 3, 4, 5, 6];
    for world in [1, 3] {
        let out = run_world(world, |r, comm| {
            let config = Config::from_dir(&dir)?;
            let plan = ShardPlan::new(&config.shapes(), world, r)?;
            let mut model = Qwen2::load(
                &mut Checkpoint::open(&dir)?,
                &config,
                &plan,
                WeightDtype::Auto,
                &mut |_, _| {},
            )?;
            let all = model.forward(comm, &ids, 0)?;
            // Re-run from position 2 (drops the cache past it), then one token at a time.
            let mut steps = model.forward(comm, &ids[..2], 0)?;
            let opts = ForwardOptions {
                logits: Logits::Last,
                hidden_states: false,
            };
            for (i, &id) in ids.iter().enumerate().skip(2) {
                steps.extend(model.forward_with(comm, &[id], i, opts)?.logits);
            }
            assert_eq!(model.cache().len(), ids.len());
            Ok((all, steps))
        });
        for o in out {
            let (all, steps) = o.unwrap();
            assert!(max_diff(&all, &steps) < 1e-5, "TP {world}");
        }
    }
}

#[test]
fn tp2_holds_and_reads_about_half() {
    // A shape where the replicated norms are small next to the matrices.
    let t = Tiny {
        hidden: 64,
        heads: 4,
        kv: 2,
        head_dim: 16,
        inter: 96,
        vocab: 101,
        layers: 2,
        tied: true,
        bf16: true,
    };
    let dir = tmpdir("bytes");
    write_tiny(&dir, &t, 3);
    let ids = [1u32, 2];
    let tp1 = run_tp(&dir, 1, &ids, WeightDtype::Auto).remove(0);
    let ck = Checkpoint::open(&dir).unwrap();
    // TP 1 reads every byte of the checkpoint exactly once.
    assert_eq!(tp1.2, ck.total_bytes());
    let tp2 = run_tp(&dir, 2, &ids, WeightDtype::Auto);
    for (r, (_, resident, read)) in tp2.iter().enumerate() {
        let (fr, fb) = (*resident as f64 / tp1.1 as f64, *read as f64 / tp1.2 as f64);
        assert!(
            fr <= 0.55 && fb <= 0.55,
            "rank {r}: resident {fr:.3}, read {fb:.3} of TP 1"
        );
    }
    // Only the replicated norms are read twice.
    let norms = (2 * t.layers + 1) * t.hidden * 2;
    assert_eq!(tp2[0].2 + tp2[1].2, tp1.2 + norms as u64);
    // --dtype f32 doubles the matrices, bf16 of an f32 checkpoint halves them.
    let f32_bytes = run_tp(&dir, 1, &ids, WeightDtype::F32).remove(0).1;
    assert!(f32_bytes > tp1.1 * 19 / 10);
}

#[test]
fn bf16_storage_of_f32_checkpoint_is_close() {
    let t = SHAPES[1];
    let dir = tmpdir("cast");
    write_tiny(&dir, &t, 11);
    let ids = [4u32, 8, 15, 16, 23, 42];
    let f = run_tp(&dir, 2, &ids, WeightDtype::Auto).remove(0);
    let b = run_tp(&dir, 2, &ids, WeightDtype::Bf16).remove(0);
    let d = max_diff(&f.0, &b.0);
    assert!(
        d > 0.0 && d < 0.1,
        "bf16 weights change the logits a little: {d}"
    );
    assert!(b.1 < f.1 * 6 / 10);
}

fn load_err(dir: &Path, world: usize) -> String {
    let r = run_world(world, |r, _comm| {
        let config = Config::from_dir(dir)?;
        let plan = ShardPlan::new(&config.shapes(), world, r)?;
        Qwen2::load(
            &mut Checkpoint::open(dir)?,
            &config,
            &plan,
            WeightDtype::Auto,
            &mut |_, _| {},
        )?;
        Ok(())
    });
    format!("{:#}", r.into_iter().next().unwrap().unwrap_err())
}

#[test]
fn bad_inputs_are_clear_errors() {
    let t = SHAPES[0];
    let dir = tmpdir("bad");
    let mut tensors = write_tiny(&dir, &t, 5);
    // Token out of range, prompt past the context.
    let errs = run_world(2, |r, comm| {
        let config = Config::from_dir(&dir)?;
        let plan = ShardPlan::new(&config.shapes(), 2, r)?;
        let mut model = Qwen2::load(
            &mut Checkpoint::open(&dir)?,
            &config,
            &plan,
            WeightDtype::Auto,
            &mut |_, _| {},
        )?;
        let e1 = model.forward(comm, &[1, 37], 0).unwrap_err().to_string();
        let e2 = model.forward(comm, &[1; 33], 0).unwrap_err().to_string();
        Ok((e1, e2))
    });
    let (e1, e2) = errs.into_iter().next().unwrap().unwrap();
    assert!(
        e1.contains("token id 37 (position 1) is outside the vocabulary (vocab_size 37)"),
        "{e1}"
    );
    assert!(
        e2.contains("33 tokens is longer than the model's context (max_position_embeddings 32)"),
        "{e2}"
    );
    // TP degree larger than the number of heads.
    let e = ShardPlan::new(&Config::from_dir(&dir).unwrap().shapes(), 5, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("TP degree 5 is larger than the number of attention heads (4)"),
        "{e}"
    );
    // Wrong shape.
    let i = tensors
        .iter()
        .position(|x| x.0 == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    tensors[i].1 = vec![t.hidden, t.inter];
    write_safetensors(&dir.join("model.safetensors"), &tensors, true);
    let e = load_err(&dir, 2);
    assert!(
        e.contains("tensor model.layers.1.mlp.up_proj.weight in ")
            && e.contains("model.safetensors has shape [32, 40], expected [40, 32]"),
        "{e}"
    );
    // Missing tensor.
    tensors.remove(i);
    write_safetensors(&dir.join("model.safetensors"), &tensors, true);
    let e = load_err(&dir, 1);
    assert!(
        e.contains("tensor model.layers.1.mlp.up_proj.weight (expected shape [40, 32]) is missing"),
        "{e}"
    );
    // Untied model without lm_head.weight.
    let mut tensors = tiny_tensors(&t, 5);
    tensors.retain(|x| x.0 != "lm_head.weight");
    write_safetensors(&dir.join("model.safetensors"), &tensors, true);
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["tie_word_embeddings"] = json!(false);
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let e = load_err(&dir, 1);
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn sharded_checkpoint_with_index() {
    let t = SHAPES[0];
    let dir = tmpdir("index");
    let tensors = write_tiny(&dir, &t, 9);
    let ids = [5u32, 6, 7];
    let single: Vec<_> = (1..=2)
        .map(|w| run_tp(&dir, w, &ids, WeightDtype::Auto).remove(0).0)
        .collect();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), a, true);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), b, true);
    let mut map = serde_json::Map::new();
    for (n, _, _) in a {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, _, _) in b {
        map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for world in [1, 2] {
        let sharded = run_tp(&dir, world, &ids, WeightDtype::Auto).remove(0).0;
        assert_eq!(sharded, single[world - 1]);
    }
}

/// Before the fallible reserve this panicked ("capacity overflow") or aborted the process.
#[test]
fn a_kv_cache_too_large_is_an_error_with_its_size() {
    let t = SHAPES[0];
    let dir = tmpdir("kv-oom");
    write_tiny(&dir, &t, 5);
    let config = Config::from_dir(&dir).unwrap();
    let plan = ShardPlan::new(&config.shapes(), 1, 0).unwrap();
    let mut ck = Checkpoint::open(&dir).unwrap();
    let mut model =
        Qwen2::load(&mut ck, &config, &plan, WeightDtype::Auto, &mut |_, _| {}).unwrap();
    let e = format!("{:#}", model.reserve(1 << 56).unwrap_err());
    assert!(e.starts_with("KV cache: cannot allocate "), "{e}");
    assert!(e.contains(" bytes"), "{e}");
}
