//! A wave's soak: after `wave cutover NAME --soak 2h --rollback-if ...`, the
//! gateway watches mail to the wave's members and rolls the wave back by
//! itself when a threshold is crossed (Phase 5: "monitor delays, bounces";
//! mini-story 3: pause when the destination throttles). The thresholds are
//! parsed and validated here, before anything moves; the decision is a pure
//! function of the measurements, so a table test covers it.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a threshold measures, over mail to the wave's members since the cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Deferred outcomes over all outcomes (delivered, deferred, bounced), in %.
    DeferRate,
    /// Deferrals, counted.
    Deferrals,
    /// Bounces (permanent failures), counted.
    Bounces,
    /// Age of the oldest queued message for a member.
    QueueAge,
    /// 95th percentile of accept-to-delivered time.
    LatencyP95,
}

impl Metric {
    pub const ALL: [(&'static str, Metric); 5] = [
        ("defer_rate", Metric::DeferRate),
        ("deferrals", Metric::Deferrals),
        ("bounces", Metric::Bounces),
        ("queue_age", Metric::QueueAge),
        ("latency_p95", Metric::LatencyP95),
    ];

    pub fn name(self) -> &'static str {
        Metric::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }
}

/// `metric > limit` (or `>=`). Rates in percent, ages in seconds, counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub metric: Metric,
    pub at_least: bool,
    pub limit: f64,
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = if self.at_least { ">=" } else { ">" };
        match self.metric {
            Metric::DeferRate => write!(f, "{}{op}{}%", self.metric.name(), self.limit),
            Metric::QueueAge | Metric::LatencyP95 => write!(
                f,
                "{}{op}{}",
                self.metric.name(),
                humantime::format_duration(Duration::from_secs(self.limit as u64))
            ),
            _ => write!(f, "{}{op}{}", self.metric.name(), self.limit),
        }
    }
}

/// The default when `--soak` is given without `--rollback-if`.
pub const DEFAULT_ROLLBACK_IF: &str = "defer_rate>5%,queue_age>15m,bounces>0";

/// Parses `defer_rate>5%,queue_age>15m,bounces>0`. Every term must be
/// known and well formed: a typo is an error naming the term.
pub fn parse_rollback_if(s: &str) -> Result<Vec<Threshold>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim) {
        if term.is_empty() {
            return Err(format!("--rollback-if `{s}`: an empty term"));
        }
        let (name, at_least, value) = if let Some((n, v)) = term.split_once(">=") {
            (n, true, v)
        } else if let Some((n, v)) = term.split_once('>') {
            (n, false, v)
        } else {
            return Err(format!(
                "--rollback-if term `{term}`: expected METRIC>VALUE (e.g. defer_rate>5%)"
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        let metric = Metric::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                format!(
                    "--rollback-if term `{term}`: unknown metric `{name}` (one of: {})",
                    Metric::ALL.map(|(n, _)| n).join(", ")
                )
            })?;
        let limit = match metric {
            Metric::DeferRate => {
                let pct = value.strip_suffix('%').ok_or_else(|| {
                    format!("--rollback-if term `{term}`: a rate is a percentage, e.g. 5%")
                })?;
                let v: f64 = pct
                    .parse()
                    .map_err(|_| format!("--rollback-if term `{term}`: `{pct}` is not a number"))?;
                if !(0.0..=100.0).contains(&v) {
                    return Err(format!(
                        "--rollback-if term `{term}`: a rate is between 0% and 100%"
                    ));
                }
                v
            }
            Metric::QueueAge | Metric::LatencyP95 => godwit_config::parse_duration(value)
                .map_err(|e| format!("--rollback-if term `{term}`: {e}"))?
                .as_secs_f64(),
            Metric::Bounces | Metric::Deferrals => value.parse::<u64>().map_err(|_| {
                format!("--rollback-if term `{term}`: `{value}` is not a whole number")
            })? as f64,
        };
        out.push(Threshold {
            metric,
            at_least,
            limit,
        });
    }
    Ok(out)
}

/// Mail to the wave's members since the cutover.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub queue_age_s: u64,
    pub latency_p95_s: f64,
}

impl Measurements {
    pub fn value(&self, m: Metric) -> f64 {
        match m {
            Metric::DeferRate => {
                let all = self.delivered + self.deferred + self.bounced;
                if all == 0 {
                    0.0
                } else {
                    self.deferred as f64 * 100.0 / all as f64
                }
            }
            Metric::Deferrals => self.deferred as f64,
            Metric::Bounces => self.bounced as f64,
            Metric::QueueAge => self.queue_age_s as f64,
            Metric::LatencyP95 => self.latency_p95_s,
        }
    }
}

/// The thresholds crossed, each as "defer_rate=42.9% > 5%" with its counts.
pub fn breaches(ts: &[Threshold], m: &Measurements) -> Vec<String> {
    ts.iter()
        .filter(|t| {
            let v = m.value(t.metric);
            if t.at_least {
                v >= t.limit
            } else {
                v > t.limit
            }
        })
        .map(|t| {
            let v = m.value(t.metric);
            let shown = match t.metric {
                Metric::DeferRate => format!("{v:.1}%"),
                Metric::QueueAge | Metric::LatencyP95 => {
                    humantime::format_duration(Duration::from_secs(v as u64)).to_string()
                }
                _ => format!("{v}"),
            };
            format!(
                "{}={shown} (threshold {t}; {} delivered, {} deferred, {} bounced)",
                t.metric.name(),
                m.delivered,
                m.deferred,
                m.bounced
            )
        })
        .collect()
}

/// Why a wave cutover should wait ("if queue growth correlates with a wave
/// cutover, pause migrations"): platforms whose circuit is open, and a queue
/// older than `limit`. Empty: go.
pub fn pause_reasons(
    circuits: &[(String, String)],
    oldest_queued: Duration,
    limit: Duration,
) -> Vec<String> {
    let mut out: Vec<String> = circuits
        .iter()
        .filter(|(_, c)| c == "open")
        .map(|(p, _)| format!("platform {p}'s circuit is open"))
        .collect();
    if oldest_queued > limit {
        out.push(format!(
            "the oldest queued message is {} old (queue.wave_pause_age = {})",
            humantime::format_duration(Duration::from_secs(oldest_queued.as_secs())),
            humantime::format_duration(limit)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_table() {
        let c = |p: &str, s: &str| (p.to_string(), s.to_string());
        let limit = Duration::from_secs(1800);
        for (name, circuits, age, want) in [
            ("calm", vec![c("old", "closed"), c("new", "closed")], 60, 0),
            (
                "half-open is trying again",
                vec![c("new", "half-open")],
                60,
                0,
            ),
            ("open circuit", vec![c("new", "open")], 60, 1),
            ("old queue", vec![c("new", "closed")], 1801, 1),
            ("both", vec![c("new", "open")], 3600, 2),
        ] {
            let got = pause_reasons(&circuits, Duration::from_secs(age), limit);
            assert_eq!(got.len(), want, "{name}: {got:?}");
        }
        assert_eq!(
            pause_reasons(&[c("new", "open")], Duration::ZERO, limit),
            ["platform new's circuit is open"]
        );
    }

    #[test]
    fn parses_the_issue_example_and_refuses_typos() {
        let t = parse_rollback_if(DEFAULT_ROLLBACK_IF).unwrap();
        assert_eq!(
            t,
            [
                Threshold {
                    metric: Metric::DeferRate,
                    at_least: false,
                    limit: 5.0
                },
                Threshold {
                    metric: Metric::QueueAge,
                    at_least: false,
                    limit: 900.0
                },
                Threshold {
                    metric: Metric::Bounces,
                    at_least: false,
                    limit: 0.0
                },
            ]
        );
        assert_eq!(
            t.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            ["defer_rate>5%", "queue_age>15m", "bounces>0"]
        );
        for (bad, names) in [
            ("defer_rat>5%", "unknown metric `defer_rat`"),
            ("defer_rate>5", "a percentage"),
            ("defer_rate>150%", "between 0% and 100%"),
            ("queue_age>15 minutes-ish", "queue_age>15 minutes-ish"),
            ("bounces>zero", "not a whole number"),
            ("bounces=0", "expected METRIC>VALUE"),
            ("bounces>0,", "an empty term"),
        ] {
            let e = parse_rollback_if(bad).unwrap_err();
            assert!(e.contains(names), "`{bad}`: {e}");
        }
        assert!(parse_rollback_if("deferrals>=3, latency_p95>10m").is_ok());
    }

    #[test]
    fn breaches_table() {
        let t = parse_rollback_if("defer_rate>20%,bounces>0,queue_age>15m").unwrap();
        let m = |delivered, deferred, bounced, age| Measurements {
            delivered,
            deferred,
            bounced,
            queue_age_s: age,
            latency_p95_s: 0.0,
        };
        for (name, ms, want) in [
            ("nothing yet", m(0, 0, 0, 0), vec![]),
            ("healthy", m(10, 1, 0, 30), vec![]),
            ("exactly at the rate is not over", m(8, 2, 0, 0), vec![]),
            ("throttled", m(3, 3, 0, 0), vec!["defer_rate=50.0%"]),
            ("one bounce", m(10, 0, 1, 0), vec!["bounces=1"]),
            ("stuck queue", m(10, 0, 0, 901), vec!["queue_age=15m 1s"]),
        ] {
            let got = breaches(&t, &ms);
            assert_eq!(got.len(), want.len(), "{name}: {got:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.starts_with(w), "{name}: {g}");
            }
        }
    }
}
