//! Store calls that run to their end, whatever happens to the caller's future.
//!
//! A caller's future can be dropped at any await point. If a statement or a transaction
//! simply stopped there, it would leave a connection mid-protocol (or inside a transaction)
//! and the key's fate to chance. A [`detached`] call owns its connection and is polled by its
//! caller, in the caller's task (no task is spawned on the way to the answer); if the caller
//! drops it unfinished, the rest of the call moves onto a tokio task of its own and runs to
//! its end there. An answer nobody received (a claim that succeeded for a caller that is
//! gone) goes to an *orphan* handler, which can undo it.
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
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;

use crate::error::Error;

/// Runs `work` to its end and returns its output.
///
/// `work` runs inside the caller's task while the caller polls it: no task is spawned on
/// the way to the answer. Dropping the returned future does not stop `work`: an unfinished
/// `work` moves onto a tokio task of its own, which runs it to its end, and a value `Ok`
/// nobody received goes to `orphan` (with the runtime to spawn clean-up on): exactly one of
/// the caller and `orphan` receives it. An `Err` nobody received is dropped. A panic in
/// `work` unwinds through the caller, and the panicked `work` is dropped, not continued.
/// Outside a tokio runtime the answer is [`Error::Config`].
pub async fn detached<T, E, W, O>(work: W, orphan: O) -> Result<T, E>
where
    T: Send + 'static,
    E: From<Error> + Send + 'static,
    W: Future<Output = Result<T, E>> + Send + 'static,
    O: FnOnce(T, &Handle) + Send + 'static,
{
    let runtime = Handle::try_current()
        .map_err(|e| Error::Config(format!("store calls run on a tokio runtime: {e}")))?;
    let mut call = Detached {
        work: Some(Box::pin(work)),
        orphan: Some(orphan),
        runtime,
        polling: false,
    };
    std::future::poll_fn(|cx| call.poll_work(cx)).await
}

/// The work of a [`detached`] call, on the heap so that it can move onto a task.
type Work<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The caller's side of [`detached`]: polls `work` in place, and if dropped before `work`
/// finished, spawns the rest of it with `orphan` waiting for its output.
struct Detached<T, E, O>
where
    T: Send + 'static,
    E: Send + 'static,
    O: FnOnce(T, &Handle) + Send + 'static,
{
    work: Option<Work<T, E>>,
    orphan: Option<O>,
    runtime: Handle,
    /// Set while `work` is being polled: if the destructor finds it set, that poll panicked.
    polling: bool,
}

impl<T, E, O> Detached<T, E, O>
where
    T: Send + 'static,
    E: Send + 'static,
    O: FnOnce(T, &Handle) + Send + 'static,
{
    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, E>> {
        let Some(work) = self.work.as_mut() else {
            // Never reached: the one `await` on this call stops polling at `Ready`.
            return Poll::Pending;
        };
        self.polling = true;
        let poll = work.as_mut().poll(cx);
        self.polling = false;
        if poll.is_ready() {
            self.work = None;
        }
        poll
    }
}

impl<T, E, O> Drop for Detached<T, E, O>
where
    T: Send + 'static,
    E: Send + 'static,
    O: FnOnce(T, &Handle) + Send + 'static,
{
    fn drop(&mut self) {
        // Nothing to continue: `work` finished, or it panicked while polled.
        let (Some(work), Some(orphan), false) =
            (self.work.take(), self.orphan.take(), self.polling)
        else {
            return;
        };
        let runtime = self.runtime.clone();
        drop(self.runtime.spawn(async move {
            if let Ok(unreceived) = work.await {
                orphan(unreceived, &runtime);
            }
        }));
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
    use tokio::sync::oneshot;

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_work_runs_in_the_callers_task_until_the_caller_is_dropped() {
        // The test's body is not a task: the caller is one spawned here.
        tokio::spawn(callers_task_until_dropped()).await.unwrap();
    }

    async fn callers_task_until_dropped() {
        let caller = tokio::task::id();
        let inline = detached(async { Ok::<_, Error>(tokio::task::id()) }, forget).await;
        assert_eq!(
            inline.unwrap(),
            caller,
            "no task spawned on the way to the answer"
        );

        // Dropped after a first poll: the rest runs on a task of its own.
        let (go, wait) = oneshot::channel::<()>();
        let (ran_on, on) = oneshot::channel::<(tokio::task::Id, tokio::task::Id)>();
        let call = detached(
            async move {
                let before = tokio::task::id();
                let _ = wait.await;
                let _ = ran_on.send((before, tokio::task::id()));
                Ok::<(), Error>(())
            },
            forget,
        );
        assert!(tokio::time::timeout(Duration::from_millis(10), call)
            .await
            .is_err());
        go.send(()).unwrap();
        let (before, after) = on.await.expect("the dropped call's work ran to its end");
        assert_eq!(before, caller);
        assert_ne!(after, caller);
    }

    /// Pending at its first poll, panics at its second; counts its polls.
    struct PanicsWhenPolledAgain(Arc<AtomicU32>);

    impl Future for PanicsWhenPolledAgain {
        type Output = Result<(), Error>;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            panic!("boom")
        }
    }

    #[tokio::test]
    async fn a_panic_in_the_work_reaches_the_caller_and_is_not_continued() {
        let polls = Arc::new(AtomicU32::new(0));
        let call = tokio::spawn(detached(PanicsWhenPolledAgain(Arc::clone(&polls)), forget));
        let e = call.await.unwrap_err();
        assert!(e.is_panic(), "{e}");
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            polls.load(Ordering::SeqCst),
            2,
            "never polled after it panicked"
        );
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
