//! The benchmark's output: a table per client count with the compared ratios, or JSON lines.

use std::collections::BTreeMap;

use serde::Serialize;

use super::measure::Summary;

/// One measurement, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub backend: &'static str,
    pub name: &'static str,
    pub clients: usize,
    /// The records the store held, for the stored-record measurements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    pub ops_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// The server's microseconds per call of each command the measurement ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_us_per_call: Option<BTreeMap<String, f64>>,
}

impl Sample {
    pub fn new(
        backend: &'static str,
        name: &'static str,
        clients: usize,
        records: Option<u64>,
        m: Summary,
    ) -> Self {
        Sample {
            backend,
            name,
            clients,
            records,
            ops_per_s: (m.ops_per_s * 10.0).round() / 10.0,
            p50_us: m.p50_us,
            p99_us: m.p99_us,
            server_us_per_call: m.server_us_per_call,
        }
    }
}

/// A ratio the table prints: `with`'s throughput over `without`'s, measured alike.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    pub with: &'static str,
    pub without: &'static str,
    pub what: &'static str,
}

/// One JSON object per line.
pub fn print_json(samples: &[Sample]) {
    for s in samples {
        if let Ok(line) = serde_json::to_string(s) {
            println!("{line}");
        }
    }
}

fn latency(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

/// A table per (stored records, clients) group, each followed by its ratios; then, when the
/// store was prefilled at several sizes, each workload's throughput at the largest size over
/// its throughput at the smallest.
pub fn print_table(samples: &[Sample], comparisons: &[Comparison], seconds: f64, rounds: usize) {
    let Some(first) = samples.first() else {
        return;
    };
    println!(
        "idem bench --backend {}: {rounds} interleaved rounds of {seconds} s per measurement \
         (median throughput, percentiles of all calls); ratios from this run",
        first.backend
    );
    let mut groups: Vec<(Option<u64>, usize)> = Vec::new();
    for s in samples {
        if !groups.contains(&(s.records, s.clients)) {
            groups.push((s.records, s.clients));
        }
    }
    for (records, clients) in groups {
        let group: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.records == records && s.clients == clients)
            .collect();
        match records {
            Some(n) => println!("\n{clients} clients, {n} records stored"),
            None => println!("\n{clients} clients"),
        }
        println!(
            "  {:<28} {:>12} {:>10} {:>10}",
            "workload", "ops/s", "p50", "p99"
        );
        for s in &group {
            println!(
                "  {:<28} {:>12.0} {:>10} {:>10}",
                s.name,
                s.ops_per_s,
                latency(s.p50_us),
                latency(s.p99_us)
            );
            if let Some(server) = &s.server_us_per_call {
                let per_call: Vec<String> = server
                    .iter()
                    .map(|(command, us)| format!("{command} {us} µs"))
                    .collect();
                println!("  {:<28} server time per call: {}", "", per_call.join(", "));
            }
        }
        let find = |name: &str| group.iter().find(|s| s.name == name);
        for c in comparisons {
            if let (Some(with), Some(without)) = (find(c.with), find(c.without)) {
                println!(
                    "  {:>6.2}x  {} / {}: {}",
                    with.ops_per_s / without.ops_per_s.max(1e-9),
                    c.with,
                    c.without,
                    c.what
                );
            }
        }
    }
    let scaled: Vec<&Sample> = samples.iter().filter(|s| s.records.is_some()).collect();
    let (Some(small), Some(large)) = (
        scaled.iter().filter_map(|s| s.records).min(),
        scaled.iter().filter_map(|s| s.records).max(),
    ) else {
        return;
    };
    if small == large {
        return;
    }
    println!("\nthroughput at {large} records stored / at {small}");
    for s in scaled.iter().filter(|s| s.records == Some(large)) {
        if let Some(base) = scaled
            .iter()
            .find(|b| b.records == Some(small) && b.name == s.name)
        {
            println!(
                "  {:>6.2}x  {}",
                s.ops_per_s / base.ops_per_s.max(1e-9),
                s.name
            );
        }
    }
}
