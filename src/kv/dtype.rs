//! The KV cache's element type (`--kv-cache-dtype`) and the per-slot scales an fp8
//! cache is written and read with.

use candle_core::DType;

/// One KV slot's fp8 scales (defined with the codec that uses them).
pub use crate::ops::fp8::KvScale;

/// What one K or V element of the cache is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    BF16,
    /// fp8 e4m3, one byte an element, written as `x / scale` and read as `code × scale`
    /// with the slot's [`KvScale`] (`ops::fp8`).
    Fp8E4m3,
}

impl KvDtype {
    /// The cache of a model computing in `dtype` (`--kv-cache-dtype auto`).
    pub fn of_model(dtype: DType) -> Self {
        match dtype {
            DType::F16 => KvDtype::F16,
            DType::BF16 => KvDtype::BF16,
            _ => KvDtype::F32,
        }
    }
    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::BF16 => 2,
            KvDtype::Fp8E4m3 => 1,
        }
    }
    /// The name the flag, `/v1/kv`, `capacity` and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::BF16 => "bf16",
            KvDtype::Fp8E4m3 => "fp8_e4m3",
        }
    }
    /// The tensor element type of the cache's storage: fp8 codes are raw bytes (`u8`),
    /// which the cache ops alone interpret.
    pub fn storage(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
            KvDtype::BF16 => DType::BF16,
            KvDtype::Fp8E4m3 => DType::U8,
        }
    }
    pub fn is_fp8(self) -> bool {
        self == KvDtype::Fp8E4m3
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
