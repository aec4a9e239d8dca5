//! The properties, grouped by topic, and THE list of them.
//!
//! [`__properties!`](crate::__properties) is the one list: the [`Property`] enum, each
//! property's mode and required guarantee, the dispatch below and the tests that
//! [`conformance_tests!`](crate::conformance_tests) generates all come from it.

use idem_core::{Guarantees, TransactionalStore};

use crate::factory::{StoreFactory, TxFactory};
use crate::kit::{Check, Cx};

pub(crate) mod claim;
pub(crate) mod crash;
pub(crate) mod guarantees;
pub(crate) mod keys;
pub(crate) mod listing;
pub(crate) mod model;
pub(crate) mod purge;
pub(crate) mod time;
pub(crate) mod tx;

/// The one list of properties. Each line: variant, test name, mode (`Lease` runs on any
/// store, `Tx` needs a [`TxFactory`]), the guarantee it needs (`Always` = every store), and
/// the function that checks it. Invoked with the name of a macro to feed the list to.
#[doc(hidden)]
#[macro_export]
macro_rules! __properties {
    ($callback:ident { $($args:tt)* }) => {
        $crate::$callback! { { $($args)* }
            /// The store declares the minimum every store must keep (atomic claim, fenced
            /// completion), and nothing that contradicts itself.
            Guarantees guarantees Lease Always guarantees::minimum;
            /// Random operation sequences with random time jumps; every answer equals the
            /// reference model's (shrunk to a minimal sequence on failure).
            ModelCheck model_check Lease Always model::model_check;
            /// Concurrent begins, completions, extensions, releases, reclaims and purges; each
            /// key's history is linearizable against the model.
            Linearizability linearizability Lease Linearizable model::linearizability;
            /// Hundreds of simultaneous `begin`s on a fresh, an expired and a released key:
            /// exactly one acquires each.
            Race race Lease Always claim::race;
            /// Complete, jump 26 hours, purge, retry: the retry replays (TTL expiry trap).
            TtlTrap ttl_trap Lease Always time::ttl_trap;
            /// Concurrent duplicates through the barrier execute once (concurrent check race).
            ConcurrentCheckRace concurrent_check_race Lease Always claim::concurrent_check_race;
            /// Derived keys are stable and a redelivered message is applied once.
            LayerMismatch layer_mismatch Lease Always claim::layer_mismatch;
            /// A zombie's complete, fail, extend and release after a reclaim are refused.
            Fencing fencing Lease Always claim::fencing;
            /// A reclaim racing the old holder's completion never lets both win.
            ReclaimRace reclaim_race Lease Linearizable claim::reclaim_race;
            /// A different fingerprint is refused on every path; an identical retry passes.
            MismatchEveryPath mismatch_every_path Lease Always claim::mismatch_every_path;
            /// Release lets the next `begin` acquire with a larger token, and fences the old
            /// lease.
            Release release Lease Always claim::release;
            /// The store keeps the lease and retention the caller passed, for randomized
            /// values, and reports them back exactly.
            TimeParameters time_parameters Lease Always time::time_parameters;
            /// Just before, at and just after every lease and retention deadline (by one
            /// millisecond, a second and a large fraction): reclaim and purge happen exactly
            /// at the deadline.
            ExactDeadlines exact_deadlines Lease Always time::exact_deadlines;
            /// Records past their retention but not purged answer exactly as before.
            RetentionIsNotAbsence retention_is_not_absence Lease Always time::retention_is_not_absence;
            /// Purge deletes only what retention allows, in batches, with exact counts.
            Purge purge Lease Always purge::purge;
            /// Purge judges the final state's `expires_at`, never creation time, and never
            /// deletes a live lease that was extended.
            PurgeFinalState purge_final_state Lease Always purge::purge_final_state;
            /// Purge racing reclaims, completions and replays never loses a completion,
            /// deletes a live claim or lets a key execute twice.
            PurgeRace purge_race Lease Always purge::purge_race;
            /// Paging through `list` (where the store can list) returns every record once,
            /// as `get` reads it, filters by scope exactly, and writes nothing.
            List list Lease Always listing::list;
            /// Keys differing in case, scope/id boundary, trailing bytes, length (up to the
            /// maxima), separators, unicode and control-adjacent bytes are distinct records.
            ExactKeys exact_keys Lease Always keys::exact_keys;
            /// No replay, conflict, mismatch, fencing or purge crosses scopes.
            ScopeIsolation scope_isolation Lease Always keys::scope_isolation;
            /// Arbitrary bytes round-trip; unknown and corrupt stored formats are typed errors.
            BadInput bad_input Lease Always keys::bad_input;
            /// Failures injected before, inside and after every step, and futures dropped at
            /// every await point: nothing partial remains and a retry ends correctly, once.
            CrashPoints crash_points Lease Always crash::crash_points;
            /// A store declaring `durable` keeps every acknowledged record across a reopen.
            Durable durable Lease Durable guarantees::durable;
            /// A store declaring `shared_across_processes`: a second handle sees and is
            /// fenced by the first one's claims, and races across handles have one winner.
            SharedHandles shared_handles Lease SharedAcrossProcesses guarantees::shared_handles;
            /// A store declaring `survives_failover` keeps acknowledged records across a
            /// fail-over (needs the factory's `fail_over` hook).
            Failover failover Lease SurvivesFailover guarantees::failover;
            /// Business rows and the outcome commit together, once; retries replay.
            TxCommitOnce tx_commit_once Tx Transactional tx::commit_once;
            /// A write-then-die or retryable failure leaves no rows and no claim; the retry
            /// runs once.
            TxPartialExecutionGhost tx_partial_execution_ghost Tx Transactional tx::ghost;
            /// A permanent failure rolls back the business rows and is replayed.
            TxPermanentFailure tx_permanent_failure Tx Transactional tx::permanent_failure;
            /// Concurrent duplicates (Wait and NoWait) execute once.
            TxConcurrentDuplicates tx_concurrent_duplicates Tx Transactional tx::concurrent_duplicates;
            /// Mismatch, a live lease-mode claim, and reclaiming an expired one, in a
            /// transaction.
            TxMixedModes tx_mixed_modes Tx Transactional tx::mixed_modes;
            /// The fingerprint is checked on every transactional path: fresh, held by a live
            /// lease, held by an open transaction, reclaim, completed, failed.
            TxMismatchEveryPath tx_mismatch_every_path Tx Transactional tx::mismatch_every_path;
            /// A transactional reclaim issues a new token; the old holder's writes are refused.
            TxReclaimFencing tx_reclaim_fencing Tx Transactional tx::reclaim_fencing;
            /// Lease-mode and transactional calls racing on the same keys take effect once.
            TxInterleaving tx_interleaving Tx Transactional tx::interleaving;
            /// `Wait` waits through several attempts that roll back and never runs two at
            /// once; `NoWait` answers at once while an attempt is open.
            TxWaitAndNoWait tx_wait_and_no_wait Tx Transactional tx::wait_and_no_wait;
            /// Transactional outcomes keep the caller's retention and are purged exactly like
            /// lease-mode ones.
            TxRetention tx_retention Tx Transactional tx::retention;
            /// `TxPolicy::Optimistic` (the operation first, the claim at commit): one commit,
            /// replays, mismatch, rollbacks, a permanent failure, lease-mode claims and
            /// concurrent duplicates, as with `Wait`.
            TxOptimistic tx_optimistic Tx Transactional tx::optimistic;
            /// Transactions failed before the claim, inside the work, at commit and dropped at
            /// every await point: nothing partial remains and a retry ends correctly, once.
            TxCrashPoints tx_crash_points Tx Transactional crash::tx_crash_points;
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __define_properties {
    ({} $( $(#[$doc:meta])* $variant:ident $name:ident $mode:ident $req:ident $($path:ident)::+; )*) => {
        /// A property of the suite (see the crate docs for what each one means).
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        #[non_exhaustive]
        pub enum Property {
            $( $(#[$doc])* $variant, )*
        }

        impl Property {
            /// Every property, in run order.
            pub const ALL: &'static [Property] = &[$(Property::$variant),*];

            /// The property's name (also its test's name in
            /// [`conformance_tests!`](crate::conformance_tests)).
            pub fn name(self) -> &'static str {
                match self { $(Property::$variant => stringify!($name),)* }
            }

            /// Whether it runs on any store or needs a [`TxFactory`].
            pub fn mode(self) -> Mode {
                match self { $(Property::$variant => Mode::$mode,)* }
            }

            /// The guarantee the store must declare for the property to run, if any.
            pub fn requires(self) -> Option<Guarantee> {
                match self { $(Property::$variant => $crate::__requires!($req),)* }
            }
        }

        /// Runs a lease-mode property; `None` for a transactional one.
        pub(crate) async fn dispatch_lease<F: StoreFactory>(
            f: &F,
            p: Property,
            cx: &Cx,
        ) -> Option<Check> {
            match p { $(Property::$variant => $crate::__lease_arm!($mode, f, cx, $($path)::+),)* }
        }

        /// Runs any property.
        pub(crate) async fn dispatch_any<F>(f: &F, p: Property, cx: &Cx) -> Check
        where
            F: TxFactory,
            F::Store: TransactionalStore,
        {
            match p { $(Property::$variant => $($path)::+(f, cx).await,)* }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __lease_arm {
    (Lease, $f:ident, $cx:ident, $($path:ident)::+) => {
        Some($($path)::+($f, $cx).await)
    };
    (Tx, $f:ident, $cx:ident, $($path:ident)::+) => {
        None
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __requires {
    (Always) => {
        None
    };
    ($g:ident) => {
        Some(Guarantee::$g)
    };
}

crate::__properties!(__define_properties {});

/// Where a property runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Mode {
    /// On any store ([`crate::run_property`]).
    Lease,
    /// On a transactional store through a [`TxFactory`] ([`crate::run_tx_property`]).
    Tx,
}

/// A guarantee of [`Guarantees`] a property needs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Guarantee {
    /// [`Guarantees::linearizable`].
    Linearizable,
    /// [`Guarantees::transactional`].
    Transactional,
    /// [`Guarantees::durable`].
    Durable,
    /// [`Guarantees::shared_across_processes`].
    SharedAcrossProcesses,
    /// [`Guarantees::survives_failover`].
    SurvivesFailover,
}

impl Guarantee {
    /// The field's name.
    pub fn name(self) -> &'static str {
        match self {
            Guarantee::Linearizable => "linearizable",
            Guarantee::Transactional => "transactional",
            Guarantee::Durable => "durable",
            Guarantee::SharedAcrossProcesses => "shared_across_processes",
            Guarantee::SurvivesFailover => "survives_failover",
        }
    }

    /// Whether `g` declares it.
    pub fn declared(self, g: &Guarantees) -> bool {
        match self {
            Guarantee::Linearizable => g.linearizable,
            Guarantee::Transactional => g.transactional,
            Guarantee::Durable => g.durable,
            Guarantee::SharedAcrossProcesses => g.shared_across_processes,
            Guarantee::SurvivesFailover => g.survives_failover,
        }
    }
}
