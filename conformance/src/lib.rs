#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idem_core::{Error, Failure, Key, Store, TransactionalStore};

mod driver;
pub mod linearizability;
pub mod ops;
mod props;
mod tx_props;

#[doc(hidden)]
pub use tokio as __tokio;

/// Hands out fresh, isolated stores (or namespaces of one store), one per test case.
///
/// # Contract
///
/// Every store `create` returns must start empty and must not share records with any other
/// store it returned: properties run concurrently and each assumes it is alone.
#[async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + 'static;

    /// A short name of the backend, matched against `IDEM_TEST_REQUIRE` (`postgres`,
    /// `redis`, `sqlite`, …).
    fn name(&self) -> &str;

    /// `Some(reason)` if the backing service cannot be reached: the properties are then
    /// skipped with the reason printed, unless `IDEM_TEST_REQUIRE` names this backend, in
    /// which case they fail.
    async fn unavailable(&self) -> Option<String> {
        None
    }

    /// A fresh, empty, isolated store.
    async fn create(&self) -> Result<Self::Store, Error>;
}

/// How the operation of a transactional-mode test case behaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TxEnd {
    /// Return `Ok(rows)`.
    Commit,
    /// Return a permanent failure (`"declined"`).
    Permanent,
    /// Return a retryable failure (`"timeout"`).
    Retryable,
    /// Panic after writing: the process "dies" before commit.
    Panic,
}

/// What a transactional-mode test operation does: write `rows` business rows for its key
/// through the store's transaction, wait `hold`, then end as `end` says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TxPlan {
    /// Business rows to insert, tagged with the key.
    pub rows: u32,
    /// How long to keep the transaction open after writing (widens race windows).
    pub hold: Duration,
    /// How the operation ends.
    pub end: TxEnd,
}

impl TxPlan {
    /// The operation's result once its rows are written: call it last in
    /// [`TxFactory::operation`].
    pub fn finish(&self) -> Result<u64, Failure<String, String>> {
        match self.end {
            TxEnd::Commit => Ok(u64::from(self.rows)),
            TxEnd::Permanent => Err(Failure::Permanent("declined".into())),
            TxEnd::Retryable => Err(Failure::Retryable("timeout".into())),
            TxEnd::Panic => panic!("idem-conformance: simulated crash before commit"),
        }
    }
}

/// A [`StoreFactory`] whose stores run operations in their own transaction: it builds the
/// store-specific operation that writes business rows, and counts them.
#[async_trait]
pub trait TxFactory: StoreFactory
where
    Self::Store: TransactionalStore,
{
    /// An operation for `key` that follows `plan`: insert `plan.rows` business rows tagged
    /// with `key` through the transaction, sleep `plan.hold`, then return `plan.finish()`.
    fn operation(
        &self,
        key: &Key,
        plan: TxPlan,
    ) -> <Self::Store as TransactionalStore>::Operation<u64, String, String>;

    /// How many business rows tagged with `key` are committed.
    async fn business_rows(&self, store: &Self::Store, key: &Key) -> Result<u64, Error>;
}

macro_rules! properties {
    ($(#[$doc:meta] $variant:ident => $name:literal),* $(,)?) => {
        /// A lease-mode property of the suite.
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        #[non_exhaustive]
        pub enum Property {
            $(#[$doc] $variant,)*
        }

        impl Property {
            /// Every lease-mode property, in the order [`run_all`] runs them.
            pub const ALL: &'static [Property] = &[$(Property::$variant),*];

            /// The property's name (also the test's name in [`conformance_tests!`]).
            pub fn name(self) -> &'static str {
                match self { $(Property::$variant => $name,)* }
            }
        }
    };
}

properties! {
    /// Random operation sequences on a few keys; every answer equals the reference model's.
    ModelCheck => "model_check",
    /// Concurrent random operations; each key's history is linearizable against the model.
    Linearizability => "linearizability",
    /// Hundreds of simultaneous `begin`s on a fresh key: exactly one `Acquired`.
    Race => "race",
    /// Complete, jump 26 hours, retry: the retry replays (TTL expiry trap).
    TtlTrap => "ttl_trap",
    /// Concurrent duplicates through the barrier execute once (concurrent check race).
    ConcurrentCheckRace => "concurrent_check_race",
    /// Derived keys are stable and a redelivered message is applied once (layer mismatch).
    LayerMismatch => "layer_mismatch",
    /// A zombie's complete, fail, extend and release after a reclaim are refused.
    Fencing => "fencing",
    /// A reclaim racing the old holder's completion never lets both win.
    ReclaimRace => "reclaim_race",
    /// A different fingerprint is refused on every path; an identical retry passes.
    MismatchEveryPath => "mismatch_every_path",
    /// Release lets the next `begin` acquire with a larger token, and fences the old lease.
    Release => "release",
    /// Purge deletes only what retention allows, in batches, and changes no live answer.
    Purge => "purge",
    /// The same id in two scopes never shares a record.
    ScopeIsolation => "scope_isolation",
    /// Arbitrary bytes round-trip; unknown and corrupt stored formats are typed errors.
    BadInput => "bad_input",
}

/// A transactional-mode property of the suite.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum TxProperty {
    /// Business rows and the outcome commit together, once; retries replay.
    CommitOnce,
    /// A write-then-die or retryable failure leaves no rows and no claim; the retry runs once.
    PartialExecutionGhost,
    /// A permanent failure rolls back the business rows and is replayed.
    PermanentFailure,
    /// Concurrent duplicates (wait and no-wait policies) execute once.
    ConcurrentDuplicates,
    /// Mismatch, a live lease-mode claim, and reclaiming an expired one, in a transaction.
    MixedModes,
}

impl TxProperty {
    /// Every transactional property, in the order [`run_all_transactional`] runs them.
    pub const ALL: &'static [TxProperty] = &[
        TxProperty::CommitOnce,
        TxProperty::PartialExecutionGhost,
        TxProperty::PermanentFailure,
        TxProperty::ConcurrentDuplicates,
        TxProperty::MixedModes,
    ];

    /// The property's name (also the test's name in [`transactional_tests!`]).
    pub fn name(self) -> &'static str {
        match self {
            TxProperty::CommitOnce => "tx_commit_once",
            TxProperty::PartialExecutionGhost => "tx_partial_execution_ghost",
            TxProperty::PermanentFailure => "tx_permanent_failure",
            TxProperty::ConcurrentDuplicates => "tx_concurrent_duplicates",
            TxProperty::MixedModes => "tx_mixed_modes",
        }
    }
}

/// How one property ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// It held.
    Passed,
    /// It did not hold: why.
    Failed(String),
    /// It did not run: why (the store does not claim the guarantee, or the service is
    /// unavailable and not required).
    Skipped(String),
}

/// One property's result.
#[derive(Clone, Debug)]
pub struct PropertyResult {
    /// The property's name.
    pub name: &'static str,
    /// How it ended.
    pub verdict: Verdict,
    /// How long it took.
    pub elapsed: Duration,
}

impl PropertyResult {
    /// Panics with the failure message unless the property passed or was skipped.
    pub fn assert_ok(&self) {
        match &self.verdict {
            Verdict::Failed(why) => panic!("conformance property `{}` failed: {why}", self.name),
            Verdict::Skipped(why) => {
                eprintln!("conformance property `{}` skipped: {why}", self.name)
            }
            Verdict::Passed => {}
        }
    }
}

/// The results of a run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per property, in run order.
    pub results: Vec<PropertyResult>,
}

impl Report {
    /// The properties that failed.
    pub fn failures(&self) -> Vec<&PropertyResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.verdict, Verdict::Failed(_)))
            .collect()
    }

    /// Whether the named property failed.
    pub fn failed(&self, name: &str) -> bool {
        self.failures().iter().any(|r| r.name == name)
    }

    /// Panics listing every failed property, if any.
    pub fn assert_ok(&self) {
        let failures = self.failures();
        if !failures.is_empty() {
            panic!("conformance failures:\n{self}");
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            let (tag, why) = match &r.verdict {
                Verdict::Passed => ("pass", ""),
                Verdict::Failed(why) => ("FAIL", why.as_str()),
                Verdict::Skipped(why) => ("skip", why.as_str()),
            };
            writeln!(f, "{tag} {:<28} {:>8.2?} {why}", r.name, r.elapsed)?;
        }
        Ok(())
    }
}

/// Scale of case counts: `IDEM_CONFORMANCE_SCALE` (default 1). Deep runs set 10 or more.
pub fn scale() -> u32 {
    std::env::var("IDEM_CONFORMANCE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

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

fn verdict(r: Result<(), String>) -> Verdict {
    match r {
        Ok(()) => Verdict::Passed,
        Err(why) => Verdict::Failed(why),
    }
}

/// Runs one lease-mode property against stores from `factory`.
///
/// Needs a multi-threaded tokio runtime (the concurrent properties rely on it).
pub async fn run_property<F: StoreFactory>(factory: &F, property: Property) -> PropertyResult {
    timed(property.name(), async {
        if let Some(v) = availability(factory).await {
            return v;
        }
        props::run(factory, property).await
    })
    .await
}

/// Runs every lease-mode property and returns the report.
pub async fn run_all<F: StoreFactory>(factory: &F) -> Report {
    let mut report = Report::default();
    for &p in Property::ALL {
        report.results.push(run_property(factory, p).await);
    }
    report
}

/// Runs one transactional-mode property.
pub async fn run_tx_property<F>(factory: &F, property: TxProperty) -> PropertyResult
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    timed(property.name(), async {
        if let Some(v) = availability(factory).await {
            return v;
        }
        tx_props::run(factory, property).await
    })
    .await
}

/// Runs every transactional-mode property and returns the report.
pub async fn run_all_transactional<F>(factory: &F) -> Report
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let mut report = Report::default();
    for &p in TxProperty::ALL {
        report.results.push(run_tx_property(factory, p).await);
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

/// Expands to a module `$module` with one `#[test]` per lease-mode property, each building
/// its store factory with `$factory` (see the crate docs for a complete example).
#[macro_export]
macro_rules! conformance_tests {
    ($module:ident, $factory:expr) => {
        $crate::conformance_tests!(@module $module, $factory;
            model_check => ModelCheck,
            linearizability => Linearizability,
            race => Race,
            ttl_trap => TtlTrap,
            concurrent_check_race => ConcurrentCheckRace,
            layer_mismatch => LayerMismatch,
            fencing => Fencing,
            reclaim_race => ReclaimRace,
            mismatch_every_path => MismatchEveryPath,
            release => Release,
            purge => Purge,
            scope_isolation => ScopeIsolation,
            bad_input => BadInput);
    };
    (@module $module:ident, $factory:expr; $($test:ident => $variant:ident),*) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    $crate::__block_on(async {
                        let factory = $factory;
                        $crate::run_property(&factory, $crate::Property::$variant).await.assert_ok();
                    });
                }
            )*
        }
    };
}

/// Expands to a module `$module` with one `#[test]` per transactional-mode property.
#[macro_export]
macro_rules! transactional_tests {
    ($module:ident, $factory:expr) => {
        $crate::transactional_tests!(@module $module, $factory;
            tx_commit_once => CommitOnce,
            tx_partial_execution_ghost => PartialExecutionGhost,
            tx_permanent_failure => PermanentFailure,
            tx_concurrent_duplicates => ConcurrentDuplicates,
            tx_mixed_modes => MixedModes);
    };
    (@module $module:ident, $factory:expr; $($test:ident => $variant:ident),*) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $test() {
                    $crate::__block_on(async {
                        let factory = $factory;
                        $crate::run_tx_property(&factory, $crate::TxProperty::$variant).await.assert_ok();
                    });
                }
            )*
        }
    };
}
