#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::future::Future;
use std::time::Instant;

use idem_core::TransactionalStore;

pub mod broken;
pub mod config;
mod driver;
mod factory;
mod kit;
pub mod linearizability;
pub mod ops;
mod props;
pub mod protocol;
mod report;
pub mod scratch;

pub use config::{Config, Timing};
pub use factory::{Gate, GateId, StoreFactory, TxEnd, TxFactory, TxPlan, GATE_TIMEOUT};
pub use props::{Guarantee, Mode, Property};
pub use report::{PropertyResult, Report, Verdict};

/// What an implementor needs to write a factory, re-exported so that running the suite
/// takes no other dependency: `#[async_trait]` for the factory traits, the core types, and
/// tokio for the runtime.
pub mod prelude {
    pub use crate::{conformance_tests, Config, StoreFactory, TxEnd, TxFactory, TxPlan};
    pub use async_trait::async_trait;
    pub use idem_core::{Error, Failure, Key, Store, TransactionalStore};
}

pub use async_trait::async_trait;
pub use idem_core;
pub use tokio;

/// Whether `IDEM_TEST_REQUIRE` (comma-separated, or `all`) names `service`.
pub fn required(service: &str) -> bool {
    std::env::var("IDEM_TEST_REQUIRE")
        .map(|v| {
            v.split(',')
                .any(|s| s.trim() == service || s.trim() == "all")
        })
        .unwrap_or(false)
}

async fn timed<Fut: Future<Output = Verdict>>(name: &'static str, fut: Fut) -> PropertyResult {
    let start = Instant::now();
    let verdict = fut.await;
    PropertyResult {
        name,
        verdict,
        elapsed: start.elapsed(),
    }
}

async fn availability<F: StoreFactory>(factory: &F) -> Option<Verdict> {
    let reason = factory.unavailable().await?;
    Some(if required(factory.name()) {
        Verdict::Failed(format!(
            "IDEM_TEST_REQUIRE names `{}` but it is unavailable: {reason}",
            factory.name()
        ))
    } else {
        Verdict::Skipped(format!("`{}` unavailable: {reason}", factory.name()))
    })
}

/// For a backend's own tests outside the suite: `true` if the factory's service is
/// reachable; otherwise prints why the test is skipped and returns `false`, or panics if
/// `IDEM_TEST_REQUIRE` names the backend.
pub async fn available<F: StoreFactory>(factory: &F) -> bool {
    match availability(factory).await {
        None => true,
        Some(Verdict::Skipped(why)) => {
            eprintln!("skipped: {why}");
            false
        }
        Some(v) => panic!("{v:?}"),
    }
}

/// Marks a property's `Err` as "could not run" rather than "violated".
pub(crate) const SKIP: &str = "\u{0}skip: ";

fn verdict(r: Result<(), String>, cfg: &Config) -> Verdict {
    match r {
        Ok(()) => Verdict::Passed,
        Err(why) => match why.strip_prefix(SKIP) {
            Some(reason) => Verdict::Skipped(reason.to_string()),
            None => Verdict::Failed(format!("{why}\n(rerun with {})", cfg.rerun_hint())),
        },
    }
}

/// Whether `p` runs on this store: `Some(verdict)` if it does not (skipped, or failed
/// because the store declares something the run cannot check).
async fn gate<F: StoreFactory>(factory: &F, p: Property, tx_factory: bool) -> Option<Verdict> {
    if let Some(v) = availability(factory).await {
        return Some(v);
    }
    let guarantees = match factory.create().await {
        Ok(store) => idem_core::Store::guarantees(&store),
        Err(e) => return Some(Verdict::Failed(kit::err(e))),
    };
    let declared = |g: Guarantee| g.declared(&guarantees);
    match (p.mode(), tx_factory) {
        (Mode::Tx, false) if guarantees.transactional => {
            return Some(Verdict::Failed(
                "the store declares `transactional`, but the suite was given no TxFactory: \
                 implement TxFactory and run it with `conformance_tests!(name, factory, \
                 transactional)` so that the claim is checked"
                    .into(),
            ))
        }
        (Mode::Tx, false) => {
            return Some(Verdict::Skipped(
                "transactional property; the store does not declare `transactional`".into(),
            ))
        }
        (Mode::Tx, true) if !guarantees.transactional => {
            return Some(Verdict::Failed(
                "the store implements TransactionalStore but does not declare `transactional`"
                    .into(),
            ))
        }
        _ => {}
    }
    match p.requires() {
        Some(g) if !declared(g) => Some(Verdict::Skipped(format!(
            "needs `{}`, which the store does not declare",
            g.name()
        ))),
        _ => None,
    }
}

/// Runs one property against stores from `factory` with the configuration from the
/// environment ([`Config::from_env`]). A transactional property is skipped (or fails, if
/// the store declares `transactional`): run those with [`run_tx_property`].
///
/// Needs a multi-threaded tokio runtime (the concurrent properties rely on it).
pub async fn run_property<F: StoreFactory>(factory: &F, property: Property) -> PropertyResult {
    run_property_with(factory, property, &Config::from_env()).await
}

/// [`run_property`] with an explicit configuration.
pub async fn run_property_with<F: StoreFactory>(
    factory: &F,
    property: Property,
    cfg: &Config,
) -> PropertyResult {
    timed(property.name(), async {
        if let Some(v) = gate(factory, property, false).await {
            return v;
        }
        let cx = kit::Cx { cfg: *cfg };
        match props::dispatch_lease(factory, property, &cx).await {
            Some(r) => verdict(r, cfg),
            None => Verdict::Skipped("transactional property".into()),
        }
    })
    .await
}

/// Runs one property, lease-mode or transactional, against a transactional store.
pub async fn run_tx_property<F>(factory: &F, property: Property) -> PropertyResult
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    run_tx_property_with(factory, property, &Config::from_env()).await
}

/// [`run_tx_property`] with an explicit configuration.
pub async fn run_tx_property_with<F>(
    factory: &F,
    property: Property,
    cfg: &Config,
) -> PropertyResult
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    timed(property.name(), async {
        if let Some(v) = gate(factory, property, true).await {
            return v;
        }
        let cx = kit::Cx { cfg: *cfg };
        verdict(props::dispatch_any(factory, property, &cx).await, cfg)
    })
    .await
}

/// Runs every property (transactional ones are skipped, or fail if the store declares
/// `transactional`) and returns the report with its summary.
pub async fn run_all<F: StoreFactory>(factory: &F) -> Report {
    let cfg = Config::from_env();
    let mut report = Report::default();
    for &p in Property::ALL {
        report
            .results
            .push(run_property_with(factory, p, &cfg).await);
    }
    report
}

/// Runs every property against a transactional store and returns the report.
pub async fn run_all_transactional<F>(factory: &F) -> Report
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let cfg = Config::from_env();
    let mut report = Report::default();
    for &p in Property::ALL {
        report
            .results
            .push(run_tx_property_with(factory, p, &cfg).await);
    }
    report
}

/// Which properties will run on this factory's stores and which will be skipped, and why;
/// printed by the `summary` test of [`conformance_tests!`]. Nothing is executed, so every
/// entry is either skipped or failed (a declared guarantee the run cannot check), and the
/// ones absent from the report will run.
pub async fn plan<F: StoreFactory>(factory: &F, tx_factory: bool) -> Report {
    let mut report = Report::default();
    for &p in Property::ALL {
        let start = Instant::now();
        if let Some(verdict) = gate(factory, p, tx_factory).await {
            report.results.push(PropertyResult {
                name: p.name(),
                verdict,
                elapsed: start.elapsed(),
            });
        }
    }
    report
}

/// Runs `fut` on a fresh multi-threaded tokio runtime; used by the test macros.
#[doc(hidden)]
pub fn __block_on<Fut: Future>(fut: Fut) -> Fut::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("idem-conformance: cannot build a tokio runtime")
        .block_on(fut)
}

/// Expands to a module `$module` with one `#[test]` per property, each building its store
/// factory with `$factory`, and a `summary` test that prints which properties run and which
/// are skipped, and why. Add `transactional` for a [`TxFactory`] (see the crate docs).
#[macro_export]
macro_rules! conformance_tests {
    ($module:ident, $factory:expr) => {
        $crate::__properties!(__property_tests { $module, $factory, run_property, false });
    };
    ($module:ident, $factory:expr, transactional) => {
        $crate::__properties!(__property_tests { $module, $factory, run_tx_property, true });
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __property_tests {
    ({ $module:ident, $factory:expr, $runner:ident, $tx:literal }
     $( $(#[$doc:meta])* $variant:ident $name:ident $mode:ident $req:ident $($path:ident)::+; )*) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    $crate::__block_on(async {
                        let factory = $factory;
                        $crate::$runner(&factory, $crate::Property::$variant)
                            .await
                            .assert_ok();
                    });
                }
            )*
            #[test]
            fn summary() {
                $crate::__block_on(async {
                    let factory = $factory;
                    let plan = $crate::plan(&factory, $tx).await;
                    println!(
                        "{} of {} properties run on this store; not run:",
                        $crate::Property::ALL.len() - plan.results.len(),
                        $crate::Property::ALL.len()
                    );
                    for result in &plan.results {
                        println!("{result}");
                    }
                });
            }
        }
    };
}
