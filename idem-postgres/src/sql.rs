//! The statements of one table, built once from a validated [`TableName`].

use std::sync::Arc;

use crate::options::{TableName, CLAIM_ARGUMENTS};

/// Released leases carry this deadline (`Timestamp::MIN`).
pub(crate) const RELEASED: i64 = i64::MIN;

/// The SQL statements of one table.
#[derive(Debug)]
pub(crate) struct Sql {
    /// The table.
    pub table: TableName,
    /// The DDL (`PgStore::schema_sql`).
    pub schema: String,
    /// `migrate`'s check that the table, its index and its claim function exist: `$1`
    /// table, `$2` index, `$3` function with its argument types.
    pub exists: &'static str,
    /// The names `exists` takes, in its order.
    pub objects: [String; 3],
    /// `migrate`: the DDL under a transaction-scoped advisory lock, one implicit
    /// transaction (one simple-query message).
    pub migrate: String,
    /// `begin`'s first try: the row as the statement's snapshot shows it, or else a fresh
    /// claim through the claim function.
    pub claim_or_read: Arc<str>,
    /// `begin` when the first try could not decide: also takes over an expired lease.
    pub begin: Arc<str>,
    /// Transactional mode's first try: insert a fresh claim, nothing on conflict.
    pub claim_fresh: Arc<str>,
    /// `TxPolicy::Optimistic`'s claim at commit: the outcome as the key's record.
    pub claim_outcome: Arc<str>,
    pub finish: Arc<str>,
    pub extend: Arc<str>,
    pub release: Arc<str>,
    pub get: Arc<str>,
    pub purge: Arc<str>,
    pub stats: Arc<str>,
    /// The planner's row count and the state column's most common values with their
    /// frequencies (`$1`: the quoted table name).
    pub estimate: &'static str,
}

impl Sql {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.quoted();
        let fenced = format!(
            "scope = $1 AND id = $2 AND state = 'in_progress' AND token = $3 AND lease_until <> {RELEASED}"
        );
        let columns =
            "fingerprint, state, token, lease_until, response, created_at, updated_at, expires_at";
        // The one rule for taking over an existing row (`r`, in an `ON CONFLICT` clause):
        // a lease that has expired by `now` or was released, and fingerprints that agree
        // (`$3` is always the request's). And what a takeover always writes: the next
        // token, whether it reclaims a live holder's lease, the fingerprint kept.
        let claimable = |now: &str| {
            format!(
                "r.state = 'in_progress' AND r.lease_until <= {now}
                   AND (r.fingerprint IS NULL OR $3::bytea IS NULL OR r.fingerprint = $3)"
            )
        };
        let takeover = format!(
            "token = r.token + 1,
                     reclaimed = r.lease_until <> {RELEASED},
                     fingerprint = COALESCE(r.fingerprint, EXCLUDED.fingerprint),
                     updated_at = EXCLUDED.updated_at"
        );
        let insert_fresh = insert_fresh(&t);
        let schema = schema_sql(table);
        Sql {
            table: table.clone(),
            // Concurrent migrations (a fleet deploying at once) queue on one advisory lock
            // per table instead of racing on the catalogs' unique indexes; the lock is
            // released with the implicit transaction of the message. (`t` is a validated,
            // quoted identifier: no single quote can occur in it.)
            migrate: format!(
                "SELECT pg_advisory_xact_lock(hashtextextended('idem-postgres migrate {t}', 0));\n{schema}"
            ),
            schema,
            exists: "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL
                            AND to_regprocedure($3) IS NOT NULL",
            objects: [
                t.clone(),
                table.quoted_index(),
                format!("{}({CLAIM_ARGUMENTS})", table.quoted_claim_function()),
            ],
            // The common cases in one statement that is a primary-key read unless the key has
            // no row: exactly one row comes back. A row in the statement's snapshot comes back
            // for the caller to judge (a replay, a mismatch, a live lease); no row calls the
            // claim function, whose insert (fresh claim, nothing on conflict) `claimed`
            // reports. The function runs only then, so a replay costs what a read costs. It
            // cannot decide a row it could take over (an expired or released lease: `begin`
            // does that atomically) nor a conflicting row committed after its snapshot was
            // taken (no row, not claimed); then `begin` runs. Same parameters as `begin`.
            claim_or_read: format!(
                "SELECT CASE WHEN r.state IS NULL THEN {}($1, $2, $3, $4, $5, $6) END AS claimed,
                        r.token, r.fingerprint, r.state, r.lease_until, r.response,
                        r.created_at, r.updated_at, r.expires_at
                   FROM (VALUES (1)) AS one
                   LEFT JOIN {t} AS r ON r.scope = $1 AND r.id = $2",
                table.quoted_claim_function()
            )
            .into(),
            // One statement, one round trip. `existing` reads the row; the insert runs only if
            // that row could be claimed (absent, or an expired lease with agreeing
            // fingerprints), so a replay or a live lease writes nothing and commits without
            // WAL. Otherwise: insert a fresh claim, or take over an expired lease, judged again
            // on the row's latest version by ON CONFLICT.
            begin: format!(
                "WITH existing AS (
                    SELECT token, reclaimed, fingerprint, state, lease_until, response,
                           created_at, updated_at, expires_at
                      FROM {t} WHERE scope = $1 AND id = $2
                 ), claimed AS (
                    INSERT INTO {t} AS r (scope, id, fingerprint, state, token, lease_until, response,
                                         reclaimed, created_at, updated_at, expires_at)
                    SELECT $1, $2, $3, 'in_progress', 1, $4, NULL, false, $5, $5, $6
                     WHERE NOT EXISTS (
                        SELECT 1 FROM existing e
                         WHERE e.state <> 'in_progress' OR e.lease_until > $5
                            OR (e.fingerprint IS NOT NULL AND $3::bytea IS NOT NULL AND e.fingerprint <> $3))
                    ON CONFLICT (scope, id) DO UPDATE SET
                        {takeover},
                        lease_until = EXCLUDED.lease_until,
                        expires_at = GREATEST(r.expires_at, EXCLUDED.expires_at)
                    WHERE {}
                    RETURNING r.token, r.reclaimed
                 )
                 SELECT true AS claimed, token, reclaimed,
                        NULL::bytea AS fingerprint, NULL::text AS state, NULL::bigint AS lease_until,
                        NULL::bytea AS response, NULL::bigint AS created_at,
                        NULL::bigint AS updated_at, NULL::bigint AS expires_at
                   FROM claimed
                 UNION ALL
                 SELECT false, token, reclaimed, fingerprint, state, lease_until, response,
                        created_at, updated_at, expires_at
                   FROM existing WHERE NOT EXISTS (SELECT 1 FROM claimed)",
                claimable("$5")
            )
            .into(),
            // The common case of transactional mode, a key never seen, without `begin`'s
            // read: a plain insert that does nothing on conflict (then `PgStore::claim` judges
            // the row that is there). `$6` is the final retention, the value `finish` writes
            // later in the same transaction, so that update changes no indexed column and
            // PostgreSQL can make it a HOT update (no new index entries).
            claim_fresh: insert_fresh.as_str().into(),
            // A key never seen gets its outcome straight away. A row whose lease has expired
            // or was released (and whose fingerprint agrees) is taken over with the outcome,
            // its token raised as a reclaim raises it. Any other row (an outcome, a live
            // lease, a mismatch) is left alone: no row changes.
            // A conflicting row that is not committed yet is waited for, then judged.
            claim_outcome: format!(
                "INSERT INTO {t} AS r (scope, id, fingerprint, state, token, lease_until, response,
                                      reclaimed, created_at, updated_at, expires_at)
                 VALUES ($1, $2, $3, $4, 1, NULL, $5, false, $6, $6, $7)
                 ON CONFLICT (scope, id) DO UPDATE SET
                     {takeover},
                     state = EXCLUDED.state,
                     lease_until = NULL,
                     response = EXCLUDED.response,
                     expires_at = EXCLUDED.expires_at
                 WHERE {}",
                claimable("$6")
            )
            .into(),
            finish: format!(
                "UPDATE {t} SET state = $4, response = $5, lease_until = NULL, expires_at = $6, updated_at = $7
                  WHERE {fenced}"
            )
            .into(),
            extend: format!(
                "UPDATE {t} SET lease_until = $4, expires_at = GREATEST(expires_at, $5), updated_at = $6
                  WHERE {fenced}"
            )
            .into(),
            release: format!(
                "UPDATE {t} SET lease_until = {RELEASED}, updated_at = $4 WHERE {fenced}"
            )
            .into(),
            get: format!("SELECT {columns} FROM {t} WHERE scope = $1 AND id = $2").into(),
            // Small batches of rows nobody holds: never a long lock.
            purge: format!(
                "DELETE FROM {t} WHERE (scope, id) IN (
                    SELECT scope, id FROM {t} WHERE expires_at <= $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)"
            )
            .into(),
            stats: format!("SELECT state, COUNT(*) FROM {t} GROUP BY state").into(),
            estimate: "SELECT c.reltuples::float8,
                              s.most_common_vals::text::text[],
                              s.most_common_freqs::float8[]
                         FROM pg_class c
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                    LEFT JOIN pg_stats s ON s.schemaname = n.nspname
                                        AND s.tablename = c.relname AND s.attname = 'state'
                        WHERE c.oid = to_regclass($1)",
        }
    }
}

/// A fresh claim of `$1`/`$2` in table `t`: fingerprint `$3`, token 1, a lease until `$4`,
/// written at `$5`, retention `$6`; nothing on conflict.
fn insert_fresh(t: &str) -> String {
    format!(
        "INSERT INTO {t} (scope, id, fingerprint, state, token, lease_until, response,
                          reclaimed, created_at, updated_at, expires_at)
         VALUES ($1, $2, $3, 'in_progress', 1, $4, NULL, false, $5, $5, $6)
         ON CONFLICT (scope, id) DO NOTHING"
    )
}

/// The schema for `table`, as `PgStore::migrate` runs it.
fn schema_sql(table: &TableName) -> String {
    let t = table.quoted();
    let index = table.index_identifier();
    let function = table.quoted_claim_function();
    // On one line: the statement as the other statements' fragment writes it, re-indented.
    let insert = insert_fresh(&t)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    scope       TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    fingerprint BYTEA,
    state       TEXT    NOT NULL,
    token       BIGINT  NOT NULL,
    lease_until BIGINT,
    response    BYTEA,
    reclaimed   BOOLEAN NOT NULL DEFAULT false,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS {index} ON {t} USING brin (expires_at) WITH (autosummarize = on);
CREATE OR REPLACE FUNCTION {function}({CLAIM_ARGUMENTS}) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $claim$
BEGIN
    {insert};
    RETURN FOUND;
END
$claim$;
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crate_docs_show_the_schema_migrate_creates() {
        let docs: Vec<&str> = include_str!("lib.rs")
            .lines()
            .filter_map(|l| {
                l.strip_prefix("//!")
                    .map(|l| l.strip_prefix(' ').unwrap_or(l))
            })
            .collect();
        let schema = schema_sql(&TableName::new(crate::DEFAULT_TABLE).unwrap());
        let lines: Vec<&str> = schema.lines().collect();
        assert!(
            docs.windows(lines.len()).any(|w| w == lines.as_slice()),
            "the crate docs' schema differs from:\n{schema}"
        );
    }
}
