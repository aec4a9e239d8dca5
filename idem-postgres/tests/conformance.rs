//! The conformance suite, lease and transactional mode, against the real PostgreSQL server
//! (`IDEM_POSTGRES_URL`), one table per store in a schema of this run: the crate's own
//! conformance factory, as `idem check` runs it.

mod common;

use idem_conformance::prelude::*;

conformance_tests!(postgres, common::factory(), transactional);
