//! What the dashboard shows, read from the state store: time series over a
//! chosen range (from the event index), wave progress (from the directory,
//! waves and sync state) and the sync panel. The page only draws it.

use crate::metrics::pct;
use godwit_store::{Row, Store};
use serde::Serialize;
use std::collections::BTreeMap;

/// The ranges the dashboard offers, with the bucket each is cut into.
pub fn range_ms(range: &str) -> Option<(i64, i64)> {
    const MIN: i64 = 60_000;
    Some(match range {
        "15m" => (15 * MIN, 15_000),
        "1h" => (60 * MIN, MIN),
        "24h" => (24 * 60 * MIN, 30 * MIN),
        "7d" => (7 * 24 * 60 * MIN, 3 * 60 * MIN),
        _ => return None,
    })
}

/// One chart's worth: bucket start times (seconds, for the time axis), and
/// per bucket the counts, the defer rate and per-platform latency.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Series {
    pub range: String,
    pub bucket_s: i64,
    /// Bucket starts, UNIX seconds.
    pub t: Vec<i64>,
    pub accepted: Vec<u64>,
    pub delivered: Vec<u64>,
    pub deferred: Vec<u64>,
    pub failed: Vec<u64>,
    /// Deferrals as a percentage of delivery outcomes in the bucket
    /// (delivered + deferred + bounced); null when there were none.
    pub defer_pct: Vec<Option<f64>>,
    /// platform -> [p50, p95, p99] per bucket, seconds; null when no delivery.
    pub latency: BTreeMap<String, [Vec<Option<f64>>; 3]>,
    /// Routing versions committed in the range: the charts' markers.
    pub routing_changes: Vec<Marker>,
    /// platform -> successful client logins (IMAP and POP3) per bucket: a
    /// wave's client move shows as logins leaving one platform for another.
    pub logins: BTreeMap<String, Vec<u64>>,
    /// Failed client logins per bucket, and sessions closed by a move.
    pub login_failures: Vec<u64>,
    pub moved: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Marker {
    pub t: i64,
    pub version: i64,
    pub command: String,
}

/// An indexed event: time, name, and for deliveries (platform, delay); for
/// successful client logins (platform, 0).
pub type Point = (i64, String, Option<(String, u64)>);

/// Cuts `events` into buckets of `bucket_ms` from `from_ms` to `to_ms`.
pub fn bucket(events: &[Point], from_ms: i64, to_ms: i64, bucket_ms: i64) -> Series {
    let n = ((to_ms - from_ms) / bucket_ms).max(1) as usize + 1;
    let start = from_ms - from_ms.rem_euclid(bucket_ms);
    let mut s = Series {
        bucket_s: bucket_ms / 1000,
        t: (0..n)
            .map(|i| (start + i as i64 * bucket_ms) / 1000)
            .collect(),
        accepted: vec![0; n],
        delivered: vec![0; n],
        deferred: vec![0; n],
        failed: vec![0; n],
        login_failures: vec![0; n],
        moved: vec![0; n],
        ..Default::default()
    };
    let mut delays: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    for (ts, name, delivery) in events {
        let i = ((ts - start) / bucket_ms) as usize;
        if *ts < start || i >= n {
            continue;
        }
        match name.as_str() {
            "message.accepted" => s.accepted[i] += 1,
            "delivery.delivered" => {
                s.delivered[i] += 1;
                if let Some((platform, delay)) = delivery {
                    delays
                        .entry(platform.clone())
                        .or_insert_with(|| vec![Vec::new(); n])[i]
                        .push(*delay as f64 / 1000.0);
                }
            }
            "delivery.deferred" => s.deferred[i] += 1,
            "delivery.failed" => s.failed[i] += 1,
            "access.login" => match delivery {
                Some((platform, _)) => {
                    s.logins
                        .entry(platform.clone())
                        .or_insert_with(|| vec![0; n])[i] += 1
                }
                None => s.login_failures[i] += 1,
            },
            "access.moved" => s.moved[i] += 1,
            _ => {}
        }
    }
    s.defer_pct = (0..n)
        .map(|i| {
            let outcomes = s.delivered[i] + s.deferred[i] + s.failed[i];
            (outcomes > 0).then(|| s.deferred[i] as f64 * 100.0 / outcomes as f64)
        })
        .collect();
    for (platform, per_bucket) in delays {
        let mut out: [Vec<Option<f64>>; 3] = Default::default();
        for mut d in per_bucket {
            d.sort_by(|a, b| a.total_cmp(b));
            for (k, q) in [0.50, 0.95, 0.99].into_iter().enumerate() {
                out[k].push((!d.is_empty()).then(|| pct(&d, q)));
            }
        }
        s.latency.insert(platform, out);
    }
    s
}

/// The series for `range` ("15m", "1h", "24h", "7d") ending now.
pub async fn series(store: &Store, range: &str, now_ms: i64) -> anyhow::Result<Series> {
    let (span, bucket_ms) = range_ms(range)
        .ok_or_else(|| anyhow::anyhow!("range `{range}`: choose 15m, 1h, 24h or 7d"))?;
    let from = now_ms - span;
    let rows = godwit_store::sqlx::query(
        "SELECT ts_ms, name, body FROM events WHERE ts_ms >= $1 AND name IN ('message.accepted', 'delivery.delivered', 'delivery.deferred', 'delivery.failed', 'access.login', 'access.moved')",
    )
    .bind(from)
    .fetch_all(&store.pool)
    .await?;
    let points: Vec<Point> = rows
        .into_iter()
        .map(|r| {
            let ts: i64 = r.try_get(0).unwrap_or(0);
            let name: String = r.try_get(1).unwrap_or_default();
            let body = || -> Option<serde_json::Value> {
                serde_json::from_str(&r.try_get::<String, _>(2).ok()?).ok()
            };
            let delivery = match name.as_str() {
                "delivery.delivered" => body().and_then(|v| {
                    Some((v["platform"].as_str()?.to_string(), v["delay_ms"].as_u64()?))
                }),
                // A login that failed carries no platform here: it is counted
                // as a failure, not as a session on the platform.
                "access.login" => body()
                    .filter(|v| v["result"] == "ok")
                    .and_then(|v| Some((v["platform"].as_str()?.to_string(), 0))),
                _ => None,
            };
            (ts, name, delivery)
        })
        .collect();
    let mut s = bucket(&points, from, now_ms, bucket_ms);
    s.range = range.to_string();
    s.routing_changes = godwit_store::sqlx::query(
        "SELECT version, at_ms, command FROM routing_versions WHERE at_ms >= $1 ORDER BY version",
    )
    .bind(from)
    .fetch_all(&store.pool)
    .await?
    .into_iter()
    .map(|r| Marker {
        version: r.try_get(0).unwrap_or(0),
        t: r.try_get::<i64, _>(1).unwrap_or(0) / 1000,
        command: r.try_get(2).unwrap_or_default(),
    })
    .collect();
    Ok(s)
}

/// One wave: its members by migration state, and how far their sync is.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WaveProgress {
    pub name: String,
    pub status: String,
    pub members: i64,
    /// Migration state -> members.
    pub states: BTreeMap<String, i64>,
    /// Sync status (seeding, ready, verified) -> members; members sync has
    /// not seen are not counted.
    pub sync: BTreeMap<String, i64>,
    pub verified: i64,
}

/// Every wave's progress, and all mailboxes by migration state.
pub async fn waves(store: &Store) -> anyhow::Result<(Vec<WaveProgress>, BTreeMap<String, i64>)> {
    let mut out: BTreeMap<String, WaveProgress> = BTreeMap::new();
    for r in godwit_store::sqlx::query("SELECT w.name, w.status, COUNT(m.address) FROM waves w LEFT JOIN wave_members m ON m.wave = w.name GROUP BY w.name, w.status")
        .fetch_all(&store.pool)
        .await?
    {
        let name: String = r.try_get(0)?;
        out.insert(
            name.clone(),
            WaveProgress {
                name,
                status: r.try_get(1)?,
                members: r.try_get(2)?,
                ..Default::default()
            },
        );
    }
    for r in godwit_store::sqlx::query("SELECT m.wave, COALESCE(d.state, 'unknown'), COUNT(*) FROM wave_members m LEFT JOIN directory_objects d ON d.address = m.address GROUP BY m.wave, COALESCE(d.state, 'unknown')")
        .fetch_all(&store.pool)
        .await?
    {
        let wave: String = r.try_get(0)?;
        if let Some(w) = out.get_mut(&wave) {
            w.states.insert(r.try_get(1)?, r.try_get(2)?);
        }
    }
    for r in godwit_store::sqlx::query("SELECT m.wave, s.status, COUNT(*) FROM wave_members m JOIN sync_accounts s ON s.address = m.address GROUP BY m.wave, s.status")
        .fetch_all(&store.pool)
        .await?
    {
        let wave: String = r.try_get(0)?;
        if let Some(w) = out.get_mut(&wave) {
            let status: String = r.try_get(1)?;
            let n: i64 = r.try_get(2)?;
            if status == "verified" {
                w.verified = n;
            }
            w.sync.insert(status, n);
        }
    }
    let mut states = BTreeMap::new();
    for r in godwit_store::sqlx::query(
        "SELECT state, COUNT(*) FROM directory_objects WHERE kind <> 'group' GROUP BY state",
    )
    .fetch_all(&store.pool)
    .await?
    {
        states.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok((out.into_values().collect(), states))
}

/// The sync panel: accounts by status, messages copied, the copy rate over
/// the last ten minutes and the time left at that rate.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SyncPanel {
    pub accounts: i64,
    pub status: BTreeMap<String, i64>,
    pub copied: i64,
    pub source: i64,
    pub rate_per_s: f64,
    pub eta_s: Option<i64>,
}

pub async fn sync_panel(store: &Store, now_ms: i64) -> anyhow::Result<SyncPanel> {
    let mut p = SyncPanel::default();
    for r in godwit_store::sqlx::query("SELECT status, COUNT(*) FROM sync_accounts GROUP BY status")
        .fetch_all(&store.pool)
        .await?
    {
        let n: i64 = r.try_get(1)?;
        p.accounts += n;
        p.status.insert(r.try_get(0)?, n);
    }
    p.copied = godwit_store::sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sync_messages")
        .fetch_one(&store.pool)
        .await?;
    p.source = godwit_store::sqlx::query_scalar::<_, Option<i64>>(
        "SELECT SUM(source_exists) FROM sync_folders",
    )
    .fetch_one(&store.pool)
    .await?
    .unwrap_or(0);
    let recent = godwit_store::sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM sync_messages WHERE copied_at_ms >= $1",
    )
    .bind(now_ms - 600_000)
    .fetch_one(&store.pool)
    .await?;
    p.rate_per_s = recent as f64 / 600.0;
    let left = (p.source - p.copied).max(0);
    p.eta_s = (p.rate_per_s > 0.0).then(|| (left as f64 / p.rate_per_s).ceil() as i64);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_rates_and_latency_per_platform() {
        let ev = |t: i64, n: &str| (t, n.to_string(), None);
        let dl = |t: i64, p: &str, d: u64| {
            (
                t,
                "delivery.delivered".to_string(),
                Some((p.to_string(), d)),
            )
        };
        let events = vec![
            ev(1_000, "message.accepted"),
            dl(2_000, "new", 100),
            dl(3_000, "new", 300),
            ev(4_000, "delivery.deferred"),
            ev(9_500, "delivery.deferred"),
            ev(70_000, "message.accepted"), // past the range
        ];
        let s = bucket(&events, 0, 10_000, 5_000);
        assert_eq!(s.t, vec![0, 5, 10]);
        assert_eq!(s.accepted, vec![1, 0, 0]);
        assert_eq!(s.delivered, vec![2, 0, 0]);
        assert_eq!(s.deferred, vec![1, 1, 0]);
        // 1 deferral of 3 outcomes; then 1 of 1; then nothing to divide.
        assert_eq!(s.defer_pct[1], Some(100.0));
        assert!((s.defer_pct[0].unwrap() - 33.333).abs() < 0.01);
        assert_eq!(s.defer_pct[2], None);
        let new = &s.latency["new"];
        assert_eq!(new[0], vec![Some(0.1), None, None]);
        assert_eq!(new[2], vec![Some(0.3), None, None]);
    }

    #[test]
    fn client_logins_per_platform_failures_and_moves() {
        let login = |t: i64, p: Option<&str>| {
            (t, "access.login".to_string(), p.map(|p| (p.to_string(), 0)))
        };
        let events = vec![
            login(1_000, Some("old")),
            login(2_000, Some("old")),
            login(3_000, None),
            (6_000, "access.moved".to_string(), None),
            login(7_000, Some("new")),
        ];
        let s = bucket(&events, 0, 10_000, 5_000);
        assert_eq!(s.logins["old"], vec![2, 0, 0]);
        assert_eq!(s.logins["new"], vec![0, 1, 0]);
        assert_eq!(s.login_failures, vec![1, 0, 0]);
        assert_eq!(s.moved, vec![0, 1, 0]);
        // Logins are not mail: the delivery series stay empty.
        assert_eq!(s.delivered, vec![0, 0, 0]);
    }

    #[test]
    fn ranges() {
        for (r, ok) in [
            ("15m", true),
            ("1h", true),
            ("24h", true),
            ("7d", true),
            ("2x", false),
        ] {
            assert_eq!(range_ms(r).is_some(), ok, "{r}");
        }
    }

    #[tokio::test]
    async fn wave_progress_reads_the_tables_that_exist() {
        let t = godwit_store::testing::sqlite_temp().await;
        let store = t.store.clone();
        for sql in [
            "INSERT INTO waves (name, status, created_version, version) VALUES ('w1', 'created', 1, 1)",
            "INSERT INTO wave_members (wave, address) VALUES ('w1', 'a@example.com'), ('w1', 'b@example.com')",
            "INSERT INTO directory_objects (address, display_name, kind, platform, state, version) VALUES ('a@example.com', 'A', 'user', 'old', 'ready', 1), ('b@example.com', 'B', 'user', 'old', 'seeding', 1)",
            "INSERT INTO sync_accounts (address, status, status_at_ms, verified_at_ms) VALUES ('a@example.com', 'verified', 1, 1)",
        ] {
            godwit_store::sqlx::query(sql)
                .execute(&store.pool)
                .await
                .unwrap();
        }
        let (waves, states) = waves(&store).await.unwrap();
        assert_eq!(waves.len(), 1);
        let w = &waves[0];
        assert_eq!((w.name.as_str(), w.members, w.verified), ("w1", 2, 1));
        assert_eq!(w.states["ready"], 1);
        assert_eq!(w.states["seeding"], 1);
        assert_eq!(states["ready"], 1);
    }
}
