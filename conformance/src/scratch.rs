//! Helpers for factories that build stores in a scratch namespace of a shared server (a
//! schema, a table prefix, a key prefix) and remove it afterwards.

use std::future::Future;

/// A name for one run's scratch namespace, unique enough across processes and runs:
/// `<pid>_<nanoseconds>` (lowercase hex digits and `_`, valid in any identifier or key).
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}_{nanos:x}", std::process::id())
}

/// Runs `fut` to completion on a thread of its own, on a fresh single-threaded tokio
/// runtime, and returns its output (`None` if the runtime cannot be built or the thread
/// panicked). For a factory's `Drop`: the runtime the factory ran on may be shutting down
/// (or be the one blocked in the drop), so the removal cannot run there.
pub fn block_on_own_thread<Fut>(fut: Fut) -> Option<Fut::Output>
where
    Fut: Future + Send,
    Fut::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()
                .map(|rt| rt.block_on(fut))
        })
        .join()
        .ok()
        .flatten()
    })
}
