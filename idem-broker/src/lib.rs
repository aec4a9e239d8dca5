//! The consumer side of a message boundary, independent of any broker.
//!
//! A broker delivers a message at least once: after a consumer crash between its effect and
//! its acknowledgement, after an acknowledgement lost on the way, or when a producer
//! publishes the same message again after the broker's own de-duplication window (two
//! minutes by default on NATS JetStream). [`ConsumerBarrier`] puts the idempotency barrier
//! between the broker and the handler:
//!
//! 1. the message's idempotency key is extracted: the adapter's own
//!    ([`Delivery::idempotency_id`]: an `Idempotency-Key` header, a broker message id), else
//!    a user extractor ([`ConsumerBarrier::with_extractor`]), in the consumer's scope;
//! 2. the handler runs behind the barrier in lease mode ([`ConsumerBarrier::handle`]) or
//!    in transactional mode ([`ConsumerBarrier::handle_transaction`], where the handler's
//!    writes and the key commit in one database transaction);
//! 3. the message is acknowledged only once the outcome is recorded. A redelivered message
//!    replays the recorded outcome without running the handler, and is acknowledged.
//!
//! # Policy
//!
//! | what happened | recorded | message | [`Handled`] |
//! |---|---|---|---|
//! | the handler succeeded, or a redelivery found its outcome | `Completed` | ack | [`Handled::Completed`] |
//! | the handler failed permanently ([`Failure::Permanent`]), or a redelivery found that failure | `Failed` | term (dead-letter) under [`FailurePolicy::Terminate`], the default; ack under [`FailurePolicy::Ack`] | [`Handled::Failed`] |
//! | the handler failed retryably ([`Failure::Retryable`]) | nothing, the key is released | nak with the retry delay | [`Handled::Retry`] |
//! | another consumer holds the key (a concurrent redelivery) | unchanged | nak with the barrier's `retry_after` | [`Handled::Busy`] |
//! | no key, an invalid key, or the key seen before with another payload | nothing | term | [`Handled::Rejected`] |
//! | the store failed or the lease was lost | nothing new | nak with the retry delay | `Err(`[`ConsumeError::Barrier`]`)` |
//!
//! "term" is the broker's "never deliver again": JetStream's `+TERM` (which publishes an
//! advisory a dead-letter consumer can follow), AMQP's `basic.reject` without requeue (which
//! routes to the queue's dead-letter exchange, if it has one). A message is terminated only
//! after its failure is recorded, so a copy published again later replays the failure and
//! is terminated again, without running the handler.
//!
//! The payload is fingerprinted ([`Fingerprint::of_bytes`]): a message that reuses a key
//! with a different payload is rejected as a mismatch, never applied.
//!
//! A handler that may run longer than the barrier's lease must extend it
//! ([`LeaseHandle::extend`]); the broker's redelivery timeout (JetStream `ack_wait`) should
//! be longer than the lease, or a redelivery finds the key in progress and is delayed.
//!
//! # Metrics
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `idem_consumer_messages_total` | counter | `result` | every handled message: `completed`, `replayed`, `failed`, `retry`, `busy`, `rejected`, `error` |
//! | `idem_consumer_settle_errors_total` | counter | `action` | acknowledgements (`ack`, `nak`, `term`) the broker refused or did not answer within the settle timeout |
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Barrier, BoxError, Error, Failure, Fingerprint, Key, LeaseHandle, Outcome, Response, RunError,
    Store, TransactionalStore, TxPolicy,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Counter of handled messages, labelled `result`.
pub const MESSAGES_TOTAL: &str = "idem_consumer_messages_total";
/// Counter of acknowledgements the broker refused or left unanswered, labelled `action`.
pub const SETTLE_ERRORS_TOTAL: &str = "idem_consumer_settle_errors_total";

/// The default delay before a message whose handler failed retryably is delivered again.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The default bound on one settlement (ack, nak, term) the broker does not answer.
pub const DEFAULT_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A settlement the broker did not answer within the consumer's settle timeout
/// ([`ConsumerBarrier::with_settle_timeout`]): a connection that died under it, say. The
/// source of a [`ConsumeError::Settle`].
#[derive(Debug, thiserror::Error)]
#[error("the broker did not answer within {after:?}")]
pub struct Unanswered {
    /// How long the consumer waited (a nak's delay included).
    pub after: Duration,
}

/// A message as a broker delivered it: what the barrier needs to read and how to settle it.
///
/// Adapters implement it for their broker's message type (`idem_nats::JetStreamMessage`,
/// `idem_amqp::AmqpMessage`).
pub trait Delivery: Send + Sync {
    /// The idempotency id the message carries, as the adapter finds it (a header, a broker
    /// message id), or `None`.
    fn idempotency_id(&self) -> Option<&str>;

    /// The message body.
    fn payload(&self) -> &[u8];

    /// Acknowledges the message: the broker never delivers it again.
    fn ack(&self) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Negatively acknowledges the message: the broker delivers it again after about
    /// `delay`.
    fn nak(&self, delay: Duration) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Terminates the message: the broker never delivers it again, and dead-letters it
    /// where the broker can.
    fn term(&self) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// The producer side of a broker, as the outbox relay (`idem-outbox`) uses it.
///
/// `publish` returns once the broker has acknowledged the message (JetStream's publish
/// acknowledgement, an AMQP publisher confirm): only then may the relay mark it sent. The
/// key's id travels with the message as its `Idempotency-Key` header (and as the broker's
/// own de-duplication id where it has one), so a consumer barrier applies a republished
/// message once.
pub trait Publisher: Send + Sync {
    /// Publishes `payload` to `subject` under `key` and waits for the broker's
    /// acknowledgement.
    fn publish(
        &self,
        key: &Key,
        subject: &str,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// What happens to a message whose handler failed permanently (a recorded `Failed`
/// outcome), fresh or replayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Terminate it: the broker dead-letters it where it can (the default).
    #[default]
    Terminate,
    /// Acknowledge it: the failure is recorded and the message is dropped.
    Ack,
}

/// A message ready for its handler: its key in the consumer's scope and its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The message's idempotency key, in the consumer's scope.
    pub key: Key,
    /// The message body.
    pub payload: Vec<u8>,
}

/// Why a message was terminated without running its handler.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// The message carries no idempotency id and the extractor found none.
    #[error("the message carries no idempotency key")]
    NoKey,
    /// The message's id is not a valid key id.
    #[error("the message's idempotency key is invalid")]
    InvalidKey(#[source] Error),
    /// The key was seen before with a different payload.
    #[error("the message's idempotency key was used before with a different payload")]
    Mismatch,
}

/// How a message was handled, and what the broker was told.
#[derive(Debug)]
pub enum Handled<T, F, E> {
    /// The handler succeeded (or a redelivery found its outcome); the message was acked.
    Completed {
        /// The handler's value.
        value: T,
        /// `true` when the outcome was replayed and the handler did not run.
        replayed: bool,
    },
    /// The handler failed permanently (or a redelivery found that failure); the failure is
    /// recorded and the message was terminated or acked per the [`FailurePolicy`].
    Failed {
        /// The recorded failure.
        failure: F,
        /// `true` when the outcome was replayed and the handler did not run.
        replayed: bool,
    },
    /// The handler failed retryably; nothing was recorded and the message was naked.
    Retry {
        /// The handler's error.
        error: E,
        /// The delay asked of the broker.
        delay: Duration,
    },
    /// Another consumer holds the key (a concurrent redelivery); the message was naked.
    Busy {
        /// The delay asked of the broker.
        retry_after: Duration,
    },
    /// The message was terminated without running the handler.
    Rejected(Rejected),
}

/// Why [`ConsumerBarrier::handle`] could not handle a message.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The barrier failed (a store error, a lost lease); nothing new was recorded and the
    /// message was naked (or, if the nak failed, is redelivered after the broker's timeout).
    #[error("the barrier failed; the message will be delivered again")]
    Barrier(#[source] Error),
    /// The broker refused to settle the message, or did not answer in time (the source is
    /// then [`Unanswered`]). The outcome, if any, is recorded: a redelivery replays it.
    #[error("the broker refused to {action} the message")]
    Settle {
        /// `ack`, `nak` or `term`.
        action: &'static str,
        /// The broker's error.
        #[source]
        source: BoxError,
    },
}

/// A user extractor: the idempotency id of a message that carries none the adapter knows.
type Extractor<M> = Arc<dyn Fn(&M) -> Option<String> + Send + Sync>;

/// The idempotency barrier between a broker and a message handler.
pub struct ConsumerBarrier<S: ?Sized, M> {
    barrier: Barrier<S>,
    scope: String,
    extractor: Option<Extractor<M>>,
    retry_delay: Duration,
    settle_timeout: Duration,
    on_failure: FailurePolicy,
}

impl<S: ?Sized, M> Clone for ConsumerBarrier<S, M> {
    fn clone(&self) -> Self {
        ConsumerBarrier {
            barrier: self.barrier.clone(),
            scope: self.scope.clone(),
            extractor: self.extractor.clone(),
            retry_delay: self.retry_delay,
            settle_timeout: self.settle_timeout,
            on_failure: self.on_failure,
        }
    }
}

impl<S: ?Sized, M> fmt::Debug for ConsumerBarrier<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBarrier")
            .field("barrier", &self.barrier)
            .field("scope", &self.scope)
            .field("extractor", &self.extractor.is_some())
            .field("retry_delay", &self.retry_delay)
            .field("settle_timeout", &self.settle_timeout)
            .field("on_failure", &self.on_failure)
            .finish()
    }
}

impl<S: ?Sized, M: Delivery> ConsumerBarrier<S, M> {
    /// A consumer barrier whose keys live in `scope` (name it after the consumer: two
    /// consumers of the same message each apply it once). An invalid scope is
    /// [`Error::InvalidKey`].
    pub fn new(barrier: Barrier<S>, scope: impl Into<String>) -> Result<Self, Error> {
        let scope = scope.into();
        Key::new(scope.clone(), "probe")?;
        Ok(ConsumerBarrier {
            barrier,
            scope,
            extractor: None,
            retry_delay: DEFAULT_RETRY_DELAY,
            settle_timeout: DEFAULT_SETTLE_TIMEOUT,
            on_failure: FailurePolicy::default(),
        })
    }

    /// Where the id comes from when the message carries none the adapter knows.
    pub fn with_extractor(
        mut self,
        extractor: impl Fn(&M) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.extractor = Some(Arc::new(extractor));
        self
    }

    /// How long the broker waits before delivering a message again after a retryable
    /// failure or a barrier error ([`DEFAULT_RETRY_DELAY`]).
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    /// How long one settlement (ack, nak, term; a nak's delay comes on top) may go
    /// unanswered before it counts as failed ([`DEFAULT_SETTLE_TIMEOUT`]): the handler's
    /// call then returns [`ConsumeError::Settle`] with [`Unanswered`] as its source instead
    /// of waiting forever on a connection that died. Liveness only: the message is still
    /// unsettled, so the broker delivers it again and the barrier replays its outcome.
    /// Requires a Tokio runtime with the time driver.
    pub fn with_settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = timeout;
        self
    }

    /// What happens to a message whose handler failed permanently.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.on_failure = policy;
        self
    }

    /// The barrier.
    pub fn barrier(&self) -> &Barrier<S> {
        &self.barrier
    }

    /// The scope of the keys.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The message's key in this consumer's scope.
    pub fn key(&self, message: &M) -> Result<Key, Rejected> {
        let id = match message.idempotency_id() {
            Some(id) => id.to_owned(),
            None => self
                .extractor
                .as_ref()
                .and_then(|extract| extract(message))
                .ok_or(Rejected::NoKey)?,
        };
        Key::new(self.scope.clone(), id).map_err(Rejected::InvalidKey)
    }

    /// Awaits one settlement, for at most the settle timeout plus `delay` (a nak's own
    /// wait), counting and typing a refusal or a silence.
    async fn settle_one(
        &self,
        action: &'static str,
        delay: Duration,
        call: impl Future<Output = Result<(), BoxError>>,
    ) -> Result<(), ConsumeError> {
        let after = self.settle_timeout.saturating_add(delay);
        let answered = match tokio::time::timeout(after, call).await {
            Ok(answered) => answered,
            Err(_) => Err(Box::new(Unanswered { after }) as BoxError),
        };
        answered.map_err(|source| {
            metrics::counter!(SETTLE_ERRORS_TOTAL, "action" => action).increment(1);
            ConsumeError::Settle { action, source }
        })
    }

    /// Settles `message` according to the barrier's answer.
    async fn settle<T, F, E>(
        &self,
        message: &M,
        result: Result<Response<T, F>, RunError<E>>,
    ) -> Result<Handled<T, F, E>, ConsumeError> {
        let (handled, label) = match result {
            Ok(Response {
                outcome: Outcome::Completed(value),
                replayed,
            }) => {
                self.settle_one("ack", Duration::ZERO, message.ack())
                    .await?;
                let label = if replayed { "replayed" } else { "completed" };
                (Handled::Completed { value, replayed }, label)
            }
            Ok(Response {
                outcome: Outcome::Failed(failure),
                replayed,
            }) => {
                match self.on_failure {
                    FailurePolicy::Terminate => {
                        self.settle_one("term", Duration::ZERO, message.term())
                            .await?
                    }
                    FailurePolicy::Ack => {
                        self.settle_one("ack", Duration::ZERO, message.ack())
                            .await?
                    }
                }
                (Handled::Failed { failure, replayed }, "failed")
            }
            Err(RunError::Operation(error)) => {
                let delay = self.retry_delay;
                self.settle_one("nak", delay, message.nak(delay)).await?;
                (Handled::Retry { error, delay }, "retry")
            }
            Err(RunError::Barrier(Error::InProgress { retry_after })) => {
                self.settle_one("nak", retry_after, message.nak(retry_after))
                    .await?;
                (Handled::Busy { retry_after }, "busy")
            }
            Err(RunError::Barrier(Error::Mismatch)) => {
                return self.reject(message, Rejected::Mismatch).await;
            }
            Err(RunError::Barrier(e)) => {
                metrics::counter!(MESSAGES_TOTAL, "result" => "error").increment(1);
                if let Err(nak) = self
                    .settle_one("nak", self.retry_delay, message.nak(self.retry_delay))
                    .await
                {
                    tracing::warn!(error = %nak, "could not nak a message after a barrier error; the broker redelivers it after its timeout");
                }
                return Err(ConsumeError::Barrier(e));
            }
        };
        metrics::counter!(MESSAGES_TOTAL, "result" => label).increment(1);
        Ok(handled)
    }

    /// Terminates a message that cannot be handled.
    async fn reject<T, F, E>(
        &self,
        message: &M,
        why: Rejected,
    ) -> Result<Handled<T, F, E>, ConsumeError> {
        tracing::warn!(reason = %why, "terminating a message the barrier cannot handle");
        self.settle_one("term", Duration::ZERO, message.term())
            .await?;
        metrics::counter!(MESSAGES_TOTAL, "result" => "rejected").increment(1);
        Ok(Handled::Rejected(why))
    }
}

impl<S: Store + ?Sized + 'static, M: Delivery> ConsumerBarrier<S, M> {
    /// Runs `handler` behind the barrier in lease mode and settles the message (see the
    /// crate docs for the policy).
    ///
    /// The handler receives the message's key and payload and the lease; it is not run for
    /// a redelivery of a message whose outcome is recorded. Its side effects outside the
    /// store should be deduplicated downstream with [`LeaseHandle::derive`] if the lease can
    /// be lost while it runs.
    pub async fn handle<T, F, E, H, Fut>(
        &self,
        message: &M,
        handler: H,
    ) -> Result<Handled<T, F, E>, ConsumeError>
    where
        T: Serialize + DeserializeOwned,
        F: Serialize + DeserializeOwned,
        H: FnOnce(Incoming, LeaseHandle<S>) -> Fut,
        Fut: Future<Output = Result<T, Failure<F, E>>>,
    {
        let key = match self.key(message) {
            Ok(key) => key,
            Err(why) => return self.reject(message, why).await,
        };
        let payload = message.payload().to_vec();
        let fingerprint = Fingerprint::of_bytes(&payload);
        let incoming = Incoming {
            key: key.clone(),
            payload,
        };
        let result = self
            .barrier
            .execute(&key, Some(fingerprint), |lease| handler(incoming, lease))
            .await;
        self.settle(message, result).await
    }
}

impl<S: TransactionalStore + 'static, M: Delivery> ConsumerBarrier<S, M> {
    /// Runs the operation `make` builds behind the barrier in transactional mode (its
    /// writes, the key and the outcome commit in one database transaction) and settles the
    /// message (see the crate docs for the policy). A concurrent redelivery waits for the
    /// first and replays it ([`TxPolicy::Wait`]).
    pub async fn handle_transaction<T, F, E>(
        &self,
        message: &M,
        make: impl FnOnce(Incoming) -> S::Operation<T, F, E>,
    ) -> Result<Handled<T, F, E>, ConsumeError>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let key = match self.key(message) {
            Ok(key) => key,
            Err(why) => return self.reject(message, why).await,
        };
        let payload = message.payload().to_vec();
        let fingerprint = Fingerprint::of_bytes(&payload);
        let op = make(Incoming {
            key: key.clone(),
            payload,
        });
        let result = self
            .barrier
            .transaction(&key, Some(fingerprint), TxPolicy::Wait, op)
            .await;
        self.settle(message, result).await
    }
}
