//! Sampling: greedy, temperature, top-k, top-p; seeded and reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng }
    }

    /// Greedy: the pick is the argmax, which the device can take without the row.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 1e-5 || self.params.top_k == 1
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if self.is_greedy() {
            return argmax(logits);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cands.truncate(p.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|c| (c.1 - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let s: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, &x) in probs.iter().enumerate() {
            acc += x;
            if r < acc {
                return cands[i].0;
            }
        }
        cands[probs.len() - 1].0
    }
}

/// A step's logits brought to the host as far as the samplers need them: every row's
/// argmax is taken where the logits are (one u32 a row), and only the rows marked `full`
/// are copied whole: at batch 256 with a 50k vocabulary all rows would be 51 MB of f32
/// a step, most of it for greedy rows that need one index.
pub struct StepLogits {
    pub argmax: Vec<u32>,
    /// `Some` for the rows asked for in full.
    pub rows: Vec<Option<Vec<f32>>>,
}

pub fn fetch_logits(logits: &candle_core::Tensor, full: &[bool]) -> candle_core::Result<StepLogits> {
    use candle_core::Tensor;
    let n = logits.dim(0)?;
    if full.len() != n {
        candle_core::bail!("fetch_logits: {} row flags for {n} rows", full.len());
    }
    let argmax = crate::ops::argmax_rows(logits)?.to_vec1::<u32>()?;
    let want: Vec<u32> = (0..n as u32).filter(|&i| full[i as usize]).collect();
    let mut rows = vec![None; n];
    if !want.is_empty() {
        let picked = if want.len() == n {
            logits.to_vec2::<f32>()?
        } else {
            let idx = Tensor::new(want.as_slice(), logits.device())?;
            logits.index_select(&idx, 0)?.to_vec2::<f32>()?
        };
        for (i, r) in want.into_iter().zip(picked) {
            rows[i as usize] = Some(r);
        }
    }
    Ok(StepLogits { argmax, rows })
}

/// The greedy pick of one row: the op layer's definition, which `ops::argmax_rows` also
/// computes on the device.
pub use crate::ops::argmax::argmax;

/// A token's log-prob and its top alternatives (id, log-prob), best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` at `token`, with the `top` best alternatives.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max + logits.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let pos = best.partition_point(|&(_, y)| y >= x);
                best.insert(pos, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&x| x - lse),
        top: best.into_iter().map(|(i, x)| (i, x - lse)).collect(),
    }
}

/// `logits` with the `banned` tokens made unpickable (−∞): before a request's
/// `min_tokens`, its EOS and stop tokens.
pub fn mask_tokens(logits: &[f32], banned: impl IntoIterator<Item = u32>) -> Vec<f32> {
    let mut masked = logits.to_vec();
    for t in banned {
        if let Some(x) = masked.get_mut(t as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
    masked
}

#[cfg(test)]
mod tests {
    #[test]
    fn fetch_logits_copies_only_the_rows_asked_for() {
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::new(&[[0f32, 2.0, 1.0], [5.0, f32::NAN, 4.0], [-1.0, -2.0, -0.5]], &dev).unwrap();
        let f = fetch_logits(&t, &[false, true, false]).unwrap();
        assert_eq!(f.argmax, vec![1, 0, 2]);
        assert!(f.rows[0].is_none() && f.rows[2].is_none());
        assert_eq!(f.rows[1].as_ref().unwrap()[2], 4.0);
        assert!(fetch_logits(&t, &[true]).is_err());
    }

    use super::*;

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_bounds_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 3,
            seed: Some(7),
        };
        let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
        let xs: Vec<u32> = (0..100).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        let mut top: Vec<usize> = (0..50).collect();
        top.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
        assert!(xs.iter().all(|&x| top[..3].contains(&(x as usize))));
        let distinct: std::collections::HashSet<_> = xs.iter().collect();
        assert!(distinct.len() > 1, "temperature 1 should not be greedy");
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~88% of the mass: top_p 0.5 leaves only it.
        let logits = [5.0f32, 3.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            seed: Some(1),
        });
        assert!((0..200).all(|_| s.sample(&logits) == 0));
    }
}
