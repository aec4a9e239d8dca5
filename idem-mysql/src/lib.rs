#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod list;
mod options;
mod sql;
mod store;
mod tx;

pub use options::{MySqlOptions, DEFAULT_MAX_OUTCOME_BYTES, DEFAULT_TABLE};
pub use sqlx;
pub use store::MySqlStore;
pub use tx::{operation, MySqlOperation};
