//! Sampling on the device against its CPU reference: the same picks for the same rows
//! and draws, over vocabularies, temperatures, top-k, top-p, min-p and adjustments.

use super::*;
use crosskv::ops::{sample_rows, LogitAdjust, RowSample};

#[test]
fn sample_rows_matches_cpu() {
    let mut rng = Rng::new(41);
    for &vocab in &[7usize, 1000, 32_000, 49_152, 128_256] {
        let n = 24;
        let logits = rng.tensor(&[n, vocab], 3.0, 0.0);
        let mut rows = Vec::new();
        for i in 0..n {
            let k = i % 8;
            let adjust = if i % 3 == 0 {
                (0..(5 + i * 7).min(vocab))
                    .map(|j| LogitAdjust {
                        token: ((j * 7919 + i) % vocab) as u32,
                        bias: if j % 2 == 0 { 1.5 } else { 0.0 },
                        rep: if j % 3 == 0 { 1.3 } else { 1.0 },
                        sub: if j == 1 { f32::INFINITY } else { 0.2 * (j % 4) as f32 },
                    })
                    .fold(Vec::<LogitAdjust>::new(), |mut v, a| {
                        if !v.iter().any(|b| b.token == a.token) {
                            v.push(a);
                        }
                        v
                    })
            } else {
                Vec::new()
            };
            rows.push(RowSample {
                row: ((i * 5) % n) as u32,
                temperature: [0.0, 0.3, 0.7, 1.0, 1.5, 1.0, 0.8, 2.0][k],
                top_k: [0, 0, 40, 0, 1, 5, 0, 100][k],
                top_p: [1.0, 0.9, 1.0, 0.5, 1.0, 0.95, 0.8, 1.0][k],
                min_p: [0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.1, 0.0][k],
                uniform: (rng.next_u64() % 1_000_000) as f32 / 1_000_000.0,
                adjust,
            });
        }
        let want = sample_rows(&logits, &rows).unwrap().to_vec1::<u32>().unwrap();
        let got = sample_rows(&logits.to_device(&gpu()).unwrap(), &rows)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        // A pick may differ only where the device's exp and the host's round a mass
        // across a threshold: almost never on random rows.
        let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        assert!(
            same >= n - 1,
            "vocab {vocab}: {same}/{n} picks agree: {got:?} vs {want:?}"
        );
        assert!(got.iter().all(|&t| (t as usize) < vocab));
    }
}
