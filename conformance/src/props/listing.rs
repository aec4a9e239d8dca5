//! Listing: pages of records for operator tools, read-only, each record once.

use std::collections::BTreeMap;
use std::time::Duration;

use idem_core::{Key, Record, Store};

use crate::factory::StoreFactory;
use crate::kit::{acquire, ensure, env, err, key, Check, Cx};
use crate::SKIP;

/// Every page from the first, `limit` at a time; `None` if the store cannot list.
async fn pages<S: Store + ?Sized>(
    store: &S,
    scope: Option<&str>,
    limit: usize,
) -> Result<Option<Vec<Record>>, String> {
    let mut all: Vec<Record> = Vec::new();
    loop {
        let after = all.last().map(|r| r.key.clone());
        let Some(page) = store
            .list(scope, after.as_ref(), limit)
            .await
            .map_err(err)?
        else {
            return Ok(None);
        };
        ensure!(
            page.len() <= limit,
            "a page of limit {limit} held {} records",
            page.len()
        );
        let done = page.len() < limit;
        all.extend(page);
        if done {
            return Ok(Some(all));
        }
        ensure!(
            all.len() <= 1000,
            "listing does not end: {} records so far",
            all.len()
        );
    }
}

pub(crate) async fn list<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let t = env.now();
    let hour = Duration::from_secs(3600);
    let Some(empty) = s.list(None, None, 10).await.map_err(err)? else {
        return Err(format!("{SKIP}the store does not list records"));
    };
    ensure!(empty.is_empty(), "a fresh store lists {empty:?}");

    // Scopes that share prefixes, every state, outcomes that are text and that are not.
    let mut keys: Vec<Key> = Vec::new();
    for (scope, ids) in [
        ("list", &["a", "b", "c", "d", "e"][..]),
        ("list2", &["a", "z"][..]),
        ("lis", &["t"][..]),
    ] {
        for id in ids {
            keys.push(key(scope, id)?);
        }
    }
    for (i, k) in keys.iter().enumerate() {
        let lease = acquire(s, k, None, t, cx).await?;
        match i % 4 {
            0 => s.complete(&lease, b"{\"ok\":1}", t.plus(hour), t).await,
            1 => s.fail(&lease, &[0xff, 0x00, 0x80], t.plus(hour), t).await,
            2 => s.release(&lease, t).await,
            _ => Ok(()),
        }
        .map_err(err)?;
    }
    let stats = s.stats().await.map_err(err)?;

    let mut expected = BTreeMap::new();
    for k in &keys {
        let r = s
            .get(k)
            .await
            .map_err(err)?
            .ok_or_else(|| format!("the record of {k} is missing"))?;
        expected.insert(k.clone(), r);
    }
    for limit in [1, 2, 3, 100] {
        let Some(all) = pages(s, None, limit).await? else {
            return Err("the store listed a first page, then answered that it cannot list".into());
        };
        let mut seen = BTreeMap::new();
        for r in all {
            ensure!(
                seen.insert(r.key.clone(), r.clone()).is_none(),
                "pages of {limit} listed {} twice",
                r.key
            );
        }
        ensure!(
            seen == expected,
            "pages of {limit} listed {:?}, expected the records {:?}",
            seen.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>()
        );
    }
    for scope in ["list", "list2", "lis", "li"] {
        let listed = pages(s, Some(scope), 2)
            .await?
            .ok_or("the store stopped listing")?;
        let mut got: Vec<Key> = listed.into_iter().map(|r| r.key).collect();
        got.sort();
        let want: Vec<Key> = expected
            .keys()
            .filter(|k| k.scope() == scope)
            .cloned()
            .collect();
        ensure!(
            got == want,
            "listing scope {scope:?} gave {got:?}, expected {want:?}"
        );
    }
    let after = s.stats().await.map_err(err)?;
    ensure!(
        after == stats,
        "listing changed the store: stats {stats:?} before, {after:?} after"
    );
    Ok(())
}
