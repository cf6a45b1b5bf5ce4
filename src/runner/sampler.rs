//! Sampling: logit bias, repetition / frequency / presence penalties, greedy,
//! temperature, top-k, min-p, top-p; seeded and reproducible.
//!
//! The order is vLLM's: the logit bias is added, then the penalties are applied
//! (repetition over prompt and output tokens, then frequency and presence over output
//! tokens), then the engine's `min_tokens` masking, then temperature, top-k, min-p and
//! top-p on the scaled row. Greedy picks take the argmax of the biased, penalised row.

use crate::ops::{LogitAdjust, RowSample};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustc_hash::{FxHashMap, FxHashSet};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 0 keeps every token; else tokens whose probability is below `min_p` times the
    /// most likely token's are dropped.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// Added to the logits of these tokens (each id at most once).
    pub logit_bias: Vec<(u32, f32)>,
    /// Subtracted once from the logit of every token already generated (0: off).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (0: off).
    pub frequency_penalty: f32,
    /// Tokens of the prompt or the output: a positive logit is divided by it, a
    /// negative one multiplied (1: off).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            logit_bias: Vec::new(),
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Any penalty is on: the sampler must know the tokens seen.
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// The row is changed before sampling (bias or penalties), so the device's argmax
    /// of the raw row may not be the pick.
    pub fn adjusts_logits(&self) -> bool {
        !self.logit_bias.is_empty() || self.has_penalties()
    }
}

/// The tokens a request's penalties read: how often each was generated, and which
/// appeared in the prompt or the output.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    output: FxHashMap<u32, u32>,
    seen: FxHashSet<u32>,
}

impl TokenHistory {
    pub fn new(prompt: &[u32]) -> Self {
        TokenHistory {
            output: FxHashMap::default(),
            seen: prompt.iter().copied().collect(),
        }
    }

    /// One generated token.
    pub fn push(&mut self, token: u32) {
        *self.output.entry(token).or_insert(0) += 1;
        self.seen.insert(token);
    }
}

/// Adds each bias to its token's logit (ids outside the row are ignored: validation
/// keeps them inside the vocabulary).
pub fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(t, b) in bias {
        if let Some(x) = logits.get_mut(t as usize) {
            *x += b;
        }
    }
}

/// vLLM's penalties: repetition over prompt and output tokens (positive logits divided,
/// negative multiplied), then `frequency × count` and `presence × (count > 0)`
/// subtracted for output tokens.
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, h: &TokenHistory) {
    if p.repetition_penalty != 1.0 {
        let r = p.repetition_penalty;
        for &t in &h.seen {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = if *x > 0.0 { *x / r } else { *x * r };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&t, &n) in &h.output {
            if let Some(x) = logits.get_mut(t as usize) {
                *x -= p.frequency_penalty * n as f32 + p.presence_penalty;
            }
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The key of the device's draws ([`Sampler::device_row`]): from the seed when
    /// there is one.
    draw_key: u64,
    /// Kept only while a penalty reads it.
    history: Option<TokenHistory>,
}

impl Sampler {
    /// A sampler whose penalties see no prompt tokens (see [`Sampler::with_prompt`]).
    pub fn new(params: SamplingParams) -> Self {
        Self::with_prompt(params, &[])
    }

    /// A sampler for a request with this prompt: the repetition penalty counts its tokens.
    pub fn with_prompt(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let history = params.has_penalties().then(|| TokenHistory::new(prompt));
        let draw_key = match params.seed {
            Some(s) => splitmix64(s ^ 0x5EED_D4A7_0000_0001),
            None => rand::random(),
        };
        Sampler {
            params,
            rng,
            draw_key,
            history,
        }
    }

    /// Greedy: the pick is the argmax (of the adjusted row when [`Sampler::adjusts_logits`]).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 1e-5 || self.params.top_k == 1
    }

    /// Whether a penalty reads the tokens generated so far.
    pub fn has_penalties(&self) -> bool {
        self.params.has_penalties()
    }

    /// Whether [`Sampler::adjust`] changes the row: the raw row's argmax is then not enough.
    pub fn adjusts_logits(&self) -> bool {
        self.params.adjusts_logits()
    }

    /// The logit bias and the penalties, in place.
    pub fn adjust(&self, logits: &mut [f32]) {
        apply_logit_bias(logits, &self.params.logit_bias);
        if let Some(h) = &self.history {
            apply_penalties(logits, &self.params, h);
        }
    }

    /// Records a generated token (the penalties count it from the next pick on).
    pub fn accept(&mut self, token: u32) {
        if let Some(h) = self.history.as_mut() {
            h.push(token);
        }
    }

    /// Pick number `pick` (0 for the first generated token) as the device samples it
    /// ([`crate::ops::sample_rows`]): the request's parameters, the pick's draw, and its
    /// logit bias, penalties and the `banned` tokens as sparse adjustments of logits row
    /// `row`. The same distribution as [`Sampler::adjust`] then [`Sampler::sample`]; the
    /// pick for a given draw may differ (ties at a threshold are kept, and the draw walks
    /// the row in index order). The draw depends on the seed and `pick` only, so a step
    /// prepared twice (launched ahead, then run after all) draws the same.
    pub fn device_row(&self, row: u32, pick: usize, banned: impl IntoIterator<Item = u32>) -> RowSample {
        let p = &self.params;
        let mut adjust: FxHashMap<u32, LogitAdjust> = FxHashMap::default();
        fn of(adjust: &mut FxHashMap<u32, LogitAdjust>, t: u32) -> &mut LogitAdjust {
            adjust.entry(t).or_insert_with(|| LogitAdjust::none(t))
        }
        for &(t, b) in &p.logit_bias {
            of(&mut adjust, t).bias += b;
        }
        if let Some(h) = &self.history {
            if p.repetition_penalty != 1.0 {
                for &t in &h.seen {
                    of(&mut adjust, t).rep = p.repetition_penalty;
                }
            }
            if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
                for (&t, &n) in &h.output {
                    of(&mut adjust, t).sub += p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
        for t in banned {
            of(&mut adjust, t).sub = f32::INFINITY;
        }
        let greedy = self.is_greedy();
        // 24 random bits: every value exact in an f32 below 1.
        let uniform = (splitmix64(self.draw_key ^ (pick as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 40) as f32
            / (1u64 << 24) as f32;
        RowSample {
            row,
            temperature: if greedy { 0.0 } else { p.temperature },
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            uniform,
            adjust: adjust.into_values().collect(),
        }
    }

    /// Samples from a row already [`Sampler::adjust`]ed (and masked).
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
        if p.min_p > 0.0 {
            // Relative to the best token (probs[0] is 1 before normalizing): the same set
            // whether taken before or after top-k, as both keep a prefix of the sorted row.
            let keep = probs.partition_point(|&x| x >= p.min_p);
            probs.truncate(keep.max(1));
        }
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

/// SplitMix64's output function: a well-mixed u64 of any u64.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A step's logits brought to the host as far as the samplers need them: every row's
/// argmax is taken where the logits are (one u32 a row), and only the rows marked `full`
/// are copied whole: at batch 256 with a 50k vocabulary all rows would be 51 MB of f32
/// a step, most of it for greedy rows that need one index.
pub struct StepLogits {
    /// Each row's argmax; for a launched decode step, each row's device pick.
    pub argmax: Vec<u32>,
    /// `Some` for the rows asked for in full.
    pub rows: Vec<Option<Vec<f32>>>,
    /// `Some` for the rows sampled on the device ([`crate::ops::sample_rows`]): the pick.
    pub sampled: Vec<Option<u32>>,
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
    Ok(StepLogits {
        argmax,
        rows,
        sampled: vec![None; n],
    })
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
            ..Default::default()
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
            ..Default::default()
        });
        assert!((0..200).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn logit_bias_adds_to_the_named_tokens_only() {
        let mut row = [1.0f32, -2.0, 0.5, f32::NEG_INFINITY];
        apply_logit_bias(&mut row, &[(1, 100.0), (2, -0.5), (3, 5.0), (9, 1.0)]);
        assert_eq!(row, [1.0, 98.0, 0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn penalties_follow_vllm_exactly() {
        // Prompt [0, 1]; output 2, 2, 3: repetition on 0..=3, frequency/presence on 2 and 3.
        let mut h = TokenHistory::new(&[0, 1]);
        for t in [2, 2, 3] {
            h.push(t);
        }
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Default::default()
        };
        let mut row = [4.0f32, -1.0, 3.0, 1.0, 7.0];
        apply_penalties(&mut row, &p, &h);
        // 0: 4/2; 1: -1*2; 2: 3/2 - 0.5*2 - 0.25; 3: 1/2 - 0.5 - 0.25; 4: untouched.
        assert_eq!(row, [2.0, -2.0, 0.25, -0.25, 7.0]);
        // Frequency and presence read output tokens only, never the prompt.
        let p = SamplingParams {
            frequency_penalty: 1.0,
            presence_penalty: 1.0,
            ..Default::default()
        };
        let mut row = [4.0f32, -1.0, 3.0, 1.0, 7.0];
        apply_penalties(&mut row, &p, &h);
        assert_eq!(row, [4.0, -1.0, 0.0, -1.0, 7.0]);
        // Negative penalties reward repeats.
        let p = SamplingParams {
            presence_penalty: -2.0,
            ..Default::default()
        };
        let mut row = [0.0f32; 5];
        apply_penalties(&mut row, &p, &h);
        assert_eq!(row, [0.0, 0.0, 2.0, 2.0, 0.0]);
    }

    #[test]
    fn sampler_counts_its_own_output_and_the_prompt() {
        let mut s = Sampler::with_prompt(
            SamplingParams {
                frequency_penalty: 1.0,
                repetition_penalty: 4.0,
                ..Default::default()
            },
            &[1],
        );
        assert!(s.adjusts_logits() && s.is_greedy());
        let mut row = vec![3.0f32, 8.0, 2.5];
        s.adjust(&mut row);
        assert_eq!(row, [3.0, 2.0, 2.5]);
        assert_eq!(s.sample(&row), 0);
        s.accept(0);
        let mut row = vec![3.0f32, 8.0, 2.5];
        s.adjust(&mut row);
        // Token 0: 3/4 - 1.
        assert_eq!(row, [-0.25, 2.0, 2.5]);
        assert_eq!(s.sample(&row), 2);
        assert!(!Sampler::new(SamplingParams::default()).adjusts_logits());
        let biased = SamplingParams {
            logit_bias: vec![(0, 1.0)],
            ..Default::default()
        };
        assert!(Sampler::new(biased).adjusts_logits());
    }

    #[test]
    fn min_p_drops_tokens_below_its_share_of_the_best() {
        // Probabilities relative to the best at temperature 1: 1, e^-1 ≈ 0.37, e^-2 ≈ 0.14,
        // e^-3 ≈ 0.05. min_p 0.2 keeps tokens 0 and 1 only; 0.5 keeps token 0 only.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let sample = |min_p: f32| -> std::collections::BTreeSet<u32> {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                min_p,
                seed: Some(3),
                ..Default::default()
            });
            (0..2000).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(sample(0.2), [0, 1].into());
        assert_eq!(sample(0.5), [0].into());
        assert_eq!(sample(0.0), [0, 1, 2, 3].into());
        // Temperature first: at 2 the ratios are e^-0.5, e^-1, e^-1.5 (≈ 0.61, 0.37, 0.22).
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            min_p: 0.3,
            seed: Some(4),
            ..Default::default()
        });
        let picked: std::collections::BTreeSet<u32> = (0..2000).map(|_| s.sample(&logits)).collect();
        assert_eq!(picked, [0, 1, 2].into());
    }

    #[test]
    fn device_rows_carry_the_adjustments_and_a_draw_of_the_seed_and_pick_only() {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            seed: Some(9),
            logit_bias: vec![(3, 2.0)],
            frequency_penalty: 0.5,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::with_prompt(params.clone(), &[1]);
        s.accept(3);
        s.accept(3);
        let r = s.device_row(4, 2, [7]);
        assert_eq!((r.row, r.top_k, r.temperature), (4, 5, 0.7));
        let mut adjust = r.adjust.clone();
        adjust.sort_by_key(|a| a.token);
        let entry = |token, bias, rep, sub| LogitAdjust { token, bias, rep, sub };
        assert_eq!(
            adjust,
            vec![
                entry(1, 0.0, 2.0, 0.0),
                entry(3, 2.0, 2.0, 1.0),
                entry(7, 0.0, 1.0, f32::INFINITY)
            ]
        );
        // The device's adjustment is the host's: (x + bias), repetition, then subtraction.
        let mut row = vec![0.5f32, 4.0, -1.0, 3.0, 0.0, 0.0, 0.0, 9.0];
        let mut host = row.clone();
        s.adjust(&mut host);
        for a in &adjust {
            let x = &mut row[a.token as usize];
            let v = *x + a.bias;
            *x = if a.rep != 1.0 {
                if v > 0.0 {
                    v / a.rep
                } else {
                    v * a.rep
                }
            } else {
                v
            } - a.sub;
        }
        assert_eq!(&row[..7], &host[..7]);
        // The draw: the same for the same seed and pick, whatever was drawn before.
        let fresh = Sampler::with_prompt(params.clone(), &[1]);
        assert_eq!(fresh.device_row(0, 2, []).uniform, r.uniform);
        assert_ne!(fresh.device_row(0, 3, []).uniform, r.uniform);
        let other = Sampler::new(SamplingParams {
            seed: Some(10),
            ..params
        });
        assert_ne!(other.device_row(0, 2, []).uniform, r.uniform);
        assert!((0.0..1.0).contains(&r.uniform));
        // Greedy rows sample at temperature 0 (the kernel's argmax).
        assert_eq!(
            Sampler::new(SamplingParams::default()).device_row(0, 0, []).temperature,
            0.0
        );
    }

    #[test]
    fn seeded_sampling_with_penalties_and_bias_is_reproducible() {
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            min_p: 0.01,
            seed: Some(42),
            logit_bias: vec![(3, 2.0), (7, -1.0)],
            presence_penalty: 0.3,
            frequency_penalty: 0.2,
            repetition_penalty: 1.3,
            ..Default::default()
        };
        let base: Vec<f32> = (0..32).map(|i| (i as f32 * 0.71).cos() * 2.0).collect();
        let run = || {
            let mut s = Sampler::with_prompt(params.clone(), &[1, 2, 3]);
            (0..64)
                .map(|_| {
                    let mut row = base.clone();
                    s.adjust(&mut row);
                    let t = s.sample(&row);
                    s.accept(t);
                    t
                })
                .collect::<Vec<u32>>()
        };
        let a = run();
        assert_eq!(a, run());
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 4, "penalties should spread the picks: {a:?}");
    }
}
