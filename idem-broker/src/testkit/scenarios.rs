//! The broker-independent scenarios: each publishes to a [`TestBroker`], consumes behind its
//! consumer barrier and checks what the barrier and the broker did; the steps and the
//! assertions are all here. A broker's test runs one on a fresh fixture with
//! [`run`](super::run).

use std::sync::atomic::{AtomicU32, Ordering};

use idem_core::{Failure, Fingerprint, Response, State, Store};

use super::TestBroker;
use crate::{Delivery, Handled, Incoming, Rejected};

/// What the scenarios' handlers give: an amount, a permanent failure's reason, a retryable
/// error.
type Ledger = Handled<u32, String, String>;

/// A consumer records a message's outcome and crashes before it acknowledges it: the
/// redelivery replays the outcome and is acknowledged, and the effect happened once.
///
/// # Panics
///
/// When a check fails.
pub async fn a_redelivery_after_a_consumer_crash_gives_one_effect<B: TestBroker>(broker: &B) {
    let effects = &AtomicU32::new(0);
    assert!(!broker.publish("order-1", b"+100").await);

    // The first consumer records the outcome and crashes before it acks: exactly the
    // barrier step `handle` runs before its ack, then the message is left unsettled.
    let (first, consumer) = broker.next_to_crash().await;
    let deliveries = B::deliveries(&first);
    assert!(deliveries.is_first(), "{deliveries:?}");
    let key = broker.barrier().key(&first).unwrap();
    let recorded: Result<Response<u32, String>, _> = broker
        .barrier()
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
    broker.crash(consumer, first).await;

    // The broker delivers it again; the restarted consumer replays and acks.
    let again = broker.next().await;
    let deliveries = B::deliveries(&again);
    assert!(deliveries.is_second(), "{deliveries:?}");
    let h: Ledger = broker
        .barrier()
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
    broker.assert_drained().await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

/// A message published twice: the broker drops the copy itself inside its
/// de-duplication window (where it has one), and delivers a copy published past it as a
/// new message, which the barrier replays.
///
/// # Panics
///
/// When a check fails.
pub async fn a_duplicate_publish_gives_one_effect<B: TestBroker>(broker: &B) {
    let effects = &AtomicU32::new(0);
    let apply = |_, _| async move {
        effects.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Failure<String, String>>(7)
    };
    assert!(!broker.publish("order-2", b"+7").await);
    if B::DEDUPLICATES {
        // Inside the window the broker itself drops the copy.
        assert!(
            broker.publish("order-2", b"+7").await,
            "the broker de-duplicates"
        );
    }
    broker.publish_copy("order-2", b"+7").await;
    for replayed_want in [false, true] {
        let message = broker.next().await;
        let deliveries = B::deliveries(&message);
        assert!(
            deliveries.is_first(),
            "a new message, not a redelivery: {deliveries:?}"
        );
        let h: Ledger = broker.barrier().handle(&message, apply).await.unwrap();
        assert!(
            matches!(h, Handled::Completed { value: 7, replayed } if replayed == replayed_want),
            "{h:?}"
        );
    }
    broker.assert_drained().await;
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

/// A message its handler cannot parse is recorded `Failed` and terminated; a copy published
/// again replays the failure and is terminated without running the handler.
///
/// # Panics
///
/// When a check fails.
pub async fn a_poison_message_is_recorded_failed_then_terminated<B: TestBroker>(broker: &B) {
    let runs = &AtomicU32::new(0);
    let parse = |incoming: Incoming, _| async move {
        runs.fetch_add(1, Ordering::SeqCst);
        std::str::from_utf8(&incoming.payload)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| Failure::Permanent("not an amount".to_string()))
    };
    assert!(!broker.publish("poison-1", b"garbage").await);
    let message = broker.next().await;
    let key = broker.barrier().key(&message).unwrap();
    let h: Ledger = broker.barrier().handle(&message, parse).await.unwrap();
    assert!(
        matches!(&h, Handled::Failed { failure, replayed: false } if failure == "not an amount"),
        "{h:?}"
    );
    let record = broker
        .barrier()
        .barrier()
        .store()
        .get(&key)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(record.state, State::Failed { .. }), "{record:?}");
    broker.assert_terminated(b"garbage").await;

    // A copy published again replays the failure and is terminated unrun.
    broker.publish_copy("poison-1", b"garbage").await;
    let h: Ledger = broker
        .barrier()
        .handle(&broker.next().await, parse)
        .await
        .unwrap();
    assert!(matches!(h, Handled::Failed { replayed: true, .. }), "{h:?}");
    broker.assert_terminated(b"garbage").await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A handler that fails retryably once: the message is naked, delivered again and applied.
///
/// # Panics
///
/// When a check fails.
pub async fn a_retryable_failure_is_delivered_again_and_then_applied<B: TestBroker>(broker: &B) {
    let attempts = &AtomicU32::new(0);
    let flaky = |_, _| async move {
        match attempts.fetch_add(1, Ordering::SeqCst) {
            0 => Err(Failure::Retryable("downstream timed out".to_string())),
            _ => Ok(5),
        }
    };
    assert!(!broker.publish("flaky-1", b"+5").await);
    let h: Ledger = broker
        .barrier()
        .handle(&broker.next().await, flaky)
        .await
        .unwrap();
    assert!(matches!(h, Handled::Retry { .. }), "{h:?}");
    let again = broker.next().await;
    let deliveries = B::deliveries(&again);
    assert!(deliveries.is_second(), "{deliveries:?}");
    let h: Ledger = broker.barrier().handle(&again, flaky).await.unwrap();
    assert!(
        matches!(
            h,
            Handled::Completed {
                value: 5,
                replayed: false
            }
        ),
        "{h:?}"
    );
    broker.assert_drained().await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

/// The key comes from the `Idempotency-Key` header, else the broker's message id, else the
/// user extractor; a message with none is terminated unrun.
///
/// # Panics
///
/// When a check fails.
pub async fn the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor<
    B: TestBroker,
>(
    broker: &B,
) {
    let barrier = broker
        .barrier()
        .clone()
        .with_extractor(id_in_body::<B::Message>);
    // The adapter's publish: the Idempotency-Key header (and the message id).
    assert!(!broker.publish("both", b"x").await);
    // Only the broker's message id.
    broker.publish_raw(Some("message-id-only"), b"y").await;
    // Neither: the extractor.
    broker.publish_raw(None, b"id=from-body").await;
    // Nothing at all: terminated.
    broker.publish_raw(None, b"anonymous").await;
    for want in ["both", "message-id-only", "from-body"] {
        let m = broker.next().await;
        assert_eq!(barrier.key(&m).unwrap().id(), want);
        let h: Ledger = barrier.handle(&m, |_, _| async { Ok(1) }).await.unwrap();
        assert!(matches!(h, Handled::Completed { .. }), "{h:?}");
    }
    let h: Ledger = barrier
        .handle(&broker.next().await, |_, _| async {
            panic!("a message without a key ran")
        })
        .await
        .unwrap();
    assert!(matches!(h, Handled::Rejected(Rejected::NoKey)), "{h:?}");
    broker.assert_drained().await;
}

/// The extractor of [`the_key_falls_back_from_the_header_to_the_message_id_to_the_extractor`]:
/// the id a body `id={id}` carries.
fn id_in_body<M: Delivery>(message: &M) -> Option<String> {
    std::str::from_utf8(message.payload())
        .ok()
        .and_then(|p| p.strip_prefix("id="))
        .map(str::to_owned)
}
