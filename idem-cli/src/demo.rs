//! The payments demo on embedded SQLite: four ways a payment gets retried, and the ledger.

use std::sync::Arc;
use std::time::Duration;

use idem::sqlite::{rusqlite, SqliteStore};
use idem::{
    Barrier, Clock, Error, Failure, Fingerprint, Key, ManualClock, Outcome, RunError, Store,
    SystemClock, TxPolicy,
};

type Charge = Result<idem::Response<String, String>, RunError<String>>;

async fn charge(
    barrier: &Barrier<SqliteStore>,
    id: &str,
    amount: i64,
    die_mid_operation: bool,
) -> Charge {
    let key = Key::new("demo/merchant-7", id).map_err(RunError::Barrier)?;
    let fp = Fingerprint::of_json(&serde_json::json!({ "amount": amount, "currency": "EUR" }))
        .map_err(RunError::Barrier)?;
    let payment = id.to_string();
    let op = Box::new(move |tx: &rusqlite::Transaction<'_>| {
        let fail = |e: rusqlite::Error| Failure::Retryable(e.to_string());
        tx.execute(
            "INSERT INTO ledger (payment, account, amount) VALUES (?1, 'customer', ?2)",
            (&payment, -amount),
        )
        .map_err(fail)?;
        if die_mid_operation {
            // The worker dies after the debit, before the credit and before commit.
            return Err(Failure::Retryable("worker died mid-operation".to_string()));
        }
        tx.execute(
            "INSERT INTO ledger (payment, account, amount) VALUES (?1, 'merchant', ?2)",
            (&payment, amount),
        )
        .map_err(fail)?;
        Ok(format!("ch_{payment}"))
    });
    barrier
        .transaction(&key, Some(fp), TxPolicy::Wait, op)
        .await
}

fn describe(r: &Charge) -> String {
    match r {
        Ok(resp) if resp.replayed => format!("replayed {:?}", outcome(resp)),
        Ok(resp) => format!("executed -> {:?}", outcome(resp)),
        Err(RunError::Barrier(Error::Mismatch)) => {
            "rejected: key reused with a different amount (422)".into()
        }
        Err(RunError::Barrier(Error::InProgress { .. })) => "in progress (409)".into(),
        Err(RunError::Barrier(e)) => format!("error: {e}"),
        Err(RunError::Operation(e)) => format!("rolled back, nothing written ({e}); retry allowed"),
    }
}

fn outcome(r: &idem::Response<String, String>) -> &str {
    match &r.outcome {
        Outcome::Completed(s) | Outcome::Failed(s) => s,
    }
}

/// Runs the four scenarios against a new SQLite file at `path` and prints the ledger.
pub async fn run(path: &std::path::Path) -> Result<bool, Error> {
    let store = SqliteStore::connect(path).await?;
    store
        .with_connection(|c| c.execute_batch("CREATE TABLE ledger (payment TEXT NOT NULL, account TEXT NOT NULL, amount INTEGER NOT NULL)"))
        .await?;
    let clock = ManualClock::new(SystemClock.now());
    let barrier = Barrier::new(Arc::new(store.clone())).with_clock(Arc::new(clock.clone()));
    println!(
        "idem demo: payments on embedded SQLite ({})\n",
        path.display()
    );

    println!("1. a burst of 20 concurrent duplicates of order-1 (a double-tapping client):");
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let b = barrier.clone();
            tokio::spawn(async move { charge(&b, "order-1", 1250, false).await })
        })
        .collect();
    let (mut executed, mut replayed) = (0, 0);
    for t in burst {
        match t.await.map_err(|e| Error::Config(e.to_string()))? {
            Ok(r) if r.replayed => replayed += 1,
            Ok(_) => executed += 1,
            Err(e) => println!("   unexpected: {}", describe(&Err(e))),
        }
    }
    println!("   executed {executed}, replayed {replayed}\n");

    println!("2. order-2: the worker dies after the debit, before commit; the client retries:");
    println!(
        "   first attempt: {}",
        describe(&charge(&barrier, "order-2", 990, true).await)
    );
    println!(
        "   retry:         {}",
        describe(&charge(&barrier, "order-2", 990, false).await)
    );
    println!(
        "   retry again:   {}\n",
        describe(&charge(&barrier, "order-2", 990, false).await)
    );

    println!("3. order-3 completes; the broker redelivers it 26 hours later:");
    println!(
        "   first:         {}",
        describe(&charge(&barrier, "order-3", 4200, false).await)
    );
    clock.advance(Duration::from_secs(26 * 3600));
    store.purge(clock.now(), 1000).await?;
    println!(
        "   26 h later:    {}\n",
        describe(&charge(&barrier, "order-3", 4200, false).await)
    );

    println!("4. order-1's key reused with a different amount:");
    println!(
        "   {}\n",
        describe(&charge(&barrier, "order-1", 999_999, false).await)
    );

    let rows: Vec<(String, String, i64)> = store
        .with_connection(|c| {
            let mut s =
                c.prepare("SELECT payment, account, amount FROM ledger ORDER BY payment, account")?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await?;
    println!("ledger:");
    for (payment, account, amount) in &rows {
        println!("   {payment:<8} {account:<9} {amount:>8}");
    }
    let mut ok = true;
    for payment in ["order-1", "order-2", "order-3"] {
        let legs: Vec<_> = rows.iter().filter(|r| r.0 == payment).collect();
        let balanced = legs.len() == 2 && legs.iter().map(|r| r.2).sum::<i64>() == 0;
        ok &= balanced;
        println!(
            "   {payment}: {} rows, {}",
            legs.len(),
            if balanced { "exactly once" } else { "WRONG" }
        );
    }
    Ok(ok)
}
