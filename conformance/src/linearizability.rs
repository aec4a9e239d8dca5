//! A Wing–Gong linearizability checker with Lowe's memoization, over one key's history.

use std::collections::HashSet;

use idem_core::{Key, Record, Timestamp};

use crate::ops::{step, Op, Ret};

/// One call in a history.
#[derive(Clone, Debug)]
pub struct Event {
    /// The operation.
    pub op: Op,
    /// The `now` it was called with.
    pub now: Timestamp,
    /// When it was invoked (any monotonic tick shared by all events of the history).
    pub invoke: u64,
    /// When it returned and what it answered; `None` if the outcome is unknown (a timeout,
    /// a connection error): it may have taken effect at any point after `invoke`, or never.
    pub returned: Option<(u64, Ret)>,
}

/// The most events one key's history may have.
pub const MAX_EVENTS: usize = 128;

/// Checks that `history` (all on `key`, starting from no record) is linearizable against
/// the sequential model. `Err` explains the first call that no order can account for.
pub fn check(key: &Key, history: &[Event]) -> Result<(), String> {
    if history.len() > MAX_EVENTS {
        return Err(format!(
            "history of {} events exceeds {MAX_EVENTS}",
            history.len()
        ));
    }
    let mut search = Search {
        key,
        history,
        seen: HashSet::new(),
        deepest: (0, None),
    };
    if search.dfs(0, None) {
        Ok(())
    } else {
        let (depth, stuck) = search.deepest;
        Err(format!(
            "not linearizable: no order explains the history; the longest linearizable prefix has \
             {depth} calls, after which none of the pending calls fits, e.g. {stuck:?}"
        ))
    }
}

struct Search<'a> {
    key: &'a Key,
    history: &'a [Event],
    seen: HashSet<(u128, Option<Record>)>,
    deepest: (u32, Option<Event>),
}

impl Search<'_> {
    fn dfs(&mut self, done: u128, rec: Option<Record>) -> bool {
        let pending = |i: usize| done & (1u128 << i) == 0;
        // Finished when every call with a known answer is placed; unknown ones may be dropped.
        if (0..self.history.len()).all(|i| !pending(i) || self.history[i].returned.is_none()) {
            return true;
        }
        if !self.seen.insert((done, rec.clone())) {
            return false;
        }
        let horizon = (0..self.history.len())
            .filter(|&i| pending(i))
            .filter_map(|i| self.history[i].returned.as_ref().map(|(t, _)| *t))
            .min()
            .unwrap_or(u64::MAX);
        let depth = done.count_ones();
        for i in (0..self.history.len()).filter(|&i| pending(i)) {
            let e = &self.history[i];
            if e.invoke > horizon {
                continue;
            }
            let (answer, next) = step(rec.as_ref(), self.key, &e.op, e.now);
            let mark = done | (1u128 << i);
            match &e.returned {
                Some((_, got)) if *got == answer => {
                    if self.dfs(mark, next) {
                        return true;
                    }
                }
                Some(_) => {
                    if depth >= self.deepest.0 {
                        self.deepest = (depth, Some(e.clone()));
                    }
                }
                None => {
                    if self.dfs(mark, next) || self.dfs(mark, rec.clone()) {
                        return true;
                    }
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{Begin, Deadlines, Lease, Token};

    fn key() -> Key {
        Key::new("s", "k").unwrap()
    }

    fn begin() -> Op {
        Op::Begin {
            fingerprint: None,
            deadlines: Deadlines {
                lease_until: Timestamp::from_millis(100),
                expires_at: Timestamp::from_millis(1000),
            },
        }
    }

    fn lease(token: u64) -> Lease {
        Lease {
            key: key(),
            token: Token(token),
            lease_until: Timestamp::from_millis(100),
            reclaimed: false,
        }
    }

    fn ev(op: Op, invoke: u64, ret: u64, answer: Ret) -> Event {
        Event {
            op,
            now: Timestamp::from_millis(0),
            invoke,
            returned: Some((ret, answer)),
        }
    }

    fn acquired(token: u64) -> Ret {
        Ret::Begin(Begin::Acquired(lease(token)))
    }

    fn in_progress() -> Ret {
        Ret::Begin(Begin::InProgress {
            lease_until: Timestamp::from_millis(100),
        })
    }

    #[test]
    fn overlapping_begins_one_winner_is_linearizable() {
        // The second call returned first but with InProgress: the first linearizes before it.
        let h = [
            ev(begin(), 0, 5, acquired(1)),
            ev(begin(), 1, 3, in_progress()),
        ];
        assert!(check(&key(), &h).is_ok());
    }

    #[test]
    fn two_winners_are_not_linearizable() {
        let h = [
            ev(begin(), 0, 5, acquired(1)),
            ev(begin(), 1, 3, acquired(1)),
        ];
        assert!(check(&key(), &h).is_err());
    }

    #[test]
    fn real_time_order_is_respected() {
        // A begin that returned before another was invoked must come first: the later one
        // cannot be the winner while the earlier saw InProgress.
        let h = [
            ev(begin(), 0, 1, in_progress()),
            ev(begin(), 2, 3, acquired(1)),
        ];
        assert!(check(&key(), &h).is_err());
    }

    #[test]
    fn indeterminate_calls_may_or_may_not_take_effect() {
        let lost = Event {
            op: begin(),
            now: Timestamp::from_millis(0),
            invoke: 0,
            returned: None,
        };
        // It took effect: the next begin sees InProgress.
        let took = [lost.clone(), ev(begin(), 1, 2, in_progress())];
        assert!(check(&key(), &took).is_ok());
        // It did not: the next begin acquires.
        let didnt = [lost, ev(begin(), 1, 2, acquired(1))];
        assert!(check(&key(), &didnt).is_ok());
    }

    #[test]
    fn completion_after_reclaim_is_fenced() {
        let finish = |token| Op::Finish {
            lease: lease(token),
            failed: false,
            response: b"r".to_vec(),
            expires_at: Timestamp::from_millis(1000),
        };
        let late = Event {
            op: begin(),
            now: Timestamp::from_millis(200),
            invoke: 2,
            returned: Some((
                3,
                Ret::Begin(Begin::Acquired(Lease {
                    token: Token(2),
                    reclaimed: true,
                    ..lease(2)
                })),
            )),
        };
        let ok = [
            ev(begin(), 0, 1, acquired(1)),
            late.clone(),
            ev(finish(1), 4, 5, Ret::Fenced(false)),
        ];
        assert!(check(&key(), &ok).is_ok());
        let zombie_wins = [
            ev(begin(), 0, 1, acquired(1)),
            late,
            ev(finish(1), 4, 5, Ret::Fenced(true)),
        ];
        assert!(check(&key(), &zombie_wins).is_err());
    }
}
