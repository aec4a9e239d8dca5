#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod barrier;
pub mod codec;
mod error;
mod fingerprint;
mod key;
mod memory;
pub mod metrics;
pub mod model;
mod record;
mod store;
mod time;
mod tx;

pub use barrier::{
    Barrier, Failure, LeaseHandle, Outcome, Replay, Response, RunError, Started, DEFAULT_LEASE,
    DEFAULT_RETENTION,
};
pub use error::{BoxError, Error, KeyError};
pub use fingerprint::Fingerprint;
pub use key::{Key, MAX_ID_LEN, MAX_SCOPE_LEN};
pub use memory::MemoryStore;
pub use record::{Begin, Deadlines, Lease, Record, RecordRow, State, Stats, Token};
pub use store::{DynStore, Guarantees, Store};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use tx::{
    settle, tx_claim, Settled, TransactionalStore, TxClaim, TxPolicy, TxRequest,
    NO_WAIT_RETRY_AFTER,
};
