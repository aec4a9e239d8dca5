//! The consumer barrier on a real NATS JetStream server (`IDEM_NATS_URL`, default
//! `nats://127.0.0.1:4222`), skipped with a note when it is unreachable unless
//! `IDEM_TEST_REQUIRE` names `nats`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use idem_broker::{ConsumerBarrier, Delivery, Handled};
use idem_core::{Barrier, Failure, Fingerprint, Key, Response, State, Store};
use idem_nats::{publish, JetStreamMessage};
use idem_sqlite::SqliteStore;

mod common;
use common::skip;

/// How long JetStream waits for an ack before redelivering: the "crash" detection time.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// The stream's de-duplication window, JetStream's smallest, so a test can publish past it.
const DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

fn url() -> String {
    std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A fresh stream with one durable pull consumer, deleted when dropped.
struct Fixture {
    js: jetstream::Context,
    stream: String,
    subject: String,
    consumer: PullConsumer,
    barrier: ConsumerBarrier<SqliteStore, JetStreamMessage>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// `None` (after printing why) when the server is unreachable, unless required.
    async fn new(name: &str) -> Option<Fixture> {
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(url()),
        )
        .await;
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return skip(&format!("cannot connect to {}: {e}", url())),
            Err(_) => return skip(&format!("connecting to {} timed out", url())),
        };
        let js = jetstream::new(client);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let stream = format!("IDEM_TEST_{name}_{}_{nanos}", std::process::id());
        let subject = format!("idem.test.{}", stream.to_lowercase());
        let created = js
            .create_stream(stream::Config {
                name: stream.clone(),
                subjects: vec![subject.clone()],
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await;
        let created = created
            .unwrap_or_else(|e| panic!("creating a stream at {} (is JetStream on?): {e}", url()));
        let consumer: PullConsumer = created
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("ledger".into()),
                ack_wait: ACK_WAIT,
                ..Default::default()
            })
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
            js,
            stream,
            subject,
            consumer,
            barrier,
            _dir: dir,
        })
    }

    /// The next message for the consumer, waiting for a redelivery if need be.
    async fn next(&self) -> JetStreamMessage {
        self.try_next(Duration::from_secs(30))
            .await
            .expect("a message was delivered")
    }

    /// The next message within `wait`, or `None`.
    async fn try_next(&self, wait: Duration) -> Option<JetStreamMessage> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .unwrap();
        batch
            .next()
            .await
            .map(|m| JetStreamMessage::from(m.unwrap()))
    }

    /// Asserts that nothing is left to deliver, after every ack wait has passed.
    async fn assert_drained(&self) {
        let left = self.try_next(ACK_WAIT * 3).await;
        assert!(
            left.is_none(),
            "nothing is redelivered: {:?}",
            left.map(|m| m.delivered())
        );
    }

    /// Deletes the stream (at the end of a test that passed; a failed test leaves it for
    /// inspection).
    async fn delete(self) {
        self.js.delete_stream(&self.stream).await.unwrap();
    }

    async fn publish(&self, id: &str, payload: &[u8]) -> bool {
        let key = Key::new("producer", id).unwrap();
        publish(&self.js, &self.subject, &key, payload.to_vec())
            .await
            .unwrap()
            .duplicate
    }
}

type Ledger = Handled<u32, String, String>;

#[tokio::test]
async fn a_redelivery_after_a_consumer_crash_gives_one_effect() {
    let Some(f) = Fixture::new("crash").await else {
        return;
    };
    let effects = &AtomicU32::new(0);
    assert!(!f.publish("order-1", b"+100").await);

    // The first consumer records the outcome and crashes before it acks: exactly the
    // barrier step `handle` runs before its ack, then the message is dropped unacked.
    let first = f.next().await;
    assert_eq!(first.delivered(), Some(1));
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
    drop(first);

    // JetStream redelivers after the ack wait; the restarted consumer replays and acks.
    let again = f.next().await;
    assert_eq!(again.delivered(), Some(2));
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
    f.assert_drained().await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    f.delete().await;
}

#[tokio::test]
async fn a_duplicate_published_past_the_dedup_window_gives_one_effect() {
    let Some(f) = Fixture::new("dedup").await else {
        return;
    };
    let effects = &AtomicU32::new(0);
    let apply = |_, _| async move {
        effects.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Failure<String, String>>(7)
    };
    assert!(!f.publish("order-2", b"+7").await);
    // Inside the window JetStream itself drops the copy.
    assert!(f.publish("order-2", b"+7").await, "JetStream de-duplicates");
    let h: Ledger = f.barrier.handle(&f.next().await, apply).await.unwrap();
    assert!(matches!(
        h,
        Handled::Completed {
            replayed: false,
            ..
        }
    ));

    // Past the window the broker accepts the copy as a new message.
    let mut accepted_again = false;
    while !accepted_again {
        tokio::time::sleep(DUPLICATE_WINDOW).await;
        accepted_again = !f.publish("order-2", b"+7").await;
    }
    let copy = f.next().await;
    assert_eq!(copy.delivered(), Some(1), "a new message, not a redelivery");
    let h: Ledger = f.barrier.handle(&copy, apply).await.unwrap();
    assert!(
        matches!(
            h,
            Handled::Completed {
                value: 7,
                replayed: true
            }
        ),
        "{h:?}"
    );
    f.assert_drained().await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    f.delete().await;
}

#[tokio::test]
async fn a_poison_message_is_recorded_failed_then_terminated() {
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
    assert!(!f.publish("poison-1", b"garbage").await);
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
    // Terminated: never redelivered, even after the ack wait.
    f.assert_drained().await;

    // A copy published past the dedup window replays the failure and is terminated unrun.
    let mut accepted_again = false;
    while !accepted_again {
        tokio::time::sleep(DUPLICATE_WINDOW).await;
        accepted_again = !f.publish("poison-1", b"garbage").await;
    }
    let h: Ledger = f.barrier.handle(&f.next().await, parse).await.unwrap();
    assert!(matches!(h, Handled::Failed { replayed: true, .. }), "{h:?}");
    f.assert_drained().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    f.delete().await;
}

#[tokio::test]
async fn a_retryable_failure_is_redelivered_after_the_nak_delay_and_then_applied() {
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
    assert!(!f.publish("flaky-1", b"+5").await);
    let h: Ledger = f.barrier.handle(&f.next().await, flaky).await.unwrap();
    assert!(matches!(h, Handled::Retry { .. }), "{h:?}");
    let again = f.next().await;
    assert_eq!(again.delivered(), Some(2));
    let h: Ledger = f.barrier.handle(&again, flaky).await.unwrap();
    assert!(matches!(
        h,
        Handled::Completed {
            value: 5,
            replayed: false
        }
    ));
    f.assert_drained().await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    f.delete().await;
}

#[tokio::test]
async fn the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor() {
    let Some(f) = Fixture::new("keys").await else {
        return;
    };
    let barrier = f.barrier.clone().with_extractor(|m: &JetStreamMessage| {
        std::str::from_utf8(m.payload())
            .ok()
            .and_then(|p| p.strip_prefix("id="))
            .map(str::to_owned)
    });
    // Both headers (idem_nats::publish): the Idempotency-Key header.
    f.publish("both", b"x").await;
    // Only Nats-Msg-Id.
    f.js.send_publish(
        f.subject.clone(),
        jetstream::message::PublishMessage::build()
            .message_id("msg-id-only")
            .payload("y".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Neither: the extractor.
    f.js.publish(f.subject.clone(), "id=from-body".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Nothing at all: terminated.
    f.js.publish(f.subject.clone(), "anonymous".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for want in ["both", "msg-id-only", "from-body"] {
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
    assert!(
        matches!(h, Handled::Rejected(idem_broker::Rejected::NoKey)),
        "{h:?}"
    );
    f.assert_drained().await;
    f.delete().await;
}
