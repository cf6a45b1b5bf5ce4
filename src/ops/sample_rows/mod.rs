//! `sample_rows`: one token for each of a step's sampled logits rows, taken where the
//! logits are, so that a sampled request costs a u32 of copy, not its whole row.
//!
//! Per row: sparse adjustments ([`LogitAdjust`]: logit bias, penalties, banned tokens)
//! first; then a greedy row takes the first maximum, as [`argmax`](super::argmax::argmax);
//! a sampled row keeps the tokens at or above three thresholds on [`order_key`] (top-k
//! by count, ties kept; min-p against the best token; top-p by probability mass, the
//! smallest set from the top holding `top_p` of it) and picks the token where the
//! running mass, in index order, passes `uniform × total`. Masses are fixed-point
//! integers ([`mass_of`]), so every sum is exact whatever its order: the kernel's
//! threads and this reference reach the same thresholds, and a row's pick depends on
//! nothing but the row and its draw — not on the batch.
//!
//! This CPU path is the reference `kernels/sample_rows.cu` must match.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
mod cuda;

/// A change to one token's logit before sampling: `bias` is added, then a positive
/// logit is divided by `rep` and a negative one multiplied (1: off), then `sub` is
/// subtracted (+∞ bans the token).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitAdjust {
    pub token: u32,
    pub bias: f32,
    pub rep: f32,
    pub sub: f32,
}

impl LogitAdjust {
    /// No change to `token`'s logit: the start an adjustment is built up from.
    pub fn none(token: u32) -> Self {
        LogitAdjust {
            token,
            bias: 0.0,
            rep: 1.0,
            sub: 0.0,
        }
    }

    fn apply(&self, x: f32) -> f32 {
        let v = x + self.bias;
        let v = if self.rep != 1.0 {
            if v > 0.0 {
                v / self.rep
            } else {
                v * self.rep
            }
        } else {
            v
        };
        v - self.sub
    }
}

/// How one logits row is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSample {
    /// The row of the logits tensor.
    pub row: u32,
    /// At most 1e-5: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// The request's draw for this pick, in [0, 1).
    pub uniform: f32,
    /// At most one per token.
    pub adjust: Vec<LogitAdjust>,
}

impl RowSample {
    /// Row `row`'s first maximum, unadjusted: the device's argmax pick.
    pub fn greedy(row: u32) -> Self {
        RowSample {
            row,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            uniform: 0.0,
            adjust: Vec::new(),
        }
    }
}

/// Floats ordered as unsigned integers: a larger logit has a larger key.
pub fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The best token's mass: 2^40. A row of 2^17 tokens sums to under 2^57.
const MASS_ONE: f64 = (1u64 << 40) as f64;

/// `exp(x / T − best / T)` in fixed point, the best token at 2^40.
fn mass_of(x: f32, best_scaled: f32, inv_t: f32) -> u64 {
    let w = (x * inv_t - best_scaled).exp();
    (w as f64 * MASS_ONE) as u64
}

/// The largest key `t` whose kept elements (finite, key ≥ `floor`) with key ≥ `t` weigh
/// at least `target` (weights: 1 each, or `mass`). Below every kept key when they all
/// weigh less.
fn threshold(keys: &[(u32, u64)], floor: u32, by_mass: bool, target: u64) -> u32 {
    // The kernel finds it by radix select; sorting gives the same key.
    let mut kept: Vec<(u32, u64)> = keys.iter().copied().filter(|&(k, _)| k >= floor).collect();
    kept.sort_unstable_by_key(|&(k, _)| std::cmp::Reverse(k));
    let mut acc = 0u64;
    for (k, m) in kept {
        acc += if by_mass { m } else { 1 };
        if acc >= target {
            return k;
        }
    }
    // The radix walk ends on an all-zero prefix when the target is never reached.
    0
}

/// One row's pick (the reference of the kernel's CTA).
pub fn sample_row(row: &[f32], s: &RowSample) -> u32 {
    let adjusted;
    let x: &[f32] = if s.adjust.is_empty() {
        row
    } else {
        let mut w = row.to_vec();
        for a in &s.adjust {
            if let Some(v) = w.get_mut(a.token as usize) {
                *v = a.apply(*v);
            }
        }
        adjusted = w;
        &adjusted
    };
    let first_best = super::argmax::argmax(x);
    let best = x.get(first_best as usize).copied().unwrap_or(f32::NEG_INFINITY);
    if s.temperature <= 1e-5 || s.top_k == 1 || !best.is_finite() {
        return first_best;
    }
    let inv_t = 1.0 / s.temperature;
    let best_scaled = best * inv_t;
    let keys: Vec<(u32, u64)> = x
        .iter()
        .map(|&v| {
            if v.is_finite() {
                (order_key(v), mass_of(v, best_scaled, inv_t))
            } else {
                (0, 0)
            }
        })
        .collect();
    let finite = |i: usize| x[i].is_finite();
    let kept_keys: Vec<(u32, u64)> = (0..x.len()).filter(|&i| finite(i)).map(|i| keys[i]).collect();
    let mut floor = if s.top_k > 0 {
        threshold(&kept_keys, 0, false, s.top_k as u64)
    } else {
        0
    };
    let min_mass = if s.min_p > 0.0 {
        (s.min_p as f64 * MASS_ONE) as u64
    } else {
        0
    };
    let min_p_floor = kept_keys
        .iter()
        .filter(|&&(k, m)| k >= floor && m >= min_mass)
        .map(|&(k, _)| k)
        .min()
        .unwrap_or(u32::MAX);
    floor = floor.max(min_p_floor);
    let total_over = |floor: u32| -> u64 {
        kept_keys
            .iter()
            .filter(|&&(k, m)| k >= floor && m >= min_mass)
            .map(|&(_, m)| m)
            .sum()
    };
    let mut total = total_over(floor);
    if s.top_p < 1.0 && total > 0 {
        let target = ((s.top_p as f64 * total as f64) as u64).max(1);
        floor = floor.max(threshold(&kept_keys, floor, true, target));
        total = kept_keys.iter().filter(|&&(k, _)| k >= floor).map(|&(_, m)| m).sum();
    }
    if total == 0 {
        return first_best;
    }
    let target = ((s.uniform as f64 * total as f64) as u64).min(total - 1);
    let mut acc = 0u64;
    for (i, &(k, m)) in keys.iter().enumerate() {
        if !finite(i) || k < floor {
            continue;
        }
        acc += m;
        if acc > target {
            return i as u32;
        }
    }
    first_best
}

/// `[rows, 12]` u32 of the kernel's `RowSpec`s and `[entries, 4]` of its `Entry`s: the
/// floats as their bits.
struct Packed {
    specs: Vec<u32>,
    entries: Vec<u32>,
    scratch_rows: usize,
}

pub(crate) const SPEC_WORDS: usize = 12;

fn pack(rows: &[RowSample]) -> Packed {
    let mut specs = Vec::with_capacity(rows.len() * SPEC_WORDS);
    let mut entries = Vec::new();
    let mut scratch_rows = 0;
    for r in rows {
        let begin = (entries.len() / 4) as u32;
        for a in &r.adjust {
            entries.extend([a.token, a.bias.to_bits(), a.rep.to_bits(), a.sub.to_bits()]);
        }
        let end = (entries.len() / 4) as u32;
        let scratch_row = scratch_rows as u32;
        if end > begin {
            scratch_rows += 1;
        }
        specs.extend([
            r.row,
            r.top_k,
            r.temperature.to_bits(),
            r.top_p.to_bits(),
            r.min_p.to_bits(),
            r.uniform.to_bits(),
            begin,
            end,
            scratch_row,
            0,
            0,
            0,
        ]);
    }
    if entries.is_empty() {
        // The kernel takes a buffer even when no row reads it.
        entries.extend([0, 0, 1f32.to_bits(), 0]);
    }
    Packed {
        specs,
        entries,
        scratch_rows,
    }
}

fn unpack(specs: &[u32], entries: &[u32]) -> Vec<RowSample> {
    specs
        .chunks_exact(SPEC_WORDS)
        .map(|s| RowSample {
            row: s[0],
            top_k: s[1],
            temperature: f32::from_bits(s[2]),
            top_p: f32::from_bits(s[3]),
            min_p: f32::from_bits(s[4]),
            uniform: f32::from_bits(s[5]),
            adjust: entries[s[6] as usize * 4..s[7] as usize * 4]
                .chunks_exact(4)
                .map(|e| LogitAdjust {
                    token: e[0],
                    bias: f32::from_bits(e[1]),
                    rep: f32::from_bits(e[2]),
                    sub: f32::from_bits(e[3]),
                })
                .collect(),
        })
        .collect()
}

/// The op: logits f32 `[n, vocab]`, specs u32 `[rows, 12]`, entries u32 `[e, 4]` →
/// picks u32 `[rows]`. `scratch_rows`: rows with adjustments (the kernel's scratch).
struct SampleRows {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    scratch_rows: usize,
}

impl CustomOp3 for SampleRows {
    fn name(&self) -> &'static str {
        "sample_rows"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        ll: &Layout,
        specs: &CpuStorage,
        sl: &Layout,
        entries: &CpuStorage,
        el: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, vocab) = ll.shape().dims2()?;
        let x = match logits {
            CpuStorage::F32(v) => super::contiguous(v, ll, self.name(), "logits")?,
            _ => candle_core::bail!("sample_rows: logits must be f32"),
        };
        let specs = super::u32_slice(specs, sl, self.name(), "specs")?;
        let entries = super::u32_slice(entries, el, self.name(), "entries")?;
        let rows = unpack(specs, entries);
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let i = r.row as usize;
            if i >= n {
                candle_core::bail!("sample_rows: row {i} of {n}");
            }
            out.push(sample_row(&x[i * vocab..(i + 1) * vocab], r));
        }
        Ok((CpuStorage::U32(out), Shape::from(rows.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        ll: &Layout,
        specs: &candle_core::CudaStorage,
        sl: &Layout,
        entries: &candle_core::CudaStorage,
        el: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::sample_rows(logits, ll, specs, sl, entries, el, self.scratch_rows)
    }
}

/// Samples `rows` of `logits` (f32 `[n, vocab]`) where they are; the picks, one a row,
/// on the logits' device (read them with one copy).
pub fn sample_rows(logits: &Tensor, rows: &[RowSample]) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if vocab == 0 {
        candle_core::bail!("sample_rows: rows are empty");
    }
    if let Some(r) = rows.iter().find(|r| r.row as usize >= n) {
        candle_core::bail!("sample_rows: row {} of {n}", r.row);
    }
    let dev = logits.device();
    let p = pack(rows);
    if rows.is_empty() {
        return Tensor::zeros(0, candle_core::DType::U32, dev);
    }
    let specs = Tensor::from_vec(p.specs, (rows.len(), SPEC_WORDS), dev)?;
    let num_entries = p.entries.len() / 4;
    let entries = Tensor::from_vec(p.entries, (num_entries, 4), dev)?;
    logits.contiguous()?.apply_op3_no_bwd(
        &specs,
        &entries,
        &SampleRows {
            scratch_rows: p.scratch_rows,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: f32) -> RowSample {
        RowSample {
            temperature: t,
            uniform: 0.5,
            ..RowSample::greedy(0)
        }
    }

    fn picks(row: &[f32], s: &RowSample, draws: usize) -> Vec<u32> {
        (0..draws)
            .map(|i| {
                let s = RowSample {
                    uniform: (i as f32 + 0.5) / draws as f32,
                    ..s.clone()
                };
                sample_row(row, &s)
            })
            .collect()
    }

    #[test]
    fn order_key_orders_floats() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            2.0,
            7e30,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]), "{} {}", w[0], w[1]);
        }
        assert!(order_key(-1.0) < order_key(1.0));
    }

    #[test]
    fn greedy_rows_take_the_first_maximum_of_the_adjusted_row() {
        let row = [1.0f32, 3.0, 3.0, 2.0];
        assert_eq!(sample_row(&row, &spec(0.0)), 1);
        let mut s = spec(0.0);
        s.adjust = vec![LogitAdjust {
            token: 1,
            bias: 0.0,
            rep: 1.0,
            sub: f32::INFINITY,
        }];
        assert_eq!(sample_row(&row, &s), 2);
        s.adjust = vec![LogitAdjust {
            token: 0,
            bias: 5.0,
            rep: 2.0,
            sub: 0.5,
        }];
        // (1 + 5) / 2 - 0.5 = 2.5: below 3.
        assert_eq!(sample_row(&row, &s), 1);
        s.adjust[0].bias = 7.0;
        assert_eq!(sample_row(&row, &s), 0);
    }

    #[test]
    fn top_k_top_p_and_min_p_bound_the_picks() {
        let row: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut order: Vec<usize> = (0..40).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let mut s = spec(1.0);
        s.top_k = 3;
        let got: std::collections::BTreeSet<u32> = picks(&row, &s, 500).into_iter().collect();
        let want: std::collections::BTreeSet<u32> = order[..3].iter().map(|&i| i as u32).collect();
        assert_eq!(got, want);
        // One token with ~88% of the mass: top_p 0.5 keeps it alone.
        let peaked = [5.0f32, 3.0, 1.0, 0.0];
        let mut s = spec(1.0);
        s.top_p = 0.5;
        assert!(picks(&peaked, &s, 200).iter().all(|&t| t == 0));
        s.top_p = 0.95;
        let got: std::collections::BTreeSet<u32> = picks(&peaked, &s, 2000).into_iter().collect();
        assert_eq!(got, [0, 1].into());
        // min_p 0.2 keeps exp(-1) and drops exp(-2) relative to the best.
        let steps = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = spec(1.0);
        s.min_p = 0.2;
        let got: std::collections::BTreeSet<u32> = picks(&steps, &s, 2000).into_iter().collect();
        assert_eq!(got, [0, 1].into());
    }

    #[test]
    fn picks_follow_the_distribution_and_skip_banned_and_nan() {
        // Probabilities 1/2, 1/4, 1/4 at temperature 1 (logits ln 2, 0, 0).
        let row = [2f32.ln(), 0.0, 0.0, f32::NAN, f32::NEG_INFINITY];
        let got = picks(&row, &spec(1.0), 4000);
        let count = |t: u32| got.iter().filter(|&&x| x == t).count();
        assert!((1990..=2010).contains(&count(0)), "{}", count(0));
        assert!((990..=1010).contains(&count(1)) && (990..=1010).contains(&count(2)));
        let mut s = spec(1.0);
        s.adjust = vec![LogitAdjust {
            token: 0,
            bias: 0.0,
            rep: 1.0,
            sub: f32::INFINITY,
        }];
        let got = picks(&row, &s, 1000);
        assert!(got.iter().all(|&t| t == 1 || t == 2));
        // Every token banned: the first maximum (as greedy) rather than an invalid id.
        let dead = [f32::NEG_INFINITY, f32::NAN];
        assert_eq!(sample_row(&dead, &spec(1.0)), 0);
    }

    #[test]
    fn the_op_samples_the_rows_asked_for() {
        let dev = candle_core::Device::Cpu;
        let t = Tensor::new(&[[0f32, 9.0, 1.0], [5.0, 1.0, 4.0], [-1.0, -2.0, 8.0]], &dev).unwrap();
        let mut a = spec(0.0);
        a.row = 2;
        let mut b = spec(0.0);
        b.row = 0;
        b.adjust = vec![LogitAdjust {
            token: 1,
            bias: -20.0,
            rep: 1.0,
            sub: 0.0,
        }];
        let got = sample_rows(&t, &[a, b]).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(got, vec![2, 2]);
        let mut bad = spec(0.0);
        bad.row = 3;
        assert!(sample_rows(&t, &[bad]).is_err());
    }
}
