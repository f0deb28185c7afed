//! Trace at scale: indexes N messages' events (accepted, routed, attempt,
//! delivered: 4 per message) into a fresh SQLite store, then times traces by
//! Message-ID, queue ID and recipient. Run by bench/trace-scale.

use godwit_events::{Event, Record};
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let store = godwit_store::Store::open(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("s.db").display()
    ))
    .await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let indexer = tokio::spawn(godwit_evidence::index::run_indexer(store.clone(), rx));
    let t0 = Instant::now();
    let rec = |event| {
        std::sync::Arc::new(godwit_events::Logged::new(Record {
            ts: "2026-11-28T10:00:00.000Z".into(),
            node: "bench".into(),
            event,
        }))
    };
    for i in 0..n {
        let q = format!("Q{i:012}");
        let m = Some(format!("<m{i}@bench.test>"));
        let rcpt = format!("user{}@example.com", i % 10_000);
        tx.send(rec(Event::MessageAccepted {
            queue_id: q.clone(),
            message_id: m.clone(),
            session: 1,
            client_ip: "192.0.2.1".into(),
            helo: "c".into(),
            tls: false,
            mail_from: "s@x.test".into(),
            rcpts: vec![rcpt.clone()],
            size: 4096,
            direction: None,
            sasl_method: None,
            sasl_username: None,
        }))?;
        tx.send(rec(Event::Routed {
            queue_id: q.clone(),
            message_id: m.clone(),
            rcpt: rcpt.clone(),
            route: "new".into(),
            why: "wave".into(),
            routing_version: 7,
        }))?;
        tx.send(rec(Event::Attempt {
            queue_id: q.clone(),
            message_id: m.clone(),
            platform: "new".into(),
            host: "10.0.0.2:25".into(),
            rcpts: vec![rcpt.clone()],
            code: 250,
            enhanced: Some("2.0.0".into()),
            reply: "250 2.0.0 Ok: queued as X".into(),
            duration_ms: 3,
            tls: true,
            tls_verified: Some(true),
        }))?;
        tx.send(rec(Event::Delivered {
            queue_id: q,
            message_id: m,
            rcpt,
            platform: "new".into(),
            host: "10.0.0.2:25".into(),
            reply: "250 2.0.0 Ok: queued as X".into(),
            remote_queue_id: Some("X".into()),
            delay_ms: 12,
            delays: Default::default(),
        }))?;
    }
    drop(tx);
    indexer.await?;
    let index_s = t0.elapsed().as_secs_f64();
    // A CLI trace opens a fresh store: measure that, as `godwit trace` does it.
    let db = dir.path().join("s.db");
    let wal = std::fs::metadata(dir.path().join("s.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    let t = Instant::now();
    let fresh = godwit_store::Store::open(&format!("sqlite://{}?mode=rwc", db.display())).await?;
    let first = godwit_evidence::trace::find(
        &fresh,
        &godwit_evidence::trace::Query {
            key: Some(format!("m{}@bench.test", n / 3)),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(first.len(), 1);
    println!(
        "  fresh store + first trace: {:.2} ms (database {} MB, WAL {} MB)",
        t.elapsed().as_secs_f64() * 1000.0,
        std::fs::metadata(&db)?.len() / 1_000_000,
        wal / 1_000_000
    );
    drop(fresh);
    let mut worst = 0f64;
    let mut total = 0f64;
    let mut all = Vec::new();
    let probes = 50;
    for k in 0..probes {
        let i = (k * 7919 * 104729) % n;
        let t = Instant::now();
        let by_mid = godwit_evidence::trace::find(
            &store,
            &godwit_evidence::trace::Query {
                key: Some(format!("m{i}@bench.test")),
                ..Default::default()
            },
        )
        .await?;
        let e = t.elapsed().as_secs_f64();
        assert_eq!(by_mid.len(), 1);
        assert_eq!(by_mid[0].verdict, "delivered");
        worst = worst.max(e);
        total += e;
        all.push(e);
    }
    let t = Instant::now();
    let by_q = godwit_evidence::trace::find(
        &store,
        &godwit_evidence::trace::Query {
            key: Some(format!("Q{:012}", n / 2)),
            ..Default::default()
        },
    )
    .await?;
    let q_s = t.elapsed().as_secs_f64();
    assert_eq!(by_q.len(), 1);
    println!(
        "trace-scale: {n} messages ({} events) indexed in {index_s:.1}s ({:.0} events/s)",
        n * 4,
        (n * 4) as f64 / index_s
    );
    all.sort_by(f64::total_cmp);
    println!(
        "  trace by Message-ID: median {:.2} ms, mean {:.2} ms, worst {:.2} ms over {probes} lookups",
        all[all.len() / 2] * 1000.0,
        total / probes as f64 * 1000.0,
        worst * 1000.0
    );
    println!("  trace by queue ID:   {:.2} ms", q_s * 1000.0);
    Ok(())
}
