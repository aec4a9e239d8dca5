#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
mod barrier;
mod error;
mod estimate;
mod fingerprint;
mod key;
pub mod maintenance;
mod memory;
pub mod metrics;
mod outcome;
mod policy;
mod record;
mod store;
mod time;
mod tx;

pub use barrier::{Barrier, LeaseHandle, Started, DEFAULT_LEASE, DEFAULT_RETENTION};
pub use error::{BoxError, Error, ErrorChain, KeyError, RunError};
pub use fingerprint::Fingerprint;
pub use key::{Key, MAX_ID_LEN, MAX_SCOPE_LEN};
pub use memory::MemoryStore;
pub use outcome::{Failure, Outcome, Replay, Response};
pub use policy::{InFlight, TxPolicy, NO_WAIT_RETRY_AFTER};
pub use record::{Begin, Deadlines, Lease, Record, State, Stats, Token};
pub use store::{DynStore, Guarantees, Store};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use tx::TransactionalStore;

/// What an application uses, in one import: `use idem_core::prelude::*;` (or
/// `use idem::prelude::*;` through the facade).
pub mod prelude {
    pub use crate::{
        Barrier, Error, Failure, Fingerprint, InFlight, Key, Outcome, Response, RunError, Started,
        TxPolicy,
    };
}
