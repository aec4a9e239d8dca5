//! Helpers for broker integration tests (feature `testkit`), shared by the broker adapters
//! the way one conformance suite serves every store:
//!
//! - [`scenarios`]: the broker-independent scenarios (a redelivery after a consumer crash, a
//!   duplicate publish, a poison message, a retryable failure, the key's fallbacks), their
//!   steps and every assertion, run on any broker whose test fixture implements
//!   [`TestBroker`];
//! - [`restart`]: the parts of a broker-restart run that do not depend on the broker (the
//!   counters, the transactional handler, the ledger of effects and its final check);
//! - retrying a step while a broker is down, waiting for a condition with a liveness bound,
//!   and reading a ledger of effects ([`retry`], [`wait_until`], [`effects`]);
//! - counting the effects of handled messages per key ([`Tally`]).
//!
//! An application's own broker tests can use them too.

mod broker;
mod fault;
pub mod restart;
pub mod scenarios;
mod tally;

pub use broker::{run, Deliveries, TempStore, TestBroker, RETRY_DELAY, SCOPE};
pub use fault::{effects, retry, wait_until, Progress, ATTEMPT_BOUND, LIVENESS, PAUSE};
pub use tally::Tally;
