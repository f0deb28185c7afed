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
use std::collections::BTreeSet;
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

/// Mail to `members` since `since_ms`: outcomes from the event index, queue
/// age from the relay's queue.
async fn measure(
    store: &Store,
    relay: &Relay,
    members: &BTreeSet<String>,
    since_ms: i64,
) -> Result<Measurements> {
    let rows = godwit_store::sqlx::query(
        "SELECT rcpt, name, body FROM events WHERE ts_ms >= $1 AND name IN ('delivery.delivered', 'delivery.deferred', 'delivery.failed')",
    )
    .bind(since_ms)
    .fetch_all(&store.pool)
    .await?;
    let mut m = Measurements::default();
    let mut lat: Vec<f64> = Vec::new();
    for r in rows {
        let rcpt: Option<String> = r.try_get(0).ok().flatten();
        if !rcpt.is_some_and(|a| members.contains(&a)) {
            continue;
        }
        let name: String = r.try_get(1).unwrap_or_default();
        match name.as_str() {
            "delivery.delivered" => {
                m.delivered += 1;
                if let Some(ms) = r
                    .try_get::<String, _>(2)
                    .ok()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["delay_ms"].as_u64())
                {
                    lat.push(ms as f64 / 1000.0);
                }
            }
            "delivery.deferred" => m.deferred += 1,
            _ => m.bounced += 1,
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    m.latency_p95_s = godwit_evidence::metrics::pct(&lat, 0.95);
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
    let mut out = BTreeSet::new();
    for m in &w.members {
        out.insert(m.address.to_lowercase());
        if let Ok(e) = godwit_route::history::explain(store, config, &m.address).await {
            out.extend(e.aliases.iter().map(|a| a.to_lowercase()));
        }
    }
    Ok(out)
}

async fn tick(config: &Config, store: &Store, relay: &Relay, events: &EventLog) -> Result<()> {
    let node = config.node_name().to_string();
    for row in rows(store, None).await? {
        if row.status != "soaking" || !claim(store, &row.wave, &node).await? {
            continue;
        }
        let thresholds = soak::parse_rollback_if(&row.rollback_if)
            .map_err(|e| anyhow::anyhow!("wave_soaks {}: {e}", row.wave))?;
        let members = members(store, config, &row.wave).await?;
        let m = measure(store, relay, &members, row.started_ms).await?;
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
    loop {
        if let Err(e) = tick(&config, &store, &relay, &events).await {
            tracing::warn!("wave soak: {e:#}");
        }
        tokio::time::sleep(TICK).await;
    }
}
