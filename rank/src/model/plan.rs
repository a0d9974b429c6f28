//! The sharding plan: which slice of every weight rank `r` of `N` owns (docs/DESIGN.md, "Tensor-parallel layout").
//!
//! Everything here is a pure function of (shapes, N, r), and this is the only place that decides
//! a split. Every split is a contiguous range, balanced so ranks differ by at most one unit:
//! rank r gets ⌈n/N⌉ units when r < n mod N, else ⌊n/N⌋.
//!
//! Query heads are split that way. Key/value heads are not split on their own: a rank holds
//! exactly the KV heads its query heads use (query head q uses KV head q / g, g = heads /
//! kv_heads), which is a contiguous range too. When N divides kv_heads the query ranges fall on
//! group boundaries and the KV heads are partitioned with no copies; otherwise the KV heads at a
//! boundary, or all of them when N > kv_heads, are replicated on the ranks that need them. Either
//! way attention never needs communication.

use std::ops::Range;

use anyhow::{bail, Result};

/// The model shapes the plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

/// Rank `rank`'s share of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub world: usize,
    pub rank: usize,
    /// Global query heads computed here.
    pub q_heads: Range<usize>,
    /// Global KV heads held here: exactly those of `q_heads`.
    pub kv_heads: Range<usize>,
    /// Columns of gate/up (rows of their weights) and of down_proj's input.
    pub intermediate: Range<usize>,
    /// Vocabulary rows of the embedding and lm_head.
    pub vocab: Range<usize>,
    /// Every rank's vocab shard padded to this many rows for the equal-size logits all-gather.
    pub vocab_padded: usize,
    /// Query heads per KV head.
    pub group: usize,
    pub head_dim: usize,
}

/// The contiguous, balanced share of `n` units that rank `r` of `world` gets.
pub fn split(n: usize, world: usize, r: usize) -> Range<usize> {
    let (base, rem) = (n / world, n % world);
    let start = r * base + r.min(rem);
    start..start + base + usize::from(r < rem)
}

impl ShardPlan {
    pub fn new(s: &Shapes, world: usize, rank: usize) -> Result<ShardPlan> {
        if world == 0 || rank >= world {
            bail!("rank {rank} out of range for {world} ranks");
        }
        if s.heads == 0 || s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
            bail!(
                "{} attention heads cannot be grouped over {} KV heads",
                s.heads,
                s.kv_heads
            );
        }
        if world > s.heads {
            bail!(
                "TP degree {world} is larger than the number of attention heads ({}): use at most {} ranks",
                s.heads,
                s.heads
            );
        }
        let group = s.heads / s.kv_heads;
        let q_heads = split(s.heads, world, rank);
        let kv_heads = q_heads.start / group..(q_heads.end - 1) / group + 1;
        Ok(ShardPlan {
            world,
            rank,
            q_heads,
            kv_heads,
            intermediate: split(s.intermediate, world, rank),
            vocab: split(s.vocab, world, rank),
            vocab_padded: s.vocab.div_ceil(world),
            group,
            head_dim: s.head_dim,
        })
    }

    /// Local index (into this rank's KV heads) of the KV head that local query head `i` uses.
    pub fn local_kv_of(&self, i: usize) -> usize {
        (self.q_heads.start + i) / self.group - self.kv_heads.start
    }

    /// Rows of q_proj (and its bias), columns of o_proj.
    pub fn q_rows(&self) -> Range<usize> {
        self.q_heads.start * self.head_dim..self.q_heads.end * self.head_dim
    }

    /// Rows of k_proj and v_proj (and their biases).
    pub fn kv_rows(&self) -> Range<usize> {
        self.kv_heads.start * self.head_dim..self.kv_heads.end * self.head_dim
    }

    /// Vocabulary range of rank `r` under this plan's world size (for reassembling logits).
    pub fn vocab_of(&self, r: usize, vocab: usize) -> Range<usize> {
        split(vocab, self.world, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(heads: usize, kv: usize, inter: usize, vocab: usize) -> Shapes {
        Shapes {
            hidden: heads * 4,
            heads,
            kv_heads: kv,
            head_dim: 4,
            intermediate: inter,
            vocab,
        }
    }

    fn covers_once(ranges: &[Range<usize>], n: usize) {
        let mut next = 0;
        for r in ranges {
            assert_eq!(r.start, next, "{ranges:?} of {n}");
            next = r.end;
        }
        assert_eq!(next, n, "{ranges:?} of {n}");
    }

    #[test]
    fn every_split_covers_once_and_kv_heads_are_local() {
        let mut combos = 0;
        for (heads, kv) in [
            (1, 1),
            (2, 1),
            (4, 2),
            (6, 2),
            (7, 7),
            (8, 8),
            (12, 2),
            (12, 4),
            (14, 2),
            (16, 4),
            (28, 4),
            (40, 8),
        ] {
            for (inter, vocab) in [(1, 1), (37, 100), (4864, 151936), (96, 152064)] {
                let s = shapes(heads, kv, inter.max(heads), vocab.max(heads));
                for n in 1..=heads {
                    let plans: Vec<ShardPlan> =
                        (0..n).map(|r| ShardPlan::new(&s, n, r).unwrap()).collect();
                    let q: Vec<_> = plans.iter().map(|p| p.q_heads.clone()).collect();
                    let i: Vec<_> = plans.iter().map(|p| p.intermediate.clone()).collect();
                    let v: Vec<_> = plans.iter().map(|p| p.vocab.clone()).collect();
                    covers_once(&q, s.heads);
                    covers_once(&i, s.intermediate);
                    covers_once(&v, s.vocab);
                    for p in &plans {
                        // Balanced: ceil or floor.
                        assert!(
                            p.q_heads.len() == s.heads / n
                                || p.q_heads.len() == s.heads.div_ceil(n)
                        );
                        assert!(p.vocab.len() <= p.vocab_padded);
                        assert!(!p.q_heads.is_empty());
                        // Every local q head's KV head is local, and every local KV head is used.
                        let g = s.heads / s.kv_heads;
                        for (li, qh) in p.q_heads.clone().enumerate() {
                            assert!(p.kv_heads.contains(&(qh / g)));
                            assert_eq!(p.kv_heads.start + p.local_kv_of(li), qh / g);
                        }
                        for kvh in p.kv_heads.clone() {
                            assert!(p.q_heads.clone().any(|qh| qh / g == kvh));
                        }
                        assert_eq!(p.q_rows().len(), p.q_heads.len() * s.head_dim);
                    }
                    // No KV head is replicated when N divides the KV heads.
                    if s.kv_heads.is_multiple_of(n) {
                        let kvr: Vec<_> = plans.iter().map(|p| p.kv_heads.clone()).collect();
                        covers_once(&kvr, s.kv_heads);
                    }
                    combos += 1;
                }
            }
        }
        assert!(combos > 400);
    }

    #[test]
    fn qwen_05b_at_4_ranks() {
        let s = shapes(14, 2, 4864, 151936);
        let p: Vec<ShardPlan> = (0..4).map(|r| ShardPlan::new(&s, 4, r).unwrap()).collect();
        assert_eq!(p[0].q_heads, 0..4);
        assert_eq!(p[1].q_heads, 4..8);
        assert_eq!(p[1].kv_heads, 0..2); // heads 4..7 use KV 0, head 7 uses KV 1
        assert_eq!(p[3].q_heads, 11..14);
        assert_eq!(p[3].kv_heads, 1..2);
        assert_eq!(p[0].vocab_padded, 37984);
    }

    #[test]
    fn too_many_ranks_is_an_error() {
        let e = ShardPlan::new(&shapes(4, 2, 8, 8), 5, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TP degree 5 is larger than the number of attention heads (4)"),
            "{e}"
        );
    }
}
