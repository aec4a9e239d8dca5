//! An exhaustive model check of the barrier protocol with [`stateright`].
//!
//! The property tests drive real stores; this module explores *every* interleaving of a
//! small system instead: two or three workers running [`idem_core::Barrier::execute`] on one
//! key against one store, with crashes, lease expiry, reclaims, releases, purges and
//! retries, for small bounds. What it mirrors, step by step:
//!
//! | model action | code it mirrors |
//! |---|---|
//! | [`Action::Begin`] | `Barrier::begin` → `Store::begin` = [`idem_core::backend::model::begin`] |
//! | [`Action::Work`] | the operation's side effect, run while holding the lease |
//! | [`Action::Complete`] | `LeaseHandle::complete` → `Store::complete` = [`idem_core::backend::model::finish`] |
//! | [`Action::Release`] | a retryable failure: `LeaseHandle::release` = [`idem_core::backend::model::release`] |
//! | [`Action::Crash`] | the process dies (or the future is dropped) while holding the lease |
//! | [`Action::Tick`] | the clock moves by one lease (leases expire, retention passes) |
//! | [`Action::Purge`] | `Store::purge`: deletes the record once its `expires_at` has passed |
//!
//! The store transitions are the reference model's own functions, so the check covers the
//! contract as written, not a re-statement of it. Checked over the whole state space:
//!
//! - **exactly once**: while a key's record exists, at most one completion is accepted;
//! - **fencing**: a completion is only accepted from the lease the record currently holds,
//!   issued for the record that currently exists (never a zombie's, never across a purge);
//! - **progress is possible**: some run completes, and some run reclaims a crashed claim.
//!
//! Assumption (stated, not hidden): purge never deletes a claim that a *live* worker still
//! holds. The contract makes this true in practice by `expires_at >= lease_until +
//! retention`; without it a worker stalled for longer than the retention could complete
//! a purged and re-created record with a reused token, which the check would report.

use std::hash::Hash;

use idem_core::backend::model;
use idem_core::{Begin, Deadlines, Key, Lease, Record, State, Timestamp};
use stateright::{Checker, Model, Property};

/// The bounds of one check.
#[derive(Clone, Debug)]
pub struct Protocol {
    /// Workers racing on the key (2 or 3 keep the state space small).
    pub workers: usize,
    /// How many leases long the clock may run.
    pub max_ticks: u8,
    /// How often one worker may start over (after a crash, an `InProgress` or a release).
    pub retries: u8,
    /// Fence completions by token (the protocol); `false` models an unfenced store, which
    /// the checker must refute.
    pub fenced: bool,
}

impl Default for Protocol {
    fn default() -> Self {
        Protocol {
            workers: 3,
            max_ticks: 2,
            retries: 1,
            fenced: true,
        }
    }
}

/// One worker, as the barrier sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Worker {
    /// Not holding the key; may call `begin` (`tries` so far).
    Idle {
        /// Attempts made.
        tries: u8,
    },
    /// Holds `lease`, issued for record generation `generation`; `worked` once its side
    /// effect ran.
    Holding {
        /// The lease.
        lease: Lease,
        /// Whether the side effect ran.
        worked: bool,
        /// Which incarnation of the record the lease belongs to.
        generation: u8,
        /// Attempts made, this one included.
        tries: u8,
    },
    /// Has an answer (a replay, its own completion, or `LeaseLost`).
    Finished,
    /// Died; its lease is gone with it.
    Crashed,
}

/// The whole system: the store's record, the clock and the workers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct World {
    /// The key's record in the store.
    pub record: Option<Record>,
    /// Lease lengths elapsed.
    pub ticks: u8,
    /// The workers.
    pub workers: Vec<Worker>,
    /// Incarnation of the record (a purge then a new claim starts the next one).
    pub generation: u8,
    /// Completions accepted for the current incarnation.
    pub accepted: u8,
    /// Whether a completion was ever accepted from a lease of another incarnation or a
    /// superseded token.
    pub stale_accepted: bool,
    /// Whether a crashed worker's claim was ever reclaimed.
    pub reclaimed: bool,
}

/// A step of the system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Worker `i` calls `begin`.
    Begin(usize),
    /// Worker `i` runs its side effect.
    Work(usize),
    /// Worker `i` stores its outcome.
    Complete(usize),
    /// Worker `i` releases after a retryable failure.
    Release(usize),
    /// Worker `i` dies.
    Crash(usize),
    /// The clock moves by one lease.
    Tick,
    /// A purge runs now.
    Purge,
}

/// One lease, in milliseconds; retention is one lease too, so purges happen in the model.
const LEASE_MS: i64 = 10;

fn at(ticks: u8) -> Timestamp {
    Timestamp::from_millis(i64::from(ticks) * LEASE_MS)
}

fn the_key() -> Key {
    Key::new("model", "k").unwrap_or_else(|_| unreachable!("a valid literal key"))
}

impl Model for Protocol {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        vec![World {
            record: None,
            ticks: 0,
            workers: vec![Worker::Idle { tries: 0 }; self.workers],
            generation: 0,
            accepted: 0,
            stale_accepted: false,
            reclaimed: false,
        }]
    }

    fn actions(&self, w: &World, actions: &mut Vec<Action>) {
        for (i, worker) in w.workers.iter().enumerate() {
            match worker {
                Worker::Idle { tries } if *tries <= self.retries => actions.push(Action::Begin(i)),
                Worker::Holding { worked: false, .. } => {
                    actions.extend([Action::Work(i), Action::Release(i), Action::Crash(i)])
                }
                Worker::Holding { worked: true, .. } => {
                    actions.extend([Action::Complete(i), Action::Crash(i)])
                }
                _ => {}
            }
        }
        if w.ticks < self.max_ticks {
            actions.push(Action::Tick);
        }
        actions.push(Action::Purge);
    }

    fn next_state(&self, w: &World, action: Action) -> Option<World> {
        let mut next = w.clone();
        let now = at(w.ticks);
        match action {
            Action::Begin(i) => {
                let Worker::Idle { tries } = w.workers[i] else {
                    return None;
                };
                let deadlines = Deadlines {
                    lease_until: at(w.ticks + 1),
                    expires_at: at(w.ticks + 2),
                };
                let (answer, record) =
                    model::begin(w.record.as_ref(), &the_key(), None, deadlines, now);
                if record.is_some() {
                    next.record = record;
                }
                next.workers[i] = match answer {
                    Begin::Acquired(lease) => {
                        let orphaned = w.workers.iter().any(|o| matches!(o, Worker::Crashed));
                        next.reclaimed |= lease.reclaimed && orphaned;
                        Worker::Holding {
                            lease,
                            worked: false,
                            generation: w.generation,
                            tries: tries + 1,
                        }
                    }
                    Begin::Completed { .. } | Begin::Failed { .. } | Begin::Mismatch => {
                        Worker::Finished
                    }
                    Begin::InProgress { .. } => Worker::Idle { tries: tries + 1 },
                };
            }
            Action::Work(i) => match &mut next.workers[i] {
                Worker::Holding { worked, .. } => *worked = true,
                _ => return None,
            },
            Action::Complete(i) => {
                let Worker::Holding {
                    lease, generation, ..
                } = &w.workers[i]
                else {
                    return None;
                };
                let expires_at = at(w.ticks + 1);
                let finished = if self.fenced {
                    model::finish(w.record.as_ref(), lease, false, b"ok", expires_at, now)
                } else {
                    // An unfenced store: any existing record takes the outcome.
                    w.record
                        .as_ref()
                        .map(|r| Record {
                            state: State::Completed {
                                response: b"ok".to_vec(),
                            },
                            updated_at: now,
                            expires_at,
                            ..r.clone()
                        })
                        .ok_or(idem_core::Error::LeaseLost)
                };
                if let Ok(done) = finished {
                    let current = w.record.as_ref().map(|r| r.token) == Some(lease.token)
                        && *generation == w.generation
                        && matches!(
                            w.record.as_ref().map(|r| &r.state),
                            Some(State::InProgress { .. })
                        );
                    next.stale_accepted |= !current;
                    next.accepted += 1;
                    next.record = Some(done);
                }
                next.workers[i] = Worker::Finished;
            }
            Action::Release(i) => {
                let Worker::Holding { lease, tries, .. } = &w.workers[i] else {
                    return None;
                };
                if let Ok(released) = model::release(w.record.as_ref(), lease, now) {
                    next.record = Some(released);
                }
                next.workers[i] = Worker::Idle { tries: *tries };
            }
            Action::Crash(i) => {
                next.workers[i] = match w.workers[i] {
                    // A crashed process may be restarted by its supervisor and retry.
                    Worker::Holding { .. } if w.workers[i] != Worker::Crashed => Worker::Crashed,
                    _ => return None,
                };
            }
            Action::Tick => next.ticks += 1,
            Action::Purge => {
                let expired = w.record.as_ref().is_some_and(|r| r.expires_at <= now);
                let held = w.workers.iter().any(|o| matches!(o, Worker::Holding { generation, .. } if *generation == w.generation));
                if !expired || held {
                    return None;
                }
                next.record = None;
                next.generation += 1;
                next.accepted = 0;
            }
        }
        Some(next)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("exactly once", |_, w: &World| w.accepted <= 1),
            Property::always("fencing", |_, w: &World| !w.stale_accepted),
            Property::sometimes("completes", |_, w: &World| w.accepted == 1),
            Property::sometimes("reclaims a crashed claim", |_, w: &World| w.reclaimed),
        ]
    }
}

/// What a check found.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Distinct states explored.
    pub states: usize,
    /// Violated `always` properties with their counterexample paths, and `sometimes`
    /// properties never reached.
    pub violations: Vec<String>,
}

/// Explores the whole state space of `protocol` (breadth first) and reports every
/// violated property with a counterexample.
pub fn check(protocol: Protocol) -> Outcome {
    let checker = protocol.checker().spawn_bfs().join();
    let discoveries = checker.discoveries();
    let mut violations = Vec::new();
    for property in checker.model().properties() {
        let found = discoveries.get(property.name);
        match (property.expectation, found) {
            (stateright::Expectation::Always, Some(path)) => violations.push(format!(
                "`{}` violated:\n{}",
                property.name,
                path.clone()
                    .into_actions()
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(" → ")
            )),
            (stateright::Expectation::Sometimes, None) => {
                violations.push(format!("`{}` is never reached", property.name))
            }
            _ => {}
        }
    }
    Outcome {
        states: checker.unique_state_count(),
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_exactly_once_and_fenced_over_the_whole_state_space() {
        for (workers, retries, max_ticks) in [(2, 2, 3), (3, 1, 2)] {
            let outcome = check(Protocol {
                workers,
                retries,
                max_ticks,
                ..Protocol::default()
            });
            println!(
                "{workers} workers, {retries} retries: {} states",
                outcome.states
            );
            assert!(
                outcome.violations.is_empty(),
                "{workers} workers, {} states: {:#?}",
                outcome.states,
                outcome.violations
            );
            assert!(
                outcome.states > 100,
                "explored only {} states",
                outcome.states
            );
        }
    }

    #[test]
    fn an_unfenced_store_is_refuted() {
        let outcome = check(Protocol {
            workers: 2,
            fenced: false,
            ..Protocol::default()
        });
        assert!(
            outcome
                .violations
                .iter()
                .any(|v| v.contains("exactly once") || v.contains("fencing")),
            "the checker did not refute an unfenced store: {outcome:?}"
        );
    }
}
