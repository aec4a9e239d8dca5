//! The settlement policy on a real SQLite store, with an in-process delivery that records
//! how each message was settled (the broker adapters run the same paths on real brokers).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_broker::{
    ConsumeError, ConsumerBarrier, Delivery, FailurePolicy, Handled, Rejected, Unanswered,
};
use idem_core::{Barrier, BoxError, Failure};
use idem_sqlite::{SqliteOperation, SqliteStore};

/// One delivery of a message; `settled` records every settlement in order.
struct Message {
    id: Option<String>,
    body: Vec<u8>,
    settled: Arc<Mutex<Vec<String>>>,
    /// The broker never answers this delivery's ack (its connection died under it).
    silent: bool,
}

impl Message {
    fn new(id: Option<&str>, body: &[u8]) -> Self {
        Message {
            id: id.map(str::to_owned),
            body: body.to_vec(),
            settled: Arc::default(),
            silent: false,
        }
    }

    fn settled(&self) -> Vec<String> {
        self.settled.lock().unwrap().clone()
    }
}

impl Delivery for Message {
    fn idempotency_id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn payload(&self) -> &[u8] {
        &self.body
    }
    async fn ack(&self) -> Result<(), BoxError> {
        if self.silent {
            std::future::pending::<()>().await;
        }
        self.settled.lock().unwrap().push("ack".into());
        Ok(())
    }
    async fn nak(&self, delay: Duration) -> Result<(), BoxError> {
        self.settled
            .lock()
            .unwrap()
            .push(format!("nak {}ms", delay.as_millis()));
        Ok(())
    }
    async fn term(&self) -> Result<(), BoxError> {
        self.settled.lock().unwrap().push("term".into());
        Ok(())
    }
}

type Outcome = Handled<u32, String, String>;

async fn consumer() -> (ConsumerBarrier<SqliteStore, Message>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("idem.db"))
        .await
        .unwrap();
    let barrier = Barrier::new(Arc::new(store));
    let consumer = ConsumerBarrier::new(barrier, "ledger")
        .unwrap()
        .with_retry_delay(Duration::from_millis(250));
    (consumer, dir)
}

#[tokio::test]
async fn a_redelivery_replays_and_is_acked_again() {
    let (c, _dir) = consumer().await;
    let effects = &AtomicU32::new(0);
    for round in 0..3 {
        let m = Message::new(Some("order-1"), b"+100");
        let h: Outcome = c
            .handle(&m, |incoming, _lease| async move {
                assert_eq!(incoming.payload, b"+100");
                assert_eq!(incoming.key.scope(), "ledger");
                Ok(effects.fetch_add(1, Ordering::SeqCst) + 7)
            })
            .await
            .unwrap();
        assert!(
            matches!(h, Handled::Completed { value: 7, replayed } if replayed == (round > 0)),
            "{h:?}"
        );
        assert_eq!(m.settled(), ["ack"]);
    }
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_permanent_failure_is_recorded_then_terminated_or_acked() {
    let (c, _dir) = consumer().await;
    let runs = AtomicU32::new(0);
    for round in 0..2 {
        let m = Message::new(Some("poison"), b"garbage");
        let h: Outcome = c
            .handle(&m, |_, _| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Err(Failure::Permanent("unparsable".to_string()))
            })
            .await
            .unwrap();
        assert!(
            matches!(&h, Handled::Failed { failure, replayed } if failure == "unparsable" && *replayed == (round > 0)),
            "{h:?}"
        );
        assert_eq!(m.settled(), ["term"]);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let acking = c.clone().with_failure_policy(FailurePolicy::Ack);
    let m = Message::new(Some("poison"), b"garbage");
    let h: Outcome = acking.handle(&m, |_, _| async { Ok(0) }).await.unwrap();
    assert!(matches!(h, Handled::Failed { replayed: true, .. }), "{h:?}");
    assert_eq!(m.settled(), ["ack"]);
}

#[tokio::test]
async fn a_retryable_failure_naks_and_the_next_delivery_runs() {
    let (c, _dir) = consumer().await;
    let m = Message::new(Some("flaky"), b"x");
    let h: Outcome = c
        .handle(&m, |_, _| async {
            Err(Failure::Retryable("timeout".to_string()))
        })
        .await
        .unwrap();
    assert!(
        matches!(&h, Handled::Retry { error, delay } if error == "timeout" && delay.as_millis() == 250)
    );
    assert_eq!(m.settled(), ["nak 250ms"]);
    let m = Message::new(Some("flaky"), b"x");
    let h: Outcome = c.handle(&m, |_, _| async { Ok(1) }).await.unwrap();
    assert!(matches!(
        h,
        Handled::Completed {
            value: 1,
            replayed: false
        }
    ));
    assert_eq!(m.settled(), ["ack"]);
}

#[tokio::test]
async fn messages_without_a_usable_key_are_terminated_unrun() {
    let (c, _dir) = consumer().await;
    let c = c.with_extractor(|m: &Message| {
        std::str::from_utf8(&m.body)
            .ok()
            .and_then(|b| b.strip_prefix("id="))
            .map(str::to_owned)
    });
    type Case = (Option<&'static str>, &'static [u8], fn(&Rejected) -> bool);
    let cases: [Case; 3] = [
        (None, b"no key here", |r| matches!(r, Rejected::NoKey)),
        (Some("has space"), b"x", |r| {
            matches!(r, Rejected::InvalidKey(_))
        }),
        (None, b"id=bad key", |r| {
            matches!(r, Rejected::InvalidKey(_))
        }),
    ];
    for (id, body, want) in cases {
        let m = Message::new(id, body);
        let h: Outcome = c
            .handle(&m, |_, _| async { panic!("a rejected message ran") })
            .await
            .unwrap();
        assert!(matches!(&h, Handled::Rejected(r) if want(r)), "{h:?}");
        assert_eq!(m.settled(), ["term"]);
    }
    // The extractor's id is used when the adapter finds none.
    let m = Message::new(None, b"id=from-body");
    let h: Outcome = c.handle(&m, |_, _| async { Ok(3) }).await.unwrap();
    assert!(matches!(h, Handled::Completed { value: 3, .. }));
    let m = Message::new(None, b"id=from-body");
    let h: Outcome = c.handle(&m, |_, _| async { Ok(4) }).await.unwrap();
    assert!(matches!(
        h,
        Handled::Completed {
            value: 3,
            replayed: true
        }
    ));
}

#[tokio::test]
async fn a_key_reused_with_another_payload_is_terminated_as_a_mismatch() {
    let (c, _dir) = consumer().await;
    let m = Message::new(Some("k"), b"+100");
    let _: Outcome = c.handle(&m, |_, _| async { Ok(1) }).await.unwrap();
    let m = Message::new(Some("k"), b"+999");
    let h: Outcome = c.handle(&m, |_, _| async { Ok(2) }).await.unwrap();
    assert!(matches!(h, Handled::Rejected(Rejected::Mismatch)), "{h:?}");
    assert_eq!(m.settled(), ["term"]);
}

#[tokio::test]
async fn in_transactional_mode_the_handlers_writes_commit_with_the_key() {
    let (c, _dir) = consumer().await;
    c.barrier()
        .store()
        .with_connection(|conn| {
            conn.execute("CREATE TABLE ledger (id TEXT, amount INTEGER)", [])
                .map(drop)
        })
        .await
        .unwrap();
    for round in 0..3 {
        let m = Message::new(Some("order-9"), b"250");
        let h: Handled<i64, String, String> = c
            .handle_transaction(&m, |incoming| -> SqliteOperation<i64, String, String> {
                Box::new(move |tx| {
                    let amount: i64 = std::str::from_utf8(&incoming.payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Failure::Permanent("not a number".to_string()))?;
                    tx.execute(
                        "INSERT INTO ledger (id, amount) VALUES (?1, ?2)",
                        (incoming.key.id(), amount),
                    )
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                    Ok(amount)
                })
            })
            .await
            .unwrap();
        assert!(
            matches!(h, Handled::Completed { value: 250, replayed } if replayed == (round > 0)),
            "{h:?}"
        );
        assert_eq!(m.settled(), ["ack"]);
    }
    let rows: i64 = c
        .barrier()
        .store()
        .with_connection(|conn| conn.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn an_ack_the_broker_never_answers_fails_after_the_settle_timeout_and_the_redelivery_replays()
{
    let (c, _dir) = consumer().await;
    let c = c.with_settle_timeout(Duration::from_millis(50));
    let effects = &AtomicU32::new(0);
    let handler = |_, _| async move { Ok(effects.fetch_add(1, Ordering::SeqCst) + 7) };
    let silent = Message {
        silent: true,
        ..Message::new(Some("order-9"), b"+100")
    };
    let h: Result<Outcome, _> = c.handle(&silent, handler).await;
    match h {
        Err(ConsumeError::Settle { action, source }) => {
            assert_eq!(action, "ack");
            let unanswered = source.downcast_ref::<Unanswered>();
            assert_eq!(
                unanswered.map(|u| u.after),
                Some(Duration::from_millis(50)),
                "{source}"
            );
        }
        other => panic!("an unanswered ack answered {other:?}"),
    }
    assert!(silent.settled().is_empty());
    // The outcome was recorded before the ack: the redelivery replays it and is acked.
    let again = Message::new(Some("order-9"), b"+100");
    let h: Outcome = c.handle(&again, handler).await.unwrap();
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
    assert_eq!(again.settled(), ["ack"]);
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}
