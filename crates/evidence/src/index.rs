//! The event index in the state store.

use godwit_events::{Logged, Record};
use godwit_store::{Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;

pub fn ts_ms(record: &Record) -> i64 {
    time::OffsetDateTime::parse(&record.ts, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// The keys of one event: queue ID, Message-ID, recipient.
pub fn keys(record: &Record) -> (Option<String>, Option<String>, Option<String>) {
    use godwit_events::Event::*;
    // Recipients are indexed lowercased: a trace by recipient is case-insensitive.
    let own = |q: &str, m: &Option<String>, r: Option<&str>| {
        (Some(q.to_string()), m.clone(), r.map(str::to_lowercase))
    };
    // The hot path (every message) without a JSON round trip.
    match &record.event {
        ConnectionOpened { .. } | ConnectionClosed { .. } | ConnectionTls { .. } => {
            (None, None, None)
        }
        MessageAccepted {
            queue_id,
            message_id,
            ..
        } => own(queue_id, message_id, None),
        Routed {
            queue_id,
            message_id,
            rcpt,
            ..
        }
        | Delivered {
            queue_id,
            message_id,
            rcpt,
            ..
        }
        | Deferred {
            queue_id,
            message_id,
            rcpt,
            ..
        }
        | Failed {
            queue_id,
            message_id,
            rcpt,
            ..
        }
        | Held {
            queue_id,
            message_id,
            rcpt,
            ..
        }
        | Released {
            queue_id,
            message_id,
            rcpt,
            ..
        } => own(queue_id, message_id, Some(rcpt)),
        Attempt {
            queue_id,
            message_id,
            ..
        } => own(queue_id, message_id, None),
        other => {
            let v = serde_json::to_value(other).unwrap_or_default();
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            (
                s("queue_id"),
                s("message_id").or_else(|| s("original_message_id")),
                s("rcpt").or_else(|| s("to")).map(|r| r.to_lowercase()),
            )
        }
    }
}

/// Writes events into the store in batches (one transaction per batch).
/// The placeholders of row `i` (0-based) of a multi-row INSERT of 7
/// columns. SQLite gets anonymous `?` (numbered in order): its parser
/// looks each `$N` up among the names seen so far, so a 100-row statement
/// cost 700²/2 string compares to prepare (15% of all instructions once
/// batches were gathered). PostgreSQL needs `$N`.
fn row_placeholders(sqlite: bool, i: usize) -> String {
    if sqlite {
        return "(?, ?, ?, ?, ?, ?, ?)".to_string();
    }
    let b = i * 7;
    let n: Vec<String> = (1..=7).map(|k| format!("${}", b + k)).collect();
    format!("({})", n.join(", "))
}

/// The rows of each multi-row INSERT for a batch of `n` events: full
/// statements of `CHUNK_MAX` rows, then the remainder as powers of two. So
/// only 8 statement texts exist, each prepared once and then taken from
/// sqlx's statement cache; one statement for whatever remained re-prepared
/// a text of up to 700 placeholders on most batches (sqlite3Prepare was a
/// third of the index's instructions).
fn chunk_sizes(n: usize) -> Vec<usize> {
    let mut sizes = vec![CHUNK_MAX; n / CHUNK_MAX];
    let rest = n % CHUNK_MAX;
    sizes.extend(
        (0..usize::BITS)
            .rev()
            .map(|b| 1 << b)
            .filter(|p| rest & p != 0),
    );
    sizes
}

/// Rows in one INSERT statement at most (a power of two, see `chunk_sizes`).
const CHUNK_MAX: usize = 128;

/// Events in one index transaction at most.
const BATCH_MAX: usize = 2000;
/// How long the indexer gathers events after the first of a batch. Each
/// transaction costs a WAL append of several page writes and round trips
/// to sqlx's SQLite thread; at 1000 messages/s, written as they came, that
/// was about 12 pwrite and 8 pread calls per relayed message. Gathered,
/// one transaction covers a window of events, and a trace sees an event
/// at most this much later (the JSON-lines log has it at once).
const GATHER: Duration = Duration::from_millis(50);

pub async fn run_indexer(store: Store, mut rx: UnboundedReceiver<Arc<Logged>>) {
    let drain = |rx: &mut UnboundedReceiver<Arc<Logged>>, batch: &mut Vec<Arc<Logged>>| {
        while batch.len() < BATCH_MAX
            && let Ok(r) = rx.try_recv()
        {
            batch.push(r);
        }
    };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        if batch.len() < BATCH_MAX {
            // Gather a window's events into one transaction (see GATHER).
            // Asleep, the task is not woken by each event sent meanwhile.
            tokio::time::sleep(GATHER).await;
            drain(&mut rx, &mut batch);
        }
        // Connection events cannot be found by a trace and reports do not
        // count them: they stay in the JSON-lines log only.
        let rows: Vec<_> = batch
            .iter()
            .filter_map(|r| {
                if r.event.name().starts_with("connection.") {
                    return None;
                }
                let (q, m, rc) = keys(r);
                Some((
                    ts_ms(r),
                    r.node.clone(),
                    r.event.name().to_string(),
                    q,
                    m,
                    rc,
                    // The line the log writer wrote (or will): serialised once.
                    r.json().to_string(),
                ))
            })
            .collect();
        if rows.is_empty() {
            continue;
        }
        let sqlite = store.backend == godwit_store::Backend::Sqlite;
        let result = store
            .write_tx(move |tx| {
                let rows = rows.clone();
                Box::pin(async move {
                    // Multi-row INSERTs of the sizes `chunk_sizes` gives.
                    let mut left = &rows[..];
                    for size in chunk_sizes(rows.len()) {
                        let (chunk, tail) = left.split_at(size);
                        left = tail;
                        let mut sql = String::from("INSERT INTO events (ts_ms, node, name, queue_id, message_id, rcpt, body) VALUES ");
                        for i in 0..chunk.len() {
                            if i > 0 {
                                sql.push_str(", ");
                            }
                            sql.push_str(&row_placeholders(sqlite, i));
                        }
                        let mut q = godwit_store::sqlx::query(godwit_store::sqlx::AssertSqlSafe(sql));
                        for (ts, node, name, qid, mid, rc, body) in chunk {
                            q = q.bind(*ts).bind(node.clone()).bind(name.clone()).bind(qid.clone()).bind(mid.clone()).bind(rc.clone()).bind(body.clone());
                        }
                        q.execute(&mut *tx).await?;
                    }
                    Ok(())
                })
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("event index: {e}");
        }
    }
}

/// Deletes indexed events older than `retention`. Returns how many.
pub async fn prune(store: &Store, retention: Duration) -> Result<u64, StoreError> {
    let cutoff = godwit_store::now_ms() - retention.as_millis() as i64;
    let r = godwit_store::sqlx::query("DELETE FROM events WHERE ts_ms < $1")
        .bind(cutoff)
        .execute(&store.pool)
        .await?;
    Ok(r.rows_affected())
}

/// Prunes the index (and JSON-lines files older than the retention) hourly.
pub async fn run_retention(store: Store, events_dir: std::path::PathBuf, retention: Duration) {
    loop {
        match prune(&store, retention).await {
            Ok(n) if n > 0 => tracing::info!("pruned {n} events older than {retention:?}"),
            Ok(_) => {}
            Err(e) => tracing::warn!("event retention: {e}"),
        }
        let cutoff = time::OffsetDateTime::now_utc() - retention;
        let cutoff_day = format!("events-{}.jsonl", cutoff.date());
        if let Ok(rd) = std::fs::read_dir(&events_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("events-") && name.ends_with(".jsonl") && name < cutoff_day {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_events::Event;

    #[test]
    fn chunks_are_full_then_powers_of_two() {
        let full = |k: usize| vec![CHUNK_MAX; k];
        let cases: [(usize, Vec<usize>); 6] = [
            (0, vec![]),
            (1, vec![1]),
            (7, vec![4, 2, 1]),
            (128, full(1)),
            (300, [full(2), vec![32, 8, 4]].concat()),
            // 15 × 128 = 1920, then 80 = 64 + 16.
            (2000, [full(15), vec![64, 16]].concat()),
        ];
        for (n, want) in cases {
            assert_eq!(chunk_sizes(n), want, "{n}");
        }
    }

    #[test]
    fn row_placeholders_per_backend() {
        let cases = [
            (true, 0, "(?, ?, ?, ?, ?, ?, ?)"),
            (true, 5, "(?, ?, ?, ?, ?, ?, ?)"),
            (false, 0, "($1, $2, $3, $4, $5, $6, $7)"),
            (false, 2, "($15, $16, $17, $18, $19, $20, $21)"),
        ];
        for (sqlite, i, want) in cases {
            assert_eq!(row_placeholders(sqlite, i), want, "{sqlite} {i}");
        }
    }

    #[tokio::test]
    async fn indexes_and_prunes_by_retention() {
        let t = godwit_store::testing::sqlite_temp().await;
        let store = t.store.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rec = |ts: &str, q: &str| {
            Arc::new(Logged::new(Record {
                ts: ts.into(),
                node: "n".into(),
                event: Event::Held {
                    queue_id: q.into(),
                    message_id: Some("<m@x>".into()),
                    rcpt: "a@b".into(),
                    why: "t".into(),
                },
            }))
        };
        tx.send(rec("2020-01-01T00:00:00.000Z", "OLD")).unwrap();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        tx.send(rec(&now, "NEW")).unwrap();
        drop(tx);
        run_indexer(store.clone(), rx).await;
        let count = || async {
            godwit_store::sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM events")
                .fetch_one(&store.pool)
                .await
                .unwrap()
        };
        assert_eq!(count().await, 2);
        let pruned = prune(&store, Duration::from_secs(90 * 86400))
            .await
            .unwrap();
        assert_eq!(pruned, 1);
        let left: String = godwit_store::sqlx::query_scalar("SELECT queue_id FROM events")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(left, "NEW");
    }
}
