//! The relay's metrics, recorded while it publishes to a real NATS JetStream server
//! (`IDEM_NATS_URL`; skipped with a note when unreachable unless `IDEM_TEST_REQUIRE` names
//! `nats`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem_core::Key;
use idem_nats::JetStreamPublisher;
use idem_outbox::{Outgoing, Relay, SqliteOutbox};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[test]
fn the_relay_reports_pending_published_errors_and_lag() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let ran = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let url = std::env::var("IDEM_NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
            let client =
                match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(&url)).await
                {
                    Ok(Ok(client)) => client,
                    Ok(Err(e)) => return skip(&format!("cannot connect to {url}: {e}")),
                    Err(_) => return skip(&format!("connecting to {url} timed out")),
                };
            let js = jetstream::new(client);
            let name = format!("IDEM_OUTBOX_METRICS_{}", std::process::id());
            let subject = format!("idem.outbox.metrics.{}", std::process::id());
            js.create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox.db");
            let outbox = SqliteOutbox::open(&path, "idem_outbox").await.unwrap();
            let conn = idem_sqlite::rusqlite::Connection::open(&path).unwrap();
            let op = Key::new("shop", "order-1").unwrap();
            outbox
                .enqueue(&conn, &op, &Outgoing::new("ok", subject, b"1".to_vec()))
                .unwrap();
            // No stream listens here: the publish is not acknowledged.
            let nowhere = Outgoing::new("lost", format!("nowhere.{name}"), b"2".to_vec())
                .ordered_by("elsewhere");
            outbox.enqueue(&conn, &op, &nowhere).unwrap();
            let relay = Relay::new(outbox, JetStreamPublisher(js.clone()));
            let run = relay.run_once().await.unwrap();
            assert_eq!((run.published, run.errors, run.backlog.pending), (1, 1, 1));
            js.delete_stream(&name).await.unwrap();
            Some(())
        })
    });
    if ran.is_none() {
        return;
    }
    let mut seen = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let value = match value {
            DebugValue::Counter(n) => n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(_) => continue,
        };
        seen.insert(key.key().name().to_string(), value);
    }
    assert_eq!(
        seen.get(idem_outbox::PUBLISHED_TOTAL),
        Some(&1.0),
        "{seen:?}"
    );
    assert_eq!(
        seen.get(idem_outbox::PUBLISH_ERRORS_TOTAL),
        Some(&1.0),
        "{seen:?}"
    );
    assert_eq!(seen.get(idem_outbox::PENDING), Some(&1.0), "{seen:?}");
    let lag = seen.get(idem_outbox::LAG_SECONDS).copied();
    assert!(lag.is_some_and(|l| l >= 0.0), "{seen:?}");
}

fn skip<T>(why: &str) -> Option<T> {
    assert!(
        !idem_conformance::required("nats"),
        "IDEM_TEST_REQUIRE names nats: {why}"
    );
    eprintln!("skipped: {why}");
    None
}
