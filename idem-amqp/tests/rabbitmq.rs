//! The consumer barrier on a real RabbitMQ server (`IDEM_AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), skipped with a note when it is unreachable
//! unless `IDEM_TEST_REQUIRE` names `rabbitmq`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_amqp::{AmqpMessage, AmqpPublisher, PublishError};
use idem_broker::{ConsumerBarrier, Delivery, Handled, Rejected};
use idem_core::{Barrier, Failure, Fingerprint, Key, Response, State, Store};
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
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(name: &str) -> Option<Fixture> {
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
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(dir.path().join("idem.db"))
            .await
            .unwrap();
        let barrier = ConsumerBarrier::new(Barrier::new(Arc::new(store)), "ledger")
            .unwrap()
            .with_retry_delay(Duration::from_millis(100));
        Some(Fixture {
            connection,
            channel,
            queue,
            dead,
            publisher,
            barrier,
            _dir: dir,
        })
    }

    async fn publish(&self, id: &str, payload: &[u8]) {
        let key = Key::new("producer", id).unwrap();
        self.publisher
            .send(&key, &self.queue, payload)
            .await
            .unwrap();
    }

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

    async fn next(&self) -> AmqpMessage {
        self.poll(&self.queue).await.expect("a message is queued")
    }

    async fn assert_empty(&self, queue: &str) {
        let left = Self::get_from(&self.channel, queue).await;
        assert!(left.is_none(), "{queue} is empty: {left:?}");
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
}

type Ledger = Handled<u32, String, String>;

#[tokio::test]
async fn a_redelivery_after_a_consumer_crash_gives_one_effect() {
    let Some(f) = Fixture::new("crash").await else {
        return;
    };
    let effects = &AtomicU32::new(0);
    f.publish("order-1", b"+100").await;

    // A consumer on its own connection records the outcome and crashes before it acks.
    let crashing = connect().await.unwrap();
    let channel = crashing.create_channel().await.unwrap();
    let first = Fixture::get_from(&channel, &f.queue).await.unwrap();
    assert!(!first.redelivered());
    let key = f.barrier.key(&first).unwrap();
    let recorded: Result<Response<u32, String>, _> = f
        .barrier
        .barrier()
        .execute(
            &key,
            Some(Fingerprint::of_bytes(first.payload())),
            |_| async {
                effects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Failure<String, String>>(100)
            },
        )
        .await;
    assert!(!recorded.unwrap().replayed);
    crashing.close(320, "crash").await.unwrap();

    let again = f.next().await;
    assert!(again.redelivered());
    let h: Ledger = f
        .barrier
        .handle(&again, |_, _| async {
            effects.fetch_add(1, Ordering::SeqCst);
            Ok(100)
        })
        .await
        .unwrap();
    assert!(
        matches!(
            h,
            Handled::Completed {
                value: 100,
                replayed: true
            }
        ),
        "{h:?}"
    );
    f.assert_empty(&f.queue).await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    f.delete().await;
}

#[tokio::test]
async fn a_duplicate_publish_gives_one_effect() {
    let Some(f) = Fixture::new("dup").await else {
        return;
    };
    let effects = &AtomicU32::new(0);
    let apply = |_, _| async move {
        effects.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Failure<String, String>>(7)
    };
    // RabbitMQ has no de-duplication window: both copies are delivered.
    f.publish("order-2", b"+7").await;
    f.publish("order-2", b"+7").await;
    for replayed_want in [false, true] {
        let h: Ledger = f.barrier.handle(&f.next().await, apply).await.unwrap();
        assert!(
            matches!(h, Handled::Completed { value: 7, replayed } if replayed == replayed_want),
            "{h:?}"
        );
    }
    f.assert_empty(&f.queue).await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    f.delete().await;
}

#[tokio::test]
async fn a_poison_message_is_recorded_failed_then_dead_lettered() {
    let Some(f) = Fixture::new("poison").await else {
        return;
    };
    let runs = &AtomicU32::new(0);
    let parse = |incoming: idem_broker::Incoming, _| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        std::str::from_utf8(&incoming.payload)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| Failure::Permanent("not an amount".to_string()))
    };
    f.publish("poison-1", b"garbage").await;
    let message = f.next().await;
    let key = f.barrier.key(&message).unwrap();
    let h: Ledger = f.barrier.handle(&message, parse).await.unwrap();
    assert!(
        matches!(&h, Handled::Failed { failure, replayed: false } if failure == "not an amount"),
        "{h:?}"
    );
    let record = f
        .barrier
        .barrier()
        .store()
        .get(&key)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(record.state, State::Failed { .. }), "{record:?}");
    f.assert_empty(&f.queue).await;
    let dead = f
        .poll(&f.dead)
        .await
        .expect("the poison message was dead-lettered");
    assert_eq!(dead.payload(), b"garbage");
    dead.ack().await.unwrap();

    // A copy published again replays the failure and is dead-lettered unrun.
    f.publish("poison-1", b"garbage").await;
    let h: Ledger = f.barrier.handle(&f.next().await, parse).await.unwrap();
    assert!(matches!(h, Handled::Failed { replayed: true, .. }), "{h:?}");
    assert!(f.poll(&f.dead).await.is_some());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    f.delete().await;
}

#[tokio::test]
async fn a_retryable_failure_is_requeued_and_then_applied() {
    let Some(f) = Fixture::new("retry").await else {
        return;
    };
    let attempts = &AtomicU32::new(0);
    let flaky = |_, _| async move {
        match attempts.fetch_add(1, Ordering::SeqCst) {
            0 => Err(Failure::Retryable("downstream timed out".to_string())),
            _ => Ok(5),
        }
    };
    f.publish("flaky-1", b"+5").await;
    let h: Ledger = f.barrier.handle(&f.next().await, flaky).await.unwrap();
    assert!(matches!(h, Handled::Retry { .. }), "{h:?}");
    let again = f.next().await;
    assert!(again.redelivered());
    let h: Ledger = f.barrier.handle(&again, flaky).await.unwrap();
    assert!(matches!(
        h,
        Handled::Completed {
            value: 5,
            replayed: false
        }
    ));
    f.assert_empty(&f.queue).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    f.delete().await;
}

#[tokio::test]
async fn the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor() {
    let Some(f) = Fixture::new("keys").await else {
        return;
    };
    let barrier = f.barrier.clone().with_extractor(|m: &AmqpMessage| {
        std::str::from_utf8(m.payload())
            .ok()
            .and_then(|p| p.strip_prefix("id="))
            .map(str::to_owned)
    });
    let raw = f.connection.create_channel().await.unwrap();
    let raw = AmqpPublisher::new(raw, "").await.unwrap();
    f.publish("both", b"x").await;
    let send = |properties: BasicProperties, body: &'static [u8]| {
        let channel = f.channel.clone();
        let queue = f.queue.clone();
        async move {
            channel
                .basic_publish(
                    "",
                    &queue,
                    lapin::options::BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    send(
        BasicProperties::default().with_message_id("message-id-only".into()),
        b"y",
    )
    .await;
    send(BasicProperties::default(), b"id=from-body").await;
    send(BasicProperties::default(), b"anonymous").await;
    for want in ["both", "message-id-only", "from-body"] {
        let m = f.next().await;
        assert_eq!(barrier.key(&m).unwrap().id(), want);
        let h: Ledger = barrier.handle(&m, |_, _| async { Ok(1) }).await.unwrap();
        assert!(matches!(h, Handled::Completed { .. }), "{h:?}");
    }
    let h: Ledger = barrier
        .handle(&f.next().await, |_, _| async {
            panic!("a message without a key ran")
        })
        .await
        .unwrap();
    assert!(matches!(h, Handled::Rejected(Rejected::NoKey)), "{h:?}");

    // A publish nobody can receive is an error, not a silent loss.
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
    f.delete().await;
}

#[tokio::test]
async fn the_outbox_relay_crashing_after_a_publish_still_gives_one_effect_per_message() {
    use idem_outbox::{OutboxStore, Outgoing, Relay, SqliteOutbox};
    let Some(f) = Fixture::new("outbox").await else {
        return;
    };
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
    let effects = std::sync::Mutex::new(std::collections::HashMap::<String, u32>::new());
    let mut delivered = 0;
    while let Some(message) = Fixture::get_from(&f.channel, &f.queue).await {
        delivered += 1;
        let h: Handled<(), String, String> = f
            .barrier
            .handle(&message, |incoming, _| {
                *effects
                    .lock()
                    .unwrap()
                    .entry(incoming.key.id().to_string())
                    .or_default() += 1;
                async { Ok(()) }
            })
            .await
            .unwrap();
        assert!(matches!(h, Handled::Completed { .. }), "{h:?}");
    }
    let effects = effects.into_inner().unwrap();
    assert_eq!(delivered, 4, "RabbitMQ delivered the republished copy too");
    assert_eq!(effects.len(), 3, "{effects:?}");
    for key in &keys {
        assert_eq!(effects.get(key.derive("created").id()), Some(&1));
    }
    f.delete().await;
}
