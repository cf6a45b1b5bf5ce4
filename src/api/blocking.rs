//! CPU-heavy request work (tokenizing, chat templates, detokenizing) runs here, off the
//! async runtime's few worker threads, so a large prompt never delays other requests,
//! `/health` or the streams in progress. At most one job per core runs at once; the
//! rest wait their turn without holding a thread.

use std::sync::OnceLock;
use tokio::sync::Semaphore;

fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// A job that panicked (its message), as an error for the request that ran it.
#[derive(Debug, thiserror::Error)]
#[error("internal error while preparing the request: {0}")]
pub struct JobPanicked(pub String);

/// Runs `job` on the blocking pool, at most one per core at a time.
pub async fn run<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> Result<T, JobPanicked> {
    let _permit = permits().acquire().await.map_err(|e| JobPanicked(e.to_string()))?;
    tokio::task::spawn_blocking(job).await.map_err(|e| {
        let msg = if e.is_panic() {
            let p = e.into_panic();
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into())
        } else {
            e.to_string()
        };
        tracing::error!("request preparation failed: {msg}");
        JobPanicked(msg)
    })
}
