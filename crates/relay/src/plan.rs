//! The queue manager's decisions, with no I/O (Postfix's qmgr plans, its
//! smtp client delivers; mox writes the next attempt before trying). Given a
//! message's recipients, the time and the routing map, `plan_attempt` says
//! what each recipient does now: wait, expire, hold, defer, or go to which
//! platforms. `settle` turns a platform's replies into recipient states.
//! Both mutate only the recipient states handed to them and return the
//! events to emit and the DSNs to send; the scheduler does the I/O.

use crate::client::{AttemptOutcome, RcptOutcome};
use crate::dsn::{self, DsnRcpt};
use godwit_config::ROUTE_BOTH;
use godwit_config::ROUTE_HOLD;
use godwit_events::{Delays, Event};
use godwit_smtp_proto::RcptParams;
use godwit_spool::{Header, RcptStatus, StatusRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Why a recipient is not moving, if it is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hold {
    #[default]
    None,
    /// The routing map says `hold`: it moves again when the route changes.
    Route,
    /// An operator said `queue hold`: only `queue release` frees it.
    Operator,
}

/// One recipient of a queued message, as the scheduler keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RcptState {
    /// Pending, Deferred, or final (Delivered, Failed, Deleted). A held
    /// recipient keeps its status; `hold` says that it is held.
    pub status: RcptStatus,
    pub hold: Hold,
    pub attempts: u32,
    /// When the next attempt is due, unix ms (meaningful when not held).
    pub next_ms: i64,
    /// The route used at the last attempt: a change makes the message due now.
    pub last_route: Option<String>,
    /// Platforms that hold a copy (dual delivery delivers to each once).
    pub delivered_to: Vec<String>,
    /// A delay warning was sent.
    pub warned: bool,
    pub last_reply: Option<String>,
}

impl RcptState {
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    /// Free to move: not final and not held.
    pub fn is_movable(&self) -> bool {
        !self.is_final() && self.hold == Hold::None
    }

    /// From the spool's latest record (`None`: no record yet, due now). A
    /// route hold is decided again at once after a restart: the route may
    /// have changed while the gateway was down.
    pub fn from_record(s: Option<&StatusRecord>, now: i64) -> RcptState {
        let Some(r) = s else {
            return RcptState {
                next_ms: now,
                ..Default::default()
            };
        };
        let held = r.status == RcptStatus::Held;
        RcptState {
            status: if held {
                if r.attempts == 0 {
                    RcptStatus::Pending
                } else {
                    RcptStatus::Deferred
                }
            } else {
                r.status
            },
            hold: if r.operator_hold {
                Hold::Operator
            } else {
                Hold::None
            },
            attempts: r.attempts,
            next_ms: if held && !r.operator_hold {
                now
            } else {
                r.next_ms
            },
            last_route: r.platform.clone(),
            delivered_to: r.delivered_to.clone(),
            warned: r.warned,
            last_reply: r.reply.clone(),
        }
    }

    /// The record that brings this state back after a restart.
    pub fn to_record(&self, rcpt: usize, now: i64) -> StatusRecord {
        let held = self.hold != Hold::None && !self.is_final();
        StatusRecord {
            rcpt,
            status: if held { RcptStatus::Held } else { self.status },
            at_ms: now,
            attempts: self.attempts,
            next_ms: if held { 0 } else { self.next_ms },
            platform: self.last_route.clone(),
            reply: self.last_reply.clone(),
            delivered_to: self.delivered_to.clone(),
            operator_hold: self.hold == Hold::Operator && !self.is_final(),
            warned: self.warned,
        }
    }

    /// The state `queue list` and the dashboard show.
    pub fn shown_status(&self) -> RcptStatus {
        if self.hold != Hold::None && !self.is_final() {
            RcptStatus::Held
        } else {
            self.status
        }
    }
}

/// The earliest attempt due among recipients that can move.
pub fn next_due(rcpts: &[RcptState]) -> Option<i64> {
    rcpts
        .iter()
        .filter(|r| r.is_movable())
        .map(|r| r.next_ms)
        .min()
}

/// Where the routing map sends a recipient now.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub route: String,
    pub why: String,
    pub version: i64,
}

/// The platforms a recipient must still reach under `route`.
pub fn targets(route: &str, platforms: &[String], delivered_to: &[String]) -> Vec<String> {
    if route == ROUTE_HOLD {
        return Vec::new();
    }
    let all: Vec<String> = if route == ROUTE_BOTH {
        platforms.to_vec()
    } else {
        vec![route.to_string()]
    };
    all.into_iter()
        .filter(|p| !delivered_to.contains(p))
        .collect()
}

/// What the scheduler needs to know of the world to plan one attempt.
pub struct World<'a> {
    pub now: i64,
    pub max_lifetime: Duration,
    /// A delay warning is due once a message has waited this long.
    pub delay_warning: Option<Duration>,
    /// The configured platforms, in order.
    pub platforms: &'a [String],
    /// The route for a recipient address now.
    pub route: &'a dyn Fn(&str) -> Routed,
    /// How long a platform's circuit stays open, if it is open.
    pub circuit_open: &'a dyn Fn(&str) -> Option<Duration>,
    /// The retry delay after `attempts` failed attempts.
    pub backoff: &'a dyn Fn(u32) -> Duration,
}

/// What to do with one message now.
#[derive(Debug, Default)]
pub struct Plan {
    /// Per platform, the recipients to send to it (in envelope order).
    pub groups: BTreeMap<String, Vec<usize>>,
    /// Recipients whose state changed and must be recorded before sending.
    pub changed: BTreeSet<usize>,
    pub events: Vec<Event>,
    /// Recipients that failed without an attempt (expired): DSN `failed`.
    pub failed: Vec<DsnRcpt>,
    /// Recipients that asked for a delay warning: DSN `delayed`.
    pub delayed: Vec<DsnRcpt>,
}

/// Plans one attempt of message `h`: every due, movable recipient is routed
/// now (a change of route since the last attempt is an event), then expired,
/// held, deferred (unknown platform, open circuit) or grouped by platform.
pub fn plan_attempt(h: &Header, rcpts: &mut [RcptState], w: &World) -> Plan {
    let mut plan = Plan::default();
    let expired = w.now - h.arrival_ms > w.max_lifetime.as_millis() as i64;
    for (i, (addr, params)) in h.envelope.rcpts.iter().enumerate() {
        let r = &mut rcpts[i];
        if !r.is_movable() || r.next_ms > w.now {
            continue;
        }
        let Routed {
            route,
            why,
            version,
        } = (w.route)(addr);
        if r.last_route.as_deref() != Some(&route) || r.attempts == 0 {
            plan.events.push(Event::Routed {
                queue_id: h.queue_id.clone(),
                message_id: h.message_id.clone(),
                rcpt: addr.clone(),
                route: route.clone(),
                why: why.clone(),
                routing_version: version,
            });
        }
        r.last_route = Some(route.clone());
        // A journal copy never expires into a bounce: it is retried until
        // the archive takes it (or an operator deletes it).
        if expired && !h.is_journal(i) {
            let reply = format!(
                "4.4.7 message expired after {} in the queue",
                humantime::format_duration(w.max_lifetime)
            );
            r.status = RcptStatus::Failed;
            r.last_reply = Some(reply.clone());
            plan.changed.insert(i);
            plan.events.push(Event::Failed {
                queue_id: h.queue_id.clone(),
                message_id: h.message_id.clone(),
                rcpt: addr.clone(),
                platform: route.clone(),
                reply: reply.clone(),
                reason: "expired".into(),
                delays: delays(h, w.now, None),
            });
            plan.failed
                .push(dsn_rcpt(addr, params, "failed", "4.4.7", &reply, None));
            continue;
        }
        if route == ROUTE_HOLD {
            r.hold = Hold::Route;
            plan.changed.insert(i);
            plan.events.push(Event::Held {
                queue_id: h.queue_id.clone(),
                message_id: h.message_id.clone(),
                rcpt: addr.clone(),
                why,
            });
            continue;
        }
        let to = targets(&route, w.platforms, &r.delivered_to);
        if to.is_empty() {
            // Every platform of the route already has its copy.
            r.status = RcptStatus::Delivered;
            plan.changed.insert(i);
            continue;
        }
        for p in to {
            if !w.platforms.contains(&p) && !crate::outbound::is_outbound(&p) {
                // A route naming a platform this gateway does not know: keep
                // the mail (never bounce on a configuration mistake).
                let reply = format!("4.3.5 route `{p}` names no configured platform");
                plan.events
                    .push(defer(h, i, r, &p, None, &reply, None, w.now, w.backoff));
                plan.changed.insert(i);
            } else if let Some(wait) = (w.circuit_open)(&p) {
                // Circuit open: the mail waits without taking a worker.
                let reply = format!(
                    "4.4.1 platform {p} is marked down (circuit open) after repeated failures"
                );
                let at = circuit_retry_at(w.now, wait, r.attempts, w.backoff);
                plan.events
                    .push(defer(h, i, r, &p, None, &reply, Some(at), w.now, w.backoff));
                plan.changed.insert(i);
            } else {
                plan.groups.entry(p).or_default().push(i);
            }
        }
    }
    // Delay warnings (RFC 3464 action=delayed), once per recipient, and
    // never about a DSN (RFC 3461 6.2).
    if let Some(after) = w.delay_warning
        && h.kind.is_none()
        && w.now - h.arrival_ms >= after.as_millis() as i64
    {
        for (i, (addr, params)) in h.envelope.rcpts.iter().enumerate() {
            let r = &mut rcpts[i];
            if !r.is_final() && !r.warned && !plan.groups.values().any(|g| g.contains(&i)) {
                r.warned = true;
                plan.changed.insert(i);
                if dsn::wanted(&params.notify, "delayed") {
                    let reply = r
                        .last_reply
                        .clone()
                        .unwrap_or_else(|| "4.4.7 still queued".into());
                    plan.delayed
                        .push(dsn_rcpt(addr, params, "delayed", "4.4.7", &reply, None));
                }
            }
        }
    }
    plan
}

/// Of the recipients planned for `platform`, those that may go now, at the
/// moment a delivery slot was granted: still movable, and still routed to
/// `platform` (a route change or rollback since the plan wins, unless the
/// transaction had begun). The second list holds the recipients left out
/// because their route changed: they are planned again at once.
pub fn still_bound(
    h: &Header,
    rcpts: &[RcptState],
    planned: &[usize],
    platform: &str,
    platforms: &[String],
    route: &dyn Fn(&str) -> Routed,
) -> (Vec<usize>, Vec<usize>) {
    let mut go = Vec::new();
    let mut rerouted = Vec::new();
    for &i in planned {
        let Some(r) = rcpts.get(i) else { continue };
        if !r.is_movable() || r.delivered_to.iter().any(|p| p == platform) {
            continue;
        }
        let now = route(&h.envelope.rcpts[i].0).route;
        if targets(&now, platforms, &r.delivered_to)
            .iter()
            .any(|p| p == platform)
            && r.last_route.as_deref() == Some(now.as_str())
        {
            go.push(i);
        } else {
            rerouted.push(i);
        }
    }
    (go, rerouted)
}

/// When a recipient deferred by an open circuit (`wait` left of its
/// cooldown, `attempts` so far) is tried again: at its own retry time, as
/// Postfix defers mail for a site it marked dead, and never inside the
/// cooldown. Not all at the cooldown's end: a 100,000-message backlog fell
/// due at once there, to be read back, refused by the half-open circuit and
/// recorded again at every cooldown. The scheduler sends one probe when the
/// cooldown ends, and the probe's success makes the waiting mail due.
pub fn circuit_retry_at(
    now: i64,
    wait: Duration,
    attempts: u32,
    backoff: &dyn Fn(u32) -> Duration,
) -> i64 {
    let cooled = now + wait.as_millis() as i64 + 10;
    let own = now + backoff(attempts + 1).as_millis() as i64;
    cooled.max(own)
}

/// Defers recipient `i`: one more attempt, the next one after the backoff
/// (or at `at`), and the event that says so.
#[allow(clippy::too_many_arguments)]
pub fn defer(
    h: &Header,
    i: usize,
    r: &mut RcptState,
    platform: &str,
    host: Option<String>,
    reply: &str,
    at: Option<i64>,
    now: i64,
    backoff: &dyn Fn(u32) -> Duration,
) -> Event {
    r.status = RcptStatus::Deferred;
    r.attempts += 1;
    let next = at.unwrap_or_else(|| now + backoff(r.attempts).as_millis() as i64);
    // With dual delivery, the earliest pending copy decides.
    r.next_ms = if r.next_ms > now {
        r.next_ms.min(next)
    } else {
        next
    };
    r.last_reply = Some(reply.to_string());
    Event::Deferred {
        queue_id: h.queue_id.clone(),
        message_id: h.message_id.clone(),
        rcpt: h.envelope.rcpts[i].0.clone(),
        platform: platform.to_string(),
        host,
        reply: reply.to_string(),
        attempts: r.attempts,
        next_attempt_in_s: ((r.next_ms - now) / 1000).max(0) as u64,
        delays: delays(h, now, None),
    }
}

/// The delay breakdown of recipient time in message `h` at `now`, the end
/// of attempt `out` (None: decided without an attempt, all of it queue time).
pub fn delays(h: &Header, now: i64, out: Option<&AttemptOutcome>) -> Delays {
    let (connect, total) = out.map_or((0, 0), |o| {
        (o.connect.as_millis() as u64, o.duration.as_millis() as u64)
    });
    let started = now - total as i64;
    Delays {
        accept_ms: h.accept_ms,
        queue_ms: (started - h.arrival_ms).max(0) as u64,
        connect_ms: connect.min(total),
        transmit_ms: total.saturating_sub(connect),
    }
}

/// What one platform's replies did to the recipients sent to it.
#[derive(Debug, Default)]
pub struct Settled {
    pub events: Vec<Event>,
    pub failed: Vec<DsnRcpt>,
}

/// Applies a platform's replies to the recipients `idxs` sent to it.
/// `soft_bounce` keeps a 5xx as a deferral (a platform mid-migration may
/// refuse a user it does not know yet).
#[allow(clippy::too_many_arguments)]
pub fn settle(
    h: &Header,
    rcpts: &mut [RcptState],
    platform: &str,
    platforms: &[String],
    idxs: &[usize],
    out: &AttemptOutcome,
    soft_bounce: bool,
    now: i64,
    backoff: &dyn Fn(u32) -> Duration,
) -> Settled {
    let mut s = Settled::default();
    let host = out.host.clone().unwrap_or_default();
    s.events.push(Event::Attempt {
        queue_id: h.queue_id.clone(),
        message_id: h.message_id.clone(),
        platform: platform.to_string(),
        host: host.clone(),
        rcpts: idxs
            .iter()
            .map(|&i| h.envelope.rcpts[i].0.clone())
            .collect(),
        code: out.summary.code,
        enhanced: out.summary.enhanced_string(),
        reply: out.summary.to_string(),
        duration_ms: out.duration.as_millis() as u64,
        tls: out.tls,
        tls_verified: out.tls_verified,
    });
    for (&i, o) in idxs.iter().zip(&out.rcpts) {
        let (addr, params) = &h.envelope.rcpts[i];
        let r = &mut rcpts[i];
        match o {
            RcptOutcome::Delivered {
                reply,
                remote_queue_id,
            } => {
                r.attempts += 1;
                if !r.delivered_to.iter().any(|p| p == platform) {
                    r.delivered_to.push(platform.to_string());
                }
                r.last_reply = Some(reply.to_string());
                let route = r.last_route.clone().unwrap_or_default();
                if targets(&route, platforms, &r.delivered_to).is_empty() {
                    r.status = RcptStatus::Delivered;
                }
                s.events.push(Event::Delivered {
                    queue_id: h.queue_id.clone(),
                    message_id: h.message_id.clone(),
                    rcpt: addr.clone(),
                    platform: platform.to_string(),
                    host: host.clone(),
                    reply: reply.to_string(),
                    remote_queue_id: remote_queue_id.clone(),
                    delay_ms: (now - h.arrival_ms).max(0) as u64,
                    delays: delays(h, now, Some(out)),
                });
            }
            RcptOutcome::Permanent(reply) if !soft_bounce => {
                r.attempts += 1;
                r.status = RcptStatus::Failed;
                r.last_reply = Some(reply.to_string());
                s.events.push(Event::Failed {
                    queue_id: h.queue_id.clone(),
                    message_id: h.message_id.clone(),
                    rcpt: addr.clone(),
                    platform: platform.to_string(),
                    reply: reply.to_string(),
                    reason: "rejected by platform".into(),
                    delays: delays(h, now, Some(out)),
                });
                let status = reply.enhanced_string().unwrap_or_else(|| "5.0.0".into());
                s.failed.push(dsn_rcpt(
                    addr,
                    params,
                    "failed",
                    &status,
                    &reply.to_string(),
                    out.host.clone(),
                ));
            }
            RcptOutcome::Permanent(reply) | RcptOutcome::Transient(reply) => {
                let mut ev = defer(
                    h,
                    i,
                    r,
                    platform,
                    out.host.clone(),
                    &reply.to_string(),
                    None,
                    now,
                    backoff,
                );
                if let Event::Deferred { delays: d, .. } = &mut ev {
                    *d = delays(h, now, Some(out));
                }
                s.events.push(ev);
            }
        }
    }
    s
}

pub fn dsn_rcpt(
    addr: &str,
    params: &RcptParams,
    action: &'static str,
    status: &str,
    reply: &str,
    host: Option<String>,
) -> DsnRcpt {
    DsnRcpt {
        address: addr.to_string(),
        orcpt: params.orcpt.clone(),
        action,
        status: status.to_string(),
        diagnostic: reply.to_string(),
        remote_mta: host,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use godwit_smtp_proto::{Envelope, MailParams, Reply};

    #[test]
    fn mail_an_open_circuit_defers_waits_for_its_own_retry_and_never_inside_the_cooldown() {
        let s = Duration::from_secs;
        // Backoff doubling from 1 minute, as queue.min_backoff = "1m".
        let backoff = |n: u32| s(60 * 2u64.pow(n.saturating_sub(1)));
        let now = 1_000_000;
        // (cooldown left, attempts so far, retry at - now in ms)
        let cases = [
            (s(30), 0, 60_000),   // first retry (1 min) is after a 30 s cooldown
            (s(30), 3, 480_000),  // 8 min: its own backoff, not the cooldown's end
            (s(600), 1, 600_010), // a cooldown longer than the backoff wins
            (s(0), 0, 60_000),
        ];
        for (wait, attempts, want) in cases {
            assert_eq!(
                circuit_retry_at(now, wait, attempts, &backoff) - now,
                want,
                "{wait:?} after {attempts}"
            );
        }
    }

    pub(crate) fn header(rcpts: &[&str], arrival_ms: i64) -> Header {
        Header {
            queue_id: "Q1".into(),
            arrival_ms,
            message_id: Some("<m@x>".into()),
            envelope: Envelope {
                mail_from: "s@remote.test".into(),
                mail_params: MailParams::default(),
                rcpts: rcpts
                    .iter()
                    .map(|a| (a.to_string(), RcptParams::default()))
                    .collect(),
                helo: "c".into(),
                esmtp: true,
                client_ip: "127.0.0.1".into(),
                tls: false,
            },
            kind: None,
            accept_ms: 0,
            journal: None,
        }
    }

    fn routes(addr: &str) -> Routed {
        let route = match addr.split('@').next().unwrap() {
            "held" => "hold",
            "dual" => "both",
            "lost" => "nowhere",
            "moved" => "new",
            _ => "old",
        };
        Routed {
            route: route.into(),
            why: "test map".into(),
            version: 7,
        }
    }

    const NOW: i64 = 1_000_000_000;

    fn plan(h: &Header, rcpts: &mut [RcptState], down: &[&str]) -> Plan {
        let platforms = vec!["new".to_string(), "old".to_string()];
        let down: Vec<String> = down.iter().map(|s| s.to_string()).collect();
        let circuit = move |p: &str| {
            down.contains(&p.to_string())
                .then(|| Duration::from_secs(30))
        };
        let w = World {
            now: NOW,
            max_lifetime: Duration::from_secs(5 * 86400),
            delay_warning: None,
            platforms: &platforms,
            route: &routes,
            circuit_open: &circuit,
            backoff: &|n| Duration::from_secs(60 * n as u64),
        };
        plan_attempt(h, rcpts, &w)
    }

    fn fresh(n: usize) -> Vec<RcptState> {
        (0..n).map(|_| RcptState::from_record(None, NOW)).collect()
    }

    #[test]
    fn plan_table() {
        // (recipient, state before, open circuits) -> (group or none, status, hold, attempts)
        struct Case {
            addr: &'static str,
            before: RcptState,
            down: &'static [&'static str],
            groups: &'static [&'static str],
            status: RcptStatus,
            hold: Hold,
            attempts: u32,
            changed: bool,
        }
        let due = RcptState::from_record(None, NOW);
        let later = RcptState {
            next_ms: NOW + 1,
            ..due.clone()
        };
        let op_held = RcptState {
            hold: Hold::Operator,
            ..due.clone()
        };
        let done = RcptState {
            status: RcptStatus::Delivered,
            ..due.clone()
        };
        let half = RcptState {
            delivered_to: vec!["old".into()],
            last_route: Some("both".into()),
            attempts: 1,
            ..due.clone()
        };
        let both_done = RcptState {
            delivered_to: vec!["old".into(), "new".into()],
            ..due.clone()
        };
        let cases = [
            Case {
                addr: "a@x",
                before: due.clone(),
                down: &[],
                groups: &["old"],
                status: RcptStatus::Pending,
                hold: Hold::None,
                attempts: 0,
                changed: false,
            },
            Case {
                addr: "moved@x",
                before: due.clone(),
                down: &[],
                groups: &["new"],
                status: RcptStatus::Pending,
                hold: Hold::None,
                attempts: 0,
                changed: false,
            },
            Case {
                addr: "dual@x",
                before: due.clone(),
                down: &[],
                groups: &["new", "old"],
                status: RcptStatus::Pending,
                hold: Hold::None,
                attempts: 0,
                changed: false,
            },
            Case {
                addr: "dual@x",
                before: half,
                down: &[],
                groups: &["new"],
                status: RcptStatus::Pending,
                hold: Hold::None,
                attempts: 1,
                changed: false,
            },
            Case {
                addr: "dual@x",
                before: both_done,
                down: &[],
                groups: &[],
                status: RcptStatus::Delivered,
                hold: Hold::None,
                attempts: 0,
                changed: true,
            },
            Case {
                addr: "held@x",
                before: due.clone(),
                down: &[],
                groups: &[],
                status: RcptStatus::Pending,
                hold: Hold::Route,
                attempts: 0,
                changed: true,
            },
            Case {
                addr: "a@x",
                before: later,
                down: &[],
                groups: &[],
                status: RcptStatus::Pending,
                hold: Hold::None,
                attempts: 0,
                changed: false,
            },
            Case {
                addr: "a@x",
                before: op_held,
                down: &[],
                groups: &[],
                status: RcptStatus::Pending,
                hold: Hold::Operator,
                attempts: 0,
                changed: false,
            },
            Case {
                addr: "a@x",
                before: done,
                down: &[],
                groups: &[],
                status: RcptStatus::Delivered,
                hold: Hold::None,
                attempts: 0,
                changed: false,
            },
            Case {
                addr: "a@x",
                before: due.clone(),
                down: &["old"],
                groups: &[],
                status: RcptStatus::Deferred,
                hold: Hold::None,
                attempts: 1,
                changed: true,
            },
            Case {
                addr: "lost@x",
                before: due.clone(),
                down: &[],
                groups: &[],
                status: RcptStatus::Deferred,
                hold: Hold::None,
                attempts: 1,
                changed: true,
            },
        ];
        for (n, c) in cases.iter().enumerate() {
            let h = header(&[c.addr], NOW - 1000);
            let mut rcpts = vec![c.before.clone()];
            let p = plan(&h, &mut rcpts, c.down);
            let groups: Vec<&str> = p.groups.keys().map(|s| s.as_str()).collect();
            assert_eq!(groups, c.groups, "case {n}: groups");
            assert_eq!(rcpts[0].status, c.status, "case {n}: status");
            assert_eq!(rcpts[0].hold, c.hold, "case {n}: hold");
            assert_eq!(rcpts[0].attempts, c.attempts, "case {n}: attempts");
            assert_eq!(p.changed.contains(&0), c.changed, "case {n}: changed");
        }
    }

    #[test]
    fn open_circuit_defers_to_its_own_retry_and_expired_mail_fails_once() {
        let h = header(&["a@x"], NOW - 1000);
        let mut rcpts = fresh(1);
        let p = plan(&h, &mut rcpts, &["old"]);
        // The first retry's backoff (60 s), not the cooldown's end (30 s).
        assert_eq!(rcpts[0].next_ms, NOW + 60_000);
        assert!(matches!(p.events.last(), Some(Event::Deferred { .. })));

        let h = header(&["a@x"], NOW - 6 * 86400 * 1000);
        let mut rcpts = fresh(1);
        let p = plan(&h, &mut rcpts, &[]);
        assert_eq!(rcpts[0].status, RcptStatus::Failed);
        assert_eq!(p.failed.len(), 1);
        assert_eq!(p.failed[0].status, "4.4.7");
        assert!(p.groups.is_empty());
    }

    #[test]
    fn routed_event_only_when_the_route_changes() {
        let h = header(&["a@x"], NOW - 1000);
        let mut rcpts = vec![RcptState {
            last_route: Some("old".into()),
            attempts: 2,
            ..fresh(1)[0].clone()
        }];
        let p = plan(&h, &mut rcpts, &[]);
        assert!(!p.events.iter().any(|e| matches!(e, Event::Routed { .. })));
        let h = header(&["moved@x"], NOW - 1000);
        let p = plan(&h, &mut rcpts, &[]);
        assert!(
            p.events
                .iter()
                .any(|e| matches!(e, Event::Routed { route, .. } if route == "new"))
        );
    }

    #[test]
    fn bound_at_admission_follows_the_route_now() {
        // Planned for `new`; by the time a slot is granted, the map says old
        // for one of them (a rollback): only the other goes to new.
        let h = header(&["moved@x", "a@x"], NOW);
        let mut rcpts = fresh(2);
        rcpts[0].last_route = Some("new".into());
        rcpts[1].last_route = Some("new".into());
        let platforms = vec!["new".to_string(), "old".to_string()];
        let (go, rerouted) = still_bound(&h, &rcpts, &[0, 1], "new", &platforms, &routes);
        assert_eq!(go, [0]);
        assert_eq!(rerouted, [1]);
        // A hold or delete since the plan: neither goes, and nothing is replanned.
        rcpts[0].hold = Hold::Operator;
        rcpts[1].status = RcptStatus::Deleted;
        let (go, rerouted) = still_bound(&h, &rcpts, &[0, 1], "new", &platforms, &routes);
        assert!(go.is_empty() && rerouted.is_empty());
    }

    #[test]
    fn settle_table() {
        let ok = Reply::new(250, (2, 0, 0), "Ok: queued as ABC");
        let tmp = Reply::new(451, (4, 3, 0), "try later");
        let bad = Reply::new(550, (5, 1, 1), "no such user");
        let platforms = vec!["new".to_string(), "old".to_string()];
        let h = header(&["a@x", "b@x", "c@x"], NOW - 5000);
        let out = AttemptOutcome {
            host: Some("127.0.0.1:25".into()),
            tls: false,
            tls_verified: None,
            rcpts: vec![
                RcptOutcome::Delivered {
                    reply: ok.clone(),
                    remote_queue_id: Some("ABC".into()),
                },
                RcptOutcome::Transient(tmp.clone()),
                RcptOutcome::Permanent(bad.clone()),
            ],
            summary: ok,
            duration: Duration::from_millis(5),
            connect: Duration::from_millis(2),
        };
        for soft_bounce in [false, true] {
            let mut rcpts = fresh(3);
            for r in &mut rcpts {
                r.last_route = Some("old".into());
            }
            let s = settle(
                &h,
                &mut rcpts,
                "old",
                &platforms,
                &[0, 1, 2],
                &out,
                soft_bounce,
                NOW,
                &|_| Duration::from_secs(60),
            );
            assert_eq!(rcpts[0].status, RcptStatus::Delivered);
            assert_eq!(rcpts[0].delivered_to, ["old"]);
            assert_eq!(rcpts[1].status, RcptStatus::Deferred);
            assert_eq!(rcpts[1].next_ms, NOW + 60_000);
            let (want, dsns) = if soft_bounce {
                (RcptStatus::Deferred, 0)
            } else {
                (RcptStatus::Failed, 1)
            };
            assert_eq!(rcpts[2].status, want, "soft_bounce={soft_bounce}");
            assert_eq!(s.failed.len(), dsns);
            // Every outcome carries the attempt's breakdown: 5 s since the
            // arrival, of which the last 5 ms were the attempt (2 ms setup).
            let want = Delays {
                accept_ms: 0,
                queue_ms: 4995,
                connect_ms: 2,
                transmit_ms: 3,
            };
            let got: Vec<Delays> = s
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::Delivered { delays, .. }
                    | Event::Deferred { delays, .. }
                    | Event::Failed { delays, .. } => Some(*delays),
                    _ => None,
                })
                .collect();
            assert_eq!(got, [want; 3], "soft_bounce={soft_bounce}");
        }
    }

    #[test]
    fn records_round_trip_holds() {
        for hold in [Hold::None, Hold::Route, Hold::Operator] {
            let r = RcptState {
                hold,
                attempts: 3,
                status: RcptStatus::Deferred,
                next_ms: NOW + 5,
                ..Default::default()
            };
            let rec = r.to_record(0, NOW);
            let back = RcptState::from_record(Some(&rec), NOW);
            // A route hold is decided again after a restart, at once.
            let want = if hold == Hold::Route {
                Hold::None
            } else {
                hold
            };
            assert_eq!(back.hold, want);
            assert_eq!(back.attempts, 3);
            assert_eq!(rec.status == RcptStatus::Held, hold != Hold::None);
        }
    }
}
