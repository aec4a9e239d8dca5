//! What a run is parameterized by: scale, seed and time. Every number the suite uses is
//! here, public, and either a documented constant or a field of [`Config`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_core::{Clock, SystemClock, Timestamp};

/// Case counts are multiplied by this environment variable (default 1; a deep release
/// check sets 20 or more).
pub const SCALE_VAR: &str = "IDEM_CONFORMANCE_SCALE";
/// The seed of a run, in hex; every random choice (proptest cases, linearizability
/// schedules, time parameters) derives from it. Printed with every failure.
pub const SEED_VAR: &str = "IDEM_CONFORMANCE_SEED";
/// Overrides the randomized lease duration, in milliseconds.
pub const LEASE_VAR: &str = "IDEM_CONFORMANCE_LEASE_MS";
/// Overrides the randomized retention, in milliseconds.
pub const RETENTION_VAR: &str = "IDEM_CONFORMANCE_RETENTION_MS";
/// Overrides the randomized start of the manual clock, in milliseconds since the epoch.
pub const START_VAR: &str = "IDEM_CONFORMANCE_START_MS";

/// Shortest randomized lease.
pub const MIN_LEASE: Duration = Duration::from_millis(2_000);
/// Longest randomized lease.
pub const MAX_LEASE: Duration = Duration::from_secs(15 * 60);
/// Shortest randomized retention.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);
/// Longest randomized retention.
pub const MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far from the real time the manual clock may start (either way).
pub const MAX_START_SHIFT: Duration = Duration::from_secs(3 * 365 * 24 * 3600);
/// The jump of the TTL-trap scenario: longer than any common cache TTL of 24 hours.
pub const TTL_TRAP_JUMP: Duration = Duration::from_secs(26 * 3600);
/// Offsets probed around every deadline: one clock tick, a second, and a large fraction
/// of the duration itself (added at run time).
pub const DEADLINE_OFFSETS: [Duration; 2] = [Duration::from_millis(1), Duration::from_secs(1)];

/// Simultaneous `begin`s of the race properties.
pub const RACE_BEGINS: usize = 200;
/// Proptest cases of the model check (times the scale).
pub const MODEL_CASES: u32 = 160;
/// Longest operation sequence of one model-check case.
pub const MODEL_STEPS: usize = 40;
/// Concurrent tasks of one linearizability round.
pub const LIN_TASKS: usize = 6;
/// Operations per task of one linearizability round.
pub const LIN_OPS_PER_TASK: usize = 14;
/// Linearizability rounds (times the scale).
pub const LIN_ROUNDS: u32 = 20;
/// Rounds of the reclaim race and the purge race (times the scale).
pub const RACE_ROUNDS: u32 = 60;
/// Concurrent duplicates of the transactional race properties.
pub const TX_DUPLICATES: usize = 12;
/// Rounds of the transactional race properties (times the scale).
pub const TX_ROUNDS: u32 = 3;
/// Attempts that roll back before one commits, in the `Wait` property.
pub const TX_ROLLBACKS: u32 = 3;
/// Most polls the dropped-future sweeps try before letting a call finish.
pub const MAX_DROP_POLLS: usize = 48;
/// The default [`Config::stuck_after`].
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

/// Lease, retention and the clock's start for one run.
///
/// The suite passes these to the store on every call; a store must honour the values the
/// caller passed, never durations of its own. By default they are drawn from the run's
/// seed within [`MIN_LEASE`]..[`MAX_LEASE`], [`MIN_RETENTION`]..[`MAX_RETENTION`] and
/// the real time ± [`MAX_START_SHIFT`], so that no constant can be baked into a store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Timing {
    /// The lease every claim asks for.
    pub lease: Duration,
    /// The retention of every outcome.
    pub retention: Duration,
    /// Where the manual clock starts.
    pub start: Timestamp,
}

/// The parameters of one run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Config {
    /// Multiplies case counts, history lengths and rounds.
    pub scale: u32,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Time parameters.
    pub timing: Timing,
    /// How long a call that must not block (a `NoWait` duplicate, a retry after a crash)
    /// may take before the suite reports it as stuck: a guard against hangs, never a
    /// performance assertion. Default [`STUCK_AFTER`].
    pub stuck_after: Duration,
}

impl Config {
    /// The configuration from the environment ([`SCALE_VAR`], [`SEED_VAR`], [`LEASE_VAR`],
    /// [`RETENTION_VAR`], [`START_VAR`]); unset values are drawn from the seed.
    pub fn from_env() -> Self {
        let seed = std::env::var(SEED_VAR)
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x1de5)
            });
        let millis = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
        };
        let mut timing = Timing::random(seed);
        if let Some(ms) = millis(LEASE_VAR).filter(|&ms| ms > 0) {
            timing.lease = Duration::from_millis(ms as u64);
        }
        if let Some(ms) = millis(RETENTION_VAR).filter(|&ms| ms > 0) {
            timing.retention = Duration::from_millis(ms as u64);
        }
        if let Some(ms) = millis(START_VAR) {
            timing.start = Timestamp::from_millis(ms);
        }
        Config {
            scale: scale(),
            seed,
            timing,
            stuck_after: STUCK_AFTER,
        }
    }

    /// How to rerun with exactly these parameters.
    pub fn rerun_hint(&self) -> String {
        format!(
            "{SEED_VAR}={:016x} {LEASE_VAR}={} {RETENTION_VAR}={} {START_VAR}={}",
            self.seed,
            self.timing.lease.as_millis(),
            self.timing.retention.as_millis(),
            self.timing.start.as_millis()
        )
    }
}

impl Timing {
    /// Lease, retention and start drawn from `seed`.
    pub fn random(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x7157_a11c_e5ee_d5ed);
        let between = |rng: &mut Rng, lo: Duration, hi: Duration| {
            let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
            Duration::from_millis(lo + rng.below(hi - lo + 1))
        };
        let lease = between(&mut rng, MIN_LEASE, MAX_LEASE);
        let retention = between(&mut rng, MIN_RETENTION.max(lease), MAX_RETENTION);
        let shift = rng.below(2 * MAX_START_SHIFT.as_millis() as u64) as i64
            - MAX_START_SHIFT.as_millis() as i64;
        Timing {
            lease,
            retention,
            start: Timestamp::from_millis(SystemClock.now().as_millis() + shift),
        }
    }
}

/// Scale of case counts: [`SCALE_VAR`] (default 1).
pub fn scale() -> u32 {
    std::env::var(SCALE_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A small deterministic generator (xorshift64*), so that a seed replays a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}
