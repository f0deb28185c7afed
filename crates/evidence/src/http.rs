//! The admin listener: Prometheus metrics, the dashboard and its JSON API.
//! It listens on loopback by default; anywhere else it requires the token.

use crate::metrics::Metrics;
use crate::trace;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use godwit_relay::Relay;
use godwit_route::SharedRoutes;
use godwit_spool::RcptStatus;
use godwit_store::{Row, Store};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every status sync gives an account (godwit_imap::Status): each account
/// has one gauge per status, 1 for the one it is in, so an alert on
/// `status="differs"` (verify found a difference; the cutover guard refuses
/// the account) works before any account has differed.
pub const SYNC_STATUSES: [&str; 4] = ["seeding", "ready", "verified", "differs"];

pub fn sync_status_gauges(status: &str) -> [(&'static str, f64); 4] {
    SYNC_STATUSES.map(|s| (s, if s == status { 1.0 } else { 0.0 }))
}

#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub relay: Relay,
    pub routes: SharedRoutes,
    pub store: Store,
    pub node: String,
    pub token: Option<String>,
    samples: Arc<Mutex<VecDeque<Sample>>>,
    /// The access front's live sessions, (platform, protocol) -> count;
    /// None when `[access]` is not configured.
    client_sessions: Option<ClientSessions>,
}

/// Reads the access front's sessions at the moment of the request.
pub type ClientSessions = Arc<dyn Fn() -> BTreeMap<(String, String), usize> + Send + Sync>;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t: i64,
    pub depth: usize,
    pub accepted: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueGauges {
    pub messages: usize,
    /// platform -> state -> recipients
    pub recipients: BTreeMap<String, BTreeMap<String, usize>>,
    pub oldest_age_s: f64,
}

impl Admin {
    pub fn new(
        metrics: Arc<Metrics>,
        relay: Relay,
        routes: SharedRoutes,
        store: Store,
        node: String,
        token: Option<String>,
    ) -> Admin {
        Admin {
            metrics,
            relay,
            routes,
            store,
            node,
            token,
            samples: Default::default(),
            client_sessions: None,
        }
    }

    /// The dashboard shows client sessions per platform next to mail flow.
    pub fn with_client_sessions(mut self, f: ClientSessions) -> Admin {
        self.client_sessions = Some(f);
        self
    }

    pub fn queue_gauges(&self) -> QueueGauges {
        let snap = self.relay.snapshot();
        let now = godwit_spool::now_ms();
        let mut recipients: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        let mut oldest = now;
        for m in &snap {
            oldest = oldest.min(m.arrival_ms);
            for (addr, status, _, route) in &m.rcpts {
                if status.is_final() {
                    continue;
                }
                let platform = route
                    .clone()
                    .unwrap_or_else(|| self.routes.decide(addr).route);
                let state = match status {
                    RcptStatus::Pending => "pending",
                    RcptStatus::Deferred => "deferred",
                    RcptStatus::Held => "held",
                    _ => "other",
                };
                *recipients
                    .entry(platform)
                    .or_default()
                    .entry(state.into())
                    .or_default() += 1;
            }
        }
        QueueGauges {
            messages: snap.len(),
            recipients,
            oldest_age_s: if snap.is_empty() {
                0.0
            } else {
                (now - oldest) as f64 / 1000.0
            },
        }
    }

    /// Sets the gauges that are sampled rather than counted.
    fn sample_gauges(&self) {
        let q = self.queue_gauges();
        let dests = self.relay.destinations();
        let version = self.routes.version();
        self.metrics.with(|| {
            metrics::gauge!("godwit_queue_messages").set(q.messages as f64);
            for p in dests.keys() {
                for s in ["pending", "deferred", "held"] {
                    let n = q.recipients.get(p).and_then(|m| m.get(s)).copied().unwrap_or(0);
                    metrics::gauge!("godwit_queue_recipients", "platform" => p.clone(), "state" => s).set(n as f64);
                }
            }
            for (p, states) in &q.recipients {
                if !dests.contains_key(p) {
                    for (s, n) in states {
                        metrics::gauge!("godwit_queue_recipients", "platform" => p.clone(), "state" => s.clone()).set(*n as f64);
                    }
                }
            }
            metrics::gauge!("godwit_queue_oldest_message_age_seconds").set(q.oldest_age_s);
            for (p, d) in &dests {
                metrics::gauge!("godwit_destination_concurrency_limit", "platform" => p.clone()).set(d.limit as f64);
                metrics::gauge!("godwit_destination_in_flight", "platform" => p.clone()).set(d.in_flight as f64);
                metrics::gauge!("godwit_destination_circuit_open", "platform" => p.clone()).set(if d.circuit == "open" { 1.0 } else { 0.0 });
                metrics::gauge!("godwit_destination_relay_hosts_down", "platform" => p.clone()).set(d.down_hosts.len() as f64);
            }
            metrics::gauge!("godwit_routing_version").set(version as f64);
            let ev = self.relay.events();
            metrics::gauge!("godwit_event_readers_pending").set(ev.pending() as f64);
            metrics::gauge!("godwit_event_readers_pending_peak").set(ev.pending_peak() as f64);
            metrics::counter!("godwit_event_flow_delay_milliseconds_total")
                .absolute(ev.flow_waited().as_millis() as u64);
        });
    }

    /// Sync progress per account, from the sync state in the store.
    async fn sample_sync(&self) {
        let q = |sql: &'static str| godwit_store::sqlx::query(sql).fetch_all(&self.store.pool);
        let status = q("SELECT address, status, COALESCE(verified_at_ms, 0) FROM sync_accounts")
            .await
            .unwrap_or_default();
        let copied = q("SELECT address, COUNT(*) FROM sync_messages GROUP BY address")
            .await
            .unwrap_or_default();
        let source = q("SELECT address, SUM(source_exists) FROM sync_folders GROUP BY address")
            .await
            .unwrap_or_default();
        self.metrics.with(|| {
            for r in status {
                let (a, st, v): (String, String, i64) = (r.try_get(0).unwrap_or_default(), r.try_get(1).unwrap_or_default(), r.try_get(2).unwrap_or(0));
                for (s, v) in sync_status_gauges(&st) {
                    metrics::gauge!("godwit_sync_account_status", "account" => a.clone(), "status" => s).set(v);
                }
                metrics::gauge!("godwit_sync_account_verified_timestamp_seconds", "account" => a).set(v as f64 / 1000.0);
            }
            for r in copied {
                let (a, n): (String, i64) = (r.try_get(0).unwrap_or_default(), r.try_get(1).unwrap_or(0));
                metrics::gauge!("godwit_sync_account_messages_copied", "account" => a).set(n as f64);
            }
            for r in source {
                let (a, n): (String, i64) = (r.try_get(0).unwrap_or_default(), r.try_get(1).unwrap_or(0));
                metrics::gauge!("godwit_sync_account_messages_source", "account" => a).set(n as f64);
            }
        });
    }

    /// Every gateway that heartbeats in this store: (node, seen_ms, spool
    /// depth, oldest message's arrival ms). On a shared PostgreSQL store,
    /// the whole fleet.
    async fn fleet_gateways(&self) -> Vec<(String, i64, i64, i64)> {
        // Bounded: with the store down, /metrics must still answer at once
        // (it is how `godwit_store_up 0` is seen).
        let rows = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            godwit_store::sqlx::query(
                "SELECT node, seen_ms, queue_len, oldest_ms FROM gateway_nodes ORDER BY node",
            )
            .fetch_all(&self.store.pool),
        )
        .await;
        rows.ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                (
                    r.try_get(0).unwrap_or_default(),
                    r.try_get(1).unwrap_or(0),
                    r.try_get(2).unwrap_or(0),
                    r.try_get(3).unwrap_or(0),
                )
            })
            .collect()
    }

    /// This endpoint's metrics are this node's (`godwit_node_info` names
    /// it); the `godwit_fleet_*` gauges cover every gateway of the store,
    /// from their heartbeats, with a `node` label.
    async fn sample_fleet(&self) {
        let gateways = self.fleet_gateways().await;
        let now = godwit_spool::now_ms();
        self.metrics.with(|| {
            metrics::gauge!("godwit_node_info", "node" => self.node.clone()).set(1.0);
            for (node, seen, depth, oldest) in gateways {
                let up = if now - seen <= 3000 { 1.0 } else { 0.0 };
                metrics::gauge!("godwit_fleet_gateway_up", "node" => node.clone()).set(up);
                metrics::gauge!("godwit_fleet_queue_messages", "node" => node.clone())
                    .set(depth as f64);
                let age = if oldest > 0 {
                    (now - oldest) as f64 / 1000.0
                } else {
                    0.0
                };
                metrics::gauge!("godwit_fleet_queue_oldest_message_age_seconds", "node" => node)
                    .set(age);
            }
        });
    }

    /// Samples the queue every 2 s for the dashboard's charts (10 minutes kept).
    pub async fn run_sampler(self) {
        loop {
            let st = self.metrics.stats.lock().unwrap().clone();
            let s = Sample {
                t: godwit_spool::now_ms(),
                depth: self.relay.len(),
                accepted: st.accepted,
                delivered: st.delivered.values().sum(),
                deferred: st.deferred.values().sum(),
                failed: st.failed.values().sum(),
            };
            {
                let mut q = self.samples.lock().unwrap();
                q.push_back(s);
                if q.len() > 300 {
                    q.pop_front();
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// A failed read is shown on the page and logged, never silently empty.
    fn store_read<T: Default>(
        &self,
        what: &str,
        errors: &mut Vec<String>,
        r: anyhow::Result<T>,
    ) -> T {
        r.unwrap_or_else(|e| {
            tracing::warn!("dashboard: {what}: {e:#}");
            errors.push(format!("{what}: {e:#}"));
            T::default()
        })
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(dashboard))
            .route("/api/series", get(series_api))
            .route("/metrics", get(metrics_text))
            .route("/api/summary", get(summary))
            .route("/api/trace", get(trace_api))
            .route("/api/soaks", get(soaks_api))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                require_token,
            ))
            .with_state(self)
    }

    fn authorized(&self, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
        let Some(token) = self.token.as_deref().filter(|t| !t.is_empty()) else {
            return true;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare without an early exit on the first differing byte.
        let eq = |a: &str| {
            a.len() == token.len()
                && a.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        };
        bearer.is_some_and(eq) || query.get("token").is_some_and(|t| eq(t))
    }
}

/// Every route needs the token when one is configured.
async fn require_token(
    State(a): State<Admin>,
    Query(q): Query<HashMap<String, String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !a.authorized(request.headers(), &q) {
        return denied();
    }
    next.run(request).await
}

fn denied() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "admin token required: Authorization: Bearer TOKEN\n",
    )
        .into_response()
}

/// The page with uPlot (MIT, vendored under src/vendor) inlined: no CDN, no
/// second request that would need the token again.
async fn dashboard() -> Response {
    static PAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let page = PAGE.get_or_init(|| {
        include_str!("dashboard.html").replace(
            "<!-- uPlot -->",
            &format!(
                "<style>{}</style>\n<script>{}</script>",
                include_str!("vendor/uPlot.min.css"),
                include_str!("vendor/uPlot.iife.min.js")
            ),
        )
    });
    Html(page.as_str()).into_response()
}

async fn series_api(State(a): State<Admin>, Query(q): Query<HashMap<String, String>>) -> Response {
    let range = q.get("range").map(String::as_str).unwrap_or("1h");
    if crate::dashboard::range_ms(range).is_none() {
        return (
            StatusCode::BAD_REQUEST,
            format!("range `{range}`: choose 15m, 1h, 24h or 7d\n"),
        )
            .into_response();
    }
    match crate::dashboard::series(&a.store, range, godwit_spool::now_ms()).await {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
    }
}

/// What the trace box looks up, in order: `<...>` is a Message-ID, text
/// without `@` a queue ID; `local@domain` may be either (Message-IDs look
/// like addresses, RFC 5322 3.6.4), so the Message-ID is tried first, then
/// the recipient over the event retention.
pub fn trace_queries(key: &str) -> Vec<trace::Query> {
    let key = key.trim();
    let by_key = trace::Query {
        key: Some(key.to_string()),
        ..Default::default()
    };
    if key.starts_with('<') || !key.contains('@') {
        return vec![by_key];
    }
    vec![
        by_key,
        trace::Query {
            rcpt: Some(key.to_string()),
            ..Default::default()
        },
    ]
}

async fn metrics_text(State(a): State<Admin>) -> Response {
    a.sample_gauges();
    a.sample_sync().await;
    a.sample_fleet().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        a.metrics.handle.render(),
    )
        .into_response()
}

async fn summary(State(a): State<Admin>) -> Response {
    let stats = a.metrics.stats.lock().unwrap().clone();
    let percentiles = stats.percentiles();
    let samples: Vec<Sample> = a.samples.lock().unwrap().iter().cloned().collect();
    let changes = godwit_store::sqlx::query("SELECT version, at_ms, actor, command FROM routing_versions ORDER BY version DESC LIMIT 10")
        .fetch_all(&a.store.pool)
        .await
        .map(|rows| {
            rows.into_iter()
                .map(|r| {
                    serde_json::json!({
                        "version": r.try_get::<i64, _>(0).unwrap_or(0),
                        "at_ms": r.try_get::<i64, _>(1).unwrap_or(0),
                        "actor": r.try_get::<String, _>(2).unwrap_or_default(),
                        "command": r.try_get::<String, _>(3).unwrap_or_default(),
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let now = godwit_spool::now_ms();
    let mut errors = Vec::new();
    let (waves, mailboxes) = a.store_read(
        "wave progress",
        &mut errors,
        crate::dashboard::waves(&a.store).await,
    );
    let sync = a.store_read(
        "sync progress",
        &mut errors,
        crate::dashboard::sync_panel(&a.store, now).await,
    );
    // platform -> protocol -> sessions; null without an access front.
    let client_sessions = a.client_sessions.as_ref().map(|f| {
        let mut by: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for ((platform, protocol), n) in f() {
            by.entry(platform).or_default().insert(protocol, n);
        }
        by
    });
    // Which nodes the page covers: the queue, destinations and counters are
    // this node's; the charts and waves come from the store, so all of them.
    let now_fleet = godwit_spool::now_ms();
    let fleet: Vec<serde_json::Value> = a
        .fleet_gateways()
        .await
        .into_iter()
        .map(|(node, seen, depth, oldest)| {
            serde_json::json!({
                "node": node,
                "live": now_fleet - seen <= 3000,
                "spool_depth": depth,
                "oldest_message_ms": (oldest > 0).then_some(oldest),
            })
        })
        .collect();
    Json(serde_json::json!({
        "node": a.node,
        "fleet": fleet,
        "client_sessions": client_sessions,
        "now_ms": godwit_spool::now_ms(),
        "routing_version": a.routes.version(),
        "stats": stats,
        "percentiles": percentiles,
        "queue": a.queue_gauges(),
        "destinations": a.relay.destinations(),
        "samples": samples,
        "routing_changes": changes,
        "waves": waves,
        "mailboxes": mailboxes,
        "sync": sync,
        "errors": errors,
    }))
    .into_response()
}

async fn trace_api(State(a): State<Admin>, Query(q): Query<HashMap<String, String>>) -> Response {
    let key = q.get("q").cloned().unwrap_or_default();
    let mut found = Ok(Vec::new());
    for query in trace_queries(&key) {
        found = trace::find(&a.store, &query).await;
        if found.as_ref().is_ok_and(|t| !t.is_empty()) {
            break;
        }
    }
    match found {
        Ok(traces) => {
            let text: String = traces
                .iter()
                .map(trace::render)
                .collect::<Vec<_>>()
                .join("\n");
            Json(serde_json::json!({ "traces": traces, "text": text })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The waves' soaks as `godwit wave watch` shows them (the `wave_soaks`
/// rows), for the dashboard and scripts.
async fn soaks_api(State(a): State<Admin>) -> Response {
    let rows = godwit_store::sqlx::query(
        "SELECT wave, started_ms, until_ms, rollback_if, status, owner, measured_ms, measurements, breach, rollback_version FROM wave_soaks ORDER BY wave",
    )
    .fetch_all(&a.store.pool)
    .await;
    match rows {
        Ok(rows) => {
            let soaks: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let s = |i: usize| r.try_get::<Option<String>, _>(i).ok().flatten();
                    let n = |i: usize| r.try_get::<Option<i64>, _>(i).ok().flatten();
                    serde_json::json!({
                        "wave": s(0),
                        "started_ms": n(1),
                        "until_ms": n(2),
                        "rollback_if": s(3),
                        "status": s(4),
                        "owner": s(5),
                        "measured_ms": n(6),
                        "measurements": s(7).and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok()),
                        "breach": s(8),
                        "rollback_version": n(9),
                    })
                })
                .collect();
            Json(serde_json::json!({ "soaks": soaks })).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves the admin listener until the process ends.
pub async fn serve(admin: Admin, listener: tokio::net::TcpListener) {
    if let Err(e) = axum::serve(listener, admin.router()).await {
        tracing::error!("admin listener: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_box_tries_the_message_id_then_the_recipient() {
        let kinds = |k: &str| -> Vec<(bool, bool)> {
            trace_queries(k)
                .iter()
                .map(|q| (q.key.is_some(), q.rcpt.is_some()))
                .collect()
        };
        // A recipient with a dot in its domain is tried as a recipient too.
        assert_eq!(kinds("alice@example.com"), [(true, false), (false, true)]);
        assert_eq!(kinds("<abc.123@mx.example>"), [(true, false)]);
        assert_eq!(kinds("7F3A2B1C"), [(true, false)]);
        assert_eq!(
            trace_queries(" bob@example.org ")[1].rcpt.as_deref(),
            Some("bob@example.org")
        );
    }
}

#[cfg(test)]
mod sync_status_tests {
    use super::*;

    #[test]
    fn one_gauge_per_status_and_differs_is_one_of_them() {
        for (status, hot) in [
            ("seeding", 0),
            ("ready", 1),
            ("verified", 2),
            ("differs", 3),
            ("unknown", 9),
        ] {
            let g = sync_status_gauges(status);
            for (i, (_, v)) in g.iter().enumerate() {
                assert_eq!(*v, if i == hot { 1.0 } else { 0.0 }, "{status}: {g:?}");
            }
        }
        assert_eq!(sync_status_gauges("differs")[3], ("differs", 1.0));
    }
}
