//! Parallel loops for the CPU reference ops, on candle's own CPU thread pool: sharing
//! its (spinning) workers instead of starting a second pool keeps two pools from
//! fighting over the cores between every op of a decode step.

use candle_core::utils::barrier_pool;

/// A raw pointer the tasks below may share; each task touches a disjoint range.
struct SharedMut<T>(*mut T);
// SAFETY: only used to hand disjoint sub-slices to concurrent tasks.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Runs `f(i)` for every `i` in `0..n` across candle's thread pool.
pub(crate) fn run_tasks(n: usize, f: impl Fn(usize) + Sync) {
    match n {
        0 => {}
        1 => f(0),
        _ => barrier_pool().execute_chunked(n, |range| range.for_each(&f)),
    }
}

/// Calls `f(i, chunk)` for each `chunk_len`-element chunk of `out`, in parallel.
pub(crate) fn for_each_chunk_mut<T: Send>(out: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let len = out.len();
    let base = SharedMut(out.as_mut_ptr());
    run_tasks(len.div_ceil(chunk_len), |i| {
        let start = i * chunk_len;
        let end = (start + chunk_len).min(len);
        // SAFETY: chunks are disjoint and within `out`, which outlives this call.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, chunk)
    });
}

/// Like `for_each_chunk_mut` over several buffers at once: `tasks[i] = (buffer, start,
/// len)` and `f(i, &mut buffers[buffer][start..start + len])`. Tasks must not overlap.
pub(crate) fn for_each_piece_mut<T: Send>(
    buffers: &mut [Vec<T>],
    tasks: &[(usize, usize, usize)],
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    for &(b, start, len) in tasks {
        assert!(start + len <= buffers[b].len(), "task outside its buffer");
    }
    let bases: Vec<SharedMut<T>> = buffers.iter_mut().map(|b| SharedMut(b.as_mut_ptr())).collect();
    run_tasks(tasks.len(), |i| {
        let (b, start, len) = tasks[i];
        // SAFETY: bounds checked above; the caller's tasks are disjoint.
        let piece = unsafe { std::slice::from_raw_parts_mut(bases[b].get().add(start), len) };
        f(i, piece)
    });
}
