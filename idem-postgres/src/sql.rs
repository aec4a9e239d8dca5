//! The statements of one table, built once from a validated [`TableName`].

use std::sync::Arc;

use crate::options::TableName;

/// Released leases carry this deadline (`Timestamp::MIN`).
pub(crate) const RELEASED: i64 = i64::MIN;

/// The SQL statements of one table.
#[derive(Debug)]
pub(crate) struct Sql {
    /// The DDL (`PgStore::schema_sql`).
    pub schema: String,
    /// `migrate`'s check that the table and its index exist: `$1` table, `$2` index.
    pub exists: &'static str,
    /// The table and index names `exists` takes.
    pub relations: (String, String),
    /// `migrate`: the DDL under a transaction-scoped advisory lock, one implicit
    /// transaction (one simple-query message).
    pub migrate: String,
    /// `begin`'s first try: a fresh claim, or the row as the statement's snapshot shows it.
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
        // A fresh claim: token 1, a lease until `$4`, retention `$6`; nothing on conflict.
        let insert_fresh = format!(
            "INSERT INTO {t} (scope, id, fingerprint, state, token, lease_until, response,
                              reclaimed, created_at, updated_at, expires_at)
             VALUES ($1, $2, $3, 'in_progress', 1, $4, NULL, false, $5, $5, $6)
             ON CONFLICT (scope, id) DO NOTHING"
        );
        // The two rows `claim_or_read` and `begin` answer with: a claim (its token and
        // whether it reclaimed; no record), or the record that is there.
        let answer_claimed = "true AS claimed, token, reclaimed,
                              NULL::bytea AS fingerprint, NULL::text AS state,
                              NULL::bigint AS lease_until, NULL::bytea AS response,
                              NULL::bigint AS created_at, NULL::bigint AS updated_at,
                              NULL::bigint AS expires_at";
        let answer_existing = "false, token, reclaimed, fingerprint, state, lease_until, response,
                               created_at, updated_at, expires_at";
        let schema = schema_sql(table);
        Sql {
            // Concurrent migrations (a fleet deploying at once) queue on one advisory lock
            // per table instead of racing on the catalogs' unique indexes; the lock is
            // released with the implicit transaction of the message. (`t` is a validated,
            // quoted identifier: no single quote can occur in it.)
            migrate: format!(
                "SELECT pg_advisory_xact_lock(hashtextextended('idem-postgres migrate {t}', 0));\n{schema}"
            ),
            schema,
            exists: "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            relations: (t.clone(), table.quoted_index()),
            // The common cases in one cheap statement: insert a fresh claim, and otherwise
            // read the row (in the statement's snapshot) for the caller to judge: a replay, a
            // mismatch, a live lease. It cannot decide a row it could take over (an expired or
            // released lease: `begin` does that atomically) nor a conflicting row committed
            // after its snapshot was taken (no row at all comes back); then `begin` runs. A row
            // purged after the snapshot and claimed again gives two rows, the claim and the
            // old record (the caller picks the claim). Same parameters and columns as `begin`.
            claim_or_read: format!(
                "WITH claimed AS ({insert_fresh} RETURNING {answer_claimed})
                 SELECT * FROM claimed
                 UNION ALL
                 SELECT {answer_existing} FROM {t} WHERE scope = $1 AND id = $2"
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
                 SELECT {answer_claimed} FROM claimed
                 UNION ALL
                 SELECT {answer_existing} FROM existing WHERE NOT EXISTS (SELECT 1 FROM claimed)",
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

/// The schema for `table`, as `PgStore::migrate` runs it.
fn schema_sql(table: &TableName) -> String {
    let t = table.quoted();
    let index = table.index_identifier();
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
"
    )
}
