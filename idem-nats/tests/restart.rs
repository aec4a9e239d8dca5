//! A broker restart during a run: a private `nats-server` (its own port and store directory,
//! never the shared server) is killed with SIGKILL and started again while messages are
//! being published and consumed behind the consumer barrier. The client reconnects by
//! itself; the test's publisher and consumer retry what failed meanwhile. At the end every
//! message has exactly one effect in a SQLite ledger, written in the barrier's
//! transactional mode into a table without a unique constraint, so a duplicate would show
//! as a second row, and a lost message as a missing one.
//!
//! Skipped with a note when there is no `nats-server` binary, unless `IDEM_TEST_REQUIRE`
//! names `nats`. Every wait is bounded (liveness only); nothing asserts on timing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, stream};
use futures::StreamExt;
use idem_broker::testkit::{effects, retry, wait_until, Progress, ATTEMPT_BOUND, LIVENESS, PAUSE};
use idem_broker::{ConsumeError, ConsumerBarrier, Handled};
use idem_core::{Barrier, Failure, Key};
use idem_nats::{publish, JetStreamMessage};
use idem_sqlite::{SqliteOperation, SqliteStore};

mod common;
use common::PrivateServer;

/// Messages published.
const MESSAGES: usize = 200;
/// How many messages the publisher may be ahead of the consumer.
const LEAD: usize = MESSAGES / 4;
const STREAM: &str = "IDEM_RESTART";
const SUBJECT: &str = "idem.restart.orders";
const CONSUMER: &str = "ledger";
/// How long JetStream waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How long a pull request waits for messages.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);

type Ledger = ConsumerBarrier<SqliteStore, JetStreamMessage>;

/// What the publisher and the consumer went through.
#[derive(Default)]
struct Stats {
    published: AtomicUsize,
    publish_retries: AtomicUsize,
    /// Publishes JetStream answered as duplicates (a retry of a publish whose ack was lost).
    dropped_duplicates: AtomicUsize,
    deliveries: AtomicUsize,
    /// Handled for the first time and acked (one whose ack failed is a settle error).
    applied: AtomicUsize,
    replayed: AtomicUsize,
    naked: AtomicUsize,
    settle_errors: AtomicUsize,
    barrier_errors: AtomicUsize,
    fetch_errors: AtomicUsize,
    /// Outcomes that must not happen (a failure, a rejection), described.
    unexpected: Mutex<Vec<String>>,
}

impl Stats {
    fn count(counter: &AtomicUsize) -> usize {
        counter.fetch_add(1, Ordering::SeqCst)
    }

    fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }

    fn unexpected(&self, what: String) {
        self.unexpected.lock().unwrap().push(what);
    }
}

impl Progress for Stats {
    fn summary(&self) -> String {
        format!(
            "{} published ({} publish retries, {} dropped by JetStream as duplicates); \
             {} deliveries: {} applied, {} replayed, {} naked, {} settle errors, \
             {} barrier errors; {} fetch errors",
            Self::get(&self.published),
            Self::get(&self.publish_retries),
            Self::get(&self.dropped_duplicates),
            Self::get(&self.deliveries),
            Self::get(&self.applied),
            Self::get(&self.replayed),
            Self::get(&self.naked),
            Self::get(&self.settle_errors),
            Self::get(&self.barrier_errors),
            Self::get(&self.fetch_errors),
        )
    }

    fn assert_expected(&self) {
        let unexpected = self.unexpected.lock().unwrap();
        assert!(unexpected.is_empty(), "unexpected outcomes: {unexpected:?}");
    }
}

fn key(i: usize) -> Key {
    Key::new("producer", format!("order-{i:03}")).unwrap()
}

/// Publishes every message in order, retrying each until JetStream acknowledges it, at
/// most [`LEAD`] messages ahead of the consumer, so that the publisher is still running
/// when the server is killed.
async fn publish_all(js: &jetstream::Context, stats: &Stats) {
    for i in 0..MESSAGES {
        wait_until("the consumer catches up", stats, || {
            Stats::get(&stats.applied) + LEAD > i
        })
        .await;
        let key = key(i);
        let ack = retry("publishing", &stats.publish_retries, || {
            publish(js, SUBJECT, &key, format!("+{i}").into_bytes())
        })
        .await;
        if ack.duplicate {
            Stats::count(&stats.dropped_duplicates);
        }
        Stats::count(&stats.published);
    }
}

/// Pulls and handles messages behind the barrier until `stop`, retrying what fails.
async fn consume(
    consumer: PullConsumer,
    barrier: Ledger,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let batch = tokio::time::timeout(
            ATTEMPT_BOUND,
            consumer
                .fetch()
                .max_messages(50)
                .expires(FETCH_EXPIRES)
                .messages(),
        )
        .await;
        let mut batch = match batch {
            Ok(Ok(batch)) => batch,
            _ => {
                Stats::count(&stats.fetch_errors);
                tokio::time::sleep(PAUSE).await;
                continue;
            }
        };
        loop {
            let message =
                match tokio::time::timeout(FETCH_EXPIRES + ATTEMPT_BOUND, batch.next()).await {
                    Ok(Some(Ok(message))) => JetStreamMessage::from(message),
                    Ok(None) => break,
                    Ok(Some(Err(_))) | Err(_) => {
                        Stats::count(&stats.fetch_errors);
                        break;
                    }
                };
            Stats::count(&stats.deliveries);
            handle(&barrier, &message, &stats).await;
        }
    }
}

/// Applies one message in transactional mode: the ledger row, the key and the outcome
/// commit together.
async fn handle(barrier: &Ledger, message: &JetStreamMessage, stats: &Stats) {
    let handled = barrier
        .handle_transaction(message, |incoming| {
            let id = incoming.key.id().to_owned();
            let op: SqliteOperation<(), String, String> = Box::new(move |tx| {
                tx.execute("INSERT INTO effects (id) VALUES (?1)", [&id])
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                Ok(())
            });
            op
        })
        .await;
    match handled {
        Ok(Handled::Completed {
            replayed: false, ..
        }) => Stats::count(&stats.applied),
        Ok(Handled::Completed { replayed: true, .. }) => Stats::count(&stats.replayed),
        // Naked: JetStream delivers it again.
        Ok(Handled::Retry { .. } | Handled::Busy { .. }) => Stats::count(&stats.naked),
        // The outcome is recorded; the redelivery after the ack wait replays it.
        Err(ConsumeError::Settle { .. }) => Stats::count(&stats.settle_errors),
        // Nothing new is recorded; the message is delivered again.
        Err(ConsumeError::Barrier(_)) => Stats::count(&stats.barrier_errors),
        Ok(other) => {
            stats.unexpected(format!("{other:?}"));
            0
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_a_run_ends_with_one_effect_per_message_and_none_lost() {
    let Some(mut server) = PrivateServer::start().await else {
        return;
    };
    let started = Instant::now();
    let stats = Arc::new(Stats::default());
    let setup_retries = AtomicUsize::new(0);

    let client = tokio::time::timeout(
        ATTEMPT_BOUND,
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50) * attempts.min(10) as u32
            })
            .connect(server.url()),
    )
    .await
    .expect("connecting in time")
    .expect("connecting");
    let mut js = jetstream::new(client);
    // A publish whose ack was lost in the restart is retried soon; JetStream drops the copy
    // (same Nats-Msg-Id inside the duplicate window).
    js.set_timeout(Duration::from_secs(1));
    let created = retry("creating the stream", &setup_retries, || {
        js.get_or_create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec![SUBJECT.to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
    })
    .await;
    let consumer: PullConsumer = retry("creating the consumer", &setup_retries, || {
        created.get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.to_string()),
                ack_wait: ACK_WAIT,
                ..Default::default()
            },
        )
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("ledger.db"))
        .await
        .unwrap();
    // No unique constraint: a second effect of a message would be a second row.
    store
        .with_connection(|c| c.execute_batch("CREATE TABLE effects (id TEXT NOT NULL)"))
        .await
        .unwrap();
    let barrier = ConsumerBarrier::new(Barrier::new(Arc::new(store.clone())), CONSUMER)
        .unwrap()
        .with_retry_delay(Duration::from_millis(100));

    let stop = Arc::new(AtomicBool::new(false));
    let consumer_task = tokio::spawn(consume(consumer, barrier, stats.clone(), stop.clone()));
    let publisher = tokio::spawn({
        let (js, stats) = (js.clone(), stats.clone());
        async move { publish_all(&js, &stats).await }
    });

    // The server is killed twice while both are running: the publisher is at most LEAD
    // messages ahead of the consumer, so neither has finished.
    let mut at_kill = Vec::new();
    for (restart, applied) in [MESSAGES / 4, MESSAGES * 5 / 8].into_iter().enumerate() {
        wait_until("the run under way", &stats, || {
            Stats::get(&stats.applied) >= applied
        })
        .await;
        at_kill.push((Stats::get(&stats.published), Stats::get(&stats.applied)));
        server.kill_and_restart().await;
        eprintln!("restart {}: {}", restart + 1, stats.summary());
    }

    tokio::time::timeout(LIVENESS, publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher did not panic");
    // The run ends when JetStream has nothing left to deliver and nothing delivered but
    // unacknowledged (a delivery whose ack a restart lost is redelivered, replayed and
    // acked first); the ledger then says whether anything was lost or applied twice.
    let started_draining = Instant::now();
    loop {
        let info = retry("reading the consumer", &setup_retries, || {
            created.consumer_info(CONSUMER)
        })
        .await;
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        stats.assert_expected();
        assert!(
            started_draining.elapsed() < LIVENESS,
            "the consumer drains within {LIVENESS:?}: {}; {info:?}; server log:\n{}",
            stats.summary(),
            server.log()
        );
        tokio::time::sleep(PAUSE).await;
    }
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(LIVENESS, consumer_task)
        .await
        .expect("the consumer stops")
        .expect("the consumer did not panic");
    stats.assert_expected();

    let effects = effects(&store).await;
    let want: Vec<String> = (0..MESSAGES).map(|i| key(i).id().to_owned()).collect();
    let lost: Vec<&String> = want
        .iter()
        .filter(|id| !effects.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &u32)> = effects.iter().filter(|(_, n)| **n != 1).collect();
    let stream_messages = retry("reading the stream", &setup_retries, || {
        js.get_stream(STREAM)
    })
    .await
    .cached_info()
    .state
    .messages;
    eprintln!(
        "restart: {MESSAGES} messages, 2 SIGKILL restarts at (published, applied) {at_kill:?}; \
         {} effects for {} ids, {} duplicated, {} lost; {stream_messages} in the stream; {}; \
         {} setup retries; {:?}",
        effects.values().sum::<u32>(),
        effects.len(),
        duplicated.len(),
        lost.len(),
        stats.summary(),
        Stats::get(&setup_retries),
        started.elapsed(),
    );
    assert!(lost.is_empty(), "messages without an effect: {lost:?}");
    assert!(
        duplicated.is_empty(),
        "messages with more than one effect: {duplicated:?}"
    );
    assert_eq!(
        effects.keys().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>(),
        "the ledger holds exactly the published messages"
    );
}
