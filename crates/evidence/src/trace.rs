//! The chain of custody of one message: received, routed (with the routing
//! version), every attempt, deliveries with the platform's own queue ID,
//! deferrals, holds, releases and DSNs.

use godwit_events::{Event, Record};
use godwit_store::{Row, Store};
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Debug, Clone, Default)]
pub struct Query {
    /// A Message-ID (with or without <>) or a queue ID.
    pub key: Option<String>,
    pub rcpt: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub queue_id: String,
    pub message_id: Option<String>,
    /// "delivered", "queued", "failed" or "partial".
    pub verdict: String,
    pub events: Vec<Record>,
}

fn records(rows: Vec<godwit_store::sqlx::any::AnyRow>) -> Vec<Record> {
    rows.into_iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .filter_map(|b| serde_json::from_str(&b).ok())
        .collect()
}

/// Finds every message matching the query and its whole chain.
pub async fn find(store: &Store, q: &Query) -> anyhow::Result<Vec<Trace>> {
    let since = q.since_ms.unwrap_or(0);
    let until = q.until_ms.unwrap_or(i64::MAX);
    let mut qids: BTreeSet<String> = BTreeSet::new();
    if let Some(key) = &q.key {
        let key = key.trim();
        if key.contains('@') {
            let mid = if key.starts_with('<') {
                key.to_string()
            } else {
                format!("<{key}>")
            };
            let rows = godwit_store::sqlx::query("SELECT DISTINCT queue_id FROM events WHERE message_id = $1 AND name = 'message.accepted'")
                .bind(&mid)
                .fetch_all(&store.pool)
                .await?;
            qids.extend(
                rows.into_iter()
                    .filter_map(|r| r.try_get::<String, _>(0).ok()),
            );
        } else {
            qids.insert(key.to_uppercase());
        }
    }
    if let Some(rcpt) = &q.rcpt {
        let rows = godwit_store::sqlx::query(
            "SELECT DISTINCT queue_id FROM events WHERE rcpt = $1 AND ts_ms >= $2 AND ts_ms <= $3",
        )
        .bind(rcpt.to_lowercase())
        .bind(since)
        .bind(until)
        .fetch_all(&store.pool)
        .await?;
        let found: BTreeSet<String> = rows
            .into_iter()
            .filter_map(|r| r.try_get::<String, _>(0).ok())
            .collect();
        qids = if q.key.is_some() {
            qids.intersection(&found).cloned().collect()
        } else {
            found
        };
    }
    let mut out = Vec::new();
    for qid in qids {
        let mut events = records(
            godwit_store::sqlx::query("SELECT body FROM events WHERE queue_id = $1 ORDER BY ts_ms")
                .bind(&qid)
                .fetch_all(&store.pool)
                .await?,
        );
        if events.is_empty() {
            continue;
        }
        // Follow DSNs generated for this message: their dsn.queued events are
        // indexed under the original Message-ID.
        let mid = events.iter().find_map(|r| match &r.event {
            Event::MessageAccepted { message_id, .. } => message_id.clone(),
            _ => None,
        });
        let mut dsns = Vec::new();
        if let Some(mid) = &mid {
            let rows = godwit_store::sqlx::query(
                "SELECT body FROM events WHERE message_id = $1 AND name = 'dsn.queued'",
            )
            .bind(mid)
            .fetch_all(&store.pool)
            .await?;
            for r in records(rows) {
                if let Event::DsnQueued {
                    queue_id,
                    original_queue_id,
                    ..
                } = &r.event
                    && *original_queue_id == qid
                    && !dsns.contains(queue_id)
                {
                    dsns.push(queue_id.clone());
                    if !events.iter().any(|e| e.ts == r.ts && e.event == r.event) {
                        events.push(r.clone());
                    }
                }
            }
        }
        for d in dsns {
            events.extend(records(
                godwit_store::sqlx::query("SELECT body FROM events WHERE queue_id = $1 AND name != 'dsn.queued' ORDER BY ts_ms")
                    .bind(&d)
                    .fetch_all(&store.pool)
                    .await?,
            ));
        }
        events.sort_by(|a, b| a.ts.cmp(&b.ts));
        let message_id = events.iter().find_map(|r| match &r.event {
            Event::MessageAccepted { message_id, .. } => message_id.clone(),
            _ => None,
        });
        out.push(Trace {
            verdict: verdict(&qid, &events),
            queue_id: qid,
            message_id,
            events,
        });
    }
    Ok(out)
}

fn verdict(qid: &str, events: &[Record]) -> String {
    let rcpts: Vec<String> = events
        .iter()
        .find_map(|r| match &r.event {
            Event::MessageAccepted {
                rcpts, queue_id, ..
            } if queue_id == qid => Some(rcpts.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let done = |want: &str| {
        rcpts
            .iter()
            .filter(|a| {
                events.iter().any(|r| match (&r.event, want) {
                    (Event::Delivered { rcpt, queue_id, .. }, "d") => rcpt == *a && queue_id == qid,
                    (Event::Failed { rcpt, queue_id, .. }, "f") => rcpt == *a && queue_id == qid,
                    _ => false,
                })
            })
            .count()
    };
    let (d, f) = (done("d"), done("f"));
    if rcpts.is_empty() {
        "unknown".into()
    } else if d == rcpts.len() {
        "delivered".into()
    } else if f == rcpts.len() {
        "failed".into()
    } else if d + f == rcpts.len() {
        "partial".into()
    } else {
        "queued".into()
    }
}

/// One line per event, for people.
pub fn render(t: &Trace) -> String {
    let mut s = format!(
        "Message {}  queue ID {}  verdict: {}\n",
        t.message_id.as_deref().unwrap_or("(no Message-ID)"),
        t.queue_id,
        t.verdict
    );
    // Several nodes of a fleet handled it (accepted on one, adopted and
    // delivered by another): each line says which.
    let nodes: BTreeSet<&str> = t.events.iter().map(|r| r.node.as_str()).collect();
    for r in &t.events {
        let ts = r.ts.get(11..23).unwrap_or(&r.ts);
        let ts = if nodes.len() > 1 {
            format!("{ts}  [{}]", r.node)
        } else {
            ts.to_string()
        };
        let line = match &r.event {
            Event::MessageAccepted {
                client_ip,
                helo,
                tls,
                mail_from,
                rcpts,
                size,
                queue_id,
                ..
            } => format!(
                "received from [{client_ip}] (HELO {helo}, {}) as {queue_id}: <{mail_from}> -> {}, {size} bytes",
                if *tls { "TLS" } else { "no TLS" },
                rcpts.join(", ")
            ),
            Event::RecipientExpanded {
                rcpt,
                members,
                groups,
                over_limit,
                ..
            } => match over_limit {
                Some(limit) => format!(
                    "group {rcpt} not expanded: over directory.expansion_limit ({limit}); its platform expands it"
                ),
                None => format!(
                    "expanded group {rcpt}{} to {} member(s): {}",
                    if groups.len() > 1 {
                        format!(" (nested: {})", groups[1..].join(", "))
                    } else {
                        String::new()
                    },
                    members.len(),
                    members.join(", ")
                ),
            },
            Event::Routed {
                rcpt,
                route,
                why,
                routing_version,
                ..
            } => format!("routed {rcpt} -> {route} ({why}; routing version {routing_version})"),
            Event::Attempt {
                platform,
                host,
                code,
                reply,
                duration_ms,
                tls,
                ..
            } => {
                format!(
                    "attempt to {platform} via {host}{}: {reply} ({duration_ms} ms) [{code}]",
                    if *tls { " (TLS)" } else { "" }
                )
            }
            Event::Delivered {
                rcpt,
                platform,
                host,
                reply,
                remote_queue_id,
                delay_ms,
                delays,
                ..
            } => format!(
                "delivered {rcpt} to {platform} ({host}); their queue ID {}; {reply}; {:.1}s after accept; {}",
                remote_queue_id.as_deref().unwrap_or("(not given)"),
                *delay_ms as f64 / 1000.0,
                breakdown(delays)
            ),
            Event::Deferred {
                rcpt,
                platform,
                reply,
                attempts,
                next_attempt_in_s,
                delays,
                ..
            } => {
                format!(
                    "deferred {rcpt} for {platform} (attempt {attempts}): {reply}; next attempt in {next_attempt_in_s}s; {}",
                    breakdown(delays)
                )
            }
            Event::Failed {
                rcpt,
                platform,
                reply,
                reason,
                delays,
                ..
            } => format!(
                "FAILED {rcpt} at {platform} ({reason}): {reply}; {}",
                breakdown(delays)
            ),
            Event::Held { rcpt, why, .. } => format!("held {rcpt}: {why}"),
            Event::Released { rcpt, actor, .. } => format!("released {rcpt} by {actor}"),
            Event::DsnQueued {
                queue_id,
                to,
                action,
                rcpts,
                ..
            } => format!(
                "DSN ({action}) for {} queued as {queue_id} to <{to}>",
                rcpts.join(", ")
            ),
            Event::QueueRecovered { pending, .. } => {
                format!("recovered after restart; pending: {}", pending.join(", "))
            }
            Event::QueueDeleted { actor, .. } => format!("deleted from the queue by {actor}"),
            Event::QueueAdopted {
                from_node,
                from_dir,
                pending,
                ..
            } => format!(
                "adopted from the spool of {} ({from_dir}); pending: {}",
                from_node.as_deref().unwrap_or("an unknown node"),
                pending.join(", ")
            ),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        s.push_str(&format!("  {ts}  {line}\n"));
    }
    s
}

/// `delays accept/queue/connect/transmit = 0.08/0.01/0.15/0.13 s`, as
/// Postfix's delays=a/b/c/d.
pub fn breakdown(d: &godwit_events::Delays) -> String {
    use crate::maillog::secs;
    format!(
        "delays accept/queue/connect/transmit = {}/{}/{}/{} s",
        secs(d.accept_ms),
        secs(d.queue_ms),
        secs(d.connect_ms),
        secs(d.transmit_ms)
    )
}
