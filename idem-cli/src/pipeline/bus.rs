//! The pipeline's broker: NATS JetStream or RabbitMQ, behind one publisher and one inbox.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use idem::{BoxError, Error, Key};
use idem_amqp::{AmqpMessage, AmqpPublisher};
use idem_broker::{Delivery, Publisher};
use idem_nats::{JetStreamMessage, JetStreamPublisher};
use indicatif::ProgressBar;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{BrokerArg, PipelineArgs};

/// JetStream's smallest de-duplication window: copies published later reach the consumer.
const DUPLICATE_WINDOW: Duration = Duration::from_millis(100);
/// JetStream's redelivery timeout for an unacknowledged message.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long the inbox must stay empty, once enough messages were applied, to be drained:
/// longer than any redelivery the faults cause.
const IDLE: Duration = Duration::from_millis(2_500);

/// How a message left the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Acknowledged (or negatively acknowledged); `fresh` if its effect was applied now.
    Settled { fresh: bool },
    /// The consumer died holding it, unacknowledged; `fresh` as above.
    Abandoned { fresh: bool },
}

/// A message from either broker.
#[derive(Debug)]
pub(super) enum Message {
    Nats(JetStreamMessage),
    Amqp(AmqpMessage),
}

impl Delivery for Message {
    fn idempotency_id(&self) -> Option<&str> {
        match self {
            Message::Nats(m) => m.idempotency_id(),
            Message::Amqp(m) => m.idempotency_id(),
        }
    }
    fn payload(&self) -> &[u8] {
        match self {
            Message::Nats(m) => m.payload(),
            Message::Amqp(m) => m.payload(),
        }
    }
    async fn ack(&self) -> Result<(), BoxError> {
        match self {
            Message::Nats(m) => m.ack().await,
            Message::Amqp(m) => m.ack().await,
        }
    }
    async fn nak(&self, delay: Duration) -> Result<(), BoxError> {
        match self {
            Message::Nats(m) => m.nak(delay).await,
            Message::Amqp(m) => m.nak(delay).await,
        }
    }
    async fn term(&self) -> Result<(), BoxError> {
        match self {
            Message::Nats(m) => m.term().await,
            Message::Amqp(m) => m.term().await,
        }
    }
}

/// The producer side of either broker.
#[derive(Clone, Debug)]
pub(super) enum Bus {
    Nats {
        publisher: JetStreamPublisher,
        stream: String,
        subject: String,
    },
    Amqp {
        publisher: AmqpPublisher,
        connection: Arc<Connection>,
        queue: String,
    },
}

impl Publisher for Bus {
    async fn publish(&self, key: &Key, subject: &str, payload: &[u8]) -> Result<(), BoxError> {
        match self {
            Bus::Nats { publisher, .. } => publisher.publish(key, subject, payload).await,
            Bus::Amqp { publisher, .. } => publisher.publish(key, subject, payload).await,
        }
    }
}

impl Bus {
    /// Where the orders' events go (a subject, a queue name).
    pub(super) fn subject(&self) -> &str {
        match self {
            Bus::Nats { subject, .. } => subject,
            Bus::Amqp { queue, .. } => queue,
        }
    }

    /// Deletes the run's stream or queue (best effort: the run's verdict is already known).
    pub(super) async fn cleanup(&self) {
        match self {
            Bus::Nats {
                publisher, stream, ..
            } => {
                let _ = publisher.0.delete_stream(stream).await;
            }
            Bus::Amqp {
                connection, queue, ..
            } => {
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .queue_delete(queue, QueueDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "done").await;
            }
        }
    }
}

/// The consumer side of either broker.
pub(super) enum Inbox {
    Nats(Box<PullConsumer>),
    Amqp(Box<AmqpInbox>),
}

/// A RabbitMQ queue and the consumer's current channel.
pub(super) struct AmqpInbox {
    connection: Arc<Connection>,
    queue: String,
    channel: Mutex<Channel>,
}

/// Connects to the broker and creates the run's stream (tiny de-duplication window) and
/// consumer, or queue.
pub(super) async fn connect(
    broker: BrokerArg,
    args: &PipelineArgs,
    run_id: &str,
) -> Result<(Bus, Inbox), Error> {
    match broker {
        BrokerArg::Nats => {
            let client = async_nats::connect(&args.nats_url)
                .await
                .map_err(Error::permanent)?;
            let js = jetstream::new(client);
            let stream = format!("IDEM_PIPELINE_{run_id}");
            let subject = format!("idem.pipeline.{run_id}.orders");
            let consumer = js
                .create_stream(stream::Config {
                    name: stream.clone(),
                    subjects: vec![subject.clone()],
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                })
                .await
                .map_err(Error::permanent)?
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some("ledger".into()),
                    ack_wait: ACK_WAIT,
                    ..Default::default()
                })
                .await
                .map_err(Error::permanent)?;
            let bus = Bus::Nats {
                publisher: JetStreamPublisher(js),
                stream,
                subject,
            };
            Ok((bus, Inbox::Nats(Box::new(consumer))))
        }
        BrokerArg::Rabbitmq => {
            let connection = Connection::connect(&args.amqp_url, ConnectionProperties::default())
                .await
                .map_err(Error::permanent)?;
            let connection = Arc::new(connection);
            let queue = format!("idem-pipeline-{run_id}");
            let channel = connection
                .create_channel()
                .await
                .map_err(Error::permanent)?;
            channel
                .queue_declare(
                    &queue,
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(Error::permanent)?;
            let publisher = AmqpPublisher::new(
                connection
                    .create_channel()
                    .await
                    .map_err(Error::permanent)?,
                "",
            )
            .await
            .map_err(Error::permanent)?;
            let bus = Bus::Amqp {
                publisher,
                connection: Arc::clone(&connection),
                queue: queue.clone(),
            };
            let inbox = Inbox::Amqp(Box::new(AmqpInbox {
                connection,
                queue,
                channel: Mutex::new(channel),
            }));
            Ok((bus, inbox))
        }
    }
}

impl Inbox {
    /// The next message within about `wait`.
    async fn next(&self, wait: Duration) -> Result<Option<Message>, Error> {
        match self {
            Inbox::Nats(consumer) => {
                let mut batch = consumer
                    .fetch()
                    .max_messages(1)
                    .expires(wait)
                    .messages()
                    .await
                    .map_err(Error::permanent)?;
                match batch.next().await {
                    Some(message) => Ok(Some(Message::Nats(JetStreamMessage::from(
                        message.map_err(Error::permanent)?,
                    )))),
                    None => Ok(None),
                }
            }
            Inbox::Amqp(amqp) => {
                let AmqpInbox { queue, channel, .. } = &**amqp;
                let until = Instant::now() + wait;
                loop {
                    let got = channel
                        .lock()
                        .await
                        .basic_get(queue, BasicGetOptions { no_ack: false })
                        .await
                        .map_err(Error::permanent)?;
                    if let Some(message) = got {
                        return Ok(Some(Message::Amqp(AmqpMessage::from(message))));
                    }
                    if Instant::now() >= until {
                        return Ok(None);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// The consumer died holding a message: JetStream redelivers it after its ack wait;
    /// RabbitMQ requeues it when the consumer's channel closes (a new one is opened).
    async fn abandon(&self) -> Result<(), Error> {
        match self {
            Inbox::Nats(_) => Ok(()),
            Inbox::Amqp(amqp) => {
                let AmqpInbox {
                    connection,
                    channel,
                    ..
                } = &**amqp;
                let mut channel = channel.lock().await;
                channel
                    .close(200, "consumer killed")
                    .await
                    .map_err(Error::permanent)?;
                *channel = connection
                    .create_channel()
                    .await
                    .map_err(Error::permanent)?;
                Ok(())
            }
        }
    }

    /// Hands messages to `consume` until at least `fresh` effects were applied and the inbox
    /// then stayed empty for a while, or `deadline` after `started`.
    pub(super) async fn drain<F, Fut>(
        &self,
        fresh: usize,
        started: Instant,
        deadline: Duration,
        progress: &ProgressBar,
        mut consume: F,
    ) -> Result<(), Error>
    where
        F: FnMut(Message) -> Fut,
        Fut: Future<Output = Result<Step, Error>>,
    {
        let mut applied = 0;
        let mut idle_since = Instant::now();
        while started.elapsed() < deadline {
            let Some(message) = self.next(Duration::from_millis(250)).await? else {
                if applied >= fresh && idle_since.elapsed() >= IDLE {
                    return Ok(());
                }
                continue;
            };
            idle_since = Instant::now();
            match consume(message).await? {
                Step::Settled { fresh } => applied += usize::from(fresh),
                Step::Abandoned { fresh } => {
                    applied += usize::from(fresh);
                    self.abandon().await?;
                }
            }
            if fresh > 0 {
                progress.set_position(applied as u64);
            }
        }
        Ok(())
    }
}
