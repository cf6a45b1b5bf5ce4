//! Tensor parallelism: one model spread over `world` ranks, Megatron style.
//!
//! Each rank holds a contiguous share of the query heads and of the MLP's intermediate
//! features: q/k/v and gate/up are split by output rows (column-parallel), o and down
//! by input columns (row-parallel), so each rank's o/down output is a partial sum that
//! one all-reduce per sublayer completes. Embedding, norms and `lm_head` are replicated.
//! KV heads follow their query heads; with fewer KV heads than ranks (MQA) each KV head
//! is replicated on the ranks whose query heads read it. Every rank runs the same step
//! with the same block tables; its KV cache holds only its own KV heads of every slot.
//!
//! The all-reduce is [`AllReduce`]: NCCL on GPUs ([`nccl`], feature `nccl`), or
//! [`LocalGroup`], threads of one process summing through shared memory, which makes
//! the whole sharded path runnable (and tested) on the CPU.

#[cfg(feature = "nccl")]
pub mod nccl;

use candle_core::{Device, Result, Tensor};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

/// Which share of the model this rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard::single()
    }
}

/// A model's split: what each rank gets, checked once against the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
    pub ffn: Range<usize>,
}

impl Shard {
    pub fn single() -> Self {
        Shard { rank: 0, world: 1 }
    }
    pub fn is_single(&self) -> bool {
        self.world == 1
    }

    /// This rank's query heads, KV heads and intermediate features of a model with
    /// `heads` query heads, `kv_heads` KV heads and `ffn` intermediate features; an error
    /// names what does not divide.
    pub fn split(&self, heads: usize, kv_heads: usize, ffn: usize) -> std::result::Result<Split, String> {
        let n = self.world;
        if n == 0 || self.rank >= n {
            return Err(format!("rank {} of a world of {n}", self.rank));
        }
        if !heads.is_multiple_of(n) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of the tensor-parallel size {n}"
            ));
        }
        if !ffn.is_multiple_of(n) {
            return Err(format!(
                "intermediate_size {ffn} is not a multiple of the tensor-parallel size {n}"
            ));
        }
        if !(kv_heads.is_multiple_of(n) || n.is_multiple_of(kv_heads)) {
            return Err(format!(
                "num_key_value_heads {kv_heads} must divide or be a multiple of the tensor-parallel size {n}"
            ));
        }
        let hr = heads / n;
        let kv = if kv_heads >= n {
            let kr = kv_heads / n;
            self.rank * kr..(self.rank + 1) * kr
        } else {
            // Fewer KV heads than ranks: `n / kv_heads` ranks share (replicate) each one.
            let k = self.rank / (n / kv_heads);
            k..k + 1
        };
        let fr = ffn / n;
        Ok(Split {
            heads: self.rank * hr..(self.rank + 1) * hr,
            kv_heads: kv,
            ffn: self.rank * fr..(self.rank + 1) * fr,
        })
    }
}

/// Rank `rank`'s device: the GPU `rank` places after `base`'s, or the CPU.
pub fn rank_device(base: &Device, rank: usize) -> Result<Device> {
    match base {
        Device::Cpu => Ok(Device::Cpu),
        _ if rank == 0 => Ok(base.clone()),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let ordinal = match base.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => unreachable!("a CUDA device"),
            };
            crate::device::cuda(ordinal + rank)
        }
        d => candle_core::bail!("tensor parallelism: device {d:?} is not supported"),
    }
}

/// One all-reduce handle per rank of `devices` (rank order): NCCL when they are GPUs
/// (feature `nccl`), [`LocalGroup`] on the CPU. One rank needs none: the list is empty.
pub fn connect(devices: &[Device]) -> Result<Vec<Arc<dyn AllReduce>>> {
    if devices.len() < 2 {
        return Ok(Vec::new());
    }
    if devices.iter().all(|d| d.is_cpu()) {
        return Ok(LocalGroup::new(devices.len())
            .into_iter()
            .map(|g| Arc::new(g) as Arc<dyn AllReduce>)
            .collect());
    }
    connect_gpus(devices)
}

#[cfg(feature = "nccl")]
fn connect_gpus(devices: &[Device]) -> Result<Vec<Arc<dyn AllReduce>>> {
    Ok(nccl::NcclComm::group(devices)?
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn AllReduce>)
        .collect())
}

#[cfg(not(feature = "nccl"))]
fn connect_gpus(_: &[Device]) -> Result<Vec<Arc<dyn AllReduce>>> {
    candle_core::bail!("tensor parallelism over GPUs needs NCCL: build with --features nccl")
}

/// Sums a tensor over all ranks; every rank gets the same total. Each rank calls it
/// from its own thread, at the same points of the same forward.
pub trait AllReduce: Send + Sync + std::fmt::Debug {
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor>;
    /// A rank failed and will not reach its next all-reduce: the others must not wait
    /// for it. After this every all-reduce of the group fails at once.
    fn abort(&self) {}
}

/// The in-process transport: ranks are threads; each deposits its partial sum, and all
/// of them add the deposits in rank order, so every rank's total is bit-identical (the
/// residual streams of the ranks must not drift apart). A two-phase barrier (deposit,
/// then read) on a condition variable, so that [`AllReduce::abort`] can wake it.
#[derive(Debug)]
struct Exchange {
    round: Mutex<Round>,
    changed: Condvar,
    world: usize,
}

#[derive(Debug)]
struct Round {
    slots: Vec<Option<Tensor>>,
    deposited: usize,
    read: usize,
    /// Every rank has deposited; ranks are taking the parts.
    reading: bool,
    aborted: bool,
}

#[derive(Debug, Clone)]
pub struct LocalGroup {
    rank: usize,
    ex: Arc<Exchange>,
}

impl LocalGroup {
    /// One handle per rank, rank order.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let ex = Arc::new(Exchange {
            round: Mutex::new(Round {
                slots: vec![None; world],
                deposited: 0,
                read: 0,
                reading: false,
                aborted: false,
            }),
            changed: Condvar::new(),
            world,
        });
        (0..world).map(|rank| LocalGroup { rank, ex: ex.clone() }).collect()
    }
}

fn aborted() -> candle_core::Error {
    candle_core::Error::Msg("all-reduce: another tensor-parallel rank failed".into())
}

impl AllReduce for LocalGroup {
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let ex = &self.ex;
        let wait = |r| ex.changed.wait(r).expect("all-reduce lock");
        let mut r = ex.round.lock().expect("all-reduce lock");
        // The previous round is read by everyone before this one's deposits.
        while r.reading && !r.aborted {
            r = wait(r);
        }
        if r.aborted {
            return Err(aborted());
        }
        r.slots[self.rank] = Some(x.clone());
        r.deposited += 1;
        if r.deposited == ex.world {
            r.reading = true;
            ex.changed.notify_all();
        }
        while !r.reading && !r.aborted {
            r = wait(r);
        }
        if r.aborted {
            return Err(aborted());
        }
        let parts: Vec<Tensor> = r
            .slots
            .iter()
            .map(|t| t.clone().expect("every rank deposited"))
            .collect();
        r.read += 1;
        if r.read == ex.world {
            r.slots.iter_mut().for_each(|s| *s = None);
            (r.deposited, r.read, r.reading) = (0, 0, false);
            ex.changed.notify_all();
        }
        drop(r);
        let dev = x.device();
        let mut sum = parts[0].to_device(dev)?;
        for p in &parts[1..] {
            sum = (sum + p.to_device(dev)?)?;
        }
        Ok(sum)
    }

    fn abort(&self) {
        self.ex.round.lock().expect("all-reduce lock").aborted = true;
        self.ex.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_split_evenly_and_kv_heads_follow_their_queries() {
        // GQA: 8 query heads, 4 KV heads (group 2), 2 ranks.
        let s = |rank, world| Shard { rank, world }.split(8, 4, 64).unwrap();
        assert_eq!(s(1, 2).heads, 4..8);
        assert_eq!(s(1, 2).kv_heads, 2..4);
        assert_eq!(s(1, 2).ffn, 32..64);
        // Every query head's KV head (h / group) is one this rank holds.
        for world in [1, 2, 4, 8] {
            for kvh in [1, 2, 4, 8] {
                for rank in 0..world {
                    let sp = Shard { rank, world }.split(8, kvh, 64).unwrap();
                    let group = 8 / kvh;
                    for h in sp.heads.clone() {
                        assert!(
                            sp.kv_heads.contains(&(h / group)),
                            "world {world} kvh {kvh} rank {rank} head {h}"
                        );
                    }
                }
            }
        }
        // MQA on 4 ranks: the one KV head on every rank.
        assert_eq!(Shard { rank: 3, world: 4 }.split(8, 1, 64).unwrap().kv_heads, 0..1);
        // GQA with 2 KV heads on 4 ranks: ranks 0-1 share head 0, ranks 2-3 head 1.
        assert_eq!(Shard { rank: 2, world: 4 }.split(8, 2, 64).unwrap().kv_heads, 1..2);
    }

    #[test]
    fn a_split_that_does_not_divide_names_the_field() {
        let e = Shard { rank: 0, world: 3 }.split(8, 2, 64).unwrap_err();
        assert!(e.contains("num_attention_heads 8"), "{e}");
        let e = Shard { rank: 0, world: 2 }.split(8, 2, 63).unwrap_err();
        assert!(e.contains("intermediate_size 63"), "{e}");
        let e = Shard { rank: 0, world: 4 }.split(12, 6, 64).unwrap_err();
        assert!(e.contains("num_key_value_heads 6"), "{e}");
    }

    #[test]
    fn local_all_reduce_sums_in_rank_order_on_every_rank() {
        let groups = LocalGroup::new(3);
        let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    s.spawn(move || {
                        let mut last = vec![];
                        for round in 0..5 {
                            let x = Tensor::new(&[r as f32 + round as f32, 1.0], &candle_core::Device::Cpu).unwrap();
                            last = g.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap();
                        }
                        last
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Round 4: (0+4) + (1+4) + (2+4) = 15, and 3 ones.
        for o in outs {
            assert_eq!(o, vec![15.0, 3.0]);
        }
    }

    #[test]
    fn an_aborted_group_wakes_the_ranks_waiting_in_it() {
        let groups = LocalGroup::new(3);
        let x = Tensor::new(&[1f32], &candle_core::Device::Cpu).unwrap();
        let results: Vec<bool> = std::thread::scope(|s| {
            let waiting: Vec<_> = groups[..2]
                .iter()
                .map(|g| {
                    let x = x.clone();
                    s.spawn(move || g.all_reduce_sum(&x).is_err())
                })
                .collect();
            // Rank 2 fails instead of reaching the all-reduce.
            std::thread::sleep(std::time::Duration::from_millis(50));
            groups[2].abort();
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results, vec![true, true]);
        // And later rounds fail at once instead of waiting.
        assert!(groups[0].all_reduce_sum(&x).is_err());
    }
}
