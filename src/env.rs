//! Every environment variable crosskv reads or sets, declared once: the name, what it
//! does, and a typed reader. docs/serving.md#environment lists them for users; the
//! `KNOBS` table is what that list is checked against (a test). Imports nothing from the
//! crate, so every layer may use it.

/// An environment variable crosskv reads or sets, and what it does.
pub struct Knob {
    pub name: &'static str,
    pub doc: &'static str,
}

pub const LOG: Knob = Knob {
    name: "CROSSKV_LOG",
    doc: "a tracing filter (e.g. `info`, `debug`) for the logs on stderr",
};
pub const CACHE: Knob = Knob {
    name: "CROSSKV_CACHE",
    doc: "where the default model's GGUF is kept (default `$HOME/.cache/crosskv`)",
};
pub const ISA: Knob = Knob {
    name: "CROSSKV_ISA",
    doc: "`scalar`, `avx2` or `avx512vnni`: caps the instruction set of the quantized CPU kernels",
};
pub const PA_PART_SIZE: Knob = Knob {
    name: "CROSSKV_PA_PART_SIZE",
    doc: "a multiple of 64: fixes the CUDA decode-attention partition size (keys per partition)",
};
pub const PA_CLUSTER: Knob = Knob {
    name: "CROSSKV_PA_CLUSTER",
    doc: "`0` turns off combining CUDA decode-attention partitions in thread-block clusters",
};
pub const PA_KERNEL: Knob = Knob {
    name: "CROSSKV_PA_KERNEL",
    doc: "`cuda-core` runs 16-bit CUDA attention (and an fp8 cache's) on the CUDA-core kernel instead of the tensor-core ones",
};
pub const CANDLE_NUM_THREADS: Knob = Knob {
    name: "CANDLE_NUM_THREADS",
    doc: "candle's own thread pool; set to 1 at start unless given, so it does not compete with ours",
};
pub const RAYON_NUM_THREADS: Knob = Knob {
    name: "RAYON_NUM_THREADS",
    doc: "threads of the CPU ops' pool (default: one per core)",
};
pub const HOME: Knob = Knob {
    name: "HOME",
    doc: "the base of the default model cache when CROSSKV_CACHE is not set",
};
pub const HF_HOME: Knob = Knob {
    name: "HF_HOME",
    doc: "the Hugging Face cache looked in before the hub",
};
pub const HF_TOKEN: Knob = Knob {
    name: "HF_TOKEN",
    doc: "a Hugging Face token for hub downloads",
};
pub const NCCL_NVLS_ENABLE: Knob = Knob {
    name: "NCCL_NVLS_ENABLE",
    doc: "set to 0 (NVLink multicast off) before NCCL starts",
};

/// Every knob the server and the commands use (benchmarks and tests document their own).
pub const KNOBS: &[&Knob] = &[
    &LOG,
    &CACHE,
    &ISA,
    &PA_PART_SIZE,
    &PA_CLUSTER,
    &PA_KERNEL,
    &CANDLE_NUM_THREADS,
    &RAYON_NUM_THREADS,
    &HOME,
    &HF_HOME,
    &HF_TOKEN,
    &NCCL_NVLS_ENABLE,
];

impl Knob {
    /// The value, when set and valid UTF-8.
    pub fn get(&self) -> Option<String> {
        std::env::var(self.name).ok()
    }
    pub fn is_set(&self) -> bool {
        std::env::var_os(self.name).is_some()
    }
    /// Sets it for this process (before any thread that reads it starts).
    pub fn set(&self, value: &str) {
        std::env::set_var(self.name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_knob_is_documented_for_users() {
        let docs = include_str!("../docs/serving.md");
        for k in KNOBS {
            assert!(
                docs.contains(&format!("`{}`", k.name)),
                "{} is missing from docs/serving.md",
                k.name
            );
            assert!(!k.doc.is_empty());
        }
    }
}
