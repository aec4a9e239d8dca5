//! The conformance suite, lease and transactional mode, against the real MySQL/MariaDB
//! server (`IDEM_MYSQL_URL`), one table per store: the crate's own conformance factory, as
//! `idem check` runs it.

mod common;

use idem_conformance::prelude::*;

conformance_tests!(mysql, common::factory(), transactional);
