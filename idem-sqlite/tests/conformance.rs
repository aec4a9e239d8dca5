//! The conformance suite, lease and transactional mode, against a SQLite file of this run
//! in the temporary directory, one table per store: the crate's own conformance factory, as
//! `idem check` runs it.

use idem_conformance::prelude::*;
use idem_conformance::scratch::run_id;
use idem_sqlite::conformance::SqliteConformance;

fn factory() -> SqliteConformance {
    let path = std::env::temp_dir().join(format!("idem-conformance-{}.db", run_id()));
    SqliteConformance::new(path, "idemchk").expect("a valid prefix")
}

conformance_tests!(sqlite, factory(), transactional);
