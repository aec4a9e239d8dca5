//! The auditor against real HTTP services on 127.0.0.1: the correct one passes every probe
//! across repeated runs, and each deliberately broken one is caught by the probe meant for
//! its defect.

mod common;

use std::time::Duration;

use common::{Defect, Service};
use idem_audit::{Audit, AuditConfig, AuditError, ProbeKind, Report, Verdict};

/// The audit configuration the tests use: every probe on, short delays.
fn config(service: &Service) -> AuditConfig {
    let mut config = AuditConfig::new(service.things());
    config.body = br#"{"amount": 100, "to": "bob"}"#.to_vec();
    config.count_url = Some(service.count());
    config.tenant_header = Some("X-Tenant".into());
    config.headers = vec!["X-Tenant: acme".into()];
    config.burst = 10;
    config.retry_delays = vec![Duration::ZERO, Duration::from_millis(200)];
    config.retention_probe = Some(Duration::from_millis(1500));
    // Well inside the services' 300 ms of work, even on a loaded machine.
    config.in_flight_delay = Duration::from_millis(100);
    config.drop_after = Duration::from_millis(100);
    config.max_wait = Duration::from_secs(15);
    config.max_duration = Duration::from_secs(120);
    config
}

async fn audit(service: &Service) -> Report {
    let report = Audit::new(config(service)).unwrap().run().await.unwrap();
    println!("{}", report.to_table());
    report
}

/// Asserts `probe` failed, and that every probe in `passes` passed.
fn caught(report: &Report, probe: ProbeKind, passes: &[ProbeKind]) {
    assert_eq!(
        report.verdict(probe),
        Verdict::Fail,
        "{} should catch the defect:\n{}",
        probe.name(),
        report.to_table()
    );
    for other in passes {
        assert_eq!(
            report.verdict(*other),
            Verdict::Pass,
            "{} should pass:\n{}",
            other.name(),
            report.to_table()
        );
    }
    assert_eq!(report.exit_code(), idem_audit::EXIT_FAILED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_correct_service_passes_every_probe_across_runs() {
    let service = common::correct().await;
    for run in 1..=3 {
        let report = audit(&service).await;
        for probe in ProbeKind::ALL {
            assert_eq!(
                report.verdict(probe),
                Verdict::Pass,
                "run {run}: false alarm on {}:\n{}",
                probe.name(),
                report.to_table()
            );
        }
        assert_eq!(report.exit_code(), idem_audit::EXIT_OK);
        assert!(report.aborted.is_none());
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(
            json["probes"].as_array().unwrap().len(),
            ProbeKind::ALL.len()
        );
        let junit = report.to_junit();
        assert!(junit.contains("tests=\"8\" failures=\"0\""), "{junit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_then_insert_is_caught_by_the_burst() {
    let service = common::broken(Defect::CheckThenInsert).await;
    let report = audit(&service).await;
    caught(
        &report,
        ProbeKind::Burst,
        &[ProbeKind::RetryAfterCompletion, ProbeKind::KeyExpiry],
    );
    let burst = report.probe(ProbeKind::Burst).unwrap();
    assert!(
        burst
            .evidence
            .iter()
            .any(|e| e.contains("different responses for one key")),
        "{:?}",
        burst.evidence
    );
    let junit = report.to_junit();
    assert!(junit.contains("<failure message="), "{junit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_payload_validation_is_caught_by_the_changed_payload() {
    let service = common::broken(Defect::NoPayloadCheck).await;
    let report = audit(&service).await;
    caught(
        &report,
        ProbeKind::ChangedPayload,
        &[
            ProbeKind::Burst,
            ProbeKind::RetryAfterCompletion,
            ProbeKind::KeyExpiry,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_forgotten_early_are_caught_by_the_key_expiry_probe() {
    let service = common::broken(Defect::ShortTtl(Duration::from_millis(700))).await;
    let report = audit(&service).await;
    caught(
        &report,
        ProbeKind::KeyExpiry,
        &[
            ProbeKind::Burst,
            ProbeKind::RetryAfterCompletion,
            ProbeKind::ChangedPayload,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn responses_not_stored_are_caught_by_the_retry_after_completion() {
    let service = common::broken(Defect::NotStored).await;
    let report = audit(&service).await;
    caught(
        &report,
        ProbeKind::RetryAfterCompletion,
        &[ProbeKind::Burst],
    );
    let retry = report.probe(ProbeKind::RetryAfterCompletion).unwrap();
    assert!(
        retry.evidence.iter().any(|e| e.contains("a second effect")),
        "{:?}",
        retry.evidence
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_that_only_serializes_is_caught_by_the_retry_after_completion() {
    let service = common::broken(Defect::SerializingLock).await;
    let report = audit(&service).await;
    // Concurrent duplicates queue on the lock and get the result: the burst passes, but
    // sequential retries run again (so does a changed payload after completion).
    caught(
        &report,
        ProbeKind::RetryAfterCompletion,
        &[ProbeKind::Burst],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_shared_across_tenants_are_caught_by_the_scope_probe() {
    let service = common::unscoped().await;
    let report = audit(&service).await;
    caught(
        &report,
        ProbeKind::Scope,
        &[
            ProbeKind::Burst,
            ProbeKind::RetryAfterCompletion,
            ProbeKind::ChangedPayload,
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_run_sends_nothing() {
    let service = common::correct().await;
    let audit = Audit::new(config(&service)).unwrap();
    let plan = audit.plan_text();
    for probe in ProbeKind::ALL {
        assert!(plan.contains(probe.name()), "{plan}");
    }
    assert!(plan.contains("nothing sent"), "{plan}");
    assert_eq!(audit.plan().len(), ProbeKind::ALL.len());
    // Give a stray request time to land before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(service.effects.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_given_url_is_ever_sent_to() {
    // A count URL elsewhere is refused before anything is sent.
    let service = common::correct().await;
    let other = common::correct().await;
    let mut foreign = config(&service);
    foreign.count_url = Some(other.count());
    assert!(matches!(
        Audit::new(foreign),
        Err(AuditError::ForeignCountUrl { .. })
    ));
    for url in ["not a url", "ftp://127.0.0.1/x", "https://127.0.0.1/x"] {
        let mut bad = config(&service);
        bad.url = url.into();
        assert!(Audit::new(bad).is_err(), "{url}");
    }
    let mut bad_header = config(&service);
    bad_header.headers = vec!["X-Bad header: v".into()];
    assert!(matches!(
        Audit::new(bad_header),
        Err(AuditError::BadHeader { .. })
    ));

    // A service that redirects every request elsewhere: the auditor does not follow.
    let redirect = common::redirecting(other.things()).await;
    let mut config = config(&redirect);
    config.count_url = None;
    let report = Audit::new(config).unwrap().run().await.unwrap();
    println!("{}", report.to_table());
    assert!(redirect.effects.requests() > 0);
    assert_eq!(other.effects.requests(), 0);
    assert_eq!(service.effects.requests(), 0);
    assert_eq!(report.exit_code(), idem_audit::EXIT_NOTHING_CHECKED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_json_answers_and_bounds_are_reported_not_panics() {
    // A request budget too small for the plan is refused up front.
    let service = common::broken(Defect::NotStored).await;
    let mut small = config(&service);
    small.max_requests = 5;
    assert!(matches!(
        Audit::new(small),
        Err(AuditError::PlanTooLarge { .. })
    ));
    // The id pointer finds nothing in plain-text answers: whole bodies are compared.
    let redirect = common::redirecting("http://127.0.0.1:9/".into()).await;
    let mut config = AuditConfig::new(redirect.things());
    config.body = b"not json".to_vec();
    config.max_requests = 60;
    let report = Audit::new(config).unwrap().run().await.unwrap();
    assert!(report.aborted.is_none(), "{}", report.to_table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_effect_not_atomic_with_the_stored_response_is_caught_by_the_lost_response() {
    let service = common::effect_before_cancel().await;
    let report = audit(&service).await;
    caught(&report, ProbeKind::LostResponse, &[ProbeKind::Burst]);
}
