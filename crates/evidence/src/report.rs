//! `godwit report`: the evidence for a wave or an incident window.

use crate::metrics::{accepted_direction, code_of, delivery_direction, pct};
use crate::trace;
use godwit_events::{Event, Record};
use godwit_store::{Row, Store};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Serialize)]
pub struct Report {
    pub since_ms: i64,
    pub until_ms: i64,
    pub accepted: u64,
    pub refused: u64,
    pub delivered_by_platform: BTreeMap<String, u64>,
    pub deferred_by_code: BTreeMap<String, u64>,
    pub bounced_by_code: BTreeMap<String, u64>,
    /// platform -> [p50, p95, p99] seconds, accept to delivered.
    pub latency_seconds: BTreeMap<String, [f64; 3]>,
    /// platform -> mean seconds in accept, queue, connect, transmit over its
    /// delivered, deferred and bounced recipients (Postfix's delays=a/b/c/d).
    pub delays_by_platform: BTreeMap<String, [f64; 4]>,
    pub still_queued: usize,
    pub held: usize,
    pub dsns: u64,
    pub samples: Vec<SampleTrace>,
    /// Access front: successful client logins per platform, failures by reason.
    pub logins_by_platform: BTreeMap<String, u64>,
    pub login_failures_by_reason: BTreeMap<String, u64>,
    pub sessions_moved: u64,
    /// The nodes whose events the window holds (every gateway of a fleet
    /// on a shared store). `still_queued` and `held` are this node's spool.
    pub nodes: Vec<String>,
    /// "inbound" / "outbound": messages accepted (by the event's
    /// direction) and recipient outcomes (by destination: `mx:` and
    /// `smarthost:` are outbound), counted apart.
    pub by_direction: BTreeMap<String, crate::metrics::DirectionCounts>,
}

#[derive(Debug, Serialize)]
pub struct SampleTrace {
    pub message_id: Option<String>,
    pub queue_id: String,
    pub verdict: String,
    pub platforms: Vec<String>,
    pub remote_queue_ids: Vec<String>,
}

pub async fn build(
    store: &Store,
    spool_dir: &std::path::Path,
    since_ms: i64,
    until_ms: i64,
    sample: usize,
) -> anyhow::Result<Report> {
    let rows = godwit_store::sqlx::query(
        "SELECT body FROM events WHERE ts_ms >= $1 AND ts_ms <= $2 ORDER BY ts_ms",
    )
    .bind(since_ms)
    .bind(until_ms)
    .fetch_all(&store.pool)
    .await?;
    let records: Vec<Record> = rows
        .into_iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .filter_map(|b| serde_json::from_str(&b).ok())
        .collect();
    let mut r = Report {
        since_ms,
        until_ms,
        accepted: 0,
        refused: 0,
        delivered_by_platform: BTreeMap::new(),
        deferred_by_code: BTreeMap::new(),
        bounced_by_code: BTreeMap::new(),
        latency_seconds: BTreeMap::new(),
        delays_by_platform: BTreeMap::new(),
        still_queued: 0,
        held: 0,
        dsns: 0,
        samples: Vec::new(),
        logins_by_platform: BTreeMap::new(),
        login_failures_by_reason: BTreeMap::new(),
        sessions_moved: 0,
        nodes: records
            .iter()
            .map(|r| r.node.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        by_direction: BTreeMap::new(),
    };
    let mut lat: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut delay_sums: BTreeMap<String, crate::metrics::DelaySums> = BTreeMap::new();
    let mut accepted_ids = Vec::new();
    for rec in &records {
        match &rec.event {
            Event::MessageAccepted {
                queue_id,
                direction,
                ..
            } => {
                r.accepted += 1;
                r.by_direction
                    .entry(accepted_direction(direction.as_deref()).into())
                    .or_default()
                    .accepted += 1;
                accepted_ids.push(queue_id.clone());
            }
            Event::MessageRefused { .. } => r.refused += 1,
            Event::Delivered {
                platform,
                delay_ms,
                delays,
                ..
            } => {
                delay_sums.entry(platform.clone()).or_default().add(delays);
                r.by_direction
                    .entry(delivery_direction(platform).into())
                    .or_default()
                    .delivered += 1;
                *r.delivered_by_platform.entry(platform.clone()).or_default() += 1;
                lat.entry(platform.clone())
                    .or_default()
                    .push(*delay_ms as f64 / 1000.0);
            }
            Event::Deferred {
                reply,
                platform,
                delays,
                ..
            } => {
                delay_sums.entry(platform.clone()).or_default().add(delays);
                r.by_direction
                    .entry(delivery_direction(platform).into())
                    .or_default()
                    .deferred += 1;
                *r.deferred_by_code.entry(code_of(reply)).or_default() += 1
            }
            Event::Failed {
                reply,
                platform,
                delays,
                ..
            } => {
                delay_sums.entry(platform.clone()).or_default().add(delays);
                r.by_direction
                    .entry(delivery_direction(platform).into())
                    .or_default()
                    .failed += 1;
                *r.bounced_by_code.entry(code_of(reply)).or_default() += 1
            }
            Event::DsnQueued { .. } => r.dsns += 1,
            Event::AccessLogin {
                platform, reason, ..
            } => match (reason, platform) {
                (None, Some(p)) => *r.logins_by_platform.entry(p.clone()).or_default() += 1,
                (reason, _) => {
                    let reason = reason.clone().unwrap_or_else(|| "unknown".into());
                    *r.login_failures_by_reason.entry(reason).or_default() += 1
                }
            },
            Event::AccessMoved { .. } => r.sessions_moved += 1,
            _ => {}
        }
    }
    r.delays_by_platform = delay_sums
        .into_iter()
        .map(|(p, d)| (p, d.means()))
        .collect();
    for (p, mut v) in lat {
        v.sort_by(f64::total_cmp);
        r.latency_seconds
            .insert(p, [pct(&v, 0.5), pct(&v, 0.95), pct(&v, 0.99)]);
    }
    for m in godwit_spool::list(spool_dir) {
        r.still_queued += 1;
        if m.status.iter().any(|s| {
            s.as_ref()
                .is_some_and(|s| s.status == godwit_spool::RcptStatus::Held)
        }) {
            r.held += 1;
        }
    }
    // An even spread of samples across the window, each traced end to end.
    let step = (accepted_ids.len() / sample.max(1)).max(1);
    for qid in accepted_ids.iter().step_by(step).take(sample) {
        for t in trace::find(
            store,
            &trace::Query {
                key: Some(qid.clone()),
                ..Default::default()
            },
        )
        .await?
        {
            let mut platforms = Vec::new();
            let mut remote = Vec::new();
            for e in &t.events {
                if let Event::Delivered {
                    platform,
                    remote_queue_id,
                    queue_id,
                    ..
                } = &e.event
                    && *queue_id == t.queue_id
                {
                    platforms.push(platform.clone());
                    remote.extend(remote_queue_id.clone());
                }
            }
            r.samples.push(SampleTrace {
                message_id: t.message_id.clone(),
                queue_id: t.queue_id.clone(),
                verdict: t.verdict.clone(),
                platforms,
                remote_queue_ids: remote,
            });
        }
    }
    Ok(r)
}

fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# godwit report\n\nWindow: {} to {}\n\n",
        when(r.since_ms),
        when(r.until_ms.min(godwit_store::now_ms()))
    );
    if r.nodes.len() > 1 {
        s.push_str(&format!(
            "Nodes: {} (mail flow from all of them; still queued and held: this node's spool)\n\n",
            r.nodes.join(", ")
        ));
    }
    s.push_str(&format!(
        "| accepted | refused | delivered | deferrals | bounced | DSNs | still queued | held |\n|---|---|---|---|---|---|---|---|\n| {} | {} | {} | {} | {} | {} | {} | {} |\n\n",
        r.accepted,
        r.refused,
        r.delivered_by_platform.values().sum::<u64>(),
        r.deferred_by_code.values().sum::<u64>(),
        r.bounced_by_code.values().sum::<u64>(),
        r.dsns,
        r.still_queued,
        r.held
    ));
    if !r.by_direction.is_empty() {
        s.push_str("## By direction\n\n| direction | accepted | delivered | deferrals | bounced |\n|---|---|---|---|---|\n");
        for (d, c) in &r.by_direction {
            s.push_str(&format!(
                "| {d} | {} | {} | {} | {} |\n",
                c.accepted, c.delivered, c.deferred, c.failed
            ));
        }
        s.push('\n');
    }
    s.push_str(
        "## Per platform\n\n| platform | delivered | p50 | p95 | p99 |\n|---|---|---|---|---|\n",
    );
    for (p, n) in &r.delivered_by_platform {
        let l = r.latency_seconds.get(p).copied().unwrap_or_default();
        s.push_str(&format!(
            "| {p} | {n} | {:.3}s | {:.3}s | {:.3}s |\n",
            l[0], l[1], l[2]
        ));
    }
    s.push_str("\n## Deferrals and bounces by code\n\n| outcome | code | count |\n|---|---|---|\n");
    for (c, n) in &r.deferred_by_code {
        s.push_str(&format!("| deferred | {c} | {n} |\n"));
    }
    for (c, n) in &r.bounced_by_code {
        s.push_str(&format!("| bounced | {c} | {n} |\n"));
    }
    if !r.logins_by_platform.is_empty() || !r.login_failures_by_reason.is_empty() {
        s.push_str("\n## Client logins (access front)\n\n| outcome | platform or reason | count |\n|---|---|---|\n");
        for (p, n) in &r.logins_by_platform {
            s.push_str(&format!("| login | {p} | {n} |\n"));
        }
        for (why, n) in &r.login_failures_by_reason {
            s.push_str(&format!("| failed | {why} | {n} |\n"));
        }
        s.push_str(&format!(
            "| moved (disconnected) | - | {} |\n",
            r.sessions_moved
        ));
    }
    if !r.delays_by_platform.is_empty() {
        s.push_str("\n## Delay breakdown (mean seconds, Postfix's delays=a/b/c/d)\n\n| platform | accept | queue | connect | transmit |\n|---|---|---|---|---|\n");
        for (p, d) in &r.delays_by_platform {
            s.push_str(&format!(
                "| {p} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                d[0], d[1], d[2], d[3]
            ));
        }
    }
    s.push_str("\n## Sample traced end to end\n\n| Message-ID | queue ID | verdict | platforms | their queue IDs |\n|---|---|---|---|---|\n");
    for t in &r.samples {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.message_id.as_deref().unwrap_or("-"),
            t.queue_id,
            t.verdict,
            t.platforms.join(", "),
            t.remote_queue_ids.join(", ")
        ));
    }
    s
}

pub fn csv(r: &Report) -> String {
    let mut s = String::from("section,key,value\n");
    s.push_str(&format!("total,accepted,{}\ntotal,refused,{}\ntotal,still_queued,{}\ntotal,held,{}\ntotal,dsns,{}\n", r.accepted, r.refused, r.still_queued, r.held, r.dsns));
    for (d, c) in &r.by_direction {
        s.push_str(&format!(
            "direction_accepted,{d},{}\ndirection_delivered,{d},{}\ndirection_deferred,{d},{}\ndirection_bounced,{d},{}\n",
            c.accepted, c.delivered, c.deferred, c.failed
        ));
    }
    for (p, n) in &r.delivered_by_platform {
        s.push_str(&format!("delivered,{p},{n}\n"));
    }
    for (c, n) in &r.deferred_by_code {
        s.push_str(&format!("deferred,{c},{n}\n"));
    }
    for (c, n) in &r.bounced_by_code {
        s.push_str(&format!("bounced,{c},{n}\n"));
    }
    for (p, l) in &r.latency_seconds {
        s.push_str(&format!(
            "latency_p50,{p},{}\nlatency_p95,{p},{}\nlatency_p99,{p},{}\n",
            l[0], l[1], l[2]
        ));
    }
    for (p, d) in &r.delays_by_platform {
        for (stage, v) in crate::metrics::DELAY_STAGES.iter().zip(d) {
            s.push_str(&format!("delay_{stage},{p},{v}\n"));
        }
    }
    for (p, n) in &r.logins_by_platform {
        s.push_str(&format!("access_login,{p},{n}\n"));
    }
    for (why, n) in &r.login_failures_by_reason {
        s.push_str(&format!("access_failed,{why},{n}\n"));
    }
    if r.sessions_moved > 0 {
        s.push_str(&format!("access_moved,sessions,{}\n", r.sessions_moved));
    }
    for t in &r.samples {
        s.push_str(&format!(
            "sample,{},{}\n",
            t.message_id.as_deref().unwrap_or("-").replace(',', " "),
            t.verdict
        ));
    }
    s
}

/// Postfix qshape's age buckets, in minutes: a row counts recipients
/// younger than each bound (the last column: older than 1280 minutes).
pub const QSHAPE_BUCKETS: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct QShapeRow {
    pub key: String,
    pub total: u64,
    /// One count per bucket of `QSHAPE_BUCKETS`, then the older ones.
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct QShape {
    /// Column headings, minutes: "5", "10", ... "1280", "1280+".
    pub buckets: Vec<String>,
    /// TOTAL first, then rows by their total, largest first.
    pub rows: Vec<QShapeRow>,
}

/// (key, age in minutes) per queued recipient -> the qshape table.
pub fn qshape(recipients: &[(String, u64)]) -> QShape {
    let n = QSHAPE_BUCKETS.len() + 1;
    let col = |age: u64| {
        QSHAPE_BUCKETS
            .iter()
            .position(|b| age < *b)
            .unwrap_or(QSHAPE_BUCKETS.len())
    };
    let mut by: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    let mut total = vec![0u64; n];
    for (key, age) in recipients {
        let c = col(*age);
        by.entry(key).or_insert_with(|| vec![0; n])[c] += 1;
        total[c] += 1;
    }
    let mut rows: Vec<QShapeRow> = by
        .into_iter()
        .map(|(k, counts)| QShapeRow {
            key: k.to_string(),
            total: counts.iter().sum(),
            counts,
        })
        .collect();
    rows.sort_by(|a, b| b.total.cmp(&a.total).then(a.key.cmp(&b.key)));
    rows.insert(
        0,
        QShapeRow {
            key: "TOTAL".into(),
            total: total.iter().sum(),
            counts: total,
        },
    );
    let mut buckets: Vec<String> = QSHAPE_BUCKETS.iter().map(u64::to_string).collect();
    buckets.push("1280+".into());
    QShape { buckets, rows }
}

pub fn render_qshape(q: &QShape, by: &str) -> String {
    let w = q
        .rows
        .iter()
        .map(|r| r.key.len())
        .max()
        .unwrap_or(5)
        .max(by.len());
    let mut out = format!("{by:>w$} {:>6}", "T");
    for b in &q.buckets {
        out.push_str(&format!(" {b:>6}"));
    }
    out.push_str("   (minutes)\n");
    for r in &q.rows {
        out.push_str(&format!("{:>w$} {:>6}", r.key, r.total));
        for c in &r.counts {
            out.push_str(&format!(" {c:>6}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod qshape_tests {
    use super::*;

    #[test]
    fn ages_fall_in_qshape_buckets() {
        let rows: Vec<(String, u64)> = [
            ("example.com", 0),
            ("example.com", 4),
            ("example.com", 5),
            ("example.org", 2000),
        ]
        .iter()
        .map(|(k, a)| (k.to_string(), *a))
        .collect();
        let q = qshape(&rows);
        assert_eq!(q.rows[0].key, "TOTAL");
        assert_eq!(q.rows[0].total, 4);
        assert_eq!(q.rows[1].key, "example.com");
        assert_eq!(q.rows[1].counts[..2], [2, 1]);
        assert_eq!(*q.rows[2].counts.last().unwrap(), 1);
        let text = render_qshape(&q, "domain");
        assert!(text.lines().next().unwrap().contains("1280+"), "{text}");
    }
}
