//! The conformance suite against the real PostgreSQL server (`IDEM_POSTGRES_URL`).

mod common;

use common::PgFactory;

idem_conformance::conformance_tests!(postgres, PgFactory::new());
idem_conformance::transactional_tests!(postgres_tx, PgFactory::new());
