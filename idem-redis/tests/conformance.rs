//! Every conformance property Redis claims, against the real server (`IDEM_REDIS_URL`),
//! each store under its own key prefix: the crate's own conformance factory, as `idem check`
//! runs it.

mod common;

use idem_conformance::prelude::*;
use idem_redis::conformance::RedisConformance;

fn factory() -> RedisConformance {
    RedisConformance::new(&common::url(), &common::unique_prefix("conformance"))
        .expect("a valid prefix")
}

conformance_tests!(redis_store, factory());
