//! fp8 e4m3 (the OCP "E4M3FN" format NVIDIA's `__nv_fp8_e4m3` implements): 1 sign bit,
//! 4 exponent bits (bias 7), 3 mantissa bits, no infinities, one NaN pattern per sign
//! (`S.1111.111`), largest finite ±448. The KV cache stores K and V in it at one byte
//! an element: a value is written as `x / scale` rounded to nearest-even and saturated to
//! ±448, and read back as `code × scale`. The CUDA kernels convert with the hardware's
//! conversion, which rounds and saturates the same way; this is the reference.

/// One KV slot's per-tensor scales: a K element `x` is stored as `x / k`, a V element
/// as `x / v`. 1.0 for a 16-bit or f32 cache, where they are not used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvScale {
    pub k: f32,
    pub v: f32,
}

impl Default for KvScale {
    fn default() -> Self {
        KvScale { k: 1.0, v: 1.0 }
    }
}

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The code of +448 (`0.1111.110`): what every value at or past the range saturates to.
const MAX_CODE: u8 = 0x7E;
/// The NaN code written for a NaN input (the sign bit cleared, as the CUDA conversion does).
const NAN_CODE: u8 = 0x7F;

/// The value of an e4m3 code.
pub const fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0xF) as i32;
    let m = (code & 7) as f32;
    if e == 0xF && code & 7 == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        // Subnormal: m/8 × 2^-6.
        m * (1.0 / 512.0)
    } else {
        (1.0 + m / 8.0) * pow2(e - 7)
    };
    sign * mag
}

/// 2^e for the small exponents e4m3 has (-6..=8), in a const fn.
const fn pow2(e: i32) -> f32 {
    let mut v = 1.0f32;
    let mut i = 0;
    while i < e.abs() {
        v = if e > 0 { v * 2.0 } else { v * 0.5 };
        i += 1;
    }
    v
}

/// Every code's value: the attention reads K/V through this table (one load, no branches).
pub static E4M3_TABLE: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// The e4m3 code nearest to `x` (ties to even), saturated to ±448; NaN gives the NaN code.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return NAN_CODE;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | MAX_CODE;
    }
    let bits = a.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127;
    let code = if exp < -6 {
        // Below the smallest normal (2^-6): multiples of 2^-9, and code k is k × 2^-9
        // up to code 8, the smallest normal, so the rounded multiple is the code. The
        // product is exact (a power of two).
        (a * 512.0).round_ties_even() as u32
    } else {
        // Normal: keep 3 of the 23 mantissa bits, rounding the 20 dropped ones to nearest
        // even; a carry out of the mantissa steps the exponent up, as it should.
        let m = bits & 0x7F_FFFF;
        let mut c = (((exp + 7) as u32) << 3) | (m >> 20);
        let rest = m & 0xF_FFFF;
        if rest > 0x8_0000 || (rest == 0x8_0000 && c & 1 == 1) {
            c += 1;
        }
        c.min(MAX_CODE as u32)
    };
    sign | code as u8
}

/// `x / scale` as e4m3, the way the cache is written: the division is a multiplication
/// by `inv_scale` (`1 / scale`, computed once), which the CUDA kernel does identically.
#[inline]
pub fn quantize(x: f32, inv_scale: f32) -> u8 {
    f32_to_e4m3(x * inv_scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes() {
        // (code, value) pairs from the format's definition.
        let table: [(u8, f32); 15] = [
            (0x00, 0.0),
            (0x80, -0.0),
            (0x01, 1.0 / 512.0), // smallest subnormal
            (0x07, 7.0 / 512.0), // largest subnormal
            (0x08, 1.0 / 64.0),  // smallest normal
            (0x38, 1.0),
            (0x39, 1.125),
            (0x3F, 1.875),
            (0x40, 2.0),
            (0xB8, -1.0),
            (0x70, 128.0),
            (0x78, 256.0),
            (0x7E, 448.0),
            (0xFE, -448.0),
            (0x5C, 24.0),
        ];
        for (code, v) in table {
            assert_eq!(e4m3_to_f32(code), v, "decode {code:#04x}");
            assert_eq!(E4M3_TABLE[code as usize].to_bits(), v.to_bits(), "table {code:#04x}");
            assert_eq!(f32_to_e4m3(v), code, "encode {v}");
        }
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
    }

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if v.is_nan() {
                continue;
            }
            assert_eq!(f32_to_e4m3(v), code, "{code:#04x} = {v}");
        }
    }

    #[test]
    fn saturates_at_448() {
        for x in [448.0, 449.0, 464.0, 480.0, 1e6, f32::INFINITY, f32::MAX] {
            assert_eq!(f32_to_e4m3(x), 0x7E, "{x}");
            assert_eq!(f32_to_e4m3(-x), 0xFE, "{x}");
        }
        // Just under: rounds to the nearest representable (416 or 448).
        assert_eq!(e4m3_to_f32(f32_to_e4m3(430.0)), 416.0);
        assert_eq!(e4m3_to_f32(f32_to_e4m3(433.0)), 448.0);
    }

    #[test]
    fn ties_round_to_even() {
        // 1.0625 is halfway between 1.0 (mantissa 0, even) and 1.125 (mantissa 1).
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
        // 1.1875 is halfway between 1.125 (odd) and 1.25 (even).
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.1875)), 1.25);
        // Subnormal ties: 1.5 × 2^-9 → 2 × 2^-9 (even); 0.5 × 2^-9 → 0.
        assert_eq!(f32_to_e4m3(1.5 / 512.0), 0x02);
        assert_eq!(f32_to_e4m3(0.5 / 512.0), 0x00);
        assert_eq!(f32_to_e4m3(-0.5 / 512.0), 0x80);
        // A carry out of the mantissa: 1.9375 (halfway 1.875 / 2.0) → 2.0.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(1.9375)), 2.0);
    }

    #[test]
    fn relative_error_of_normals_is_at_most_one_sixteenth() {
        // Every normal magnitude (2^-6 ..= 448), both signs, on a fine grid.
        let mut x = 1.0f32 / 64.0;
        let mut worst = 0f32;
        while x <= E4M3_MAX {
            for v in [x, -x] {
                let back = e4m3_to_f32(f32_to_e4m3(v));
                assert_eq!(back.signum(), v.signum());
                worst = worst.max(((back - v) / v).abs());
            }
            x *= 1.0007;
        }
        assert!(worst <= 1.0 / 16.0, "worst relative error {worst}");
        assert!(worst > 1.0 / 20.0, "the grid should reach near the bound: {worst}");
        // Subnormals: absolute error at most half a step (2^-10).
        for i in 0..1000 {
            let v = i as f32 / 1000.0 / 64.0;
            assert!((e4m3_to_f32(f32_to_e4m3(v)) - v).abs() <= 1.0 / 1024.0);
        }
    }

    #[test]
    fn agrees_with_the_float8_crate() {
        // An independent implementation (the one candle uses for its F8E4M3 dtype).
        for code in 0..=255u8 {
            let ours = e4m3_to_f32(code);
            let theirs = float8::F8E4M3::from_bits(code).to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{code:#04x}"
            );
        }
        let mut x = 1.0f32 / 4096.0;
        while x < E4M3_MAX {
            for v in [x, -x, x * 1.37, -x * 0.61] {
                if v.abs() < E4M3_MAX {
                    assert_eq!(f32_to_e4m3(v), float8::F8E4M3::from_f32(v).to_bits(), "{v}");
                }
            }
            x *= 1.013;
        }
    }

    #[test]
    fn quantize_divides_by_the_scale() {
        let scale = 0.25f32;
        assert_eq!(e4m3_to_f32(quantize(3.0, 1.0 / scale)) * scale, 3.0);
        // 200 / 0.25 = 800 saturates: the stored value is 448 × 0.25 = 112.
        assert_eq!(e4m3_to_f32(quantize(200.0, 1.0 / scale)) * scale, 112.0);
    }
}
