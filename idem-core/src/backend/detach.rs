//! Store calls that run to their end on their own task, whatever happens to the caller's
//! future.
//!
//! A caller's future can be dropped at any await point. If a statement or a transaction
//! were driven by that future, dropping it would leave a connection mid-protocol (or inside
//! a transaction) and the key's fate to chance. With [`detached`] the call runs on a spawned
//! task that owns its connection, and the caller only waits for the answer: the one await
//! point a caller can be dropped at is that wait. An answer nobody received (a claim that
//! succeeded for a caller that is gone) goes to an *orphan* handler, which can undo it.
//!
//! ```
//! use idem_core::backend::detach::{detached, forget};
//! use idem_core::Error;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let rows: u64 = detached(async { Ok::<_, Error>(1) }, forget).await?;
//! assert_eq!(rows, 1);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::panic;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::Error;

/// Runs `work` on its own tokio task and returns its output.
///
/// Dropping the returned future does not stop `work`. If the caller is gone when `work`
/// ends with `Ok`, the value goes to `orphan` instead, with the runtime to spawn clean-up on
/// (called on the task, or in the dropped future's destructor if the output arrived just
/// before the drop): exactly one of the caller and `orphan` receives it. An `Err` nobody
/// received is dropped. A panic in `work` resumes in the caller. Outside a tokio runtime
/// the answer is [`Error::Config`]; a task cancelled by a runtime shutting down is a
/// retryable [`Error::Store`].
pub async fn detached<T, E, W, O>(work: W, orphan: O) -> Result<T, E>
where
    T: Send + 'static,
    E: From<Error> + Send + 'static,
    W: Future<Output = Result<T, E>> + Send + 'static,
    O: Fn(T, &Handle) + Clone + Send + 'static,
{
    let runtime = Handle::try_current()
        .map_err(|e| Error::Config(format!("store calls run on a tokio runtime: {e}")))?;
    let (tx, rx) = oneshot::channel();
    let (on_task, task_runtime) = (orphan.clone(), runtime.clone());
    let task = runtime.spawn(async move {
        if let Err(Ok(unreceived)) = tx.send(work.await) {
            on_task(unreceived, &task_runtime);
        }
    });
    let mut waiting = Waiting {
        rx,
        orphan,
        runtime,
        received: false,
    };
    let received = (&mut waiting.rx).await;
    waiting.received = true;
    match received {
        Ok(output) => output,
        // The task ended without sending: it panicked, or its runtime is shutting down.
        Err(_) => match task.await {
            Err(e) if e.is_panic() => panic::resume_unwind(e.into_panic()),
            _ => Err(Error::retryable("the task running the store call was cancelled").into()),
        },
    }
}

/// The caller's side of [`detached`]: if dropped before the output was received, hands an
/// output already sent to `orphan`, and makes the task's later send fail so that the task
/// hands it over instead.
struct Waiting<T, E, O: Fn(T, &Handle)> {
    rx: oneshot::Receiver<Result<T, E>>,
    orphan: O,
    runtime: Handle,
    received: bool,
}

impl<T, E, O: Fn(T, &Handle)> Drop for Waiting<T, E, O> {
    fn drop(&mut self) {
        if !self.received {
            self.rx.close();
            if let Ok(Ok(output)) = self.rx.try_recv() {
                (self.orphan)(output, &self.runtime);
            }
        }
    }
}

/// An orphan handler for outputs that need no clean-up: a committed outcome is replayed by
/// the next request, a rolled-back one left nothing.
pub fn forget<T>(_: T, _: &Handle) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_caller_hands_the_output_to_the_orphan_handler() {
        let orphaned = Arc::new(AtomicU32::new(0));
        let (go, wait) = oneshot::channel::<()>();
        let counter = Arc::clone(&orphaned);
        let call = detached(
            async move {
                let _ = wait.await;
                Ok::<u32, Error>(7)
            },
            move |v: u32, _: &Handle| {
                counter.fetch_add(v, Ordering::SeqCst);
            },
        );
        // Dropped while the work waits: the work goes on.
        assert!(tokio::time::timeout(Duration::from_millis(10), call)
            .await
            .is_err());
        go.send(()).unwrap();
        for _ in 0..100 {
            if orphaned.load(Ordering::SeqCst) == 7 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the orphan handler never received the output");
    }

    #[test]
    fn outside_a_runtime_the_answer_is_a_config_error() {
        let call = std::pin::pin!(detached(async { Ok::<(), Error>(()) }, forget));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Refused at the first poll, before anything is spawned.
        assert!(matches!(
            call.poll(&mut cx),
            std::task::Poll::Ready(Err(Error::Config(_)))
        ));
    }
}
