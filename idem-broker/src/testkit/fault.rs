//! Retrying a step while a broker is down, waiting for a condition with a liveness bound,
//! and reading a ledger of effects.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idem_sqlite::SqliteStore;

/// How long one attempt (a connection, a publish, a fetch) may take before it is given up
/// and retried.
pub const ATTEMPT_BOUND: Duration = Duration::from_secs(5);
/// How long a run may go without reaching its goal: a liveness bound, never a
/// performance assertion.
pub const LIVENESS: Duration = Duration::from_secs(120);
/// The pause between two attempts, or two looks at a condition.
pub const PAUSE: Duration = Duration::from_millis(20);

/// What a fault test can say about its progress.
pub trait Progress {
    /// The counters so far, for a failure message.
    fn summary(&self) -> String;
    /// Panics if an outcome that must not happen has happened.
    fn assert_expected(&self);
}

impl<P: Progress + ?Sized> Progress for std::sync::Arc<P> {
    fn summary(&self) -> String {
        (**self).summary()
    }
    fn assert_expected(&self) {
        (**self).assert_expected()
    }
}

/// Runs `attempt` until it succeeds, taking every error as retryable (the broker is down
/// or still recovering), each attempt bounded by [`ATTEMPT_BOUND`] and all of them by
/// [`LIVENESS`]; counts the retries in `retries`.
///
/// # Panics
///
/// When the attempts still fail after [`LIVENESS`].
pub async fn retry<T, E, F>(what: &str, retries: &AtomicUsize, mut attempt: impl FnMut() -> F) -> T
where
    E: Display,
    F: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    loop {
        let error = match tokio::time::timeout(ATTEMPT_BOUND, attempt()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {ATTEMPT_BOUND:?}"),
        };
        assert!(
            started.elapsed() < LIVENESS,
            "{what} still fails after {LIVENESS:?}: {error}"
        );
        retries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(PAUSE).await;
    }
}

/// Waits (bounded by [`LIVENESS`]) until `done` holds, failing early on an unexpected
/// outcome.
///
/// # Panics
///
/// On an unexpected outcome, or when `done` does not hold after [`LIVENESS`].
pub async fn wait_until(what: &str, progress: &impl Progress, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        progress.assert_expected();
        assert!(
            started.elapsed() < LIVENESS,
            "{what} within {LIVENESS:?}: {}",
            progress.summary()
        );
        tokio::time::sleep(PAUSE).await;
    }
}

/// The rows of the table `effects (id TEXT)` of `store`, counted per id: a duplicate effect
/// shows as a count of 2.
///
/// # Panics
///
/// When the table cannot be read.
pub async fn effects(store: &SqliteStore) -> BTreeMap<String, u32> {
    store
        .with_connection(|c| {
            let mut rows = c.prepare("SELECT id, COUNT(*) FROM effects GROUP BY id")?;
            let rows = rows.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
        .await
        .expect("the effects table is readable")
}
