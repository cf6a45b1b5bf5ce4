//! `x · Wᵀ` for dense weights on the CPU (f32, f16, bf16; computed in f32) with one
//! fixed arithmetic per output element: the dot product of its `x` row and its `W`
//! row, in 16 partial sums over the columns in order, then those sums and the tail in a
//! fixed order. An output row therefore never depends on how many rows share the call
//! or where it sits among them. A BLAS-style GEMM picks tile shapes and reduction
//! splits by the matrix sizes (and a one-row call may take a GEMV path), so a token's
//! result, and so a request's tokens and log-probs, would change with the batch
//! around it.

use super::parallel::for_each_piece_mut;
use super::{contiguous, Elem};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Partial sums per dot product: wide enough for the compiler to vectorise the loop
/// with 256- or 512-bit registers.
const LANES: usize = 16;
/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// `N` activation rows (f32) against one weight row: each row's result is exactly what
/// `N = 1` gives it (the same operations in the same order).
#[inline(always)]
fn dot_rows<T: Elem, const N: usize>(w: &[T], x: [&[f32]; N]) -> [f32; N] {
    let k = w.len();
    let full = k / LANES * LANES;
    let mut acc = [[0f32; LANES]; N];
    let mut wf = [0f32; LANES];
    for c in (0..full).step_by(LANES) {
        for (i, v) in wf.iter_mut().enumerate() {
            *v = w[c + i].to_f32();
        }
        for j in 0..N {
            let xs = &x[j][c..c + LANES];
            for i in 0..LANES {
                acc[j][i] += xs[i] * wf[i];
            }
        }
    }
    let mut out = [0f32; N];
    for j in 0..N {
        // Pairwise over the lanes, then the tail in column order.
        let mut lanes = acc[j];
        let mut width = LANES;
        while width > 1 {
            width /= 2;
            for i in 0..width {
                lanes[i] += lanes[i + width];
            }
        }
        let mut total = lanes[0];
        for c in full..k {
            total += x[j][c] * w[c].to_f32();
        }
        out[j] = total;
    }
    out
}

/// `x` `[m, k]` (f32) times `w` `[n, k]` transposed; returns `[m, n]`.
fn matmul_rows<T: Elem>(x: &[f32], w: &[T], m: usize, n: usize, k: usize) -> Vec<f32> {
    // Tasks own a run of weight rows for every token ([n, m] order), so a weight row is
    // read from memory once per call whatever m is.
    let mut out_t = vec![vec![0f32; n * m]];
    let tasks: Vec<(usize, usize, usize)> = (0..n)
        .step_by(ROWS_PER_TASK)
        .map(|r0| (0, r0 * m, ROWS_PER_TASK.min(n - r0) * m))
        .collect();
    for_each_piece_mut(&mut out_t, &tasks, |i, piece| {
        let r0 = tasks[i].1 / m;
        for (i, r) in (r0..r0 + piece.len() / m).enumerate() {
            let row = &w[r * k..(r + 1) * k];
            let out = &mut piece[i * m..(i + 1) * m];
            let xr = |t: usize| &x[t * k..(t + 1) * k];
            let mut t = 0;
            while t + 4 <= m {
                out[t..t + 4].copy_from_slice(&dot_rows(row, [xr(t), xr(t + 1), xr(t + 2), xr(t + 3)]));
                t += 4;
            }
            for (t, o) in out.iter_mut().enumerate().skip(t) {
                *o = dot_rows(row, [xr(t)])[0];
            }
        }
    });
    let out_t = out_t.pop().expect("one buffer");
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for r in 0..n {
        for t in 0..m {
            out[t * n + r] = out_t[r * m + t];
        }
    }
    out
}

struct DenseMatMul;

impl DenseMatMul {
    fn run<T: Elem>(&self, x: &[T], lx: &Layout, w: &[T], lw: &Layout) -> Result<(Vec<T>, Shape)> {
        let x = contiguous(x, lx, "dense_matmul", "x")?;
        let w = contiguous(w, lw, "dense_matmul", "w")?;
        let (n, k) = lw.shape().dims2()?;
        let mut dims = lx.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("dense_matmul: x is {dims:?}, w is [{n}, {k}]");
        }
        let m = x.len() / k.max(1);
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let out = matmul_rows(&xf, w, m, n, k);
        *dims.last_mut().expect("checked") = n;
        Ok((out.into_iter().map(T::from_f32).collect(), Shape::from(dims)))
    }
}

impl CustomOp2 for DenseMatMul {
    fn name(&self) -> &'static str {
        "dense_matmul"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => self.run(x, l1, w, l2).map(|(o, s)| (CpuStorage::F32(o), s)),
            (CpuStorage::F16(x), CpuStorage::F16(w)) => self.run(x, l1, w, l2).map(|(o, s)| (CpuStorage::F16(o), s)),
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => self.run(x, l1, w, l2).map(|(o, s)| (CpuStorage::BF16(o), s)),
            _ => candle_core::bail!("dense_matmul: x and w must share one of f32, f16, bf16"),
        }
    }
}

/// `x · wᵀ` on the CPU: `x` `[.., k]`, `w` `[n, k]`, one dtype; batch-invariant (see
/// the module doc). No backward: serving only.
pub fn dense_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &DenseMatMul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_candles_matmul_and_each_row_alone_gives_the_same_bits() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // k = 70: four full 16-lane chunks and a tail; m = 7: the 4-row and 1-row paths.
            let (m, n, k) = (7, 37, 70);
            let x = Tensor::from_vec(values(m * k, 3), (m, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::from_vec(values(n * k, 5), (n, k), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let got = dense_matmul(&x, &w).unwrap();
            assert_eq!(got.dims(), &[m, n]);
            let f32s = |t: &Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let want = f32s(
                &x.to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap(),
            );
            let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
            for (a, b) in f32s(&got).iter().zip(&want) {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{dtype:?}: {a} vs {b}");
            }
            let all = f32s(&got);
            for t in 0..m {
                let alone = f32s(&dense_matmul(&x.narrow(0, t, 1).unwrap(), &w).unwrap());
                assert_eq!(alone, all[t * n..(t + 1) * n], "{dtype:?} row {t} alone");
            }
            // A 3-d input is its rows.
            let x3 = x.reshape((1, m, k)).unwrap();
            assert_eq!(f32s(&dense_matmul(&x3, &w).unwrap()), all);
        }
    }
}
