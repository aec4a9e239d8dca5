//! A broker restart during a run: a private RabbitMQ node (its own name, ports and
//! database, never the shared broker) is killed with SIGKILL and started again while
//! messages are being published (persistent, with publisher confirms, to a durable queue)
//! and consumed behind the consumer barrier. lapin does not reconnect by itself, so the
//! test's publisher and consumer open a new connection and retry what failed. At the end
//! every message has exactly one effect in a SQLite ledger, written in the barrier's
//! transactional mode into a table without a unique constraint, so a duplicate would show
//! as a second row, and a lost message as a missing one.
//!
//! Skipped with a note when RabbitMQ is not installed, unless `IDEM_TEST_REQUIRE` names
//! `rabbitmq`. Every wait is bounded (liveness only); nothing asserts on timing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_amqp::{AmqpMessage, AmqpPublisher};
use idem_broker::testkit::{effects, retry, wait_until, Progress, ATTEMPT_BOUND, LIVENESS, PAUSE};
use idem_broker::{ConsumeError, ConsumerBarrier, Handled};
use idem_core::{Barrier, Failure, Key};
use idem_sqlite::{SqliteOperation, SqliteStore};
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

mod common;
use common::PrivateBroker;

/// Messages published.
const MESSAGES: usize = 200;
/// How many messages the publisher may be ahead of the consumer.
const LEAD: usize = MESSAGES / 4;
const QUEUE: &str = "idem-restart-orders";
const SCOPE: &str = "ledger";

type Ledger = ConsumerBarrier<SqliteStore, AmqpMessage>;

/// What the publisher and the consumer went through.
#[derive(Default)]
struct Stats {
    published: AtomicUsize,
    publish_retries: AtomicUsize,
    /// Connection attempts that failed (the node was down or booting).
    reconnects: AtomicUsize,
    deliveries: AtomicUsize,
    /// Handled for the first time and acked (one whose ack failed is a settle error).
    applied: AtomicUsize,
    replayed: AtomicUsize,
    naked: AtomicUsize,
    settle_errors: AtomicUsize,
    barrier_errors: AtomicUsize,
    get_errors: AtomicUsize,
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
}

impl Progress for Stats {
    fn summary(&self) -> String {
        format!(
            "{} published ({} publish retries); {} failed connection attempts; {} deliveries: {} applied, \
             {} replayed, {} naked, {} settle errors, {} barrier errors; {} get errors",
            Self::get(&self.published),
            Self::get(&self.publish_retries),
            Self::get(&self.reconnects),
            Self::get(&self.deliveries),
            Self::get(&self.applied),
            Self::get(&self.replayed),
            Self::get(&self.naked),
            Self::get(&self.settle_errors),
            Self::get(&self.barrier_errors),
            Self::get(&self.get_errors),
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

/// A connection and a channel on it, with the durable queue declared.
async fn open(url: &str) -> Result<(Connection, Channel), lapin::Error> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(
            QUEUE,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel))
}

/// Whether the queue exists (a passive declaration).
async fn queue_exists(url: &str, retries: &AtomicUsize) -> bool {
    let connection = retry("connecting", retries, || {
        Connection::connect(url, ConnectionProperties::default())
    })
    .await;
    let channel = retry("opening a channel", retries, || connection.create_channel()).await;
    channel
        .queue_declare(
            QUEUE,
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok()
}

/// A confirming publisher on a fresh connection.
async fn open_publisher(url: &str) -> Result<(Connection, AmqpPublisher), String> {
    let (connection, channel) = open(url).await.map_err(|e| e.to_string())?;
    let publisher = AmqpPublisher::new(channel, "")
        .await
        .map_err(|e| e.to_string())?;
    Ok((connection, publisher))
}

/// Publishes every message in order, at most [`LEAD`] messages ahead of the consumer,
/// each until it is confirmed; after a failure on a new connection (a message confirmed
/// before the failure but whose confirm was lost is published twice, which the barrier
/// replays).
async fn publish_all(url: &str, stats: &Stats) {
    let mut session = None;
    for i in 0..MESSAGES {
        wait_until("the consumer catches up", stats, || {
            Stats::get(&stats.applied) + LEAD > i
        })
        .await;
        let key = key(i);
        let started = Instant::now();
        loop {
            let (_, publisher) = match &session {
                Some(session) => session,
                None => {
                    let opened = retry("connecting the publisher", &stats.reconnects, || {
                        open_publisher(url)
                    })
                    .await;
                    session.insert(opened)
                }
            };
            let sent = tokio::time::timeout(
                ATTEMPT_BOUND,
                publisher.send(&key, QUEUE, format!("+{i}").as_bytes()),
            )
            .await;
            if let Ok(Ok(())) = sent {
                break;
            }
            assert!(
                started.elapsed() < LIVENESS,
                "publishing {} still fails after {LIVENESS:?}: {sent:?}",
                key.id()
            );
            Stats::count(&stats.publish_retries);
            session = None;
            tokio::time::sleep(PAUSE).await;
        }
        Stats::count(&stats.published);
    }
}

/// Gets and handles messages behind the barrier, on a new connection after a failure,
/// until the publisher is done, the queue is empty and every message has its effect.
async fn consume(url: String, barrier: Ledger, stats: Arc<Stats>, published: Arc<AtomicBool>) {
    let mut session: Option<(Connection, Channel)> = None;
    loop {
        let (_, channel) = match &session {
            Some(session) => session,
            None => {
                let opened =
                    retry("connecting the consumer", &stats.reconnects, || open(&url)).await;
                session.insert(opened)
            }
        };
        let got = tokio::time::timeout(
            ATTEMPT_BOUND,
            channel.basic_get(QUEUE, BasicGetOptions { no_ack: false }),
        )
        .await;
        let message = match got {
            Ok(Ok(Some(message))) => AmqpMessage::from(message),
            Ok(Ok(None)) => {
                if published.load(Ordering::SeqCst)
                    && effects(barrier.barrier().store()).await.len() == MESSAGES
                {
                    return;
                }
                tokio::time::sleep(PAUSE).await;
                continue;
            }
            Ok(Err(_)) | Err(_) => {
                Stats::count(&stats.get_errors);
                session = None;
                tokio::time::sleep(PAUSE).await;
                continue;
            }
        };
        Stats::count(&stats.deliveries);
        if !handle(&barrier, &message, &stats).await {
            session = None;
        }
    }
}

/// Applies one message in transactional mode: the ledger row, the key and the outcome
/// commit together. `false` if the channel failed.
async fn handle(barrier: &Ledger, message: &AmqpMessage, stats: &Stats) -> bool {
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
        // Requeued: RabbitMQ delivers it again.
        Ok(Handled::Retry { .. } | Handled::Busy { .. }) => Stats::count(&stats.naked),
        // The outcome is recorded; the message, unacked, comes back and is replayed.
        Err(ConsumeError::Settle { .. }) => {
            Stats::count(&stats.settle_errors);
            return false;
        }
        // Nothing new is recorded; the message is delivered again.
        Err(ConsumeError::Barrier(_)) => Stats::count(&stats.barrier_errors),
        Ok(other) => {
            stats.unexpected.lock().unwrap().push(format!("{other:?}"));
            0
        }
    };
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_a_run_ends_with_one_effect_per_message_and_none_lost() {
    let Some(mut broker) = PrivateBroker::start().await else {
        return;
    };
    let started = Instant::now();
    let stats = Arc::new(Stats::default());

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("ledger.db"))
        .await
        .unwrap();
    // No unique constraint: a second effect of a message would be a second row.
    store
        .with_connection(|c| c.execute_batch("CREATE TABLE effects (id TEXT NOT NULL)"))
        .await
        .unwrap();
    let barrier = ConsumerBarrier::new(Barrier::new(Arc::new(store.clone())), SCOPE)
        .unwrap()
        .with_retry_delay(Duration::from_millis(100));

    // RabbitMQ can lose a durable queue declared moments before a crash (its metadata
    // store writes asynchronously): the queue is declared until it has survived a SIGKILL,
    // so the run tests the messages, not the declaration.
    let setup_retries = AtomicUsize::new(0);
    let url = broker.url();
    let mut crashes_to_declare = 0;
    loop {
        retry("declaring the queue", &setup_retries, || open(&url)).await;
        broker.kill_and_restart().await;
        crashes_to_declare += 1;
        if queue_exists(&url, &setup_retries).await {
            break;
        }
        assert!(
            crashes_to_declare < 10,
            "the durable queue survives a restart: {}",
            broker.log()
        );
    }

    let published = Arc::new(AtomicBool::new(false));
    let consumer = tokio::spawn(consume(
        broker.url(),
        barrier,
        stats.clone(),
        published.clone(),
    ));
    let publisher = tokio::spawn({
        let (url, stats) = (broker.url(), stats.clone());
        async move { publish_all(&url, &stats).await }
    });

    // The node is killed twice while both are running: the publisher is at most LEAD
    // messages ahead of the consumer, so neither has finished.
    let mut at_kill = Vec::new();
    for (restart, applied) in [MESSAGES / 4, MESSAGES * 5 / 8].into_iter().enumerate() {
        wait_until("the run under way", &stats, || {
            Stats::get(&stats.applied) >= applied
        })
        .await;
        at_kill.push((Stats::get(&stats.published), Stats::get(&stats.applied)));
        broker.kill_and_restart().await;
        eprintln!("restart {}: {}", restart + 1, stats.summary());
    }

    tokio::time::timeout(LIVENESS, publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher did not panic");
    published.store(true, Ordering::SeqCst);
    match tokio::time::timeout(LIVENESS, consumer).await {
        Ok(joined) => joined.expect("the consumer did not panic"),
        Err(_) => {
            let effects = effects(&store).await;
            let missing: Vec<String> = (0..MESSAGES)
                .map(|i| key(i).id().to_owned())
                .filter(|id| !effects.contains_key(id))
                .collect();
            panic!(
                "the consumer finishes within {LIVENESS:?}: {}; no effect for {missing:?}; \
                 node log:\n{}",
                stats.summary(),
                broker.log()
            );
        }
    }
    stats.assert_expected();

    let effects = effects(&store).await;
    let want: Vec<String> = (0..MESSAGES).map(|i| key(i).id().to_owned()).collect();
    let duplicated: Vec<(&String, &u32)> = effects.iter().filter(|(_, n)| **n != 1).collect();
    eprintln!(
        "restart: {MESSAGES} messages, 2 SIGKILL restarts at (published, applied) {at_kill:?}; \
         {} effects for {} ids, {} duplicated; {}; {} SIGKILLs until the queue was \
         durable, {} setup retries; {:?}",
        effects.values().sum::<u32>(),
        effects.len(),
        duplicated.len(),
        stats.summary(),
        crashes_to_declare,
        Stats::get(&setup_retries),
        started.elapsed(),
    );
    assert!(
        duplicated.is_empty(),
        "messages with more than one effect: {duplicated:?}"
    );
    assert_eq!(
        effects.keys().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>(),
        "the ledger holds exactly the published messages, none lost"
    );
}
