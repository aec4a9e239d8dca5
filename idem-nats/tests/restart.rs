//! A broker restart during a run: a private `nats-server` (its own port and store directory,
//! never the shared server) is killed with SIGKILL and started again while messages are
//! being published and consumed behind the consumer barrier. The client reconnects by
//! itself; the test's publisher and consumer retry what failed meanwhile. At the end every
//! message has exactly one effect in a SQLite ledger, written in the barrier's
//! transactional mode into a table without a unique constraint, so a duplicate would show
//! as a second row, and a lost message as a missing one (the shared run of
//! `idem_broker::testkit::restart`; this file provides the JetStream side).
//!
//! Skipped with a note when there is no `nats-server` binary, unless `IDEM_TEST_REQUIRE`
//! names `nats`. Every wait is bounded (liveness only); nothing asserts on timing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, stream};
use futures::StreamExt;
use idem_broker::testkit::restart::{self, Restartable, Run, Stats, MESSAGES};
use idem_broker::testkit::{retry, Progress, ATTEMPT_BOUND, LIVENESS, PAUSE};
use idem_broker::ConsumerBarrier;
use idem_nats::{publish, JetStreamMessage};
use idem_sqlite::SqliteStore;

mod common;
use common::PrivateServer;

const STREAM: &str = "IDEM_RESTART";
const SUBJECT: &str = "idem.restart.orders";
const CONSUMER: &str = "ledger";
/// How long JetStream waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(2);
/// How long a pull request waits for messages.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);

type Ledger = ConsumerBarrier<SqliteStore, JetStreamMessage>;

/// Publishes every message in order, retrying each until JetStream acknowledges it, at
/// most [`restart::LEAD`] messages ahead of the consumer.
async fn publish_all(js: &jetstream::Context, stats: &Stats) {
    for i in 0..MESSAGES {
        restart::wait_for_the_consumer(stats, i).await;
        let key = restart::key(i);
        let ack = retry("publishing", &stats.publish_retries, || {
            publish(js, SUBJECT, &key, restart::payload(i))
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
            // A delivery whose ack failed is redelivered after the ack wait and replayed;
            // the client reconnects by itself.
            restart::handle(&barrier, &message, &stats).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_a_run_ends_with_one_effect_per_message_and_none_lost() {
    let Some(mut server) = PrivateServer::start().await else {
        return;
    };
    let mut run = Run::new().await;
    let stats = run.stats().clone();

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
    let created = retry("creating the stream", &stats.setup_retries, || {
        js.get_or_create_stream(stream::Config {
            name: STREAM.to_string(),
            subjects: vec![SUBJECT.to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
    })
    .await;
    let consumer: PullConsumer = retry("creating the consumer", &stats.setup_retries, || {
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

    let stop = Arc::new(AtomicBool::new(false));
    let consumer_task = tokio::spawn(consume(
        consumer,
        run.consumer_barrier(),
        stats.clone(),
        stop.clone(),
    ));
    let publisher = tokio::spawn({
        let (js, stats) = (js.clone(), stats.clone());
        async move { publish_all(&js, &stats).await }
    });

    run.kill_twice(&mut server).await;

    tokio::time::timeout(LIVENESS, publisher)
        .await
        .expect("the publisher finishes")
        .expect("the publisher did not panic");
    // The run ends when JetStream has nothing left to deliver and nothing delivered but
    // unacknowledged (a delivery whose ack a restart lost is redelivered, replayed and
    // acked first); the ledger then says whether anything was lost or applied twice.
    let started_draining = Instant::now();
    loop {
        let info = retry("reading the consumer", &stats.setup_retries, || {
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

    let stream_messages = retry("reading the stream", &stats.setup_retries, || {
        js.get_stream(STREAM)
    })
    .await
    .cached_info()
    .state
    .messages;
    run.assert_one_effect_per_message(&format!("{stream_messages} in the stream"))
        .await;
}
