//! The KV layout: which layers produce K/V, the layer → KV-slot map, and the exact
//! accounting of docs/cla-and-kv.md that operators compare with and without sharing.

use super::KvDtype;
use serde::Serialize;

/// The sharing scheme of one model, normalised: built once from a checked `kv_source`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayout {
    kv_source: Vec<usize>,
    /// `layer_slot[i]`: the KV slot layer `i` reads (its producer's slot).
    layer_slot: Vec<usize>,
    /// `producers[s]`: the layer that writes slot `s`.
    producers: Vec<usize>,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype_bytes: usize,
    /// The cache's element type, when known (`with_dtype`); else only its size is.
    dtype: Option<KvDtype>,
}

impl KvLayout {
    /// `kv_source` must already be valid (see `config::validate_kv_source`).
    pub fn new(kv_source: Vec<usize>, num_kv_heads: usize, head_dim: usize, dtype_bytes: usize) -> Self {
        let producers: Vec<usize> = (0..kv_source.len()).filter(|&i| kv_source[i] == i).collect();
        let mut slot_of_producer = vec![usize::MAX; kv_source.len()];
        for (slot, &layer) in producers.iter().enumerate() {
            slot_of_producer[layer] = slot;
        }
        let layer_slot = kv_source.iter().map(|&src| slot_of_producer[src]).collect();
        KvLayout {
            kv_source,
            layer_slot,
            producers,
            num_kv_heads,
            head_dim,
            dtype_bytes,
            dtype: None,
        }
    }

    /// The same layout with elements of `dtype` (its bytes replace `dtype_bytes`).
    pub fn with_dtype(mut self, dtype: KvDtype) -> Self {
        self.dtype_bytes = dtype.bytes();
        self.dtype = Some(dtype);
        self
    }

    /// The element type's name (`KvDtype::name`), or its size when only that is known.
    pub fn dtype_name(&self) -> String {
        match self.dtype {
            Some(d) => d.name().to_string(),
            None => format!("{}-byte", self.dtype_bytes),
        }
    }

    pub fn layers(&self) -> usize {
        self.kv_source.len()
    }
    pub fn kv_layers(&self) -> usize {
        self.producers.len()
    }
    pub fn kv_source(&self) -> &[usize] {
        &self.kv_source
    }
    pub fn slot_of_layer(&self, layer: usize) -> usize {
        self.layer_slot[layer]
    }
    pub fn is_producer(&self, layer: usize) -> bool {
        self.kv_source[layer] == layer
    }
    pub fn producer_of_slot(&self, slot: usize) -> usize {
        self.producers[slot]
    }

    /// The share factor when the pattern is the uniform `i - i % f` one, else `None`.
    pub fn uniform_share_factor(&self) -> Option<usize> {
        (1..=self.layers().max(1)).find(|&f| self.kv_source.iter().enumerate().all(|(i, &s)| s == i - i % f))
    }

    /// Bytes one token of one slot takes: K and V, every KV head.
    fn slot_bytes_per_token(&self) -> usize {
        2 * self.num_kv_heads * self.head_dim * self.dtype_bytes
    }
    pub fn kv_bytes_per_token(&self) -> usize {
        self.kv_layers() * self.slot_bytes_per_token()
    }
    pub fn non_cla_kv_bytes_per_token(&self) -> usize {
        self.layers() * self.slot_bytes_per_token()
    }
    pub fn block_bytes(&self, block_size: usize) -> usize {
        block_size * self.slot_bytes_per_token()
    }

    /// The capacity figures for a KV budget of `kv_cache_bytes`, with and without sharing.
    pub fn capacity(&self, kv_cache_bytes: u64, block_size: usize, seq_len: usize) -> CapacityReport {
        let block_bytes = self.block_bytes(block_size) as u64;
        let num_blocks = (kv_cache_bytes / block_bytes) as usize;
        let blocks_per_seq = seq_len.div_ceil(block_size).max(1);
        let tokens = |kv_layers: usize| (num_blocks / kv_layers) * block_size;
        let concurrency = |kv_layers: usize| num_blocks / (kv_layers * blocks_per_seq);
        CapacityReport {
            layers: self.layers(),
            kv_layers: self.kv_layers(),
            kv_source: self.kv_source.clone(),
            cla_share_factor: self.uniform_share_factor(),
            num_key_value_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            kv_cache_dtype: self.dtype_name(),
            dtype_bytes: self.dtype_bytes,
            kv_bytes_per_token: self.kv_bytes_per_token(),
            non_cla_kv_bytes_per_token: self.non_cla_kv_bytes_per_token(),
            block_size,
            block_bytes: block_bytes as usize,
            num_blocks,
            kv_cache_bytes,
            seq_len,
            capacity_tokens: tokens(self.kv_layers()),
            max_concurrency: concurrency(self.kv_layers()),
            non_cla_capacity_tokens: tokens(self.layers()),
            non_cla_max_concurrency: concurrency(self.layers()),
        }
    }

    /// Blocks needed to hold `kv_cache_tokens` tokens in every slot (`--kv-cache-tokens`).
    pub fn bytes_for_tokens(&self, tokens: usize, block_size: usize) -> u64 {
        (tokens.div_ceil(block_size) * self.kv_layers() * self.block_bytes(block_size)) as u64
    }
}

/// What `crosskv capacity --json` prints (docs/cla-and-kv.md).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CapacityReport {
    pub layers: usize,
    pub kv_layers: usize,
    pub kv_source: Vec<usize>,
    pub cla_share_factor: Option<usize>,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// The element type K and V are stored in (`--kv-cache-dtype`).
    pub kv_cache_dtype: String,
    pub dtype_bytes: usize,
    pub kv_bytes_per_token: usize,
    pub non_cla_kv_bytes_per_token: usize,
    pub block_size: usize,
    pub block_bytes: usize,
    pub num_blocks: usize,
    pub kv_cache_bytes: u64,
    pub seq_len: usize,
    pub capacity_tokens: usize,
    pub max_concurrency: usize,
    pub non_cla_capacity_tokens: usize,
    pub non_cla_max_concurrency: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_producers_in_layer_order() {
        let l = KvLayout::new(vec![0, 0, 2, 2, 2, 5], 2, 8, 4);
        assert_eq!(l.kv_layers(), 3);
        let slots: Vec<usize> = (0..6).map(|i| l.slot_of_layer(i)).collect();
        assert_eq!(slots, vec![0, 0, 1, 1, 1, 2]);
        assert_eq!(l.producer_of_slot(2), 5);
        assert_eq!(l.uniform_share_factor(), None);
        assert_eq!(
            KvLayout::new(vec![0, 0, 0, 3, 3, 3], 1, 8, 2).uniform_share_factor(),
            Some(3)
        );
    }
}
