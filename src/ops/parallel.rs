//! Parallel loops for the CPU ops. Tasks are claimed from a shared counter by the
//! calling thread and by rayon helpers; the caller waits only for tasks already
//! claimed, never for a helper that has not started. On a busy machine (more runnable
//! threads than cores) a barrier that waits for every worker stalls whenever one is
//! descheduled, which is what collapses barrier-synchronised engines under load.
//!
//! Run the whole model step inside the pool (`in_pool`): then the helpers are plain
//! spawns and the caller works too, with no hand-off to another thread per op.

use std::sync::atomic::{AtomicUsize, Ordering};

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

/// Runs `f` on a rayon worker (inline when already on one).
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Runs `f(i)` for every `i` in `0..n`, in parallel.
pub(crate) fn run_tasks(n: usize, f: impl Fn(usize) + Sync) {
    if n <= 1 {
        if n == 1 {
            f(0);
        }
        return;
    }
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    };
    let helpers = rayon::current_num_threads().saturating_sub(1).min(n - 1);
    rayon::scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| work());
        }
        work();
    });
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
