//! Picking the next token from logits: greedy, or temperature / top-k / top-p sampling with a
//! seeded generator of our own (so a seed gives the same text whatever crate versions are used).

use anyhow::{bail, Result};

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, passes BigCrush, and fully specified here.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// The highest logit (the lowest id among equal ones, like torch.argmax).
    Greedy,
    /// Softmax of logits / temperature, cut to the `top_k` best and then to the smallest set whose
    /// probability reaches `top_p` (the order transformers applies its warpers in), then a draw.
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: f32,
    },
}

/// A strategy plus the generator state; one per generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub strategy: Strategy,
    rng: Rng,
}

impl Sampler {
    pub fn new(strategy: Strategy, seed: u64) -> Sampler {
        Sampler {
            strategy,
            rng: Rng::new(seed),
        }
    }

    pub fn greedy() -> Sampler {
        Sampler::new(Strategy::Greedy, 0)
    }

    /// The next token id from one position's logits (the full vocabulary).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        match self.strategy {
            Strategy::Greedy => argmax(logits),
            Strategy::Sample {
                temperature,
                top_k,
                top_p,
            } => {
                if temperature.is_nan() || temperature <= 0.0 {
                    return argmax(logits);
                }
                let u = self.rng.next_f64();
                sample_with(logits, temperature, top_k, top_p, u)
            }
        }
    }
}

/// Index of the largest logit; NaN never wins; the first of equal maxima wins.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    match best {
        Some((i, _)) => Ok(i as u32),
        None => bail!("no token to pick: the {} logits are all NaN", logits.len()),
    }
}

/// One draw with uniform `u` in [0, 1). Candidates are ordered by (logit descending, id
/// ascending), a total order, so the result is a pure function of the inputs.
fn sample_with(
    logits: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: f32,
    u: f64,
) -> Result<u32> {
    let finite = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = logits
        .iter()
        .copied()
        .map(finite)
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        bail!(
            "no token to pick: every one of the {} logits is -inf or NaN",
            logits.len()
        );
    }
    let inv_t = 1.0 / temperature as f64;
    let weight = |x: f32| ((finite(x) as f64 - max as f64) * inv_t).exp();
    let by_rank = |a: &u32, b: &u32| {
        let (xa, xb) = (finite(logits[*a as usize]), finite(logits[*b as usize]));
        xb.total_cmp(&xa).then(a.cmp(b))
    };

    let k = top_k.unwrap_or(usize::MAX).min(logits.len());
    if k == logits.len() && top_p >= 1.0 {
        // Plain temperature sampling: no ordering needed, walk the vocabulary in id order.
        let total: f64 = logits.iter().map(|&x| weight(x)).sum();
        let target = u * total;
        let mut acc = 0.0;
        let mut last = 0u32;
        for (i, &x) in logits.iter().enumerate() {
            let w = weight(x);
            if w > 0.0 {
                acc += w;
                last = i as u32;
                if acc > target {
                    return Ok(i as u32);
                }
            }
        }
        return Ok(last);
    }

    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    if k < ids.len() {
        // Like transformers' TopK warper, keep every token tied with the k-th logit.
        ids.select_nth_unstable_by(k - 1, by_rank);
        let kth = finite(logits[ids[k - 1] as usize]);
        ids.retain(|&i| finite(logits[i as usize]) >= kth);
    }
    ids.sort_unstable_by(by_rank);
    let weights: Vec<f64> = ids.iter().map(|&i| weight(logits[i as usize])).collect();
    let total: f64 = weights.iter().sum();
    let mut keep = weights.len();
    if top_p < 1.0 {
        // The smallest prefix whose probability reaches top_p (at least one token).
        let mut acc = 0.0;
        for (n, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= top_p as f64 {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..keep].iter().sum();
    let target = u * kept_total;
    let mut acc = 0.0;
    for (n, w) in weights[..keep].iter().enumerate() {
        acc += w;
        if acc > target {
            return Ok(ids[n]);
        }
    }
    Ok(ids[keep - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_known_values() {
        // Reference outputs of SplitMix64 seeded with 1234567.
        let mut r = Rng::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            vec![
                6457827717110365317,
                3203168211198807973,
                9817491932198370423
            ]
        );
        let mut r = Rng::new(7);
        for _ in 0..1000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }

    #[test]
    fn argmax_first_max_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]).unwrap(), 1);
        assert_eq!(argmax(&[f32::NAN, -5.0, f32::NAN]).unwrap(), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]).unwrap(), 0);
        assert!(argmax(&[f32::NAN]).is_err());
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 2.0, 1.9, -3.0, 0.0];
        for seed in 0..50 {
            let mut s = Sampler::new(
                Strategy::Sample {
                    temperature: 1.5,
                    top_k: Some(1),
                    top_p: 1.0,
                },
                seed,
            );
            assert_eq!(s.sample(&logits).unwrap(), 1);
            let mut s = Sampler::new(
                Strategy::Sample {
                    temperature: 1.5,
                    top_k: None,
                    top_p: 1e-6,
                },
                seed,
            );
            assert_eq!(s.sample(&logits).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [3.0, 2.9, 2.8, -10.0, 2.7, 0.0];
        let mut seen = [0usize; 6];
        let mut s = Sampler::new(
            Strategy::Sample {
                temperature: 1.0,
                top_k: Some(3),
                top_p: 1.0,
            },
            42,
        );
        for _ in 0..3000 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] > 0, "{seen:?}");
        assert_eq!(seen[3] + seen[4] + seen[5], 0, "{seen:?}");

        // p = softmax([3, 2.9, 2.8, ...]): the first two hold < 0.6 of the mass, three > 0.6.
        let mut seen = [0usize; 6];
        let mut s = Sampler::new(
            Strategy::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: 0.6,
            },
            43,
        );
        for _ in 0..3000 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] > 0, "{seen:?}");
        assert_eq!(seen[3] + seen[4] + seen[5], 0, "{seen:?}");
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        // Two tokens with probabilities 0.25 / 0.75 after temperature 2: logits ln(1) and ln(3)*2.
        let logits = [0.0, 2.0 * 3f32.ln()];
        let mut s = Sampler::new(
            Strategy::Sample {
                temperature: 2.0,
                top_k: None,
                top_p: 1.0,
            },
            9,
        );
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits).unwrap() == 1).count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn same_seed_same_draws_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let strategy = Strategy::Sample {
            temperature: 1.0,
            top_k: Some(40),
            top_p: 0.95,
        };
        let draw = |seed| {
            let mut s = Sampler::new(strategy.clone(), seed);
            (0..64)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn all_masked_is_an_error() {
        let mut s = Sampler::new(
            Strategy::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: 0.9,
            },
            1,
        );
        assert!(s.sample(&[f32::NEG_INFINITY, f32::NAN]).is_err());
    }
}
