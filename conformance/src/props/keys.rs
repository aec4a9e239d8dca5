//! Keys are exact: every distinct `(scope, id)` is its own record, scopes never leak into
//! each other, and stored bytes come back unchanged.

use std::time::Duration;

use idem_core::backend::codec;
use idem_core::{
    Begin, Clock, Deadlines, Error, Fingerprint, Key, Response, RunError, Store, MAX_ID_LEN,
    MAX_SCOPE_LEN,
};

use crate::factory::StoreFactory;
use crate::kit::{acquire, begin, ensure, env, err, key, record, Check, Cx};

/// Keys that a store conflating case, the scope/id boundary, trailing bytes, long keys,
/// separators, wildcards, unicode forms or whitespace would map to fewer records.
pub(crate) fn tricky_keys() -> Result<Vec<Key>, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut add = |s: &str, i: &str| pairs.push((s.to_string(), i.to_string()));
    // Case.
    for (s, i) in [
        ("s", "Key"),
        ("s", "key"),
        ("s", "KEY"),
        ("S", "key"),
        ("Tenant", "k"),
        ("tenant", "k"),
    ] {
        add(s, i);
    }
    // Where the scope ends and the id begins.
    for (s, i) in [
        ("a:b", "c"),
        ("a", "b:c"),
        ("a/b", "c"),
        ("a", "b/c"),
        ("a.b", "c"),
        ("a", "b.c"),
        ("ab", "c"),
        ("a", "bc"),
        ("", "abc"),
        ("abc", "x"),
        ("a|b", "c"),
        ("a", "b|c"),
        ("a:", "b"),
        ("a", ":b"),
        ("a{b}", "c"),
        ("a", "{b}c"),
        ("6162", "63"),
        ("61", "6263"),
    ] {
        add(s, i);
    }
    // Trailing and leading bytes, whitespace in the scope, control-adjacent characters.
    for (s, i) in [
        ("t", "k"),
        ("t", "k!"),
        ("t", "k~"),
        ("t", "!k"),
        ("t ", "k"),
        (" t", "k"),
        ("t  ", "k"),
        ("t\u{a0}", "k"),
        ("t\u{200b}", "k"),
    ] {
        add(s, i);
    }
    // Separators and SQL / glob wildcards inside the id and the scope.
    for sep in [
        ":", "/", "|", "{", "}", "\\", "%", "_", "*", "?", "'", "\"", ";", "#", "-", ",", "=", "&",
        "+", ".", "[", "]", "`", "^", "$", "@", "!", "~", "<", ">", "(", ")",
    ] {
        add("sep", &format!("a{sep}b"));
        add(&format!("sep{sep}"), "ab");
    }
    add("sep", "aXb");
    // Unicode in the scope: composed and decomposed forms, case mappings, other scripts.
    for s in [
        "\u{e9}",
        "e\u{301}",
        "e",
        "\u{df}",
        "ss",
        "\u{130}",
        "i",
        "\u{1f642}",
        "\u{65e5}\u{672c}",
        "\u{5d0}",
    ] {
        add(s, "u");
    }
    // Lengths up to the maxima, differing only in the last byte or in length.
    let long_id = "x".repeat(MAX_ID_LEN);
    add("len", &long_id);
    add("len", &long_id[..MAX_ID_LEN - 1]);
    add("len", &format!("{}y", &long_id[..MAX_ID_LEN - 1]));
    for cut in [32, 64, 100, 128, 191, 200] {
        add("len", &format!("{}a", &long_id[..cut]));
        add("len", &format!("{}b", &long_id[..cut]));
    }
    let wide = "\u{e9}".repeat((MAX_SCOPE_LEN - 1) / 2);
    add(&format!("{wide}a"), "k");
    add(&format!("{wide}b"), "k");
    add(&"s".repeat(MAX_SCOPE_LEN), &long_id);
    add(&"s".repeat(MAX_SCOPE_LEN - 1), &long_id);
    add(&"s".repeat(MAX_SCOPE_LEN), &long_id[..MAX_ID_LEN - 1]);
    let mut keys = Vec::new();
    for (s, i) in pairs {
        let k = key(&s, &i)?;
        ensure!(!keys.contains(&k), "the suite lists {k:?} twice");
        keys.push(k);
    }
    Ok(keys)
}

pub(crate) async fn exact_keys<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let now = env.clock.now();
    let keys = tricky_keys()?;
    for (n, k) in keys.iter().enumerate() {
        match begin(s, k, None, now, cx).await? {
            Begin::Acquired(l) => {
                let resp = codec::encode(&n).map_err(err)?;
                s.complete(&l, &resp, cx.expiry(now), now)
                    .await
                    .map_err(err)?;
            }
            Begin::Completed { response } => {
                let other: usize = codec::decode(&response).map_err(err)?;
                return Err(format!(
                    "{k:?} replayed the outcome of {:?}: the store maps two keys to one record",
                    keys.get(other)
                ));
            }
            other => return Err(format!("the fresh key {k:?} answered {other:?}")),
        }
    }
    for (n, k) in keys.iter().enumerate() {
        let want = codec::encode(&n).map_err(err)?;
        match begin(s, k, None, now, cx).await? {
            Begin::Completed { response } if response == want => {}
            Begin::Completed { response } => {
                let other: usize = codec::decode(&response).map_err(err)?;
                return Err(format!(
                    "{k:?} replays the outcome of {:?}: its own record was overwritten",
                    keys.get(other)
                ));
            }
            other => return Err(format!("{k:?} answered {other:?} instead of its outcome")),
        }
        let rec = record(s, k).await?;
        ensure!(
            rec.key == *k,
            "get({k:?}) returned the record of {:?}",
            rec.key
        );
    }
    let stats = s.stats().await.map_err(err)?;
    ensure!(
        stats.total() == keys.len() as u64,
        "{} distinct keys, but the store counts {} records",
        keys.len(),
        stats.total()
    );
    Ok(())
}

pub(crate) async fn scope_isolation<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let t0 = env.clock.now();
    let (fa, fb) = (Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    let resp = codec::encode(&"scoped").map_err(err)?;
    let scopes = [
        ("tenant-a", "tenant-b"),
        ("", " "),
        ("Tenant", "tenant"),
        ("ten", "tenant"),
        ("\u{e9}", "e\u{301}"),
    ];
    for (n, (sa, sb)) in scopes.iter().enumerate() {
        let id = format!("same-id-{n}");
        let (a, b) = (key(sa, &id)?, key(sb, &id)?);
        // Replay: an outcome in scope A is not B's.
        let l = acquire(s, &a, Some(&fa), t0, cx).await?;
        s.complete(&l, &resp, cx.expiry(t0), t0)
            .await
            .map_err(err)?;
        // Mismatch and conflict: B's claim with another payload is B's own.
        let lb = match begin(s, &b, Some(&fb), t0, cx).await? {
            Begin::Acquired(l) => l,
            other => {
                return Err(format!(
                    "{b:?} answered {other:?}: the outcome (or fingerprint) of {a:?} crossed scopes"
                ))
            }
        };
        // Conflict the other way: A's id in a third state must not see B's live claim.
        let c = key(&format!("{sa}/c"), &id)?;
        match begin(s, &c, Some(&fb), t0, cx).await? {
            Begin::Acquired(_) => {}
            other => return Err(format!("{c:?} answered {other:?}")),
        }
        match begin(s, &b, None, t0, cx).await? {
            Begin::InProgress { .. } => {}
            other => return Err(format!("{b:?} lost its own claim: {other:?}")),
        }
        // Purge: A's outcome expires, B's claim does not; each scope keeps its own.
        let expires = cx.expiry(t0);
        let n_purged = s.purge(expires, 100).await.map_err(err)?;
        ensure!(
            n_purged == 1 && s.get(&a).await.map_err(err)?.is_none(),
            "purging the expired {a:?} deleted {n_purged} records"
        );
        let rb = record(s, &b).await?;
        ensure!(rb.key == b, "{b:?} reads {rb:?}");
        s.complete(&lb, &resp, expires.plus(cx.retention()), expires)
            .await
            .map_err(err)?;
        let d = Deadlines {
            lease_until: expires.plus(cx.lease()),
            expires_at: expires.plus(cx.lease()),
        };
        match s.begin(&a, None, d, expires).await.map_err(err)? {
            Begin::Acquired(l) if l.token == idem_core::Token(1) => {
                s.release(&l, expires).await.map_err(err)?;
            }
            other => return Err(format!("the purged {a:?} answered {other:?}")),
        }
        // Clean the slate for the next pair: everything here expires at the same time.
        let all = expires.plus(cx.lease() + cx.retention() * 2 + Duration::from_secs(1));
        s.purge(all, 100).await.map_err(err)?;
        ensure!(
            s.stats().await.map_err(err)?.total() == 0,
            "records remain after purging everything"
        );
    }
    Ok(())
}

pub(crate) async fn bad_input<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let now = env.clock.now();
    // Responses are opaque bytes and come back exactly.
    let samples: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff, 0, 0xfe],
        (0..=255u8).cycle().take(64 * 1024).collect(),
    ];
    for (i, bytes) in samples.iter().enumerate() {
        let k = key("bytes", &format!("k{i}"))?;
        let l = acquire(s, &k, None, now, cx).await?;
        s.complete(&l, bytes, now.plus(cx.retention()), now)
            .await
            .map_err(err)?;
        match begin(s, &k, None, now, cx).await? {
            Begin::Completed { response } if response == *bytes => {}
            other => {
                return Err(format!(
                    "{} bytes did not round-trip: {:?}",
                    bytes.len(),
                    other
                ))
            }
        }
    }
    // Unknown and corrupt stored formats are typed errors at replay, never a wrong answer.
    for (id, stored, want) in [
        ("unknown", b"\x09{}".to_vec(), "UnknownFormat"),
        ("corrupt", b"\x01{\"amou".to_vec(), "Corrupt"),
    ] {
        let k = key("formats", id)?;
        let l = acquire(s, &k, None, now, cx).await?;
        s.complete(&l, &stored, now.plus(cx.retention()), now)
            .await
            .map_err(err)?;
        let r: Result<Response<u64, String>, RunError<String>> =
            env.barrier.execute(&k, None, |_| async { Ok(1) }).await;
        let ok = matches!(
            (&r, want),
            (
                Err(RunError::Barrier(Error::UnknownFormat { .. })),
                "UnknownFormat"
            ) | (Err(RunError::Barrier(Error::Corrupt { .. })), "Corrupt")
        );
        ensure!(ok, "stored {id} outcome: expected {want}, got {r:?}");
    }
    // Invalid keys never reach a store.
    for (scope, id) in [("s", ""), ("s", "has space"), ("s", "ключ"), ("a\nb", "k")] {
        ensure!(
            Key::new(scope, id).is_err(),
            "key ({scope:?}, {id:?}) was accepted"
        );
    }
    ensure!(
        Key::new("s", "x".repeat(256)).is_err(),
        "a 256-byte id was accepted"
    );
    let stats = s.stats().await.map_err(err)?;
    ensure!(
        stats.total() == (samples.len() + 2) as u64,
        "stats count {stats:?}"
    );
    Ok(())
}
