//! Tensor parallelism over NCCL against one GPU.

use super::model::{tiny_model_schedule, tiny_model_schedule_ranks};
use super::*;

/// Tensor parallelism over the GPUs this machine has (2 or more): a tiny CLA
/// model's logits over N ranks joined by NCCL equal one GPU's, in f32 (tight) and bf16
/// (within twice the error bf16 itself makes), for GQA (KV heads split) and MQA (the KV
/// head replicated). On a machine with one GPU it says so and checks nothing.
#[cfg(feature = "nccl")]
#[test]
fn tensor_parallel_over_gpus_matches_one_gpu() {
    let dev = gpu();
    let gpus = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().unwrap() as usize;
    if gpus < 2 {
        eprintln!("tensor parallelism: SKIPPED, {gpus} GPU on this machine (needs 2 or more)");
        return;
    }
    for world in [2usize, 4, 8].into_iter().filter(|w| *w <= gpus) {
        for kv_heads in [2usize, 1] {
            let tiny = Tiny::new(4, 8, kv_heads, 64, 128, 97)
                .cla("cla_share_factor", json!(2))
                .seed(43);
            let ck = tiny.write();
            let cpu = ck.load();
            let cpu_bf16 = ck.load_with(&LoadOptions {
                dtype: Some(DType::BF16),
                ..LoadOptions::default()
            });
            let bf16_alone = tiny_model_schedule(&cpu, &cpu_bf16, &tiny, DType::BF16, f32::INFINITY);
            for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 2.0 * bf16_alone)] {
                let opts = |tp| LoadOptions {
                    dtype: Some(dtype),
                    device: dev.clone(),
                    tensor_parallel_size: tp,
                    ..LoadOptions::default()
                };
                let one = ck.load_with(&opts(1));
                let ranks = crosskv::model::load_model_dir_ranks(ck.path(), &opts(world)).unwrap();
                for (r, m) in ranks.iter().enumerate() {
                    assert_eq!(m.device().location(), candle_core::DeviceLocation::Cuda { gpu_id: r });
                }
                eprintln!("tensor parallelism: {world} GPUs, {kv_heads} KV heads, {dtype:?}, against one GPU:");
                tiny_model_schedule_ranks(&one, &ranks, &tiny, dtype, tol);
            }
        }
    }
}

/// The single-GPU path through NCCL (N = 1): a communicator of one rank, all-reducing
/// every layer's output with itself, leaves the logits exactly as they were.
#[cfg(feature = "nccl")]
#[test]
fn nccl_with_one_rank_leaves_the_logits_unchanged() {
    let dev = gpu();
    let tiny = Tiny::new(4, 4, 2, 64, 128, 97)
        .cla("cla_share_factor", json!(2))
        .seed(44);
    let ck = tiny.write();
    for dtype in [DType::F32, DType::BF16] {
        let m = ck.load_with(&LoadOptions {
            dtype: Some(dtype),
            device: dev.clone(),
            ..LoadOptions::default()
        });
        let mut through_nccl = m.clone();
        let comm = crosskv::tp::nccl::NcclComm::group(std::slice::from_ref(&dev))
            .unwrap()
            .remove(0);
        through_nccl.set_all_reduce(std::sync::Arc::new(comm));
        let e = tiny_model_schedule(&m, &through_nccl, &tiny, dtype, 0.0);
        eprintln!("NCCL with one rank, {dtype:?}: logits differ by {e:.2e} (relative)");
    }
}
