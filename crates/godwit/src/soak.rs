//! The soak watcher: every running gateway looks for soaking waves; the one
//! holding a wave's lease (a row in `wave_soaks`, so exactly one node of a
//! fleet) measures mail to its members since the cutover and, on a breach,
//! runs the one `wave rollback` path itself, recording the breach and its
//! evidence as the history's command and emitting `wave.rolled_back`. The
//! decision is `godwit_route::soak::breaches`; this is the I/O around it.

use anyhow::{Context, Result};
use godwit_config::Config;
use godwit_events::{Event, EventLog};
use godwit_relay::Relay;
use godwit_route::soak::{self, Measurements};
use godwit_spool::{RcptStatus, now_ms};
use godwit_store::{Row, Store};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// How often the watcher measures (and renews its lease).
const TICK: Duration = Duration::from_secs(1);
/// A lease outlives a few missed ticks, so a node that died is replaced.
const LEASE_MS: i64 = 10_000;

/// One soak row, as `wave watch` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakRow {
    pub wave: String,
    pub started_ms: i64,
    pub until_ms: i64,
    pub rollback_if: String,
    pub status: String,
    pub owner: Option<String>,
    pub measured_ms: i64,
    pub measurements: Option<serde_json::Value>,
    pub breach: Option<String>,
    pub rollback_version: Option<i64>,
}

pub async fn start(store: &Store, wave: &str, soak: Duration, rollback_if: &str) -> Result<()> {
    let now = now_ms();
    godwit_store::sqlx::query("DELETE FROM wave_soaks WHERE wave = $1")
        .bind(wave)
        .execute(&store.pool)
        .await?;
    godwit_store::sqlx::query(
        "INSERT INTO wave_soaks (wave, started_ms, until_ms, rollback_if, status, lease_until_ms, measured_ms) VALUES ($1, $2, $3, $4, 'soaking', 0, 0)",
    )
    .bind(wave)
    .bind(now)
    .bind(now + soak.as_millis() as i64)
    .bind(rollback_if)
    .execute(&store.pool)
    .await
    .context("recording the soak in the state store")?;
    Ok(())
}

pub async fn rows(store: &Store, wave: Option<&str>) -> Result<Vec<SoakRow>> {
    let rows = godwit_store::sqlx::query(
        "SELECT wave, started_ms, until_ms, rollback_if, status, owner, measured_ms, measurements, breach, rollback_version FROM wave_soaks ORDER BY wave",
    )
    .fetch_all(&store.pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(SoakRow {
                wave: r.try_get(0).ok()?,
                started_ms: r.try_get(1).ok()?,
                until_ms: r.try_get(2).ok()?,
                rollback_if: r.try_get(3).ok()?,
                status: r.try_get(4).ok()?,
                owner: r.try_get(5).ok().flatten(),
                measured_ms: r.try_get(6).ok()?,
                measurements: r
                    .try_get::<Option<String>, _>(7)
                    .ok()
                    .flatten()
                    .and_then(|s| serde_json::from_str(&s).ok()),
                breach: r.try_get(8).ok().flatten(),
                rollback_version: r.try_get(9).ok().flatten(),
            })
        })
        .filter(|r| wave.is_none_or(|w| w == r.wave))
        .collect())
}

/// Takes (or renews) the lease on `wave`'s soak for `node`.
async fn claim(store: &Store, wave: &str, node: &str) -> Result<bool> {
    let now = now_ms();
    let r = godwit_store::sqlx::query(
        "UPDATE wave_soaks SET owner = $1, lease_until_ms = $2 WHERE wave = $3 AND status = 'soaking' AND (owner = $1 OR owner IS NULL OR lease_until_ms < $4)",
    )
    .bind(node)
    .bind(now + LEASE_MS)
    .bind(wave)
    .bind(now)
    .execute(&store.pool)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// How far back each tick re-reads before the newest event it has seen:
/// the event index is written in batches (and, on a fleet, by nodes whose
/// clocks differ), so an event may land with a `ts_ms` a little older than
/// one already read. Events read twice are recognised and counted once.
const OVERLAP_MS: i64 = 60_000;

/// Mail to `members` since `since_ms`, as running aggregates: each tick reads
/// only the events since the last seen (within `OVERLAP_MS`), not the whole
/// soak window again. Kept per recipient, so a change of membership (an
/// alias added) is applied to everything already read. Pure: the watcher
/// feeds it rows.
#[derive(Debug, Default)]
pub struct Window {
    since_ms: i64,
    /// The newest `ts_ms` read.
    cursor_ms: i64,
    /// Events read within the overlap, by `ts_ms`: (node, body) hashes.
    seen: BTreeMap<i64, HashSet<u64>>,
    per_rcpt: HashMap<String, RcptAgg>,
}

#[derive(Debug, Default, Clone)]
struct RcptAgg {
    delivered: u64,
    deferred: u64,
    bounced: u64,
    latencies_s: Vec<f64>,
}

impl Window {
    pub fn new(since_ms: i64) -> Window {
        Window {
            since_ms,
            cursor_ms: since_ms,
            ..Default::default()
        }
    }

    /// Where the next read starts.
    pub fn read_from(&self) -> i64 {
        self.since_ms.max(self.cursor_ms - OVERLAP_MS)
    }

    /// Adds one delivery event (name, lowercased recipient, JSON body);
    /// false if it had been read already.
    pub fn add(&mut self, ts_ms: i64, node: &str, name: &str, rcpt: &str, body: &str) -> bool {
        if ts_ms < self.since_ms {
            return false;
        }
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (node, name, rcpt, body).hash(&mut h);
            h.finish()
        };
        if !self.seen.entry(ts_ms).or_default().insert(key) {
            return false;
        }
        self.cursor_ms = self.cursor_ms.max(ts_ms);
        let a = self.per_rcpt.entry(rcpt.to_string()).or_default();
        match name {
            "delivery.delivered" => {
                a.delivered += 1;
                if let Some(ms) = serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v["delay_ms"].as_u64())
                {
                    a.latencies_s.push(ms as f64 / 1000.0);
                }
            }
            "delivery.deferred" => a.deferred += 1,
            "delivery.failed" => a.bounced += 1,
            _ => {}
        }
        // Only events inside the overlap can come again.
        let keep = self.cursor_ms - OVERLAP_MS;
        self.seen = self.seen.split_off(&keep);
        true
    }

    /// The outcomes of mail to `members` (queue age is the relay's: not here).
    pub fn measurements(&self, members: &BTreeSet<String>) -> Measurements {
        let mut m = Measurements::default();
        let mut lat: Vec<f64> = Vec::new();
        for (rcpt, a) in &self.per_rcpt {
            if !members.contains(rcpt) {
                continue;
            }
            m.delivered += a.delivered;
            m.deferred += a.deferred;
            m.bounced += a.bounced;
            lat.extend_from_slice(&a.latencies_s);
        }
        lat.sort_by(f64::total_cmp);
        m.latency_p95_s = godwit_evidence::metrics::pct(&lat, 0.95);
        m
    }
}

/// Reads the delivery events since `w.read_from()` into `w`, then measures
/// mail to `members`, with the queue age from the relay's queue.
async fn measure(
    store: &Store,
    relay: &Relay,
    members: &BTreeSet<String>,
    w: &mut Window,
) -> Result<Measurements> {
    let rows = godwit_store::sqlx::query(
        "SELECT ts_ms, node, name, rcpt, body FROM events WHERE ts_ms >= $1 AND name IN ('delivery.delivered', 'delivery.deferred', 'delivery.failed')",
    )
    .bind(w.read_from())
    .fetch_all(&store.pool)
    .await?;
    for r in rows {
        let Some(rcpt) = r.try_get::<Option<String>, _>(3).ok().flatten() else {
            continue;
        };
        let ts: i64 = r.try_get(0).unwrap_or_default();
        let node: String = r.try_get(1).unwrap_or_default();
        let name: String = r.try_get(2).unwrap_or_default();
        let body: String = r.try_get(4).unwrap_or_default();
        w.add(ts, &node, &name, &rcpt, &body);
    }
    let mut m = w.measurements(members);
    let now = now_ms();
    for q in relay.snapshot() {
        if q.rcpts.iter().any(|(a, st, _, _)| {
            !matches!(
                st,
                RcptStatus::Delivered | RcptStatus::Failed | RcptStatus::Deleted
            ) && members.contains(&a.to_lowercase())
        }) {
            m.queue_age_s = m
                .queue_age_s
                .max(((now - q.arrival_ms) / 1000).max(0) as u64);
        }
    }
    Ok(m)
}

/// The wave's members and their aliases, lowercased (events index
/// recipients lowercased).
async fn members(store: &Store, config: &Config, wave: &str) -> Result<BTreeSet<String>> {
    let w = godwit_route::history::wave(store, wave, config.directory.max_verify_age)
        .await?
        .with_context(|| format!("no wave `{wave}`"))?;
    let mut aliases = godwit_route::history::aliases(store).await?;
    let mut out = BTreeSet::new();
    for m in &w.members {
        out.insert(m.address.to_lowercase());
        let own = aliases
            .remove(&godwit_route::normalize_address(&m.address))
            .unwrap_or_default();
        out.extend(own.iter().map(|a| a.to_lowercase()));
    }
    Ok(out)
}

/// The running aggregates of the soaks this node watches, by wave. Lost
/// with the process (or the lease): the next watcher reads the window once
/// from the soak's start, which is in the store.
type Windows = HashMap<String, Window>;

async fn tick(
    config: &Config,
    store: &Store,
    relay: &Relay,
    events: &EventLog,
    windows: &mut Windows,
) -> Result<()> {
    let node = config.node_name().to_string();
    let all = rows(store, None).await?;
    windows.retain(|w, _| all.iter().any(|r| &r.wave == w && r.status == "soaking"));
    for row in all {
        if row.status != "soaking" || !claim(store, &row.wave, &node).await? {
            windows.remove(&row.wave);
            continue;
        }
        let thresholds = soak::parse_rollback_if(&row.rollback_if)
            .map_err(|e| anyhow::anyhow!("wave_soaks {}: {e}", row.wave))?;
        let members = members(store, config, &row.wave).await?;
        let w = windows.entry(row.wave.clone()).or_default();
        if w.since_ms != row.started_ms {
            // A new soak (or the first tick): read its window from the start.
            *w = Window::new(row.started_ms);
        }
        let m = measure(store, relay, &members, w).await?;
        let mjson = serde_json::to_value(&m)?;
        let now = now_ms();
        godwit_store::sqlx::query(
            "UPDATE wave_soaks SET measured_ms = $1, measurements = $2 WHERE wave = $3",
        )
        .bind(now)
        .bind(mjson.to_string())
        .bind(&row.wave)
        .execute(&store.pool)
        .await?;
        let breaches = soak::breaches(&thresholds, &m);
        if breaches.is_empty() {
            if now >= row.until_ms {
                godwit_store::sqlx::query(
                    "UPDATE wave_soaks SET status = 'passed' WHERE wave = $1",
                )
                .bind(&row.wave)
                .execute(&store.pool)
                .await?;
                events.emit(Event::WaveSoakPassed {
                    wave: row.wave.clone(),
                    measurements: mjson,
                });
            }
            continue;
        }
        // The one rollback path, with the breach and its evidence as the
        // history's command: `godwit history` shows why it happened.
        let command = format!(
            "wave rollback {} (automatic: soak breach {})",
            row.wave,
            breaches.join("; ")
        );
        let actor = format!("godwit soak on {node}");
        let o = godwit_route::control::wave_rollback(
            &godwit_route::control::Ctx {
                store,
                config,
                actor: &actor,
                command: &command,
                dry_run: false,
            },
            &row.wave,
        )
        .await
        .map_err(|e| anyhow::anyhow!("automatic rollback of wave {}: {e}", row.wave))?;
        godwit_store::sqlx::query(
            "UPDATE wave_soaks SET status = 'rolled-back', breach = $1, rollback_version = $2 WHERE wave = $3",
        )
        .bind(breaches.join("; "))
        .bind(o.version)
        .bind(&row.wave)
        .execute(&store.pool)
        .await?;
        tracing::warn!(wave = %row.wave, version = o.version, "soak breach, wave rolled back: {}", breaches.join("; "));
        events.emit(Event::WaveRolledBack {
            wave: row.wave.clone(),
            version: o.version,
            breaches,
            measurements: mjson,
            node: node.clone(),
        });
    }
    Ok(())
}

pub async fn watch(config: Arc<Config>, store: Store, relay: Relay, events: EventLog) {
    let mut windows = Windows::new();
    loop {
        if let Err(e) = tick(&config, &store, &relay, &events, &mut windows).await {
            tracing::warn!("wave soak: {e:#}");
        }
        tokio::time::sleep(TICK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(ms: u64) -> String {
        // Real bodies differ by queue ID and timestamp; so do these, by delay.
        format!("{{\"event\":\"delivery.delivered\",\"delay_ms\":{ms}}}")
    }

    #[test]
    fn incremental_aggregates_match_a_full_read() {
        // (ts, name, rcpt, body): the events index, in insertion order; a late
        // batch lands with older timestamps than rows already read.
        let members: BTreeSet<String> = ["a@x".to_string(), "b@x".to_string()].into();
        let e = |ts: i64, name: &str, rcpt: &str, body: String| {
            (ts, name.to_string(), rcpt.to_string(), body)
        };
        let rows = vec![
            e(900, "delivery.delivered", "a@x", delivered(1000)), // before the soak
            e(1_000, "delivery.delivered", "a@x", delivered(2000)),
            e(1_500, "delivery.deferred", "b@x", "{\"d\":1}".into()),
            e(2_000, "delivery.delivered", "c@x", delivered(9000)), // not a member
            e(30_000, "delivery.failed", "b@x", "{\"f\":1}".into()),
            e(20_000, "delivery.deferred", "a@x", "{\"d\":2}".into()), // late
            e(90_000, "delivery.delivered", "b@x", delivered(4000)),
        ];
        // Ticks see growing prefixes of the index, each re-reading from
        // read_from(): every row in the overlap comes again.
        let mut w = Window::new(1_000);
        for upto in [2, 4, 5, 6, 7, 7] {
            let from = w.read_from();
            for (ts, name, rcpt, body) in rows[..upto].iter().filter(|r| r.0 >= from) {
                w.add(*ts, "n1", name, rcpt, body);
            }
        }
        let mut full = Window::new(1_000);
        for (ts, name, rcpt, body) in &rows {
            full.add(*ts, "n1", name, rcpt, body);
        }
        let (inc, all) = (w.measurements(&members), full.measurements(&members));
        let table = [
            ("delivered", inc.delivered, all.delivered, 2),
            ("deferred", inc.deferred, all.deferred, 2),
            ("bounced", inc.bounced, all.bounced, 1),
        ];
        for (what, got, from_scratch, want) in table {
            assert_eq!(got, want, "{what}");
            assert_eq!(got, from_scratch, "{what}: incremental = full read");
        }
        assert_eq!(inc.latency_p95_s, all.latency_p95_s);
        assert!(
            inc.latency_p95_s >= 2.0 && inc.latency_p95_s <= 4.0,
            "{inc:?}"
        );
        // A new member (an alias added): what was read for it counts now.
        let more: BTreeSet<String> = ["a@x", "b@x", "c@x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(w.measurements(&more).delivered, 3);
        // The overlap is bounded: only the last OVERLAP_MS of keys is kept.
        assert!(
            w.seen.keys().all(|&t| t >= 90_000 - OVERLAP_MS),
            "{:?}",
            w.seen.keys()
        );
        assert_eq!(w.read_from(), 90_000 - OVERLAP_MS);
    }
}
