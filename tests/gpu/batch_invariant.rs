//! The batch-invariant mode's kernels: against the CPU, and a row's bits against the rest of the launch.

use super::*;

/// The batch-invariant matmul: close to the CPU's, and every row's bits the same whatever
/// rows share the launch (one row, a partial tile, several tiles).
#[test]
fn fixed_matmul_matches_cpu_and_a_row_does_not_depend_on_the_others() {
    use crosskv::ops::fixed_matmul;
    let dev = gpu();
    let mut rng = Rng::new(11);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        // k: three 64-wide tiles and a partial one; n: a partial last tile.
        let (m, n, k) = (77, 45, 200);
        let (xc, xg) = pair(&mut rng, &[m, k], dtype, &dev);
        let (wc, wg) = pair(&mut rng, &[n, k], dtype, &dev);
        let want = flat(&fixed_matmul(&xc.to_dtype(DType::F32).unwrap(), &wc.to_dtype(DType::F32).unwrap()).unwrap());
        let all = flat(&fixed_matmul(&xg, &wg).unwrap());
        let e = rel_err(&all, &want);
        assert!(e <= tol(dtype), "{dtype:?}: rel err {e}");
        for rows in [1, 5, 32, 33, 64] {
            for start in [0, 3, m - rows] {
                let part = flat(&fixed_matmul(&xg.narrow(0, start, rows).unwrap(), &wg).unwrap());
                assert_eq!(
                    part,
                    all[start * n..(start + rows) * n],
                    "{dtype:?}: rows {start}..+{rows}"
                );
            }
        }
    }
}

/// The batch-invariant paged attention: close to the CPU reference, and a token's output
/// the same bits whether it is prefilled with its sequence's other tokens, in a shorter
/// chunk, decoded alone, or beside another sequence.
#[test]
fn fixed_paged_attention_matches_cpu_and_a_token_does_not_depend_on_the_step() {
    use crosskv::ops::fixed_paged_attention;
    let dev = gpu();
    let mut rng = Rng::new(12);
    let (heads, kv_heads, block, blocks, max_blocks) = (4, 2, 16, 32, 8);
    for d in [64, 128, 256] {
        for dtype in [DType::BF16, DType::F32] {
            let (kc, kg) = pair(&mut rng, &[blocks, block, kv_heads, d], dtype, &dev);
            let (vc, vg) = pair(&mut rng, &[blocks, block, kv_heads, d], dtype, &dev);
            let table = shuffled(&mut rng, blocks)[..2 * max_blocks].to_vec();
            let (qc, qg) = pair(&mut rng, &[41, heads, d], dtype, &dev);
            let span = |q_start, q_len, ctx_len| SeqSpan {
                q_start,
                q_len,
                ctx_len,
            };
            // A prefills 40 tokens, B (ctx 70) decodes one.
            let both = [span(0, 40, 40), span(40, 1, 70)];
            let scale = 1.0 / (d as f32).sqrt();
            let run = |q: &Tensor, k: &Tensor, v: &Tensor, seqs: &[SeqSpan], table: &[u32]| {
                flat(&fixed_paged_attention(q, k, v, seqs, table, max_blocks, scale).unwrap())
            };
            let all = run(&qg, &kg, &vg, &both, &table);
            let want = flat(&paged_attention(&qc, &kc, &vc, &both, &table, max_blocks, scale).unwrap());
            let e = rel_err(&all, &want);
            assert!(e <= tol(dtype), "d{d} {dtype:?}: rel err {e}");
            let row = heads * d;
            // A's last ten tokens as a chunk.
            let chunk = run(
                &qg.narrow(0, 30, 10).unwrap(),
                &kg,
                &vg,
                &[span(0, 10, 40)],
                &table[..max_blocks],
            );
            assert_eq!(chunk, all[30 * row..40 * row], "d{d} {dtype:?}: chunk");
            // A's last token decoded alone, and B alone.
            let a = run(
                &qg.narrow(0, 39, 1).unwrap(),
                &kg,
                &vg,
                &[span(0, 1, 40)],
                &table[..max_blocks],
            );
            assert_eq!(a, all[39 * row..40 * row], "d{d} {dtype:?}: A alone");
            let b = run(
                &qg.narrow(0, 40, 1).unwrap(),
                &kg,
                &vg,
                &[span(0, 1, 70)],
                &table[max_blocks..],
            );
            assert_eq!(b, all[40 * row..], "d{d} {dtype:?}: B alone");
        }
    }
}
