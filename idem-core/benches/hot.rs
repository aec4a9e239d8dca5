//! Micro-benchmarks of the pure functions on every barrier call: fingerprinting a request,
//! encoding and decoding a stored outcome, and converting a stored row to a record.
//!
//! `cargo bench -p idem-core --bench hot` (HTML reports under target/criterion).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use idem_core::backend::{codec, RecordRow};
use idem_core::{Fingerprint, Key, Response};
use serde::{Deserialize, Serialize};

/// A payment request as an API receives it.
#[derive(Serialize, Deserialize)]
struct Payment {
    amount: u64,
    currency: String,
    customer: String,
    description: String,
    metadata: Vec<(String, String)>,
}

fn payment() -> Payment {
    Payment {
        amount: 12_345,
        currency: "eur".into(),
        customer: "cus_9s6XKzkNRiz8i3".into(),
        description: "order 2026-11-30/4411".into(),
        metadata: (0..8)
            .map(|i| (format!("key{i}"), format!("value number {i}")))
            .collect(),
    }
}

fn fingerprints(c: &mut Criterion) {
    let request = payment();
    let body = serde_json::to_vec(&request).unwrap_or_default();
    let large: Vec<u8> = (0..16 * 1024).map(|i| (i % 251) as u8).collect();
    c.bench_function("fingerprint/of_json payment", |b| {
        b.iter(|| Fingerprint::of_json(black_box(&request)))
    });
    c.bench_function("fingerprint/of_bytes payment body", |b| {
        b.iter(|| Fingerprint::of_bytes(black_box(&body)))
    });
    c.bench_function("fingerprint/of_bytes 16 KiB", |b| {
        b.iter(|| Fingerprint::of_bytes(black_box(&large)))
    });
}

fn outcomes(c: &mut Criterion) {
    let request = payment();
    let stored = codec::encode(&request).unwrap_or_default();
    c.bench_function("outcome/encode payment", |b| {
        b.iter(|| codec::encode(black_box(&request)))
    });
    c.bench_function("outcome/decode payment", |b| {
        b.iter(|| codec::decode::<Payment>(black_box(&stored)))
    });
    c.bench_function("outcome/replay decode payment", |b| {
        b.iter(|| Response::<Payment, String>::from_stored(false, black_box(&stored)))
    });
}

fn records(c: &mut Criterion) {
    let key = Key::new("payments", "3f1e1c2a-6d1f-4a59-9d77-0d3f8f2e6b11").ok();
    let row = RecordRow {
        fingerprint: Some(vec![7; 32]),
        state: "completed".into(),
        token: 3,
        lease_until: None,
        response: Some(codec::encode(&payment()).unwrap_or_default()),
        created_at: 1_790_000_000_000,
        updated_at: 1_790_000_000_500,
        expires_at: 1_790_086_400_500,
    };
    c.bench_function("record/key new", |b| {
        b.iter(|| Key::new(black_box("payments"), black_box("3f1e1c2a-6d1f-4a59")))
    });
    if let Some(key) = key {
        c.bench_function("record/row into record", |b| {
            b.iter(|| black_box(row.clone()).into_record(&key))
        });
    }
}

criterion_group!(hot, fingerprints, outcomes, records);
criterion_main!(hot);
