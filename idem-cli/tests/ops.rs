//! The operator commands, run as the binary: on an SQLite file the lab filled, on records
//! written through the library (SQLite, PostgreSQL), and against servers that refuse.

use std::path::Path;
use std::process::Command;

fn idem(args: &[&str], db: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .expect("the idem binary runs");
    assert!(out.status.success(), "idem {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn stats_get_and_purge_read_the_records_the_lab_left() {
    let db = std::env::temp_dir().join(format!("idem-cli-test-ops-{}.db", std::process::id()));
    // The lab leaves the last strategy's records (the transactional barrier's) behind.
    idem(
        &["lab", "--json", "--payments", "20", "--clients", "4"],
        &db,
    );

    let stats = idem(&["stats"], &db);
    let completed = stats
        .lines()
        .find_map(|l| l.strip_prefix("completed"))
        .map(|n| n.trim().parse::<u64>().expect("a count"));
    assert_eq!(completed, Some(20), "{stats}");

    let record = idem(
        &["get", "--scope", "lab/payments-tx", "--id", "pay-000000"],
        &db,
    );
    assert!(record.contains("state       completed"), "{record}");
    let none = idem(&["get", "--scope", "lab/payments-tx", "--id", "nope"], &db);
    assert!(none.starts_with("no record for"), "{none}");

    // Nothing has passed its retention yet.
    assert_eq!(idem(&["purge"], &db).trim(), "purged 0 records");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// The binary's exit status, stdout and stderr, and how long it ran.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: std::time::Duration,
}

fn run(args: &[&str]) -> Run {
    let start = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .output()
        .expect("the idem binary runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: start.elapsed(),
    }
}

fn ok(args: &[&str]) -> String {
    let r = run(args);
    assert_eq!(r.code, Some(0), "idem {args:?}: {}", r.stderr);
    r.stdout
}

fn scratch_db(name: &str) -> std::path::PathBuf {
    let db = std::env::temp_dir().join(format!("idem-cli-{name}-{}.db", std::process::id()));
    remove_db(&db);
    db
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

fn sqlite_tables(db: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(db).expect("open the database");
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .expect("prepare");
    stmt.query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("names")
}

/// Three completed records (a JSON outcome, text, bytes) and one in progress, all past
/// their retention except the one in progress.
async fn fill(store: &dyn idem::Store) {
    use idem::backend::{Begin, Deadlines};
    use idem::{Key, Timestamp};
    let now = idem::Clock::now(&idem::SystemClock);
    let hour = std::time::Duration::from_secs(3600);
    let past = Timestamp::from_millis(now.as_millis() - 3_600_000);
    let deadlines = Deadlines {
        lease_until: now.plus(hour),
        expires_at: now.plus(hour * 2),
    };
    let outcomes: [(&str, &[u8]); 3] = [
        ("json", b"\x01{\"paid\":100}"),
        ("text", b"paid in full"),
        ("bytes", &[0xff, 0x00, 0x7f]),
    ];
    for (id, bytes) in outcomes {
        let key = Key::new("ops-test", id).unwrap();
        let Begin::Acquired(lease) = store.begin(&key, None, deadlines, now).await.unwrap() else {
            panic!("a fresh key is acquired")
        };
        store.complete(&lease, bytes, past, now).await.unwrap();
    }
    let key = Key::new("ops-test", "running").unwrap();
    store.begin(&key, None, deadlines, now).await.unwrap();
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// `get` and `list` in both formats on records that `fill` wrote through `args` (the
/// backend options), then `purge --dry-run` and `purge`.
fn reads_and_purge(args: &[&str]) {
    let with = |extra: &[&str]| -> String {
        let mut all: Vec<&str> = extra.to_vec();
        all.extend_from_slice(args);
        ok(&all)
    };
    let listed = json_lines(&with(&["list", "--scope", "ops-test", "--format", "json"]));
    assert_eq!(listed.len(), 4, "{listed:?}");
    let by_id = |id: &str| {
        listed
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {listed:?}"))
            .clone()
    };
    assert_eq!(by_id("json")["outcome_encoding"], "json");
    assert_eq!(by_id("json")["outcome"], serde_json::json!({"paid": 100}));
    assert_eq!(by_id("text")["outcome_encoding"], "utf8");
    assert_eq!(by_id("text")["outcome"], "paid in full");
    assert_eq!(by_id("bytes")["outcome_encoding"], "hex");
    assert_eq!(by_id("bytes")["outcome"], "ff007f");
    assert_eq!(by_id("running")["state"], "in_progress");
    assert!(by_id("running")["outcome"].is_null());

    let limited = json_lines(&with(&["list", "--limit", "2", "--format", "json"]));
    assert_eq!(limited.len(), 2, "{limited:?}");
    assert!(json_lines(&with(&["list", "--scope", "nobody", "--format", "json"])).is_empty());

    let table = with(&["get", "--scope", "ops-test", "--id", "json"]);
    assert!(table.contains("state       completed"), "{table}");
    assert!(table.contains("(json) {\"paid\":100}"), "{table}");
    let one = json_lines(&with(&[
        "get", "--scope", "ops-test", "--id", "bytes", "--format", "json",
    ]));
    assert_eq!(one[0]["outcome"], "ff007f");
    assert_eq!(
        with(&["get", "--scope", "ops-test", "--id", "nope", "--format", "json"]).trim(),
        "null"
    );

    let dry = with(&["purge", "--dry-run"]);
    assert_eq!(
        dry.trim(),
        "would purge 3 records (dry run: nothing deleted)"
    );
    assert_eq!(
        json_lines(&with(&["list", "--scope", "ops-test", "--format", "json"])).len(),
        4,
        "the dry run deleted records"
    );
    assert_eq!(with(&["purge", "--batch", "2"]).trim(), "purged 3 records");
    let left = json_lines(&with(&["list", "--scope", "ops-test", "--format", "json"]));
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["id"], "running");
}

#[test]
fn sqlite_reads_create_nothing_and_show_outcomes_readably() {
    let db = scratch_db("reads");
    let path = db.to_str().expect("a UTF-8 path");
    let absent = run(&["stats", "--db", path]);
    assert_eq!(absent.code, Some(3), "{}", absent.stderr);
    assert!(
        absent.stderr.contains("does not exist"),
        "{}",
        absent.stderr
    );
    assert!(!db.exists(), "stats created the database file");

    assert!(ok(&["migrate", "--db", path]).contains("is ready"));
    let other = run(&["list", "--db", path, "--table", "other_records"]);
    assert_eq!(other.code, Some(3), "{}", other.stderr);
    assert!(
        other.stderr.contains("table other_records does not exist"),
        "{}",
        other.stderr
    );
    assert!(!sqlite_tables(&db).contains(&"other_records".to_string()));

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = idem::sqlite::SqliteStore::connect(&db).await.unwrap();
        fill(&store).await;
    });
    reads_and_purge(&["--db", path]);
    remove_db(&db);
}

#[test]
fn options_that_do_not_apply_are_refused() {
    for args in [
        &["stats", "--backend", "redis", "--table", "t"][..],
        &["stats", "--key-prefix", "x:"][..],
        &["stats", "--backend", "postgres", "--db", "x.db"][..],
    ] {
        let r = run(args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("applies to"), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn migrate_print_shows_the_ddl_without_connecting() {
    // Port 1 refuses connections: --print must not try.
    let pg = ok(&[
        "migrate",
        "--print",
        "--backend",
        "postgres",
        "--url",
        "postgres://postgres@127.0.0.1:1/test",
        "--table",
        "billing.records",
    ]);
    assert!(
        pg.contains("CREATE TABLE IF NOT EXISTS \"billing\".\"records\""),
        "{pg}"
    );
    let db = scratch_db("print");
    let sqlite = ok(&["migrate", "--print", "--db", db.to_str().unwrap()]);
    assert!(
        sqlite.contains("CREATE TABLE IF NOT EXISTS \"idem_records\""),
        "{sqlite}"
    );
    assert!(!db.exists(), "migrate --print created the database");
    assert!(ok(&["migrate", "--print", "--backend", "redis"]).contains("no schema"));
}

#[test]
fn refused_connections_are_reported_at_once_with_their_cause() {
    for (backend, url) in [
        ("postgres", "postgres://postgres@127.0.0.1:1/test"),
        ("mysql", "mysql://root@127.0.0.1:1/test"),
        ("redis", "redis://127.0.0.1:1/"),
    ] {
        let r = run(&["stats", "--backend", backend, "--url", url]);
        assert_eq!(r.code, Some(4), "{backend}: {}", r.stderr);
        assert!(
            r.stderr.to_lowercase().contains("refused"),
            "{backend}: {}",
            r.stderr
        );
        assert!(
            r.took < std::time::Duration::from_secs(4),
            "{backend} took {:?}",
            r.took
        );
    }
}

#[test]
fn check_passes_on_sqlite_and_leaves_no_scratch_table() {
    let db = scratch_db("check");
    let path = db.to_str().unwrap();
    ok(&["migrate", "--db", path]);
    let before = sqlite_tables(&db);
    let report = ok(&["check", "--db", path]);
    assert!(report.contains("passed"), "{report}");
    assert_eq!(
        sqlite_tables(&db),
        before,
        "scratch tables were left behind"
    );
    remove_db(&db);
}

fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// The server of `backend` (`service` in `IDEM_TEST_REQUIRE`) at `url`, or `None` (with a
/// note) when it is absent and not required.
fn server(backend: &str, service: &str, url: String) -> Option<String> {
    let mut probe = vec!["stats", "--backend", backend, "--url", &url];
    if matches!(backend, "postgres" | "mysql") {
        probe.extend(["--table", "absent_probe"]);
    }
    let probe = run(&probe);
    if probe.code == Some(4) {
        assert!(
            !idem_conformance::required(service),
            "IDEM_TEST_REQUIRE names {service}: {}",
            probe.stderr
        );
        eprintln!("skipped: {backend} unavailable: {}", probe.stderr);
        return None;
    }
    Some(url)
}

/// The PostgreSQL server, or `None` (with a note) when it is absent and not required.
fn postgres() -> Option<String> {
    server("postgres", "postgres", postgres_url())
}

/// The MySQL server (`IDEM_MYSQL_URL`), or `None` when it is absent and not required.
fn mysql() -> Option<String> {
    let url = std::env::var("IDEM_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string());
    server("mysql", "mysql", url)
}

/// The Redis server (`IDEM_REDIS_URL`), or `None` when it is absent and not required.
fn redis() -> Option<String> {
    let url =
        std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string());
    server("redis", "redis", url)
}

/// The etcd cluster (`IDEM_ETCD_ENDPOINTS`, else the one of `scripts/cluster.sh start
/// etcd`), or `None` when it is absent and not required.
fn etcd() -> Option<String> {
    let url = std::env::var("IDEM_ETCD_ENDPOINTS").unwrap_or_else(|_| {
        "http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793".to_string()
    });
    server("etcd", "etcd", url)
}

/// Names of PostgreSQL relations and schemas matching `like`.
fn pg_objects(url: &str, like: &str) -> Vec<String> {
    use idem::postgres::sqlx::{self, Connection};
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(
            "SELECT relname::text FROM pg_class WHERE relname LIKE $1
             UNION ALL SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1",
        )
        .bind(like)
        .fetch_all(&mut conn)
        .await
        .unwrap()
    })
}

#[test]
fn postgres_reads_create_nothing_and_migrate_makes_the_table() {
    let Some(url) = postgres() else { return };
    let table = format!("idem_cli_ops_{}", std::process::id());
    let ns = ["--backend", "postgres", "--url", &url, "--table", &table];
    let with = |cmd: &[&str]| -> Vec<String> {
        cmd.iter().chain(ns.iter()).map(|s| s.to_string()).collect()
    };
    let args = with(&["stats"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let absent = run(&args);
    assert_eq!(absent.code, Some(3), "{}", absent.stderr);
    assert!(
        absent.stderr.contains("does not exist"),
        "{}",
        absent.stderr
    );
    assert!(pg_objects(&url, &table).is_empty(), "stats created {table}");

    let migrate = with(&["migrate"]);
    ok(&migrate.iter().map(String::as_str).collect::<Vec<_>>());
    let stats = ok(&args);
    assert!(stats.contains("total       0"), "{stats}");

    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = idem::postgres::PgStore::connect_with(
            &url,
            idem::postgres::PgOptions::default()
                .with_table(&table)
                .unwrap(),
        )
        .await
        .unwrap();
        fill(&store).await;
    });
    reads_and_purge(&ns);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use idem::postgres::sqlx::{self, Connection};
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE {table}; DROP FUNCTION {table}_claim"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    });
}

#[test]
fn check_passes_on_postgres_and_leaves_no_scratch_schema() {
    let Some(url) = postgres() else { return };
    let report = ok(&["check", "--backend", "postgres", "--url", &url]);
    assert!(report.contains("passed"), "{report}");
    // Every scratch schema and table of a check is named idemchk_<run>….
    let left = pg_objects(&url, "idemchk\\_%");
    assert!(left.is_empty(), "scratch objects left behind: {left:?}");
}

#[test]
fn check_passes_on_mysql_and_leaves_no_scratch_table() {
    let Some(url) = mysql() else { return };
    let report = ok(&["check", "--backend", "mysql", "--url", &url]);
    assert!(report.contains("passed"), "{report}");
    let left: Vec<String> = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use idem::mysql::sqlx::{self, Connection};
        let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
        sqlx::query_scalar(
            "SELECT CAST(table_name AS CHAR) FROM information_schema.tables
              WHERE table_schema = DATABASE() AND table_name LIKE 'idemchk\\_%'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    });
    assert!(left.is_empty(), "scratch tables left behind: {left:?}");
}

/// The Redis keys matching `pattern`.
fn redis_keys(url: &str, pattern: &str) -> Vec<String> {
    let mut conn = ::redis::Client::open(url)
        .unwrap()
        .get_connection()
        .unwrap();
    ::redis::cmd("KEYS").arg(pattern).query(&mut conn).unwrap()
}

#[test]
fn redis_reads_and_purge_under_a_key_prefix() {
    let Some(url) = redis() else { return };
    let prefix = format!("idem-cli-ops:{}:", std::process::id());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let options = idem::redis::RedisOptions::default()
            .with_key_prefix(&prefix)
            .unwrap();
        let store = idem::redis::RedisStore::connect_with(&url, options)
            .await
            .unwrap();
        fill(&store).await;
    });
    reads_and_purge(&["--backend", "redis", "--url", &url, "--key-prefix", &prefix]);
    let left = redis_keys(&url, &format!("{prefix}*"));
    let mut conn = ::redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = ::redis::cmd("DEL").arg(&left).query(&mut conn).unwrap();
}

#[test]
fn check_passes_on_redis_and_leaves_no_scratch_key() {
    let Some(url) = redis() else { return };
    let report = ok(&["check", "--backend", "redis", "--url", &url]);
    assert!(report.contains("passed"), "{report}");
    let left = redis_keys(&url, "idemchk:*");
    assert!(left.is_empty(), "scratch keys left behind: {left:?}");
}

/// A client on the etcd cluster at `endpoints`.
async fn etcd_client(endpoints: &str) -> idem::etcd::etcd_client::Client {
    let endpoints: Vec<&str> = endpoints.split(',').collect();
    idem::etcd::etcd_client::Client::connect(endpoints, None)
        .await
        .unwrap()
}

#[test]
fn etcd_reads_and_purge_under_a_key_prefix() {
    let Some(url) = etcd() else { return };
    let prefix = format!("idem-cli-ops/{}/", std::process::id());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = idem::etcd::EtcdOptions::default().with_key_prefix(&prefix);
        let store = idem::etcd::EtcdStore::connect_with(&url, options)
            .await
            .unwrap();
        fill(&store).await;
    });
    reads_and_purge(&["--backend", "etcd", "--url", &url, "--key-prefix", &prefix]);
    runtime.block_on(async {
        let delete = idem::etcd::etcd_client::DeleteOptions::new().with_prefix();
        etcd_client(&url)
            .await
            .delete(prefix, Some(delete))
            .await
            .unwrap();
    });
}

#[test]
fn check_passes_on_etcd_and_leaves_no_scratch_key() {
    let Some(url) = etcd() else { return };
    let report = ok(&["check", "--backend", "etcd", "--url", &url]);
    assert!(report.contains("passed"), "{report}");
    let left = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let keys = idem::etcd::etcd_client::GetOptions::new()
            .with_prefix()
            .with_keys_only();
        etcd_client(&url)
            .await
            .get("idemchk/", Some(keys))
            .await
            .unwrap()
            .count()
    });
    assert_eq!(left, 0, "scratch keys left behind");
}
