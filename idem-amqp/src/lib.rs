//! RabbitMQ (AMQP 0-9-1) adapter for the idem consumer barrier.
//!
//! Consume with manual acknowledgements (`no_ack: false`), wrap each delivery in
//! [`AmqpMessage`] and hand it to an [`idem_broker::ConsumerBarrier`]: the handler runs
//! behind the barrier, and the message is acknowledged only after its outcome is recorded.
//! The key is, in order:
//!
//! 1. the [`IDEMPOTENCY_KEY`] header (`Idempotency-Key`, a string);
//! 2. the message's `message_id` property;
//! 3. the consumer's extractor ([`idem_broker::ConsumerBarrier::with_extractor`]).
//!
//! Settlement:
//!
//! | barrier | AMQP |
//! |---|---|
//! | ack | `basic.ack` |
//! | term | `basic.reject` without requeue: routed to the queue's dead-letter exchange (`x-dead-letter-exchange`) if it has one, else dropped |
//! | nak with a delay | AMQP has no delayed requeue: the message is held (unacknowledged, counting against the channel's prefetch) for the delay, then `basic.nack` with requeue |
//!
//! A consumer whose connection drops before it acks gets the message again (with
//! `redelivered` set) on its next channel; the barrier replays it. RabbitMQ has no
//! de-duplication window of its own: every republished copy reaches the consumer, and the
//! barrier applies it once.
//!
//! [`AmqpPublisher`] is the producer side for the outbox relay: it publishes with the key as
//! both the `Idempotency-Key` header and the `message_id`, as a persistent message marked
//! mandatory, and waits for the publisher confirm (the channel is put in confirm mode).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::time::Duration;

use idem_broker::{Delivery, Publisher};
use idem_core::{BoxError, Key};
use lapin::message::{BasicGetMessage, Delivery as LapinDelivery};
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

/// The header that carries an idempotency key.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// An AMQP delivery, ready for an [`idem_broker::ConsumerBarrier`].
#[derive(Debug)]
pub struct AmqpMessage {
    delivery: LapinDelivery,
    id: Option<String>,
}

impl From<LapinDelivery> for AmqpMessage {
    fn from(delivery: LapinDelivery) -> Self {
        let header = delivery.properties.headers().as_ref().and_then(|headers| {
            match headers.inner().get(IDEMPOTENCY_KEY)? {
                AMQPValue::LongString(s) => {
                    std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned)
                }
                AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                _ => None,
            }
        });
        let id = header.or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
        });
        AmqpMessage { delivery, id }
    }
}

impl From<BasicGetMessage> for AmqpMessage {
    fn from(message: BasicGetMessage) -> Self {
        AmqpMessage::from(message.delivery)
    }
}

impl AmqpMessage {
    /// The underlying delivery (routing key, properties, delivery tag).
    pub fn delivery(&self) -> &LapinDelivery {
        &self.delivery
    }

    /// Whether the broker delivered this message before.
    pub fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }
}

impl Delivery for AmqpMessage {
    fn idempotency_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    fn payload(&self) -> &[u8] {
        &self.delivery.data
    }

    async fn ack(&self) -> Result<(), BoxError> {
        self.delivery.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BoxError> {
        tokio::time::sleep(delay).await;
        self.delivery
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await?;
        Ok(())
    }

    async fn term(&self) -> Result<(), BoxError> {
        self.delivery
            .reject(BasicRejectOptions { requeue: false })
            .await?;
        Ok(())
    }
}

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel failed.
    #[error("AMQP publish failed")]
    Channel(#[source] lapin::Error),
    /// The broker refused the message (a negative publisher confirm).
    #[error("the broker refused the message (basic.nack)")]
    Nacked,
    /// The channel is not in confirm mode (it was reset), so the broker's receipt is
    /// unknown.
    #[error("the channel is not in confirm mode; the publish is unconfirmed")]
    Unconfirmed,
    /// No queue is bound for the routing key: the broker returned the mandatory message.
    #[error("no queue is bound for routing key {routing_key:?} on exchange {exchange:?}")]
    Unroutable {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
}

/// Publishes to one exchange on a channel in confirm mode; an [`idem_broker::Publisher`]
/// whose subjects are routing keys.
#[derive(Clone, Debug)]
pub struct AmqpPublisher {
    channel: Channel,
    exchange: String,
}

impl AmqpPublisher {
    /// Puts `channel` in confirm mode and publishes to `exchange` (`""` is the default
    /// exchange, whose routing keys are queue names).
    pub async fn new(channel: Channel, exchange: impl Into<String>) -> Result<Self, PublishError> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(PublishError::Channel)?;
        Ok(AmqpPublisher {
            channel,
            exchange: exchange.into(),
        })
    }

    /// Publishes `payload` with routing key `routing_key` under `key` and waits for the
    /// publisher confirm.
    pub async fn send(
        &self,
        key: &Key,
        routing_key: &str,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(IDEMPOTENCY_KEY),
            AMQPValue::LongString(key.id().into()),
        );
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(key.id()))
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT);
        let confirm = self
            .channel
            .basic_publish(
                &self.exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            )
            .await
            .map_err(PublishError::Channel)?
            .await
            .map_err(PublishError::Channel)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::NotRequested => Err(PublishError::Unconfirmed),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: self.exchange.clone(),
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}

impl Publisher for AmqpPublisher {
    async fn publish(&self, key: &Key, subject: &str, payload: &[u8]) -> Result<(), BoxError> {
        self.send(key, subject, payload).await?;
        Ok(())
    }
}
