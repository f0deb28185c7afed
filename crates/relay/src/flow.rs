//! Per-destination flow control. Each platform has an adaptive concurrency
//! limit (additive increase while deliveries succeed, multiplicative decrease
//! on throttling: 421, 451, 452, any 4.7.x, connection failures), an optional
//! rate limit, and a circuit breaker that marks a failing platform down so its
//! mail waits in the queue without occupying workers. Unlike Postfix, a 4.7.x
//! rate-limit reply in mid-session counts as throttling, not only connection
//! and greeting failures.

use godwit_config::PlatformConfig;
use godwit_smtp_proto::Reply;
use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    failures: u32,
    down_until: Option<Instant>,
    /// Cooldown of the current open period (doubles on failed probes).
    cooldown: Duration,
    probing: bool,
    /// The scheduler was asked for a probe since the cooldown ended (see
    /// `probe_wanted`); cleared when the circuit opens again or closes.
    probe_asked: bool,
    recent: VecDeque<u16>,
    delivered: u64,
    throttled: u64,
}

pub struct Flow {
    max: usize,
    /// `max_rate` as a GCRA bucket (none when unlimited).
    rate: Option<DefaultDirectRateLimiter>,
    breaker_failures: u32,
    base_cooldown: Duration,
    state: Mutex<State>,
    changed: Notify,
}

/// What `queue destinations` shows for a platform.
#[derive(Debug, Clone, Serialize)]
pub struct FlowSnapshot {
    pub limit: usize,
    pub max: usize,
    pub in_flight: usize,
    /// "closed" (normal), "open" (down) or "half-open" (one probe allowed).
    pub circuit: String,
    pub down_for_s: u64,
    pub recent_codes: Vec<u16>,
    pub delivered: u64,
    pub throttled: u64,
    /// Relay hosts passed over after connection failures, with the seconds
    /// left (filled in by the scheduler, which knows the hosts).
    pub down_hosts: Vec<(String, u64)>,
    /// Attempts waiting for a delivery slot (at most `queue.max_ready`).
    pub ready: usize,
    /// Due messages parked because the ready queue was full.
    pub parked: usize,
}

/// How a delivery went, for the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Success,
    /// 421, 451, 452, 4.7.x, or the connection failed.
    Throttled,
    /// Any other outcome (a 5xx about one recipient, say): no change.
    Neutral,
}

pub fn classify(reply: &Reply, connected: bool) -> Signal {
    if !connected {
        return Signal::Throttled;
    }
    match reply.code {
        200..=399 => Signal::Success,
        421 | 451 | 452 => Signal::Throttled,
        _ if reply.enhanced.is_some_and(|(c, s, _)| c == 4 && s == 7) => Signal::Throttled,
        _ => Signal::Neutral,
    }
}

/// Held while a delivery runs; releases the slot on drop.
pub struct Permit(Arc<Flow>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().in_flight -= 1;
        self.0.changed.notify_waiters();
    }
}

pub enum Admission {
    Granted(Permit),
    /// The circuit is open: retry no earlier than this.
    Down(Duration),
}

impl Flow {
    pub fn new(cfg: &PlatformConfig) -> Arc<Flow> {
        Arc::new(Flow {
            max: cfg.max_connections,
            rate: quota(cfg.max_rate).map(RateLimiter::direct),
            breaker_failures: cfg.breaker_failures,
            base_cooldown: cfg.breaker_cooldown,
            state: Mutex::new(State {
                limit: cfg.initial_connections as f64,
                in_flight: 0,
                failures: 0,
                down_until: None,
                cooldown: cfg.breaker_cooldown,
                probing: false,
                probe_asked: false,
                recent: VecDeque::new(),
                delivered: 0,
                throttled: 0,
            }),
            changed: Notify::new(),
        })
    }

    /// Whether the circuit is open now (mail for it should wait, not queue up
    /// for a worker).
    pub fn down_for(&self) -> Option<Duration> {
        let st = self.state.lock().unwrap();
        st.down_until
            .and_then(|t| t.checked_duration_since(Instant::now()))
    }

    /// Whether the scheduler should make one message due now, as the
    /// half-open circuit's probe: true once each time a cooldown ends with
    /// no probe under way. Mail the open circuit deferred waits for its own
    /// retry time (as Postfix defers mail for a dead site), not for the end
    /// of the cooldown: a backlog that all fell due then was re-read,
    /// re-deferred and re-recorded at every cooldown. The probe's success
    /// releases it all (`observe` says so).
    pub fn probe_wanted(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        let ended = st.down_until.is_some_and(|t| t <= Instant::now());
        if ended && !st.probing && st.in_flight == 0 && !st.probe_asked {
            st.probe_asked = true;
            return true;
        }
        false
    }

    /// Waits for a delivery slot under the current limit and rate.
    pub async fn admit(self: &Arc<Self>) -> Admission {
        loop {
            let wait = {
                let mut st = self.state.lock().unwrap();
                let now = Instant::now();
                if let Some(until) = st.down_until {
                    if until > now {
                        return Admission::Down(until - now);
                    }
                    // Half-open: one probe at a time.
                    if st.probing || st.in_flight > 0 {
                        Some(Duration::from_millis(100))
                    } else {
                        st.probing = true;
                        st.in_flight += 1;
                        return Admission::Granted(Permit(self.clone()));
                    }
                } else if st.in_flight < (st.limit.floor() as usize).max(1) {
                    // A slot is free: the rate's token is taken only now, so
                    // a wait for a slot never spends one.
                    match self.rate.as_ref().map(|r| (r.check(), r.clock().now())) {
                        None | Some((Ok(()), _)) => {
                            st.in_flight += 1;
                            return Admission::Granted(Permit(self.clone()));
                        }
                        Some((Err(not_until), now)) => Some(not_until.wait_time_from(now)),
                    }
                } else {
                    None
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    let notified = self.changed.notified();
                    // Re-check after registering, then wait (bounded, in case of a missed wake).
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    /// Closes the circuit at once (an operator's `queue flush --platform`,
    /// as `postqueue -s` does for a site): the platform is back, try now.
    pub fn close_circuit(&self) {
        let mut st = self.state.lock().unwrap();
        st.down_until = None;
        st.failures = 0;
        st.probing = false;
        st.probe_asked = false;
        st.cooldown = self.base_cooldown;
        drop(st);
        self.changed.notify_waiters();
    }

    /// Feeds one attempt's outcome back into the controller. True when it
    /// closed an open circuit: the platform is back, and the mail that
    /// waits for it should go now.
    pub fn observe(&self, signal: Signal, code: u16) -> bool {
        let mut recovered = false;
        let mut st = self.state.lock().unwrap();
        st.recent.push_back(code);
        if st.recent.len() > 20 {
            st.recent.pop_front();
        }
        let was_probe = std::mem::take(&mut st.probing);
        match signal {
            Signal::Success => {
                st.delivered += 1;
                st.failures = 0;
                if st.down_until.take().is_some() {
                    // Recovered: start again from the bottom and grow.
                    st.limit = 1.0;
                    st.cooldown = self.base_cooldown;
                    st.probe_asked = false;
                    recovered = true;
                }
                // Additive increase: about +1 per window of successful deliveries.
                st.limit = (st.limit + 1.0 / st.limit.max(1.0)).min(self.max as f64);
            }
            Signal::Throttled => {
                st.throttled += 1;
                st.failures += 1;
                st.limit = (st.limit / 2.0).max(1.0);
                if was_probe {
                    st.cooldown = (st.cooldown * 2).min(self.base_cooldown * 16);
                    st.down_until = Some(Instant::now() + st.cooldown);
                    st.probe_asked = false;
                } else if st.failures >= self.breaker_failures && st.down_until.is_none() {
                    st.down_until = Some(Instant::now() + st.cooldown);
                    st.probe_asked = false;
                }
            }
            Signal::Neutral => {}
        }
        drop(st);
        self.changed.notify_waiters();
        recovered
    }

    pub fn snapshot(&self) -> FlowSnapshot {
        let st = self.state.lock().unwrap();
        let now = Instant::now();
        let (circuit, down_for) = match st.down_until {
            Some(t) if t > now => ("open", (t - now).as_secs()),
            Some(_) => ("half-open", 0),
            None => ("closed", 0),
        };
        FlowSnapshot {
            limit: (st.limit.floor() as usize).max(1),
            max: self.max,
            in_flight: st.in_flight,
            circuit: circuit.into(),
            down_for_s: down_for,
            recent_codes: st.recent.iter().copied().collect(),
            delivered: st.delivered,
            throttled: st.throttled,
            down_hosts: Vec::new(),
            ready: 0,
            parked: 0,
        }
    }
}

/// `max_rate` deliveries a second as a bucket: one token every 1/rate
/// seconds, holding at most a second's worth (at least one), full at start.
/// None when the rate is unlimited (0).
fn quota(rate: f64) -> Option<Quota> {
    if rate.is_nan() || rate <= 0.0 {
        return None;
    }
    let burst = NonZeroU32::new(rate.min(u32::MAX as f64) as u32).unwrap_or(NonZeroU32::MIN);
    // Below one a year (a typo's 1e-9) is one, then none for a year.
    const YEAR_S: f64 = 365.0 * 86_400.0;
    let period = Duration::from_secs_f64((1.0 / rate).min(YEAR_S));
    Some(Quota::with_period(period)?.allow_burst(burst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_rate_becomes_a_second_of_burst_refilled_one_token_at_a_time() {
        // (max_rate, burst, period)
        let table = [
            (0.0, None),
            (-1.0, None),
            (f64::NAN, None),
            (20.0, Some((20, Duration::from_millis(50)))),
            (1.0, Some((1, Duration::from_secs(1)))),
            (2.5, Some((2, Duration::from_millis(400)))),
            (0.5, Some((1, Duration::from_secs(2)))),
            (1e-300, Some((1, Duration::from_secs(365 * 86_400)))),
        ];
        for (rate, want) in table {
            let got = quota(rate).map(|q| (q.burst_size().get(), q.replenish_interval()));
            assert_eq!(got, want, "max_rate {rate}");
        }
    }

    fn cfg() -> PlatformConfig {
        PlatformConfig {
            max_connections: 16,
            initial_connections: 2,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_millis(200),
            ..Default::default()
        }
    }

    #[test]
    fn grows_on_success_and_halves_on_throttling() {
        let f = Flow::new(&cfg());
        for _ in 0..40 {
            f.observe(Signal::Success, 250);
        }
        let grown = f.snapshot().limit;
        assert!(grown > 4, "{grown}");
        f.observe(Signal::Throttled, 421);
        assert_eq!(f.snapshot().limit, grown / 2);
        assert_eq!(f.snapshot().circuit, "closed");
        for _ in 0..200 {
            f.observe(Signal::Success, 250);
        }
        assert_eq!(f.snapshot().limit, 16, "capped at max_connections");
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(&Reply::new(451, (4, 7, 1), "rate"), true),
            Signal::Throttled
        );
        assert_eq!(
            classify(&Reply::new(450, (4, 7, 0), "x"), true),
            Signal::Throttled
        );
        assert_eq!(
            classify(&Reply::new(450, (4, 2, 0), "mailbox busy"), true),
            Signal::Neutral
        );
        assert_eq!(
            classify(&Reply::new(250, (2, 0, 0), "ok"), true),
            Signal::Success
        );
        assert_eq!(
            classify(&Reply::new(451, (4, 4, 1), "refused"), false),
            Signal::Throttled
        );
    }

    #[tokio::test]
    async fn breaker_opens_probes_and_closes() {
        let f = Flow::new(&cfg());
        for _ in 0..3 {
            f.observe(Signal::Throttled, 421);
        }
        assert_eq!(f.snapshot().circuit, "open");
        assert!(matches!(f.admit().await, Admission::Down(_)));
        // No probe is asked for while the cooldown runs.
        assert!(!f.probe_wanted());
        tokio::time::sleep(Duration::from_millis(250)).await;
        // The cooldown ended: one probe is asked for, once.
        assert!(f.probe_wanted());
        assert!(!f.probe_wanted());
        // Half-open: one probe; a failed probe doubles the cooldown.
        let p = match f.admit().await {
            Admission::Granted(p) => p,
            Admission::Down(_) => panic!("probe refused"),
        };
        assert!(
            !f.observe(Signal::Throttled, 421),
            "a failed probe recovers nothing"
        );
        drop(p);
        assert_eq!(f.snapshot().circuit, "open");
        assert!(f.down_for().unwrap() > Duration::from_millis(250));
        assert!(!f.probe_wanted());
        tokio::time::sleep(Duration::from_millis(450)).await;
        // The next cooldown ended: a probe is asked for again.
        assert!(f.probe_wanted());
        let p = match f.admit().await {
            Admission::Granted(p) => p,
            Admission::Down(d) => panic!("still down {d:?}"),
        };
        // Its success closes the circuit and says so (the waiting mail goes).
        assert!(f.observe(Signal::Success, 250));
        drop(p);
        assert_eq!(f.snapshot().circuit, "closed");
        assert!(!f.observe(Signal::Success, 250), "closed already");
        assert!(!f.probe_wanted());
    }

    #[tokio::test]
    async fn limit_bounds_in_flight_and_rate_spaces_admissions() {
        let f = Flow::new(&cfg());
        let a = f.admit().await;
        let b = f.admit().await;
        assert_eq!(f.snapshot().in_flight, 2);
        let third = tokio::time::timeout(Duration::from_millis(100), f.admit()).await;
        assert!(
            third.is_err(),
            "a third slot was granted over the limit of 2"
        );
        drop(a);
        let c = tokio::time::timeout(Duration::from_millis(500), f.admit()).await;
        assert!(c.is_ok());
        drop((b, c));
        let rated = Flow::new(&PlatformConfig {
            max_rate: 20.0,
            max_connections: 16,
            initial_connections: 16,
            ..Default::default()
        });
        let start = Instant::now();
        for _ in 0..30 {
            let _p = rated.admit().await;
        }
        // 20 tokens of burst, then 10 more at 20/s: about half a second.
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
    }
}
