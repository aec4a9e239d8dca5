//! The consumer barrier on a real RabbitMQ server (`IDEM_AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), skipped with a note when it is unreachable
//! unless `IDEM_TEST_REQUIRE` names `rabbitmq`. The scenarios are the shared ones of
//! `idem_broker::testkit::scenarios`; this file provides the RabbitMQ fixture and the
//! scenarios of its own.

use std::sync::Arc;
use std::time::Duration;

use idem_amqp::{AmqpMessage, AmqpPublisher, PublishError};
use idem_broker::testkit::{run, scenarios, Deliveries, Tally, TempStore, TestBroker};
use idem_broker::{ConsumerBarrier, Delivery};
use idem_core::{Barrier, Failure, Key};
use idem_sqlite::SqliteStore;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

mod common;

fn url() -> String {
    std::env::var("IDEM_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

async fn connect() -> Option<Connection> {
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&url(), ConnectionProperties::default()),
    )
    .await;
    let why = match connected {
        Ok(Ok(connection)) => return Some(connection),
        Ok(Err(e)) => format!("cannot connect to {}: {e}", url()),
        Err(_) => format!("connecting to {} timed out", url()),
    };
    common::skip(&why)
}

/// A queue with a dead-letter queue, a publisher and a consumer barrier.
struct Fixture {
    connection: Connection,
    channel: Channel,
    queue: String,
    dead: String,
    publisher: AmqpPublisher,
    barrier: ConsumerBarrier<SqliteStore, AmqpMessage>,
    _store: TempStore,
}

impl Fixture {
    /// The next message of `queue` on `channel`, with manual acknowledgement.
    async fn get_from(channel: &Channel, queue: &str) -> Option<AmqpMessage> {
        channel
            .basic_get(queue, BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .map(AmqpMessage::from)
    }

    /// The next message of `queue`, polled for (up to 10 s): a requeue after a closed
    /// connection, a nack or a reject takes effect inside the broker after the call.
    async fn poll(&self, queue: &str) -> Option<AmqpMessage> {
        for _ in 0..200 {
            if let Some(m) = Self::get_from(&self.channel, queue).await {
                return Some(m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    async fn assert_empty(&self, queue: &str) {
        let left = Self::get_from(&self.channel, queue).await;
        assert!(left.is_none(), "{queue} is empty: {left:?}");
    }
}

impl TestBroker for Fixture {
    type Message = AmqpMessage;
    /// A consumer on a connection of its own, closed to crash it.
    type Crashing = (Connection, Channel);
    /// RabbitMQ has no de-duplication window: every copy is delivered.
    const DEDUPLICATES: bool = false;

    async fn open(name: &str) -> Option<Fixture> {
        let connection = connect().await?;
        let channel = connection.create_channel().await.unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let queue = format!("idem-test-{name}-{}-{nanos}", std::process::id());
        let dead = format!("{queue}.dead");
        channel
            .queue_declare(&dead, QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(dead.as_str().into()),
        );
        channel
            .queue_declare(&queue, QueueDeclareOptions::default(), arguments)
            .await
            .unwrap();
        let publisher = AmqpPublisher::new(connection.create_channel().await.unwrap(), "")
            .await
            .unwrap();
        let store = TempStore::new().await;
        Some(Fixture {
            connection,
            channel,
            queue,
            dead,
            publisher,
            barrier: store.consumer_barrier(),
            _store: store,
        })
    }

    async fn delete(self) {
        for queue in [&self.queue, &self.dead] {
            self.channel
                .queue_delete(queue, QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        self.connection.close(200, "done").await.unwrap();
    }

    fn barrier(&self) -> &ConsumerBarrier<SqliteStore, AmqpMessage> {
        &self.barrier
    }

    async fn publish(&self, id: &str, payload: &[u8]) -> bool {
        let key = Key::new("producer", id).unwrap();
        self.publisher
            .send(&key, &self.queue, payload)
            .await
            .unwrap();
        false
    }

    async fn publish_copy(&self, id: &str, payload: &[u8]) {
        assert!(!self.publish(id, payload).await);
    }

    /// Publishes on the fixture's channel, without publisher confirms.
    async fn publish_raw(&self, message_id: Option<&str>, payload: &[u8]) {
        let mut properties = BasicProperties::default();
        if let Some(id) = message_id {
            properties = properties.with_message_id(id.into());
        }
        self.channel
            .basic_publish(
                "",
                &self.queue,
                lapin::options::BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn next(&self) -> AmqpMessage {
        self.poll(&self.queue).await.expect("a message is queued")
    }

    fn deliveries(message: &AmqpMessage) -> Deliveries {
        Deliveries::Flagged {
            redelivered: message.redelivered(),
        }
    }

    async fn next_to_crash(&self) -> (AmqpMessage, (Connection, Channel)) {
        let crashing = connect().await.unwrap();
        let channel = crashing.create_channel().await.unwrap();
        let first = Self::get_from(&channel, &self.queue).await.unwrap();
        (first, (crashing, channel))
    }

    /// Closes the consumer's connection: RabbitMQ requeues its unacked message.
    async fn crash(&self, (connection, _channel): (Connection, Channel), _message: AmqpMessage) {
        connection.close(320, "crash").await.unwrap();
    }

    async fn assert_drained(&self) {
        self.assert_empty(&self.queue).await;
    }

    /// Gone from the queue, and dead-lettered (then acked there).
    async fn assert_terminated(&self, payload: &[u8]) {
        self.assert_empty(&self.queue).await;
        let dead = self
            .poll(&self.dead)
            .await
            .expect("the terminated message was dead-lettered");
        assert_eq!(dead.payload(), payload);
        dead.ack().await.unwrap();
    }
}

#[tokio::test]
async fn a_redelivery_after_a_consumer_crash_gives_one_effect() {
    run::<Fixture>(
        "crash",
        scenarios::a_redelivery_after_a_consumer_crash_gives_one_effect,
    )
    .await;
}

#[tokio::test]
async fn a_duplicate_publish_gives_one_effect() {
    run::<Fixture>("dup", scenarios::a_duplicate_publish_gives_one_effect).await;
}

#[tokio::test]
async fn a_poison_message_is_recorded_failed_then_dead_lettered() {
    run::<Fixture>(
        "poison",
        scenarios::a_poison_message_is_recorded_failed_then_terminated,
    )
    .await;
}

#[tokio::test]
async fn a_retryable_failure_is_requeued_and_then_applied() {
    run::<Fixture>(
        "retry",
        scenarios::a_retryable_failure_is_delivered_again_and_then_applied,
    )
    .await;
}

#[tokio::test]
async fn the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor() {
    run::<Fixture>("keys", async |f| {
        scenarios::the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor(f).await;

        // A publish nobody can receive is an error, not a silent loss.
        let raw = f.connection.create_channel().await.unwrap();
        let raw = AmqpPublisher::new(raw, "").await.unwrap();
        let unroutable = raw
            .send(
                &Key::new("p", "lost").unwrap(),
                "no-such-queue-anywhere",
                b"z",
            )
            .await;
        assert!(
            matches!(unroutable, Err(PublishError::Unroutable { .. })),
            "{unroutable:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_outbox_relay_crashing_after_a_publish_still_gives_one_effect_per_message() {
    use idem_outbox::{OutboxStore, Outgoing, Relay, SqliteOutbox};
    run::<Fixture>("outbox", async |f| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orders.db");
        let orders = Barrier::new(Arc::new(SqliteStore::connect(&path).await.unwrap()));
        let outbox = SqliteOutbox::open(&path, "idem_outbox").await.unwrap();
        let keys: Vec<Key> = (0..3)
            .map(|i| Key::new("shop", format!("order-{i}")).unwrap())
            .collect();
        for key in &keys {
            let (outbox, op_key, queue) = (outbox.clone(), key.clone(), f.queue.clone());
            let op: idem_sqlite::SqliteOperation<(), String, String> = Box::new(move |tx| {
                let event = Outgoing::new("created", queue, op_key.id().as_bytes().to_vec());
                outbox
                    .enqueue(tx, &op_key, &event)
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                Ok(())
            });
            orders
                .transaction(key, None, idem_core::TxPolicy::Wait, op)
                .await
                .unwrap();
        }
        let lease = Duration::from_millis(300);
        let relay = Relay::new(outbox.clone(), f.publisher.clone()).with_lease(lease);
        // A relay claims one message, publishes it and crashes before marking it sent.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let claimed = outbox.claim(now, now + 300, 7, 1).await.unwrap();
        let m = &claimed[0];
        idem_broker::Publisher::publish(&f.publisher, &m.key, &m.subject, &m.payload)
            .await
            .unwrap();
        // Another relay drains the outbox, publishing that message again after its lease.
        let mut rounds = 0;
        while relay.run_once().await.unwrap().backlog.pending > 0 {
            rounds += 1;
            assert!(rounds < 1000, "the outbox drains");
            tokio::time::sleep(lease / 4).await;
        }
        let tally = Tally::default();
        let mut delivered = 0;
        while let Some(message) = Fixture::get_from(&f.channel, &f.queue).await {
            delivered += 1;
            tally.handle(&f.barrier, &message).await;
        }
        assert_eq!(delivered, 4, "RabbitMQ delivered the republished copy too");
        tally.assert_once_each(keys.iter().map(|key| key.derive("created")));
    })
    .await;
}
