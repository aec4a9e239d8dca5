#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod keys;
mod list;
mod options;
mod store;

pub use etcd_client;
pub use options::{EtcdOptions, ETCD_DEFAULT_MAX_REQUEST_BYTES};
pub use store::EtcdStore;
