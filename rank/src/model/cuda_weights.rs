//! What the device model uploads for one rank (issue 20): every tensor the CPU [`crate::Qwen2`]
//! loads, with the same names, full shapes and [`ShardPlan`] slices, in the same order. The
//! test `device_tensors_are_what_the_cpu_model_loads` records the CPU loader's requests and
//! compares, so the two cannot drift apart.
//!
//! Types on the device: matrices (projections, embedding, LM head) keep the checkpoint's type
//! after `--dtype` (bf16 for cuBLAS bf16 × bf16 → f32 with f32 accumulation, f32 for an f32
//! GEMM); vectors (norm weights, q/k/v biases) are loaded as f32 by the CPU path, and so are they
//! on the device. The embedding table is also uploaded in f32 for `embedding_gather` (the CPU
//! lookup widens each row to f32; with tied embeddings the LM head keeps its matrix copy).

use crate::model::config::Config;
use crate::model::loader::Slice;
use crate::model::plan::ShardPlan;

/// A matrix (cuBLAS operand / embedding table) or a vector (norm weight, bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Matrix,
    Vector,
}

/// One tensor to load and upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub slice: Slice,
    pub kind: Kind,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize], slice: Slice, kind: Kind) -> TensorSpec {
        TensorSpec {
            name,
            shape: shape.to_vec(),
            slice,
            kind,
        }
    }

    /// Elements on this rank.
    pub fn local_len(&self) -> usize {
        let full: usize = self.shape.iter().product();
        let rows = self.shape[0];
        match &self.slice {
            Slice::All => full,
            Slice::Rows(r) => full / rows * r.len(),
            Slice::Cols(c) => rows * c.len(),
        }
    }
}

fn layer(c: &Config, plan: &ShardPlan, i: usize, out: &mut Vec<TensorSpec>) {
    use Kind::*;
    let (h, d) = (c.hidden_size, c.head_dim);
    let (nq, nkv, inter) = (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
    );
    let p = |s: &str| format!("model.layers.{i}.{s}");
    let mut push = |n: &str, shape: &[usize], slice: Slice, kind| {
        out.push(TensorSpec::new(p(n), shape, slice, kind))
    };
    push("input_layernorm.weight", &[h], Slice::All, Vector);
    for (proj, rows, range) in [
        ("q", nq * d, plan.q_rows()),
        ("k", nkv * d, plan.kv_rows()),
        ("v", nkv * d, plan.kv_rows()),
    ] {
        let name = format!("self_attn.{proj}_proj");
        push(
            &format!("{name}.weight"),
            &[rows, h],
            Slice::Rows(range.clone()),
            Matrix,
        );
        push(&format!("{name}.bias"), &[rows], Slice::Rows(range), Vector);
    }
    push(
        "self_attn.o_proj.weight",
        &[h, nq * d],
        Slice::Cols(plan.q_rows()),
        Matrix,
    );
    push("post_attention_layernorm.weight", &[h], Slice::All, Vector);
    let cols = plan.intermediate.clone();
    push(
        "mlp.gate_proj.weight",
        &[inter, h],
        Slice::Rows(cols.clone()),
        Matrix,
    );
    push(
        "mlp.up_proj.weight",
        &[inter, h],
        Slice::Rows(cols.clone()),
        Matrix,
    );
    push(
        "mlp.down_proj.weight",
        &[h, inter],
        Slice::Cols(cols),
        Matrix,
    );
}

/// Every tensor of this rank's shard, in the CPU loader's order.
pub fn device_tensors(c: &Config, plan: &ShardPlan) -> Vec<TensorSpec> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let vocab = Slice::Rows(plan.vocab.clone());
    let name = |s: &str| s.to_string();
    let mut out = vec![TensorSpec::new(
        name("model.embed_tokens.weight"),
        &[v, h],
        vocab.clone(),
        Kind::Matrix,
    )];
    for i in 0..c.num_hidden_layers {
        layer(c, plan, i, &mut out);
    }
    out.push(TensorSpec::new(
        name("model.norm.weight"),
        &[h],
        Slice::All,
        Kind::Vector,
    ));
    if !c.tie_word_embeddings {
        out.push(TensorSpec::new(
            name("lm_head.weight"),
            &[v, h],
            vocab,
            Kind::Matrix,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::WeightSource;
    use crate::model::loader::{Checkpoint, WeightDtype, Weights};
    use crate::tests::{tmpdir, write_tiny, Tiny};
    use crate::Qwen2;
    use anyhow::Result;

    /// Forwards to a checkpoint and records each request.
    struct Recorder<'a> {
        ck: &'a mut Checkpoint,
        seen: Vec<(String, Vec<usize>, Slice)>,
    }

    impl WeightSource for Recorder<'_> {
        fn load(&mut self, n: &str, s: &[usize], sl: Slice, d: WeightDtype) -> Result<Weights> {
            self.seen.push((n.to_string(), s.to_vec(), sl.clone()));
            self.ck.load(n, s, sl, d)
        }
        fn load_f32(&mut self, n: &str, s: &[usize], sl: Slice) -> Result<Vec<f32>> {
            self.seen.push((n.to_string(), s.to_vec(), sl.clone()));
            self.ck.load_f32(n, s, sl)
        }
    }

    #[test]
    fn device_tensors_are_what_the_cpu_model_loads() {
        for tied in [false, true] {
            let t = Tiny {
                hidden: 16,
                heads: 4,
                kv: 2,
                head_dim: 4,
                inter: 24,
                vocab: 50,
                layers: 2,
                tied,
                bf16: false,
            };
            let dir = tmpdir("cuda-weights");
            write_tiny(&dir, &t, 1);
            let config = Config::from_dir(&dir).unwrap();
            for (world, rank) in [(1, 0), (2, 0), (2, 1)] {
                let plan = ShardPlan::new(&config.shapes(), world, rank).unwrap();
                let mut ck = Checkpoint::open(&dir).unwrap();
                let mut rec = Recorder {
                    ck: &mut ck,
                    seen: Vec::new(),
                };
                Qwen2::load(&mut rec, &config, &plan, WeightDtype::Auto, &mut |_, _| {}).unwrap();
                let specs = device_tensors(&config, &plan);
                let want: Vec<_> = specs
                    .iter()
                    .map(|s| (s.name.clone(), s.shape.clone(), s.slice.clone()))
                    .collect();
                assert_eq!(rec.seen, want, "tied {tied}, rank {rank} of {world}");
            }
        }
    }

    #[test]
    fn local_len_follows_the_slice() {
        let s = |shape: &[usize], slice| TensorSpec::new("w".into(), shape, slice, Kind::Matrix);
        assert_eq!(s(&[10, 4], Slice::All).local_len(), 40);
        assert_eq!(s(&[10, 4], Slice::Rows(2..5)).local_len(), 12);
        assert_eq!(s(&[10, 4], Slice::Cols(1..3)).local_len(), 20);
        assert_eq!(s(&[10], Slice::Rows(0..5)).local_len(), 5);
    }
}
