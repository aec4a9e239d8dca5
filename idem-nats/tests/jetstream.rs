//! The consumer barrier on a real NATS JetStream server (`IDEM_NATS_URL`, default
//! `nats://127.0.0.1:4222`), skipped with a note when it is unreachable unless
//! `IDEM_TEST_REQUIRE` names `nats`. The scenarios are the shared ones of
//! `idem_broker::testkit::scenarios`; this file provides the JetStream fixture.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use idem_broker::testkit::{run, scenarios, Deliveries, TempStore, TestBroker};
use idem_broker::ConsumerBarrier;
use idem_core::Key;
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

/// A fresh stream with one durable pull consumer, and a consumer barrier on a fresh store.
struct Fixture {
    js: jetstream::Context,
    stream: String,
    subject: String,
    consumer: PullConsumer,
    barrier: ConsumerBarrier<SqliteStore, JetStreamMessage>,
    _store: TempStore,
}

impl Fixture {
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
}

impl TestBroker for Fixture {
    type Message = JetStreamMessage;
    /// A pull consumer that "crashes" by dropping its message unacked.
    type Crashing = ();
    const DEDUPLICATES: bool = true;

    /// `None` (after printing why) when the server is unreachable, unless required.
    async fn open(name: &str) -> Option<Fixture> {
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
        let store = TempStore::new().await;
        Some(Fixture {
            js,
            stream,
            subject,
            consumer,
            barrier: store.consumer_barrier(),
            _store: store,
        })
    }

    /// Deletes the stream (at the end of a test that passed; a failed test leaves it for
    /// inspection).
    async fn delete(self) {
        self.js.delete_stream(&self.stream).await.unwrap();
    }

    fn barrier(&self) -> &ConsumerBarrier<SqliteStore, JetStreamMessage> {
        &self.barrier
    }

    async fn publish(&self, id: &str, payload: &[u8]) -> bool {
        let key = Key::new("producer", id).unwrap();
        publish(&self.js, &self.subject, &key, payload.to_vec())
            .await
            .unwrap()
            .duplicate
    }

    /// Publishes again until JetStream takes the copy, past the de-duplication window.
    async fn publish_copy(&self, id: &str, payload: &[u8]) {
        let mut accepted_again = false;
        while !accepted_again {
            tokio::time::sleep(DUPLICATE_WINDOW).await;
            accepted_again = !self.publish(id, payload).await;
        }
    }

    async fn publish_raw(&self, message_id: Option<&str>, payload: &[u8]) {
        let mut message = jetstream::message::PublishMessage::build();
        if let Some(id) = message_id {
            message = message.message_id(id);
        }
        self.js
            .send_publish(
                self.subject.clone(),
                message.payload(payload.to_vec().into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn next(&self) -> JetStreamMessage {
        self.try_next(Duration::from_secs(30))
            .await
            .expect("a message was delivered")
    }

    fn deliveries(message: &JetStreamMessage) -> Deliveries {
        Deliveries::Counted(message.delivered())
    }

    async fn next_to_crash(&self) -> (JetStreamMessage, ()) {
        (self.next().await, ())
    }

    /// Drops `message` unacked: JetStream delivers it again after the ack wait.
    async fn crash(&self, (): (), message: JetStreamMessage) {
        drop(message);
    }

    /// Nothing is delivered, even after every ack wait has passed.
    async fn assert_drained(&self) {
        let left = self.try_next(ACK_WAIT * 3).await;
        assert!(
            left.is_none(),
            "nothing is redelivered: {:?}",
            left.map(|m| m.delivered())
        );
    }

    /// Terminated: never redelivered, even after the ack wait.
    async fn assert_terminated(&self, _payload: &[u8]) {
        self.assert_drained().await;
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
async fn a_duplicate_published_past_the_dedup_window_gives_one_effect() {
    run::<Fixture>("dedup", scenarios::a_duplicate_publish_gives_one_effect).await;
}

#[tokio::test]
async fn a_poison_message_is_recorded_failed_then_terminated() {
    run::<Fixture>(
        "poison",
        scenarios::a_poison_message_is_recorded_failed_then_terminated,
    )
    .await;
}

#[tokio::test]
async fn a_retryable_failure_is_redelivered_after_the_nak_delay_and_then_applied() {
    run::<Fixture>(
        "retry",
        scenarios::a_retryable_failure_is_delivered_again_and_then_applied,
    )
    .await;
}

#[tokio::test]
async fn the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor() {
    run::<Fixture>(
        "keys",
        scenarios::the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor,
    )
    .await;
}
