//! Metrics. Counters and histograms are fed by the event stream; gauges are
//! sampled from the queue and the destinations at scrape time. Names follow
//! Prometheus conventions (`_total`, `_seconds`, base units).

use godwit_events::{Delays, Event, Record};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedReceiver;

/// Latency buckets (seconds): from loopback speed to a day in the queue.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 14400.0, 86400.0,
];

/// Exact counts kept beside the recorder, for the dashboard and reports.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub accepted: u64,
    pub refused: u64,
    pub delivered: BTreeMap<String, u64>,
    pub deferred: BTreeMap<String, u64>,
    pub failed: BTreeMap<String, u64>,
    pub dsn: u64,
    pub routing_version: i64,
    /// Per platform, the delay breakdown summed over every delivered,
    /// deferred and bounced recipient (Postfix's delays=a/b/c/d).
    pub delays: BTreeMap<String, DelaySums>,
    /// "inbound" and "outbound" counted apart (issue 14's evidence: mail
    /// leaving for the internet is not mixed into the inbound figures).
    pub by_direction: BTreeMap<String, DirectionCounts>,
    #[serde(skip)]
    pub latencies: BTreeMap<String, VecDeque<f64>>,
}

impl Stats {
    /// p50/p95/p99 of the most recent deliveries per platform (seconds).
    pub fn percentiles(&self) -> BTreeMap<String, [f64; 3]> {
        self.latencies
            .iter()
            .map(|(p, v)| {
                let mut s: Vec<f64> = v.iter().copied().collect();
                s.sort_by(f64::total_cmp);
                (p.clone(), [pct(&s, 0.50), pct(&s, 0.95), pct(&s, 0.99)])
            })
            .collect()
    }
}

/// One direction's messages accepted and recipient outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct DirectionCounts {
    pub accepted: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub failed: u64,
}

pub const INBOUND: &str = "inbound";
pub const OUTBOUND: &str = "outbound";

/// The direction of an accepted message: the event's `direction`
/// (`outbound` when a recipient is outside our domains), else inbound.
pub fn accepted_direction(direction: Option<&str>) -> &'static str {
    match direction {
        Some(OUTBOUND) => OUTBOUND,
        _ => INBOUND,
    }
}

/// The direction of a delivery outcome, by its destination: `mx:DOMAIN`
/// and `smarthost:PLATFORM` are the outbound edge; platforms are inbound.
pub fn delivery_direction(platform: &str) -> &'static str {
    if platform.starts_with("mx:") || platform.starts_with("smarthost:") {
        OUTBOUND
    } else {
        INBOUND
    }
}

/// Sums of [`Delays`] over `n` recipient outcomes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
pub struct DelaySums {
    pub n: u64,
    pub accept_ms: u64,
    pub queue_ms: u64,
    pub connect_ms: u64,
    pub transmit_ms: u64,
}

impl DelaySums {
    pub fn add(&mut self, d: &Delays) {
        self.n += 1;
        self.accept_ms += d.accept_ms;
        self.queue_ms += d.queue_ms;
        self.connect_ms += d.connect_ms;
        self.transmit_ms += d.transmit_ms;
    }

    /// Mean seconds per stage: accept, queue, connect, transmit.
    pub fn means(&self) -> [f64; 4] {
        let n = self.n.max(1) as f64 * 1000.0;
        [
            self.accept_ms as f64 / n,
            self.queue_ms as f64 / n,
            self.connect_ms as f64 / n,
            self.transmit_ms as f64 / n,
        ]
    }
}

/// The stage names of the delay breakdown, in Postfix's a/b/c/d order.
pub const DELAY_STAGES: [&str; 4] = ["accept", "queue", "connect", "transmit"];

fn record_delays(st: &mut Stats, platform: &str, outcome: &'static str, d: &Delays) {
    st.delays.entry(platform.to_string()).or_default().add(d);
    for (stage, ms) in
        DELAY_STAGES
            .iter()
            .zip([d.accept_ms, d.queue_ms, d.connect_ms, d.transmit_ms])
    {
        metrics::histogram!("godwit_delivery_delay_seconds", "platform" => platform.to_string(), "stage" => *stage, "outcome" => outcome).record(ms as f64 / 1000.0);
    }
}

pub fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn class(code: &str) -> String {
    code.chars()
        .next()
        .map(|c| format!("{c}xx"))
        .unwrap_or_else(|| "none".into())
}

/// The reply's enhanced code ("4.7.1") if it has one, else its basic code.
pub fn code_of(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let first = words.next().unwrap_or("");
    let second = words.next().unwrap_or("");
    let enhanced = |w: &str| {
        w.split('.').count() == 3
            && w.split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    };
    if enhanced(second) {
        second.to_string()
    } else if enhanced(first) || (first.len() == 3 && first.chars().all(|c| c.is_ascii_digit())) {
        first.to_string()
    } else {
        "none".into()
    }
}

pub struct Metrics {
    pub handle: PrometheusHandle,
    recorder: Arc<PrometheusRecorder>,
    pub stats: Arc<Mutex<Stats>>,
}

impl Metrics {
    /// A recorder of our own (not the global one), so tests and several
    /// gateways in one process never share counters.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        Metrics {
            handle,
            recorder: Arc::new(recorder),
            stats: Default::default(),
        }
    }

    /// `# HELP` for every metric, and the counters of known label sets at 0,
    /// so `rate()` works from the first scrape rather than after the first
    /// event of each kind.
    pub fn describe(&self, platforms: &[String]) {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        self.with(|| {
            for (name, help) in [
                ("godwit_connections_total", "SMTP connections opened."),
                ("godwit_connections_refused_total", "SMTP connections refused before the greeting, by reason."),
                ("godwit_messages_accepted_total", "Messages accepted (made durable, answered 250)."),
                ("godwit_messages_accepted_bytes_total", "Bytes of accepted messages."),
                ("godwit_messages_refused_total", "Commands or messages refused, by stage and reply code."),
                ("godwit_deliveries_total", "Delivery outcomes per recipient, by platform, outcome, reply class and code."),
                ("godwit_dsn_total", "Delivery status notifications queued, by action."),
                ("godwit_event_flow_delay_milliseconds_total", "Time new mail and new attempts waited for lagging event readers (events.max_lag)."),
            ] {
                describe_counter!(name, help);
            }
            describe_histogram!(
                "godwit_delivery_latency_seconds",
                metrics::Unit::Seconds,
                "Accept-to-delivered time per recipient, by platform."
            );
            describe_histogram!(
                "godwit_delivery_delay_seconds",
                metrics::Unit::Seconds,
                "Where each delivered, deferred or bounced recipient's time went, by platform, stage (accept, queue, connect, transmit: Postfix's delays=a/b/c/d) and outcome."
            );
            for (name, help) in [
                ("godwit_queue_messages", "Messages in the queue."),
                ("godwit_queue_recipients", "Undelivered recipients, by platform and state."),
                ("godwit_queue_oldest_message_age_seconds", "Age of the oldest queued message."),
                ("godwit_destination_concurrency_limit", "The adaptive concurrency limit per platform."),
                ("godwit_destination_in_flight", "Deliveries in progress per platform."),
                ("godwit_destination_circuit_open", "1 while the platform's circuit breaker is open."),
                ("godwit_destination_relay_hosts_down", "Relay hosts passed over after connection failures."),
                ("godwit_routing_version", "The routing version this gateway applies."),
                ("godwit_store_up", "1 while the state store answers this gateway's heartbeat, 0 while it does not."),
                ("godwit_event_readers_pending", "Event records the log writer or the index has not yet finished with."),
                ("godwit_event_readers_pending_peak", "The most event records pending at once since start (bounded by events.max_lag plus the work under way)."),
                ("godwit_sync_account_status", "1 for the account's current sync status."),
                ("godwit_sync_account_verified_timestamp_seconds", "When the account last verified clean."),
                ("godwit_sync_account_messages_copied", "Messages copied for the account."),
                ("godwit_sync_account_messages_source", "Messages in the account's source folders."),
            ] {
                describe_gauge!(name, help);
            }
            metrics::counter!("godwit_connections_total").absolute(0);
            metrics::counter!("godwit_messages_accepted_total").absolute(0);
            metrics::counter!("godwit_messages_accepted_bytes_total").absolute(0);
            for reason in ["max_connections", "max_connections_per_ip"] {
                metrics::counter!("godwit_connections_refused_total", "reason" => reason).absolute(0);
            }
            for action in ["failed", "delayed"] {
                metrics::counter!("godwit_dsn_total", "action" => action).absolute(0);
            }
            // The generic code of each outcome (RFC 3463 X.0.0), as the
            // Postfix-style log uses when a reply has none.
            for p in platforms {
                for (outcome, class, code) in [
                    ("delivered", "2xx", "2.0.0"),
                    ("deferred", "4xx", "4.0.0"),
                    ("failed", "5xx", "5.0.0"),
                ] {
                    metrics::counter!("godwit_deliveries_total", "platform" => p.clone(), "outcome" => outcome, "class" => class, "code" => code).absolute(0);
                }
            }
        });
    }

    pub fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&*self.recorder, f)
    }

    pub fn observe(&self, r: &Record) {
        let mut st = self.stats.lock().unwrap();
        self.with(|| match &r.event {
            Event::ConnectionOpened { .. } => metrics::counter!("godwit_connections_total").increment(1),
            Event::ConnectionRefused { reason, .. } => metrics::counter!("godwit_connections_refused_total", "reason" => reason.clone()).increment(1),
            Event::SubmissionAuth { listener, result, reason, .. } => {
                let reason = reason.clone().unwrap_or_else(|| "ok".into());
                metrics::counter!("godwit_submission_auth_total", "listener" => listener.clone(), "result" => result.clone(), "reason" => reason).increment(1);
            }
            Event::SubmissionLockout { .. } => metrics::counter!("godwit_submission_lockouts_total").increment(1),
            Event::MessageAccepted { size, direction, .. } => {
                st.accepted += 1;
                st.by_direction.entry(accepted_direction(direction.as_deref()).into()).or_default().accepted += 1;
                metrics::counter!("godwit_messages_accepted_total").increment(1);
                if let Some(d) = direction {
                    metrics::counter!("godwit_messages_accepted_by_direction_total", "direction" => d.clone()).increment(1);
                }
                metrics::counter!("godwit_messages_accepted_bytes_total").increment(*size);
            }
            Event::MessageRefused { stage, reply, .. } => {
                st.refused += 1;
                metrics::counter!("godwit_messages_refused_total", "stage" => stage.clone(), "code" => code_of(reply)).increment(1);
            }
            Event::Delivered { platform, delay_ms, delays, .. } => {
                *st.delivered.entry(platform.clone()).or_default() += 1;
                st.by_direction.entry(delivery_direction(platform).into()).or_default().delivered += 1;
                record_delays(&mut st, platform, "delivered", delays);
                let secs = *delay_ms as f64 / 1000.0;
                let lat = st.latencies.entry(platform.clone()).or_default();
                lat.push_back(secs);
                if lat.len() > 10_000 {
                    lat.pop_front();
                }
                metrics::counter!("godwit_deliveries_total", "platform" => platform.clone(), "outcome" => "delivered", "class" => "2xx", "code" => "2.0.0").increment(1);
                metrics::histogram!("godwit_delivery_latency_seconds", "platform" => platform.clone()).record(secs);
            }
            Event::Deferred { platform, reply, delays, .. } => {
                *st.deferred.entry(platform.clone()).or_default() += 1;
                st.by_direction.entry(delivery_direction(platform).into()).or_default().deferred += 1;
                record_delays(&mut st, platform, "deferred", delays);
                let code = code_of(reply);
                metrics::counter!("godwit_deliveries_total", "platform" => platform.clone(), "outcome" => "deferred", "class" => class(&code), "code" => code).increment(1);
            }
            Event::Failed { platform, reply, delays, .. } => {
                *st.failed.entry(platform.clone()).or_default() += 1;
                st.by_direction.entry(delivery_direction(platform).into()).or_default().failed += 1;
                record_delays(&mut st, platform, "failed", delays);
                let code = code_of(reply);
                metrics::counter!("godwit_deliveries_total", "platform" => platform.clone(), "outcome" => "failed", "class" => class(&code), "code" => code).increment(1);
            }
            Event::DsnQueued { action, .. } => {
                st.dsn += 1;
                metrics::counter!("godwit_dsn_total", "action" => action.clone()).increment(1);
            }
            Event::RouteChanged { version, .. } => {
                st.routing_version = *version;
                metrics::gauge!("godwit_routing_version").set(*version as f64);
            }
            Event::StoreState { up, .. } => {
                metrics::gauge!("godwit_store_up").set(if *up { 1.0 } else { 0.0 });
            }
            Event::GatewayStarted { routing_version, .. } => {
                st.routing_version = *routing_version;
                metrics::gauge!("godwit_routing_version").set(*routing_version as f64);
            }
            _ => {}
        });
    }

    pub async fn run(self: Arc<Self>, mut rx: UnboundedReceiver<Arc<godwit_events::Logged>>) {
        while let Some(r) = rx.recv().await {
            self.observe(&r);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_table() {
        for (direction, want) in [
            (Some("outbound"), OUTBOUND),
            (None, INBOUND),
            (Some("inbound"), INBOUND),
        ] {
            assert_eq!(accepted_direction(direction), want, "{direction:?}");
        }
        for (platform, want) in [
            ("mx:foreign.example", OUTBOUND),
            ("smarthost:new", OUTBOUND),
            ("old", INBOUND),
            ("new", INBOUND),
            // A platform that happens to be named like a host is still one.
            ("mx1", INBOUND),
        ] {
            assert_eq!(delivery_direction(platform), want, "{platform}");
        }
    }

    #[test]
    fn codes_and_percentiles() {
        assert_eq!(code_of("451 4.7.1 slow down"), "4.7.1");
        assert_eq!(code_of("4.4.1 platform down"), "4.4.1");
        assert_eq!(code_of("421 closing"), "421");
        let v: Vec<f64> = (1..=100).map(|x| x as f64).collect();
        assert_eq!(
            (pct(&v, 0.5), pct(&v, 0.95), pct(&v, 0.99)),
            (50.0, 95.0, 99.0)
        );
    }

    #[test]
    fn help_lines_and_zeroed_counters_before_any_event() {
        let m = Metrics::new();
        m.describe(&["old".into(), "new".into()]);
        let text = m.handle.render();
        for line in [
            "# HELP godwit_messages_accepted_total Messages accepted",
            "# HELP godwit_deliveries_total ",
            "godwit_messages_accepted_total 0",
            "godwit_deliveries_total{platform=\"new\",outcome=\"deferred\",class=\"4xx\",code=\"4.0.0\"} 0",
            "godwit_deliveries_total{platform=\"old\",outcome=\"delivered\",class=\"2xx\",code=\"2.0.0\"} 0",
        ] {
            assert!(text.contains(line), "no `{line}` in\n{text}");
        }
    }

    #[test]
    fn counters_and_histogram_from_events() {
        let m = Metrics::new();
        let rec = |event| Record {
            ts: String::new(),
            node: "n".into(),
            event,
        };
        for i in 0..3 {
            m.observe(&rec(Event::Delivered {
                queue_id: format!("Q{i}"),
                message_id: None,
                rcpt: "a@x".into(),
                platform: "new".into(),
                host: "h".into(),
                reply: "250 ok".into(),
                remote_queue_id: None,
                delay_ms: 100 * (i + 1),
                delays: Delays {
                    accept_ms: 10,
                    queue_ms: 20,
                    connect_ms: 30,
                    transmit_ms: 40 + 100 * i,
                },
            }));
        }
        m.observe(&rec(Event::Deferred {
            queue_id: "Q".into(),
            message_id: None,
            rcpt: "a@x".into(),
            platform: "new".into(),
            host: None,
            reply: "451 4.7.1 throttled".into(),
            attempts: 1,
            next_attempt_in_s: 1,
            delays: Delays {
                queue_ms: 2000,
                ..Default::default()
            },
        }));
        let text = m.handle.render();
        // The breakdown per platform, stage and outcome.
        assert!(
            text.contains("godwit_delivery_delay_seconds_count{platform=\"new\",stage=\"transmit\",outcome=\"delivered\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("godwit_delivery_delay_seconds_sum{platform=\"new\",stage=\"queue\",outcome=\"deferred\"} 2"),
            "{text}"
        );
        let sums = m.stats.lock().unwrap().delays["new"];
        assert_eq!((sums.n, sums.transmit_ms, sums.queue_ms), (4, 420, 2060));
        assert!(text.contains("godwit_deliveries_total{platform=\"new\",outcome=\"delivered\",class=\"2xx\",code=\"2.0.0\"} 3"), "{text}");
        assert!(text.contains("code=\"4.7.1\"} 1"), "{text}");
        assert!(
            text.contains("godwit_delivery_latency_seconds_count{platform=\"new\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("godwit_delivery_latency_seconds_bucket{platform=\"new\",le=\"0.25\"} 2"),
            "{text}"
        );
        assert_eq!(m.stats.lock().unwrap().percentiles()["new"][0], 0.2);
    }
}
