//! NATS JetStream adapter for the idem consumer barrier.
//!
//! Wrap each message a JetStream pull consumer delivers in [`JetStreamMessage`] and hand it
//! to an [`idem_broker::ConsumerBarrier`]: the handler runs behind the barrier, and the
//! message is acknowledged only after its outcome is recorded. The key is, in order:
//!
//! 1. the [`IDEMPOTENCY_KEY`] header (`Idempotency-Key`);
//! 2. the `Nats-Msg-Id` header (JetStream's own de-duplication id);
//! 3. the consumer's extractor ([`idem_broker::ConsumerBarrier::with_extractor`]).
//!
//! Settlement: an ack is sent with `double_ack`, waiting for the server to confirm it (a lost
//! ack means one more redelivery, which replays); a nak is `-NAK` with the delay, a term is
//! `+TERM`. JetStream publishes an advisory on `$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.>`
//! for every terminated message, which a dead-letter consumer can follow.
//!
//! Set the consumer's `ack_wait` longer than the barrier's lease, so a redelivery of a message
//! whose consumer crashed mid-handler finds the lease expired rather than in progress.
//!
//! [`publish`] is the producer side: it sets both headers from a key and waits for the
//! stream's acknowledgement.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use futures::StreamExt;
//! use idem_broker::ConsumerBarrier;
//! use idem_core::{Barrier, Failure, MemoryStore};
//! use idem_nats::JetStreamMessage;
//! let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await?);
//! let consumer: async_nats::jetstream::consumer::PullConsumer =
//!     js.get_stream("ORDERS").await?.get_consumer("ledger").await?;
//! let barrier = ConsumerBarrier::new(Barrier::new(std::sync::Arc::new(MemoryStore::new())), "ledger")?;
//! let mut messages = consumer.messages().await?;
//! while let Some(message) = messages.next().await {
//!     let message = JetStreamMessage::from(message?);
//!     barrier
//!         .handle(&message, |incoming, _lease| async move {
//!             Ok::<_, Failure<String, String>>(incoming.payload.len())
//!         })
//!         .await?;
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use idem_broker::Delivery;
use idem_core::{BoxError, Key};

/// The header that carries an idempotency key.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// A JetStream message, ready for an [`idem_broker::ConsumerBarrier`].
#[derive(Debug)]
pub struct JetStreamMessage {
    message: jetstream::Message,
    id: Option<String>,
}

impl From<jetstream::Message> for JetStreamMessage {
    fn from(message: jetstream::Message) -> Self {
        let id = message.headers.as_ref().and_then(|headers| {
            headers
                .get(IDEMPOTENCY_KEY)
                .or_else(|| headers.get(NATS_MESSAGE_ID))
                .map(|value| value.as_str().to_owned())
        });
        JetStreamMessage { message, id }
    }
}

impl JetStreamMessage {
    /// The underlying JetStream message (subject, headers, delivery info).
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }

    /// How many times JetStream has delivered this message (1 for the first delivery), or
    /// `None` if the message carries no delivery info.
    pub fn delivered(&self) -> Option<i64> {
        self.message.info().ok().map(|info| info.delivered)
    }
}

impl Delivery for JetStreamMessage {
    fn idempotency_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    async fn ack(&self) -> Result<(), BoxError> {
        self.message.double_ack().await
    }

    async fn nak(&self, delay: Duration) -> Result<(), BoxError> {
        self.message.ack_with(AckKind::Nak(Some(delay))).await
    }

    async fn term(&self) -> Result<(), BoxError> {
        self.message.ack_with(AckKind::Term).await
    }
}

/// Why [`publish`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message could not be sent.
    #[error("could not publish to JetStream")]
    Send(#[source] jetstream::context::PublishError),
    /// The stream did not acknowledge the message (no stream for the subject, a timeout).
    #[error("JetStream did not acknowledge the message")]
    Ack(#[source] jetstream::context::PublishError),
}

/// Publishes `payload` to `subject` with `key`'s id as both the [`IDEMPOTENCY_KEY`] and the
/// `Nats-Msg-Id` header, and waits for the stream's acknowledgement. Publishing the same key
/// again is safe: inside the stream's duplicate window JetStream drops it
/// (`duplicate == true` in the answer), after it a consumer barrier replays it.
pub async fn publish(
    context: &jetstream::Context,
    subject: &str,
    key: &Key,
    payload: Vec<u8>,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let mut headers = HeaderMap::new();
    headers.insert(IDEMPOTENCY_KEY, key.id());
    let publish = PublishMessage::build()
        .headers(headers)
        .message_id(key.id())
        .payload(payload.into());
    context
        .send_publish(subject.to_owned(), publish)
        .await
        .map_err(PublishError::Send)?
        .await
        .map_err(PublishError::Ack)
}

/// [`publish`] as an [`idem_broker::Publisher`], for the outbox relay.
#[derive(Clone, Debug)]
pub struct JetStreamPublisher(pub jetstream::Context);

impl idem_broker::Publisher for JetStreamPublisher {
    async fn publish(&self, key: &Key, subject: &str, payload: &[u8]) -> Result<(), BoxError> {
        publish(&self.0, subject, key, payload.to_vec()).await?;
        Ok(())
    }
}

/// The guide `docs/consumers.md`, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../docs/consumers.md")]
pub struct ConsumersGuide;
