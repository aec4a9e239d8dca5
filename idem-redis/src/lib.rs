#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod conn;
mod error;
mod keys;
mod list;
mod options;
mod record;
mod scripts;
mod store;

pub use conn::RedisConnection;
pub use options::{
    RedisOptions, WaitReplicas, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_OUTCOME_SIZE, DEFAULT_PREFIX,
    DEFAULT_RESPONSE_TIMEOUT, MAX_PREFIX_LEN,
};
pub use redis;
pub use store::RedisStore;
