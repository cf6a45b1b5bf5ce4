//! `qmatmul`: `x · Wᵀ` with W in a GGUF block format, for CPU decode speed.
//! - Q4_1 (blocks of 32: f16 scale `d`, f16 min `m`, 16 bytes of nibbles; element j is
//!   the low nibble of byte j, element j+16 the high one). candle 0.11's Q4_1 dot
//!   product is scalar, and the default model is Q4_1.
//! - Q8_0 (f16 scale, 32 i8): the default model's tied embedding / lm_head; having it
//!   here puts it in the same fused, low-overhead parallel region as the rest.
//!
//! Activations are quantized per block of 32 to i8 with an f16 scale, rounded as
//! llama.cpp's Q8_1 is, so a Q4_1 block's dot product is `d_w·d_x·Σ q_w q_x + m_w·d_x·Σ q_x` and a
//! Q8_0 one `d_w·d_x·Σ q_w q_x`. AVX2 (maddubs) where the CPU has it; the scalar paths
//! are the reference.
//!
//! Over 600 lines on purpose: the activation quantization, the kernel families (scalar,
//! AVX2, AVX-512 VNNI, one row and four) and the tests that hold them to one answer are
//! one unit; about 590 lines without the tests.

use super::parallel::for_each_piece_mut;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;

const QK: usize = 32;
/// How far ahead of the current block the kernels prefetch weights.
const PREFETCH_BYTES: usize = 1024;

/// The GGUF block formats this op reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    Q4_1,
    Q8_0,
}

impl QFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }
}

/// A quantized weight `[rows, cols]`, row-major, raw GGUF blocks.
#[derive(Debug)]
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Activations quantized per block of 32: scales, scale × Σq, and the i8 values.
struct QuantizedRows {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

fn quantize_rows(x: &[f32], cols: usize) -> QuantizedRows {
    let nb = x.len() / QK;
    let mut out = QuantizedRows {
        d: vec![0.0; nb],
        s: vec![0.0; nb],
        q: vec![0; x.len()],
    };
    debug_assert_eq!(x.len() % cols, 0);
    for b in 0..nb {
        let xs = &x[b * QK..(b + 1) * QK];
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        // llama.cpp's Q8_1 / Q8_0 activation blocks, to its rounding: the values scaled
        // by 127 / amax and rounded half to even, the scale and the scaled sum stored
        // as f16. Every layer re-quantizes its input, so a smaller difference here
        // grows through the model; matching it keeps GGUF log-probs near llama.cpp's.
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in out.q[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
            // Half to even by the 1.5·2^23 trick (|v·id| ≤ 127): one add and one
            // subtract, where `round_ties_even` is a libm call unless the build targets
            // SSE4.1.
            const ROUND: f32 = 12_582_912.0;
            *q = ((v * id + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
            sum += *q as i32;
        }
        out.d[b] = f16::from_f32(d).to_f32();
        out.s[b] = f16::from_f32(d * sum as f32).to_f32();
    }
    out
}

fn block_scales(blk: &[u8]) -> (f32, f32) {
    (
        f16::from_le_bytes([blk[0], blk[1]]).to_f32(),
        f16::from_le_bytes([blk[2], blk[3]]).to_f32(),
    )
}

/// [`block_scales`] with the F16C instruction, inlined into the SIMD kernels (which all
/// enable it): `half`'s conversion picks F16C at run time behind a call per scale unless
/// the whole build targets a CPU with it. Both conversions are exact.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
unsafe fn block_scales_f16c(blk: *const u8) -> (f32, f32) {
    use std::arch::x86_64::*;
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

/// One f16 at `p` as f32 with F16C (see [`block_scales_f16c`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
unsafe fn f16_f16c(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        (p as *const u16).read_unaligned() as i32
    )))
}

/// The Q8_0 reference: one weight row against one quantized activation row.
fn dot_row_q8_0_scalar(row: &[u8], q: &[i8], d: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (b, blk) in row.chunks_exact(34).enumerate() {
        let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let qa = &q[b * QK..(b + 1) * QK];
        let isum: i32 = blk[2..].iter().zip(qa).map(|(&w, &a)| w as i8 as i32 * a as i32).sum();
        sum += dw * d[b] * isum as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_q8_0_avx2(row: &[u8], q: &[i8], d: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = row.len() / 34;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let blk = row.as_ptr().add(b * 34);
        let dw = f16_f16c(blk);
        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let a = _mm256_loadu_si256(q.as_ptr().add(b * QK) as *const __m256i);
        // maddubs wants unsigned × signed: |w| × (a · sign(w)).
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
        let p = _mm256_madd_epi16(p, ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * *d.get_unchecked(b)), _mm256_cvtepi32_ps(p), acc);
    }
    hsum(acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(acc, 1);
    let v = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
    _mm_cvtss_f32(v)
}

/// The Q4_1 reference: one weight row against one quantized activation row.
fn dot_row_scalar(row: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (b, blk) in row.chunks_exact(20).enumerate() {
        let (dw, mw) = block_scales(blk);
        let qa = &q[b * QK..(b + 1) * QK];
        let mut isum = 0i32;
        for j in 0..QK / 2 {
            isum += (blk[4 + j] & 0x0F) as i32 * qa[j] as i32 + (blk[4 + j] >> 4) as i32 * qa[j + QK / 2] as i32;
        }
        sum += dw * d[b] * isum as f32 + mw * s[b];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_avx2(row: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = row.len() / 20;
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut min_acc = 0f32;
    for b in 0..nb {
        let blk = row.as_ptr().add(b * 20);
        let (dw, mw) = block_scales_f16c(blk);
        let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low));
        let a = _mm256_loadu_si256(q.as_ptr().add(b * QK) as *const __m256i);
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * *d.get_unchecked(b)), _mm256_cvtepi32_ps(p), acc);
        min_acc += mw * *s.get_unchecked(b);
    }
    hsum(acc) + min_acc
}

/// Four activation rows against one Q4_1 weight row: each weight block is decoded once
/// for the four (prefill is compute-bound, so this is where its time goes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
unsafe fn dot_row_x4_avx2(row: &[u8], q: [&[i8]; 4], d: [&[f32]; 4], s: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let nb = row.len() / 20;
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut min_acc = [0f32; 4];
    for b in 0..nb {
        let blk = row.as_ptr().add(b * 20);
        let (dw, mw) = block_scales_f16c(blk);
        let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low));
        for j in 0..4 {
            let a = _mm256_loadu_si256(q[j].as_ptr().add(b * QK) as *const __m256i);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
            acc[j] = _mm256_fmadd_ps(
                _mm256_set1_ps(dw * *d[j].get_unchecked(b)),
                _mm256_cvtepi32_ps(p),
                acc[j],
            );
            min_acc[j] += mw * *s[j].get_unchecked(b);
        }
    }
    [
        hsum(acc[0]) + min_acc[0],
        hsum(acc[1]) + min_acc[1],
        hsum(acc[2]) + min_acc[2],
        hsum(acc[3]) + min_acc[3],
    ]
}

/// Four activation rows against one Q8_0 weight row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
unsafe fn dot_row_q8_0_x4_avx2(row: &[u8], q: [&[i8]; 4], d: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let nb = row.len() / 34;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        let blk = row.as_ptr().add(b * 34);
        let dw = f16_f16c(blk);
        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        for j in 0..4 {
            let a = _mm256_loadu_si256(q[j].as_ptr().add(b * QK) as *const __m256i);
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
            acc[j] = _mm256_fmadd_ps(
                _mm256_set1_ps(dw * *d[j].get_unchecked(b)),
                _mm256_cvtepi32_ps(p),
                acc[j],
            );
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// Which kernels this CPU can run, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU has (detected once), capped by `CROSSKV_ISA` (scalar, avx2,
    /// avx512vnni) when set, to compare kernels.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let best = *Isa::available().last().expect("scalar is always there");
            let cap = match crate::env::ISA.get().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => Isa::Avx2,
                _ => Isa::Avx512Vnni,
            };
            best.min(cap)
        })
    }

    /// Every level this CPU can run, for tests that compare them.
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                out.push(Isa::Avx2);
                if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    out.push(Isa::Avx512Vnni);
                }
            }
        }
        out
    }
}

/// Q4_1 with AVX-512 VNNI: two blocks per step, `vpdpbusd` (u8 nibbles × i8 activations).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_row_q4_1_vnni(row: &[u8], q: &[i8], d: &[f32], s: &[f32]) -> f32 {
    dot_row_q4_1_vnni_xn::<1>(row, [q], [d], [s])[0]
}

/// `N` activation rows against one Q4_1 row: each weight block pair is decoded once for
/// all of them, and each row's arithmetic is exactly that of `dot_row_q4_1_vnni`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
unsafe fn dot_row_q4_1_vnni_xn<const N: usize>(row: &[u8], q: [&[i8]; N], d: [&[f32]; N], s: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let nb = row.len() / 20;
    let low = _mm_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut min_acc = [0f32; N];
    let nibbles = |blk: *const u8| {
        let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low))
    };
    let mut b = 0;
    while b + 2 <= nb {
        let (b0, b1) = (row.as_ptr().add(b * 20), row.as_ptr().add((b + 1) * 20));
        // Decode streams the weights once: fetch well ahead (rows are contiguous).
        _mm_prefetch(b0.add(PREFETCH_BYTES) as *const i8, _MM_HINT_T0);
        let (dw0, mw0) = block_scales_f16c(b0);
        let (dw1, mw1) = block_scales_f16c(b1);
        let w = _mm512_inserti64x4(_mm512_castsi256_si512(nibbles(b0)), nibbles(b1), 1);
        for j in 0..N {
            let a = _mm512_loadu_si512(q[j].as_ptr().add(b * QK) as *const _);
            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
            let scale = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(dw0 * *d[j].get_unchecked(b)),
                _mm512_set1_ps(dw1 * *d[j].get_unchecked(b + 1)),
            );
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[j]);
            min_acc[j] += mw0 * *s[j].get_unchecked(b) + mw1 * *s[j].get_unchecked(b + 1);
        }
        b += 2;
    }
    let mut out = [0f32; N];
    for j in 0..N {
        out[j] = _mm512_reduce_add_ps(acc[j]) + min_acc[j];
        if b < nb {
            let tail = b * 20;
            out[j] += dot_row_avx2(&row[tail..], &q[j][b * QK..], &d[j][b..], &s[j][b..]);
        }
    }
    out
}

/// Q8_0 with AVX-512 VNNI: `vpdpbusd` wants one unsigned side, so the weights are
/// offset to `w + 128` and `128·Σq_x` taken off again, both in i32 where they are
/// exact. (Taking the offset off after scaling to f32 cancels two large terms: on the
/// outlier channels of real hidden states that lost most of a logit's digits.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_row_q8_0_vnni(row: &[u8], q: &[i8], d: &[f32]) -> f32 {
    dot_row_q8_0_vnni_xn::<1>(row, [q], [d])[0]
}

/// `N` activation rows against one Q8_0 row, each row's arithmetic exactly that of
/// `dot_row_q8_0_vnni` (so a row's result does not depend on the rows beside it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
unsafe fn dot_row_q8_0_vnni_xn<const N: usize>(row: &[u8], q: [&[i8]; N], d: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let nb = row.len() / 34;
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut b = 0;
    while b + 2 <= nb {
        let (b0, b1) = (row.as_ptr().add(b * 34), row.as_ptr().add((b + 1) * 34));
        _mm_prefetch(b0.add(PREFETCH_BYTES) as *const i8, _MM_HINT_T0);
        _mm_prefetch(b0.add(PREFETCH_BYTES + 64) as *const i8, _MM_HINT_T0);
        let dw0 = f16_f16c(b0);
        let dw1 = f16_f16c(b1);
        let w = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2) as *const __m256i)),
            _mm256_loadu_si256(b1.add(2) as *const __m256i),
            1,
        );
        let wu = _mm512_xor_si512(w, flip);
        for j in 0..N {
            let a = _mm512_loadu_si512(q[j].as_ptr().add(b * QK) as *const _);
            // flip is 0x80 bytes: as u8 it is 128, so this is 128·Σq_x per lane.
            let p = _mm512_sub_epi32(
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, a),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, a),
            );
            let scale = _mm512_mask_blend_ps(
                0xFF00,
                _mm512_set1_ps(dw0 * *d[j].get_unchecked(b)),
                _mm512_set1_ps(dw1 * *d[j].get_unchecked(b + 1)),
            );
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[j]);
        }
        b += 2;
    }
    let mut out = [0f32; N];
    for j in 0..N {
        out[j] = _mm512_reduce_add_ps(acc[j]);
        if b < nb {
            out[j] += dot_row_q8_0_avx2(&row[b * 34..], &q[j][b * QK..], &d[j][b..]);
        }
    }
    out
}

impl QMatrix {
    /// From raw GGUF bytes of a `[rows, cols]` tensor.
    pub fn from_bytes(format: QFormat, data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * format.block_bytes() {
            candle_core::bail!(
                "qmatmul: {} bytes do not make a [{rows}, {cols}] {format:?} matrix",
                data.len()
            );
        }
        Ok(QMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    pub fn format(&self) -> QFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The dense f32 weight `[rows, cols]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for blk in self.data.chunks_exact(self.format.block_bytes()) {
            match self.format {
                QFormat::Q4_1 => {
                    let (d, m) = block_scales(blk);
                    out.extend(blk[4..].iter().map(|b| (b & 0x0F) as f32 * d + m));
                    out.extend(blk[4..].iter().map(|b| (b >> 4) as f32 * d + m));
                }
                QFormat::Q8_0 => {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    out.extend(blk[2..].iter().map(|&b| b as i8 as f32 * d));
                }
            }
        }
        Tensor::from_vec(out, (self.rows, self.cols), &candle_core::Device::Cpu)
    }

    fn row(&self, r: usize) -> &[u8] {
        let n = self.cols / QK * self.format.block_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    // Kept out of line, as are the x4 kernels. Inlined into matmul_many's task closure
    // (rustc's choice flips with unrelated code elsewhere in the crate: adding the fused
    // norm/RoPE ops flipped it), decode and prefill of SmolLM2 Q4_1 took ~15 % more CPU.
    #[inline(never)]
    fn dot_row(&self, row: &[u8], q: &[i8], d: &[f32], s: &[f32], isa: Isa) -> f32 {
        // SAFETY (each arm): `isa` never names more than `Isa::available()` found.
        #[cfg(target_arch = "x86_64")]
        match (isa, self.format) {
            (Isa::Avx512Vnni, QFormat::Q4_1) => return unsafe { dot_row_q4_1_vnni(row, q, d, s) },
            (Isa::Avx512Vnni, QFormat::Q8_0) => return unsafe { dot_row_q8_0_vnni(row, q, d) },
            (Isa::Avx2, QFormat::Q4_1) => return unsafe { dot_row_avx2(row, q, d, s) },
            (Isa::Avx2, QFormat::Q8_0) => return unsafe { dot_row_q8_0_avx2(row, q, d) },
            (Isa::Scalar, _) => {}
        }
        match self.format {
            QFormat::Q4_1 => dot_row_scalar(row, q, d, s),
            QFormat::Q8_0 => dot_row_q8_0_scalar(row, q, d),
        }
    }

    /// `x` is `[m, cols]` row-major; returns `[m, rows]`.
    pub fn matmul(&self, x: &[f32], isa: Isa) -> Vec<f32> {
        Self::matmul_many(&[self], x, isa)
            .pop()
            .expect("one matrix, one output")
    }

    /// Several matrices with the same `cols` applied to one `x` (q/k/v, gate/up):
    /// one activation quantization and one parallel region for all of them.
    pub fn matmul_many(ws: &[&QMatrix], x: &[f32], isa: Isa) -> Vec<Vec<f32>> {
        let cols = ws[0].cols;
        assert!(
            ws.iter().all(|w| w.cols == cols),
            "matmul_many: matrices must share cols"
        );
        let m = x.len() / cols;
        let qx = quantize_rows(x, cols);
        let nb = cols / QK;
        let isa = isa.min(Isa::best());
        // Tasks own a run of weight rows for every token ([rows, m] order), so a weight
        // row is read from memory once per call whatever m is. Small tasks: the pool
        // hands them out in batches to balance the threads.
        const CHUNK: usize = 16;
        let mut outs_t: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows * m]).collect();
        let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
        for (wi, w) in ws.iter().enumerate() {
            for r0 in (0..w.rows).step_by(CHUNK) {
                tasks.push((wi, r0 * m, (CHUNK.min(w.rows - r0)) * m));
            }
        }
        for_each_piece_mut(&mut outs_t, &tasks, |i, piece| {
            let (wi, start, _) = tasks[i];
            let (w, r0) = (ws[wi], start / m);
            for (i, r) in (r0..r0 + piece.len() / m).enumerate() {
                let row = w.row(r);
                let act = |t: usize| {
                    (
                        &qx.q[t * cols..(t + 1) * cols],
                        &qx.d[t * nb..(t + 1) * nb],
                        &qx.s[t * nb..(t + 1) * nb],
                    )
                };
                let out = &mut piece[i * m..(i + 1) * m];
                let mut t = 0;
                #[cfg(target_arch = "x86_64")]
                while isa >= Isa::Avx2 && t + 4 <= m {
                    let a = [act(t), act(t + 1), act(t + 2), act(t + 3)];
                    let (q, d, s) = (a.map(|x| x.0), a.map(|x| x.1), a.map(|x| x.2));
                    // The 4-row kernels of an ISA give each row the bits its 1-row kernel
                    // (below) gives: a row's result never depends on the rows beside it.
                    // SAFETY: `isa` is at most what `Isa::available()` found, here ≥ AVX2.
                    let r4 = unsafe {
                        match (isa, w.format) {
                            (Isa::Avx512Vnni, QFormat::Q4_1) => dot_row_q4_1_vnni_xn::<4>(row, q, d, s),
                            (Isa::Avx512Vnni, QFormat::Q8_0) => dot_row_q8_0_vnni_xn::<4>(row, q, d),
                            (_, QFormat::Q4_1) => dot_row_x4_avx2(row, q, d, s),
                            (_, QFormat::Q8_0) => dot_row_q8_0_x4_avx2(row, q, d),
                        }
                    };
                    out[t..t + 4].copy_from_slice(&r4);
                    t += 4;
                }
                for (t, o) in out.iter_mut().enumerate().skip(t) {
                    let (q, d, s) = act(t);
                    *o = w.dot_row(row, q, d, s, isa);
                }
            }
        });
        if m == 1 {
            return outs_t;
        }
        outs_t
            .into_iter()
            .zip(ws)
            .map(|(out_t, w)| {
                let mut out = vec![0f32; m * w.rows];
                for r in 0..w.rows {
                    for t in 0..m {
                        out[t * w.rows + r] = out_t[r * m + t];
                    }
                }
                out
            })
            .collect()
    }
}

struct QMatMulOp<'a> {
    w: &'a QMatrix,
    isa: Isa,
}

impl CustomOp1 for QMatMulOp<'_> {
    fn name(&self) -> &'static str {
        "qmatmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            candle_core::bail!("qmatmul: activations must be f32")
        };
        let x = super::contiguous(x, l, self.name(), "x")?;
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&self.w.cols) {
            candle_core::bail!("qmatmul: x is {dims:?}, weight is [{}, {}]", self.w.rows, self.w.cols);
        }
        *dims.last_mut().expect("checked") = self.w.rows;
        Ok((CpuStorage::F32(self.w.matmul(x, self.isa)), Shape::from(dims)))
    }
}

/// `x · Wᵢᵀ` for each of `ws` (sharing `cols`), one quantization of `x`; f32 `x` `[.., cols]`.
pub fn qmatmul_many(x: &Tensor, ws: &[&QMatrix]) -> Result<Vec<Tensor>> {
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&ws[0].cols) || ws.iter().any(|w| w.cols != ws[0].cols) {
        candle_core::bail!("qmatmul_many: x is {dims:?}, weights have {} cols", ws[0].cols);
    }
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    QMatrix::matmul_many(ws, &data, Isa::best())
        .into_iter()
        .zip(ws)
        .map(|(out, w)| {
            let mut shape = dims.clone();
            *shape.last_mut().expect("checked") = w.rows;
            Tensor::from_vec(out, shape, x.device())
        })
        .collect()
}

/// `x · Wᵀ` for f32 `x` `[.., cols]` with the kernels of `isa` (capped at what the CPU
/// has); `Isa::Scalar` is the reference.
pub fn qmatmul(x: &Tensor, w: &QMatrix, isa: Isa) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&QMatMulOp { w, isa })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    fn check(dtype: GgmlDType, format: QFormat) {
        let (rows, cols, m) = (40, 96, 7);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let x: Vec<f32> = (0..m * cols).map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0).collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let mat = QMatrix::from_bytes(format, q.data().unwrap().to_vec(), rows, cols).unwrap();
        let ours: Vec<f32> = mat.dequantize().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            ours,
            deq.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{format:?} dequantize"
        );
        let xt = Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap();
        let flat = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let want = flat(xt.matmul(&deq.t().unwrap()).unwrap());
        let scalar = flat(qmatmul(&xt, &mat, Isa::Scalar).unwrap());
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for i in 0..want.len() {
            // Activation quantization to i8 costs ~1% of the output scale.
            assert!(
                (want[i] - scalar[i]).abs() <= 0.02 * scale,
                "{format:?} {i}: {} vs {}",
                want[i],
                scalar[i]
            );
        }
        // Every kernel this CPU has (AVX2, AVX-512 VNNI; rows of 3 blocks exercise the
        // odd-block tails, 7 tokens the 4-row and 1-row paths) matches the scalar one.
        for isa in Isa::available() {
            let got = flat(qmatmul(&xt, &mat, isa).unwrap());
            for i in 0..want.len() {
                assert!(
                    (got[i] - scalar[i]).abs() <= 1e-4 * scale,
                    "{format:?} {isa:?} {i}: {} vs {}",
                    got[i],
                    scalar[i]
                );
            }
        }
        let best = flat(qmatmul(&xt, &mat, Isa::best()).unwrap());
        // Fused calls give each matrix exactly what a lone call gives.
        let many = qmatmul_many(&xt, &[&mat, &mat]).unwrap();
        assert_eq!(flat(many[1].clone()), best);
    }

    /// Activations shaped like a transformer's hidden states: most channels small, a
    /// few outlier channels hundreds of times larger (SmolLM2's residual stream has
    /// channels in the hundreds next to ones below 1).
    fn outlier_activations(m: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        (0..m * cols)
            .map(|i| {
                let c = i % cols;
                let v = next();
                if c % 97 == 5 || c == cols / 3 {
                    v * 400.0 + 150.0
                } else {
                    v * 0.7
                }
            })
            .collect()
    }

    fn quantized(dtype: GgmlDType, format: QFormat, rows: usize, cols: usize) -> QMatrix {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&wt, dtype).unwrap();
        QMatrix::from_bytes(format, q.data().unwrap().to_vec(), rows, cols).unwrap()
    }

    /// The exact value of the kernels' formula on the same quantized inputs (f64), and
    /// the sum of its terms' magnitudes: float rounding can only move a kernel's result
    /// by a small multiple of f32's epsilon times that sum.
    fn exact(w: &QMatrix, qx: &QuantizedRows, t: usize, r: usize) -> (f64, f64) {
        let (cols, nb) = (w.cols, w.cols / QK);
        let q = &qx.q[t * cols..(t + 1) * cols];
        let (mut sum, mut mag) = (0f64, 0f64);
        for (b, blk) in w.row(r).chunks_exact(w.format.block_bytes()).enumerate() {
            let qa = &q[b * QK..(b + 1) * QK];
            let dx = qx.d[t * nb + b] as f64;
            let terms = match w.format {
                QFormat::Q4_1 => {
                    let (dw, mw) = block_scales(blk);
                    let isum: i64 = (0..QK / 2)
                        .map(|j| {
                            (blk[4 + j] & 0x0F) as i64 * qa[j] as i64 + (blk[4 + j] >> 4) as i64 * qa[j + QK / 2] as i64
                        })
                        .sum();
                    [dw as f64 * dx * isum as f64, mw as f64 * qx.s[t * nb + b] as f64]
                }
                QFormat::Q8_0 => {
                    let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32() as f64;
                    let isum: i64 = blk[2..].iter().zip(qa).map(|(&x, &a)| x as i8 as i64 * a as i64).sum();
                    [dw * dx * isum as f64, 0.0]
                }
            };
            sum += terms[0] + terms[1];
            mag += terms[0].abs() + terms[1].abs();
        }
        (sum, mag)
    }

    #[test]
    fn every_kernel_agrees_with_the_exact_result_to_rounding_on_outlier_activations() {
        for (dtype, format) in [(GgmlDType::Q4_1, QFormat::Q4_1), (GgmlDType::Q8_0, QFormat::Q8_0)] {
            // SmolLM2's hidden and intermediate widths; 7 tokens use the 4-row and 1-row paths.
            for cols in [576, 1536] {
                let (rows, m) = (24, 7);
                let w = quantized(dtype, format, rows, cols);
                let x = outlier_activations(m, cols, cols as u64);
                let qx = quantize_rows(&x, cols);
                for isa in Isa::available() {
                    let got = w.matmul(&x, isa);
                    for t in 0..m {
                        for r in 0..rows {
                            let (want, mag) = exact(&w, &qx, t, r);
                            let err = (got[t * rows + r] as f64 - want).abs();
                            assert!(
                                err <= 1e-6 * mag,
                                "{format:?} {isa:?} cols {cols} token {t} row {r}: {} vs {want} (error {:.2e} of {mag:.3e})",
                                got[t * rows + r],
                                err / mag
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_is_the_same_bits_whatever_rows_share_its_call() {
        for (dtype, format) in [(GgmlDType::Q4_1, QFormat::Q4_1), (GgmlDType::Q8_0, QFormat::Q8_0)] {
            // 3 blocks: the odd-block tails too.
            for cols in [96, 576] {
                let (rows, m) = (20, 9);
                let w = quantized(dtype, format, rows, cols);
                let x = outlier_activations(m, cols, 7);
                for isa in Isa::available() {
                    let all = w.matmul(&x, isa);
                    for t in 0..m {
                        let alone = w.matmul(&x[t * cols..(t + 1) * cols], isa);
                        assert_eq!(
                            alone,
                            all[t * rows..(t + 1) * rows],
                            "{format:?} {isa:?} token {t} alone"
                        );
                    }
                    // The same row at another place in a batch of another size.
                    let mut shifted = x[cols..].to_vec();
                    shifted.extend_from_slice(&x[..cols]);
                    let moved = w.matmul(&shifted, isa);
                    assert_eq!(
                        moved[(m - 1) * rows..],
                        all[..rows],
                        "{format:?} {isa:?} token 0 moved to the end"
                    );
                }
            }
        }
    }

    #[test]
    fn q4_1_simd_matches_scalar_and_dense_reference() {
        check(GgmlDType::Q4_1, QFormat::Q4_1);
    }

    #[test]
    fn q8_0_simd_matches_scalar_and_dense_reference() {
        check(GgmlDType::Q8_0, QFormat::Q8_0);
    }
}
