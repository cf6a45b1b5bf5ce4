//! The CUDA launches of `adamw` (feature `cuda`): `kernels/adamw.cu`.

use super::Scalars;
use crate::ops::cuda::{contiguous, cuda_of, ptx, raw_range, suffix};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use std::cell::RefCell;

/// `name` over `dst` (n elements of the variable, or 2n of the moments) and `src`:
/// n is the variable's size, the smaller of the two.
pub(super) fn launch(
    name: &str,
    dst: &mut CudaStorage,
    dl: &Layout,
    src: &CudaStorage,
    sl: &Layout,
    s: Scalars,
) -> Result<()> {
    let (d0, d1) = contiguous(dl, name, "dst")?;
    let (s0, s1) = contiguous(sl, name, "src")?;
    let n = (d1 - d0).min(s1 - s0);
    if n == 0 {
        return Ok(());
    }
    let dev = dst.device.clone();
    let f = dev.get_or_load_custom_func(name, "crosskv_adamw", ptx::ADAMW)?;
    let src = src.as_cuda_slice::<f32>()?.slice(s0..s1);
    let mut dst = dst.as_cuda_slice_mut::<f32>()?.slice_mut(d0..d1);
    let n64 = n as u64;
    let mut b = f.builder();
    b.arg(&mut dst).arg(&src).arg(&n64).arg(&s);
    // Memory-bound: enough 256-thread blocks to fill the GPU, each striding on.
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The tensors of a multi-tensor launch (`*_many_*` in kernels/adamw.cu): a row of
/// u64 per tensor (addresses, its length) and the prefix sums of their blocks, in
/// which a block finds its tensor by binary search (`owner_of_block`).
struct BlockTable {
    entries: Vec<u64>,
    starts: Vec<u32>,
}

impl BlockTable {
    fn new() -> Self {
        BlockTable {
            entries: Vec::new(),
            starts: vec![0],
        }
    }

    fn push(&mut self, entry: &[u64], blocks: usize) {
        self.entries.extend_from_slice(entry);
        let last = *self.starts.last().expect("starts begins with 0");
        self.starts.push(last + blocks as u32);
    }

    /// Runs `launch(table, starts, count, config)` on the device copies, unless the
    /// table is empty.
    fn launch(
        &self,
        dev: &CudaDevice,
        launch: impl FnOnce(&CudaSlice<u64>, &CudaSlice<u32>, u32, LaunchConfig) -> Result<()>,
    ) -> Result<()> {
        let count = (self.starts.len() - 1) as u32;
        if count == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (*self.starts.last().expect("starts begins with 0"), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        launch(
            &dev.clone_htod(&self.entries)?,
            &dev.clone_htod(&self.starts)?,
            count,
            cfg,
        )
    }
}

/// One `sum_squares_many_*` launch over `gs` (contiguous, one dtype, acc's device) into `acc`.
pub(super) fn sum_squares_many(acc: &Tensor, gs: &[Tensor]) -> Result<()> {
    const OP: &str = "sum_squares_many";
    let dtype = gs[0].dtype();
    let guards: Vec<_> = gs.iter().map(|g| g.storage_and_layout()).collect();
    let dev = cuda_of(&guards[0].0, OP, "the gradient")?.device.clone();
    // (address, length) of each gradient: a block per 16384 elements (8 vector loads a
    // thread), at most 1056 per tensor. Blocks of a few scalar loads each cost more to
    // schedule than their loads (BENCHMARKS.md, "Measurements behind design choices").
    let mut table = BlockTable::new();
    for (s, l) in &guards {
        let (a, b) = contiguous(l, OP, "gradient")?;
        let g = cuda_of(s, OP, "the gradient")?;
        if g.dtype() != dtype {
            candle_core::bail!("{OP}: gradients of {:?} and {dtype:?} in one launch", g.dtype());
        }
        if b > a {
            let ptr = raw_range(g, a..b, OP, "the gradient")?;
            table.push(&[ptr, (b - a) as u64], (b - a).div_ceil(16384).min(1056));
        }
    }
    let f = dev.get_or_load_custom_func(
        &format!("sum_squares_many_{}", suffix(dtype, OP)?),
        "crosskv_adamw",
        ptx::ADAMW,
    )?;
    table.launch(&dev, |table, starts, count, cfg| {
        acc.inplace_op1(&Lend(OP, |accs: &mut CudaStorage, al: &Layout| {
            let (a0, a1) = contiguous(al, OP, "accumulator")?;
            let mut acc = accs.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a1);
            let mut b = f.builder();
            b.arg(&mut acc).arg(table).arg(starts).arg(&count);
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }))
    })?;
    drop(guards);
    Ok(())
}

/// One `adamw_mixed_many_*` launch over `items` (CUDA, one copy dtype, checked).
pub(super) fn mixed_many(items: &[super::MixedUpdate], s: &Scalars) -> Result<()> {
    const OP: &str = "adamw_update_mixed_many";
    let grads: Vec<Tensor> = items.iter().map(|it| it.3.contiguous()).collect::<Result<_>>()?;
    // Read guards on every storage while the table is built and the kernel launched;
    // the kernel writes master, moments and copy in place, as the one-tensor op does
    // through its lent storages (nothing else runs on them meanwhile: one stream).
    let guards: Vec<[_; 4]> = items
        .iter()
        .zip(&grads)
        .map(|(it, g)| [it.0, it.1, it.2, g].map(|t| t.storage_and_layout()))
        .collect();
    let dtype = items[0].2.dtype();
    let mut dev = None;
    let mut table = BlockTable::new();
    for (it, gd) in items.iter().zip(&guards) {
        let n = it.0.elem_count();
        if n == 0 {
            continue;
        }
        let mut entry = [0u64; 5];
        for (i, ((st, l), what)) in gd
            .iter()
            .zip(["the variable", "the moments", "the copy", "the gradient"])
            .enumerate()
        {
            let c = cuda_of(st, OP, what)?;
            let (a, b) = contiguous(l, OP, what)?;
            let want = if i == 1 { 2 * n } else { n };
            if b - a != want {
                candle_core::bail!("{OP}: {what} holds {} elements, {want} expected", b - a);
            }
            let (want_dtype, got) = (if i < 2 { DType::F32 } else { dtype }, c.dtype());
            if got != want_dtype {
                candle_core::bail!("{OP}: {what} is {got:?}, {want_dtype:?} expected");
            }
            entry[i] = raw_range(c, a..b, OP, what)?;
            dev.get_or_insert_with(|| c.device.clone());
        }
        entry[4] = n as u64;
        // About 8 elements a thread (28 bytes each), at most 2048 blocks a tensor.
        table.push(&entry, n.div_ceil(256 * 8).min(2048));
    }
    let Some(dev) = dev else { return Ok(()) };
    let name = format!("adamw_mixed_many_{}", suffix(dtype, OP)?);
    let f = dev.get_or_load_custom_func(&name, "crosskv_adamw", ptx::ADAMW)?;
    table.launch(&dev, |table, starts, count, cfg| {
        let mut b = f.builder();
        b.arg(table).arg(starts).arg(&count).arg(s);
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })?;
    drop(guards);
    Ok(())
}

/// Lends one tensor's storage mutably to `f` (an in-place op that only runs `f`), so
/// that nesting three of them holds the write locks of master, moments and copy at
/// once: candle's in-place ops lend one mutable storage each.
struct Lend<F>(&'static str, F);

impl<F: Fn(&mut CudaStorage, &Layout) -> Result<()>> InplaceOp1 for Lend<F> {
    fn name(&self) -> &'static str {
        self.0
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("{}: the CUDA path got a CPU tensor", self.0)
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        (self.1)(s, l)
    }
}

/// The mixed-precision update as one kernel (`adamw_mixed_{bf16,f16}`).
pub(super) fn mixed(theta: &Tensor, mv: &Tensor, copy: &Tensor, g: &Tensor, s: &Scalars) -> Result<()> {
    const OP: &str = "adamw_update_mixed";
    let n = theta.elem_count();
    if n == 0 {
        return Ok(());
    }
    let (gs, gl) = g.storage_and_layout();
    let gs = cuda_of(&gs, OP, "the gradient")?;
    let (g0, g1) = contiguous(gl, OP, "the gradient")?;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as u64;
    theta.inplace_op1(&Lend(OP, |ts: &mut CudaStorage, tl: &Layout| {
        let ts = RefCell::new(ts);
        mv.inplace_op1(&Lend(OP, |ms: &mut CudaStorage, ml: &Layout| {
            let ms = RefCell::new(ms);
            copy.inplace_op1(&Lend(OP, |cs: &mut CudaStorage, cl: &Layout| {
                let (mut ts, mut ms) = (ts.borrow_mut(), ms.borrow_mut());
                let (t0, t1) = contiguous(tl, OP, "the variable")?;
                let (m0, m1) = contiguous(ml, OP, "the moments")?;
                let (c0, c1) = contiguous(cl, OP, "the compute copy")?;
                let dev = cs.device.clone();
                let name = format!("adamw_mixed_{}", suffix(cs.dtype(), OP)?);
                let f = dev.get_or_load_custom_func(&name, "crosskv_adamw", ptx::ADAMW)?;
                let mut theta = ts.as_cuda_slice_mut::<f32>()?.slice_mut(t0..t1);
                let mut mv = ms.as_cuda_slice_mut::<f32>()?.slice_mut(m0..m1);
                macro_rules! go {
                    ($t:ty) => {{
                        let mut copy = cs.as_cuda_slice_mut::<$t>()?.slice_mut(c0..c1);
                        let g = gs.as_cuda_slice::<$t>()?.slice(g0..g1);
                        let mut b = f.builder();
                        b.arg(&mut theta)
                            .arg(&mut mv)
                            .arg(&mut copy)
                            .arg(&g)
                            .arg(&n64)
                            .arg(s);
                        unsafe { b.launch(cfg) }.w()?;
                    }};
                }
                match cs.dtype() {
                    DType::BF16 => go!(half::bf16),
                    _ => go!(half::f16),
                }
                Ok(())
            }))
        }))
    }))
}
