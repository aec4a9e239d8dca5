//! The claim statement under MariaDB's `SIMULTANEOUS_ASSIGNMENT` SQL mode, where the
//! assignments of an `UPDATE` see the old row instead of the values assigned before them:
//! the properties that exercise reclaims, fencing and fingerprints give the same answers.

mod common;

use common::url;
use idem_conformance::{available, run_property, Property};
use sqlx::{Connection, MySqlConnection};

#[test]
fn claims_are_the_same_under_simultaneous_assignment() {
    idem_conformance::__block_on(async {
        let factory = common::factory()
            .with_session("SET SESSION sql_mode = CONCAT(@@sql_mode, ',SIMULTANEOUS_ASSIGNMENT')");
        if !available(&common::factory()).await {
            return;
        }
        let mut conn = MySqlConnection::connect(&url()).await.unwrap();
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if !version.contains("MariaDB") {
            eprintln!(
                "skipped: SIMULTANEOUS_ASSIGNMENT is a MariaDB mode; the server is {version}"
            );
            return;
        }
        let mode: String = sqlx::query_scalar("SELECT @@SESSION.sql_mode")
            .fetch_one(factory.pool().await.unwrap())
            .await
            .unwrap();
        assert!(mode.contains("SIMULTANEOUS_ASSIGNMENT"), "{mode}");
        for property in [
            Property::Fencing,
            Property::ReclaimRace,
            Property::MismatchEveryPath,
            Property::Release,
            Property::Linearizability,
        ] {
            run_property(&factory, property).await.assert_ok();
        }
    });
}
