//! The suite must reject every deliberately broken store of `idem_conformance::broken`,
//! each by the properties aimed at its bug (the correct `LabStore` passing everything is
//! `tests/memory.rs`).

use std::time::Duration;

use futures::future::join_all;
use idem_conformance::broken::{Bug, LabFactory};
use idem_conformance::{run_tx_property_with, Config, Property, Verdict};

fn property(name: &str) -> Property {
    *Property::ALL
        .iter()
        .find(|p| p.name() == name)
        .unwrap_or_else(|| panic!("no property named {name}"))
}

#[test]
fn every_broken_store_is_rejected() {
    assert!(
        Bug::ALL.len() >= 40,
        "the self-test needs at least 40 kinds of broken store"
    );
    // A store that blocks must be caught quickly here: the correct stores never need it.
    let cfg = Config {
        stuck_after: Duration::from_secs(5),
        ..Config::from_env()
    };
    idem_conformance::__block_on(async {
        let runs = Bug::ALL.iter().map(|&bug| async move {
            let mut missed = Vec::new();
            for name in bug.rejected_by() {
                let result =
                    run_tx_property_with(&LabFactory::with_bug(bug), property(name), &cfg).await;
                match &result.verdict {
                    Verdict::Failed(why) => {
                        let first = why.lines().next().unwrap_or_default();
                        println!("{bug:?} rejected by {name}: {first}");
                    }
                    other => missed.push(format!("{bug:?} passed `{name}`: {other:?}")),
                }
            }
            missed
        });
        let missed: Vec<String> = join_all(runs).await.into_iter().flatten().collect();
        assert!(
            missed.is_empty(),
            "broken stores the suite let through (seed {:016x}):\n{}",
            cfg.seed,
            missed.join("\n")
        );
    });
}
