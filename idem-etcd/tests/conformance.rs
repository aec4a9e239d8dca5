//! The conformance suite against a 3-member etcd cluster (`scripts/cluster.sh start etcd`,
//! started on first use; `IDEM_ETCD_ENDPOINTS` overrides), each store under its own prefix:
//! the crate's own conformance factory, as `idem check` runs it.

mod common;

use idem_conformance::prelude::*;

conformance_tests!(etcd, common::factory());
