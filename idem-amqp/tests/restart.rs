//! A broker restart during a run: a private RabbitMQ node (its own name, ports and
//! database, never the shared broker) is killed with SIGKILL and started again while
//! messages are being published (persistent, with publisher confirms, to a durable queue)
//! and consumed behind the consumer barrier. lapin does not reconnect by itself, so the
//! test's publisher and consumer open a new connection and retry what failed. At the end
//! every message has exactly one effect in a SQLite ledger, written in the barrier's
//! transactional mode into a table without a unique constraint, so a duplicate would show
//! as a second row, and a lost message as a missing one (the shared run of
//! `idem_broker::testkit::restart`; this file provides the RabbitMQ side).
//!
//! Skipped with a note when RabbitMQ is not installed, unless `IDEM_TEST_REQUIRE` names
//! `rabbitmq`. Every wait is bounded (liveness only); nothing asserts on timing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use idem_amqp::{AmqpMessage, AmqpPublisher};
use idem_broker::testkit::restart::{self, Restartable, Run, Stats, MESSAGES};
use idem_broker::testkit::{effects, retry, Progress, ATTEMPT_BOUND, LIVENESS, PAUSE};
use idem_broker::ConsumerBarrier;
use idem_sqlite::SqliteStore;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

mod common;
use common::PrivateBroker;

const QUEUE: &str = "idem-restart-orders";

type Ledger = ConsumerBarrier<SqliteStore, AmqpMessage>;

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

/// Publishes every message in order, at most [`restart::LEAD`] messages ahead of the
/// consumer, each until it is confirmed; after a failure on a new connection (a message
/// confirmed before the failure but whose confirm was lost is published twice, which the
/// barrier replays).
async fn publish_all(url: &str, stats: &Stats) {
    let mut session = None;
    for i in 0..MESSAGES {
        restart::wait_for_the_consumer(stats, i).await;
        let key = restart::key(i);
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
                publisher.send(&key, QUEUE, &restart::payload(i)),
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
                Stats::count(&stats.fetch_errors);
                session = None;
                tokio::time::sleep(PAUSE).await;
                continue;
            }
        };
        Stats::count(&stats.deliveries);
        // A refused settlement: the unacked message comes back on a new connection.
        if !restart::handle(&barrier, &message, &stats).await {
            session = None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_a_run_ends_with_one_effect_per_message_and_none_lost() {
    let Some(mut broker) = PrivateBroker::start().await else {
        return;
    };
    let mut run = Run::new().await;
    let stats = run.stats().clone();

    // RabbitMQ can lose a durable queue declared moments before a crash (its metadata
    // store writes asynchronously): the queue is declared until it has survived a SIGKILL,
    // so the run tests the messages, not the declaration.
    let url = broker.url();
    let mut crashes_to_declare = 0;
    loop {
        retry("declaring the queue", &stats.setup_retries, || open(&url)).await;
        broker.kill_and_restart().await;
        crashes_to_declare += 1;
        if queue_exists(&url, &stats.setup_retries).await {
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
        run.consumer_barrier(),
        stats.clone(),
        published.clone(),
    ));
    let publisher = tokio::spawn({
        let (url, stats) = (broker.url(), stats.clone());
        async move { publish_all(&url, &stats).await }
    });

    run.kill_twice(&mut broker).await;

    tokio::time::timeout(LIVENESS, publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher did not panic");
    published.store(true, Ordering::SeqCst);
    match tokio::time::timeout(LIVENESS, consumer).await {
        Ok(joined) => joined.expect("the consumer did not panic"),
        Err(_) => panic!(
            "the consumer finishes within {LIVENESS:?}: {}; no effect for {:?}; node log:\n{}",
            stats.summary(),
            restart::lost(&run.effects().await),
            broker.log()
        ),
    }
    run.assert_one_effect_per_message(&format!(
        "{crashes_to_declare} SIGKILLs until the queue was durable"
    ))
    .await;
}
