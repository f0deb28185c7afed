//! The queue manager (Postfix's qmgr): which message is due, where each of its
//! recipients goes now, and what happened to each copy.

use crate::client::{AttemptOutcome, Platform, RcptOutcome};
use crate::dsn::{self, DsnRcpt};
use crate::flow::{Admission, Flow, FlowSnapshot, classify};
use godwit_config::{Config, ROUTE_BOTH, ROUTE_HOLD};
use godwit_events::{Event, EventLog};
use godwit_route::SharedRoutes;
use godwit_smtp_proto::{Envelope, MailParams, RcptParams};
use godwit_spool::{Header, RcptStatus, Spool, Spooled, StatusRecord, now_ms};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Clone, Default)]
struct RcptRt {
    status: RcptStatus,
    attempts: u32,
    next_ms: i64,
    /// The route used at the last attempt: a change makes the message due now.
    last_route: Option<String>,
    delivered_to: Vec<String>,
    operator_hold: bool,
    warned: bool,
    last_reply: Option<String>,
}

struct Entry {
    sp: Arc<Spooled>,
    rcpts: Vec<RcptRt>,
    in_flight: bool,
    /// A routing change arrived while in flight.
    recheck: bool,
    /// Operator commands that arrived while in flight, applied afterwards.
    pending_ops: Vec<(QueueOp, String)>,
    due: Option<i64>,
}

#[derive(Default)]
struct State {
    msgs: HashMap<String, Entry>,
    due: BTreeSet<(i64, String)>,
}

impl State {
    fn schedule(&mut self, id: &str, at: Option<i64>) {
        if let Some(e) = self.msgs.get_mut(id) {
            if let Some(old) = e.due.take() {
                self.due.remove(&(old, id.to_string()));
            }
            if let Some(at) = at {
                e.due = Some(at);
                self.due.insert((at, id.to_string()));
            }
        }
    }
}

struct Dest {
    platform: Arc<Platform>,
    flow: Arc<Flow>,
}

struct Inner {
    config: Arc<Config>,
    spool: Arc<Spool>,
    routes: SharedRoutes,
    events: EventLog,
    dests: BTreeMap<String, Dest>,
    state: Mutex<State>,
    wake: Notify,
}

/// The delivery engine. Clone the handle into every place that enqueues.
#[derive(Clone)]
pub struct RelayHandle(Arc<Inner>);
pub type Relay = RelayHandle;

/// What `queue list` shows of a message held in memory.
#[derive(Debug, Clone)]
pub struct QueueSnapshot {
    pub queue_id: String,
    pub message_id: Option<String>,
    pub arrival_ms: i64,
    /// (address, state, attempts, route at the last attempt)
    pub rcpts: Vec<(String, RcptStatus, u32, Option<String>)>,
}

/// An operator's queue command (postsuper/postqueue equivalents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueOp {
    Hold,
    Release,
    /// Retry now.
    Flush,
    /// Decide the route again and retry now.
    Requeue,
    Delete,
}

/// Which recipients a command applies to. Empty fields match everything;
/// `all` must be set for a command with no other filter (no accidents).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcpt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub older_than_s: Option<u64>,
    #[serde(default)]
    pub all: bool,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.queue_id.is_none()
            && self.platform.is_none()
            && self.rcpt.is_none()
            && self.older_than_s.is_none()
            && !self.all
    }

    /// Whether recipient `addr` of message `h`, currently routed to `route`, matches.
    pub fn matches(&self, h: &Header, addr: &str, route: &str, now: i64) -> bool {
        self.queue_id
            .as_ref()
            .is_none_or(|q| q.eq_ignore_ascii_case(&h.queue_id))
            && self
                .platform
                .as_ref()
                .is_none_or(|p| p == route || (route == ROUTE_BOTH))
            && self
                .rcpt
                .as_ref()
                .is_none_or(|r| r.eq_ignore_ascii_case(addr))
            && self
                .older_than_s
                .is_none_or(|s| (now - h.arrival_ms) / 1000 >= s as i64)
    }
}

fn rt_of(s: &Option<StatusRecord>, now: i64) -> RcptRt {
    match s {
        Some(r) => RcptRt {
            status: r.status,
            attempts: r.attempts,
            next_ms: if r.status == RcptStatus::Held && !r.operator_hold {
                now
            } else {
                r.next_ms
            },
            last_route: r.platform.clone(),
            delivered_to: r.delivered_to.clone(),
            operator_hold: r.operator_hold,
            warned: r.warned,
            last_reply: r.reply.clone(),
        },
        None => RcptRt {
            next_ms: now,
            ..Default::default()
        },
    }
}

fn status_rec(i: usize, r: &RcptRt) -> StatusRecord {
    StatusRecord {
        rcpt: i,
        status: r.status,
        at_ms: now_ms(),
        attempts: r.attempts,
        next_ms: if r.next_ms == i64::MAX { 0 } else { r.next_ms },
        platform: r.last_route.clone(),
        reply: r.last_reply.clone(),
        delivered_to: r.delivered_to.clone(),
        operator_hold: r.operator_hold,
        warned: r.warned,
    }
}

/// The earliest attempt due among recipients that can move.
fn next_due(rcpts: &[RcptRt]) -> Option<i64> {
    rcpts
        .iter()
        .filter(|r| !r.status.is_final() && !r.operator_hold && r.status != RcptStatus::Held)
        .map(|r| r.next_ms)
        .filter(|&t| t != i64::MAX)
        .min()
}

impl RelayHandle {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        routes: SharedRoutes,
        events: EventLog,
    ) -> RelayHandle {
        let dests = config
            .platforms
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    Dest {
                        platform: Arc::new(Platform::new(name, p)),
                        flow: Flow::new(p),
                    },
                )
            })
            .collect();
        RelayHandle(Arc::new(Inner {
            config,
            spool,
            routes,
            events,
            dests,
            state: Mutex::default(),
            wake: Notify::new(),
        }))
    }

    /// The routing map this relay decides with (the SMTP RCPT policy reads
    /// the same map for unknown recipients).
    pub fn routes(&self) -> &SharedRoutes {
        &self.0.routes
    }

    /// Adds a message just accepted (or recovered) and makes it due now,
    /// except recipients whose recorded state says otherwise.
    pub fn enqueue(&self, sp: Spooled) {
        let now = now_ms();
        let rcpts: Vec<RcptRt> = sp.status.iter().map(|s| rt_of(s, now)).collect();
        let due = next_due(&rcpts).or_else(|| {
            rcpts
                .iter()
                .any(|r| r.status == RcptStatus::Held && !r.operator_hold)
                .then_some(now)
        });
        let id = sp.header.queue_id.clone();
        let mut st = self.0.state.lock().unwrap();
        st.msgs.insert(
            id.clone(),
            Entry {
                sp: Arc::new(sp),
                rcpts,
                in_flight: false,
                recheck: false,
                pending_ops: Vec::new(),
                due: None,
            },
        );
        st.schedule(&id, due);
        drop(st);
        self.0.wake.notify_one();
    }

    pub fn len(&self) -> usize {
        self.0.state.lock().unwrap().msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn destinations(&self) -> BTreeMap<String, FlowSnapshot> {
        self.0
            .dests
            .iter()
            .map(|(n, d)| {
                let mut s = d.flow.snapshot();
                s.down_hosts = d.platform.down_hosts();
                (n.clone(), s)
            })
            .collect()
    }

    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        let st = self.0.state.lock().unwrap();
        st.msgs
            .values()
            .map(|e| QueueSnapshot {
                queue_id: e.sp.header.queue_id.clone(),
                message_id: e.sp.header.message_id.clone(),
                arrival_ms: e.sp.header.arrival_ms,
                rcpts: e
                    .sp
                    .header
                    .envelope
                    .rcpts
                    .iter()
                    .zip(&e.rcpts)
                    .map(|((a, _), r)| (a.clone(), r.status, r.attempts, r.last_route.clone()))
                    .collect(),
            })
            .collect()
    }

    /// Called when the routing version changes: every queued message with a
    /// recipient whose route is now different becomes due at once, so a
    /// routing change or rollback applies to mail already queued.
    pub fn routes_changed(&self) {
        let now = now_ms();
        let mut st = self.0.state.lock().unwrap();
        let mut due_now = Vec::new();
        for (id, e) in st.msgs.iter_mut() {
            if e.in_flight {
                e.recheck = true;
                continue;
            }
            let dsn = e.sp.header.kind.is_some();
            let changed = !dsn
                && e.sp
                    .header
                    .envelope
                    .rcpts
                    .iter()
                    .zip(&e.rcpts)
                    .any(|((addr, _), r)| {
                        !r.status.is_final()
                            && !r.operator_hold
                            && r.last_route.as_deref()
                                != Some(self.0.routes.decide(addr).route.as_str())
                    });
            if changed {
                for r in e
                    .rcpts
                    .iter_mut()
                    .filter(|r| !r.status.is_final() && !r.operator_hold)
                {
                    r.next_ms = now;
                    if r.status == RcptStatus::Held {
                        r.status = RcptStatus::Deferred;
                    }
                }
                due_now.push(id.clone());
            }
        }
        for id in &due_now {
            st.schedule(id, Some(now));
        }
        drop(st);
        if !due_now.is_empty() {
            self.0.wake.notify_one();
        }
    }

    /// Runs the scheduler until the process ends.
    pub async fn run(self) {
        let scan = self.0.config.queue.scan_interval;
        loop {
            let now = now_ms();
            let (ready, next) = {
                let mut st = self.0.state.lock().unwrap();
                let mut ready = Vec::new();
                while let Some((at, id)) = st.due.first().cloned() {
                    if at > now {
                        break;
                    }
                    st.due.remove(&(at, id.clone()));
                    if let Some(e) = st.msgs.get_mut(&id) {
                        e.due = None;
                        if !e.in_flight {
                            e.in_flight = true;
                            ready.push(id);
                        }
                    }
                }
                (ready, st.due.first().map(|(at, _)| *at))
            };
            for id in ready {
                let me = self.clone();
                tokio::spawn(async move { me.attempt(&id).await });
            }
            let wait = next.map_or(scan, |at| {
                Duration::from_millis((at - now).clamp(1, scan.as_millis() as i64) as u64)
            });
            tokio::select! {
                _ = self.0.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let q = &self.0.config.queue;
        let base =
            q.min_backoff.as_secs_f64() * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
        let jitter = rand::random_range(0.8..1.2);
        Duration::from_secs_f64(
            (base * jitter).clamp(q.min_backoff.as_secs_f64(), q.max_backoff.as_secs_f64()),
        )
    }

    /// The platforms a recipient must still reach under `route`.
    fn targets(&self, route: &str, delivered_to: &[String]) -> Vec<String> {
        let all: Vec<String> = if route == ROUTE_BOTH {
            self.0.dests.keys().cloned().collect()
        } else {
            vec![route.to_string()]
        };
        all.into_iter()
            .filter(|p| !delivered_to.contains(p))
            .collect()
    }

    async fn attempt(&self, id: &str) {
        let inner = &self.0;
        let (sp, mut rcpts) = {
            let st = inner.state.lock().unwrap();
            match st.msgs.get(id) {
                Some(e) => (e.sp.clone(), e.rcpts.clone()),
                None => return,
            }
        };
        let now = now_ms();
        let h = &sp.header;
        let qid = &h.queue_id;
        let mid = &h.message_id;
        let expired = now - h.arrival_ms > inner.config.queue.max_lifetime.as_millis() as i64;
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut changed: BTreeSet<usize> = BTreeSet::new();
        let mut failed: Vec<DsnRcpt> = Vec::new();
        for (i, (addr, params)) in h.envelope.rcpts.iter().enumerate() {
            let r = &mut rcpts[i];
            if r.status.is_final() || r.next_ms > now || r.operator_hold {
                continue;
            }
            let (route, why, version) = if h.kind.is_some() {
                (
                    inner.config.dsn_platform(),
                    "DSN to the sender".to_string(),
                    inner.routes.version(),
                )
            } else {
                let d = inner.routes.decide(addr);
                (d.route, d.why.to_string(), d.version)
            };
            if r.last_route.as_deref() != Some(&route) || r.attempts == 0 {
                inner.events.emit(Event::Routed {
                    queue_id: qid.clone(),
                    message_id: mid.clone(),
                    rcpt: addr.clone(),
                    route: route.clone(),
                    why: why.clone(),
                    routing_version: version,
                });
            }
            r.last_route = Some(route.clone());
            if expired {
                let reply = format!(
                    "4.4.7 message expired after {} in the queue",
                    humanize(inner.config.queue.max_lifetime)
                );
                r.status = RcptStatus::Failed;
                r.last_reply = Some(reply.clone());
                changed.insert(i);
                inner.events.emit(Event::Failed {
                    queue_id: qid.clone(),
                    message_id: mid.clone(),
                    rcpt: addr.clone(),
                    platform: route.clone(),
                    reply: reply.clone(),
                    reason: "expired".into(),
                });
                failed.push(dsn_rcpt(addr, params, "failed", "4.4.7", &reply, None));
                continue;
            }
            if route == ROUTE_HOLD {
                if r.status != RcptStatus::Held {
                    r.status = RcptStatus::Held;
                    changed.insert(i);
                    inner.events.emit(Event::Held {
                        queue_id: qid.clone(),
                        message_id: mid.clone(),
                        rcpt: addr.clone(),
                        why,
                    });
                }
                r.next_ms = i64::MAX;
                continue;
            }
            let targets = self.targets(&route, &r.delivered_to);
            if targets.is_empty() {
                // Every platform of the route already has its copy.
                r.status = RcptStatus::Delivered;
                changed.insert(i);
                continue;
            }
            for p in targets {
                match inner.dests.get(&p) {
                    None => {
                        // A route naming a platform this gateway does not know:
                        // keep the mail (never bounce on a configuration mistake).
                        let reply = format!("4.3.5 route `{p}` names no configured platform");
                        self.defer(h, i, r, &p, None, &reply, None, now);
                        changed.insert(i);
                    }
                    Some(d) => match d.flow.down_for() {
                        // Circuit open: the mail waits without taking a worker.
                        Some(wait) => {
                            let reply = format!(
                                "4.4.1 platform {p} is marked down (circuit open) after repeated failures"
                            );
                            self.defer(
                                h,
                                i,
                                r,
                                &p,
                                None,
                                &reply,
                                Some(now + wait.as_millis() as i64 + 10),
                                now,
                            );
                            changed.insert(i);
                        }
                        None => groups.entry(p).or_default().push(i),
                    },
                }
            }
        }
        // Delay warnings (RFC 3464 action=delayed), once per recipient.
        if let Some(after) = inner.config.queue.delay_warning
            && h.kind.is_none()
            && now - h.arrival_ms >= after.as_millis() as i64
        {
            let mut delayed = Vec::new();
            for (i, (addr, params)) in h.envelope.rcpts.iter().enumerate() {
                let r = &mut rcpts[i];
                if !r.status.is_final() && !r.warned && !groups.values().any(|g| g.contains(&i)) {
                    r.warned = true;
                    changed.insert(i);
                    if dsn::wanted(&params.notify, "delayed") {
                        let reply = r
                            .last_reply
                            .clone()
                            .unwrap_or_else(|| "4.4.7 still queued".into());
                        delayed.push(dsn_rcpt(addr, params, "delayed", "4.4.7", &reply, None));
                    }
                }
            }
            if !delayed.is_empty() {
                self.send_dsn(&sp, delayed).await;
            }
        }
        if !changed.is_empty() {
            let recs: Vec<_> = changed.iter().map(|&i| status_rec(i, &rcpts[i])).collect();
            if let Err(e) = inner.spool.record_many(qid, &recs) {
                tracing::error!("{e}");
            }
        }
        if !groups.is_empty() {
            let spool = inner.spool.clone();
            let sp2 = sp.clone();
            match tokio::task::spawn_blocking(move || spool.read_body(&sp2))
                .await
                .ok()
                .and_then(|r| r.ok())
            {
                Some(body) => {
                    let body = Arc::new(body);
                    let mut tasks = tokio::task::JoinSet::new();
                    let single = groups.len() == 1;
                    for (platform, idxs) in groups.clone() {
                        let d = &inner.dests[&platform];
                        let (p, flow) = (d.platform.clone(), d.flow.clone());
                        let sp = sp.clone();
                        let body = body.clone();
                        let helo = inner.config.hostname.clone();
                        let relay = self.clone();
                        let id = id.to_string();
                        tasks.spawn(async move {
                            match flow.admit().await {
                                Admission::Granted(_permit) => {
                                    // Waiting for a slot can take long: an operator may
                                    // have held or deleted the message meanwhile. Look
                                    // again now, before anything is sent.
                                    let idxs = relay.still_deliverable(&id, &idxs);
                                    if idxs.is_empty() {
                                        return (platform, idxs, Ok(None));
                                    }
                                    let out = p
                                        .deliver(
                                            &helo,
                                            &sp.header.queue_id,
                                            &sp.header.envelope,
                                            &idxs,
                                            &body,
                                        )
                                        .await;
                                    let signal = classify(&out.summary, out.host.is_some());
                                    flow.observe(signal, out.summary.code);
                                    (platform, idxs, Ok(Some(out)))
                                }
                                Admission::Down(wait) => (platform, idxs, Err(wait)),
                            }
                        });
                    }
                    // Settle each platform as it finishes: a slow platform never
                    // delays the record of the other's deliveries.
                    while let Some(Ok((platform, idxs, out))) = tasks.join_next().await {
                        let records = match out {
                            Ok(Some(out)) => {
                                self.settle(&sp, &mut rcpts, &platform, &idxs, out, &mut failed)
                            }
                            Ok(None) => continue,
                            Err(wait) => {
                                let reply = format!(
                                    "4.4.1 platform {platform} is marked down (circuit open)"
                                );
                                idxs.iter()
                                    .map(|&i| {
                                        self.defer(
                                            h,
                                            i,
                                            &mut rcpts[i],
                                            &platform,
                                            None,
                                            &reply,
                                            Some(now_ms() + wait.as_millis() as i64),
                                            now_ms(),
                                        );
                                        status_rec(i, &rcpts[i])
                                    })
                                    .collect()
                            }
                        };
                        if single && rcpts.iter().all(|r| r.status.is_final()) && failed.is_empty()
                        {
                            // Everything is delivered: the durable removal below is
                            // the record (one group-committed directory sync).
                            continue;
                        }
                        // Written (fdatasync'ed for final outcomes) right after the
                        // platform's reply: the window in which a crash duplicates.
                        if let Err(e) = inner.spool.record_many(qid, &records) {
                            tracing::error!("{e}");
                        }
                    }
                }
                None => {
                    tracing::error!(queue_id = %qid, "cannot read message body from the spool; will retry")
                }
            }
        }
        if !failed.is_empty() && h.kind.is_none() {
            let wanted: Vec<DsnRcpt> = failed
                .into_iter()
                .filter(|f| {
                    h.envelope
                        .rcpts
                        .iter()
                        .find(|(a, _)| *a == f.address)
                        .is_none_or(|(_, p)| dsn::wanted(&p.notify, "failed"))
                })
                .collect();
            if !wanted.is_empty() {
                self.send_dsn(&sp, wanted).await;
            }
        }
        self.write_back(id, rcpts).await;
    }

    #[allow(clippy::too_many_arguments)]
    fn defer(
        &self,
        h: &Header,
        i: usize,
        r: &mut RcptRt,
        platform: &str,
        host: Option<String>,
        reply: &str,
        at: Option<i64>,
        now: i64,
    ) {
        r.status = RcptStatus::Deferred;
        r.attempts += 1;
        let next = at.unwrap_or_else(|| now + self.backoff(r.attempts).as_millis() as i64);
        // With dual delivery, the earliest pending copy decides.
        r.next_ms = if r.next_ms > now && r.next_ms != i64::MAX {
            r.next_ms.min(next)
        } else {
            next
        };
        r.last_reply = Some(reply.to_string());
        self.0.events.emit(Event::Deferred {
            queue_id: h.queue_id.clone(),
            message_id: h.message_id.clone(),
            rcpt: h.envelope.rcpts[i].0.clone(),
            platform: platform.to_string(),
            host,
            reply: reply.to_string(),
            attempts: r.attempts,
            next_attempt_in_s: ((r.next_ms - now) / 1000).max(0) as u64,
        });
    }

    fn settle(
        &self,
        sp: &Spooled,
        rcpts: &mut [RcptRt],
        platform: &str,
        idxs: &[usize],
        out: AttemptOutcome,
        failed: &mut Vec<DsnRcpt>,
    ) -> Vec<StatusRecord> {
        let inner = &self.0;
        let h = &sp.header;
        let now = now_ms();
        let host = out.host.clone().unwrap_or_default();
        inner.events.emit(Event::Attempt {
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
        });
        let mut records = Vec::new();
        for (&i, o) in idxs.iter().zip(out.rcpts) {
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
                    if self.targets(&route, &r.delivered_to).is_empty() {
                        r.status = RcptStatus::Delivered;
                    }
                    inner.events.emit(Event::Delivered {
                        queue_id: h.queue_id.clone(),
                        message_id: h.message_id.clone(),
                        rcpt: addr.clone(),
                        platform: platform.to_string(),
                        host: host.clone(),
                        reply: reply.to_string(),
                        remote_queue_id,
                        delay_ms: (now - h.arrival_ms).max(0) as u64,
                    });
                }
                RcptOutcome::Permanent(reply) if !inner.config.queue.soft_bounce => {
                    r.attempts += 1;
                    r.status = RcptStatus::Failed;
                    r.last_reply = Some(reply.to_string());
                    inner.events.emit(Event::Failed {
                        queue_id: h.queue_id.clone(),
                        message_id: h.message_id.clone(),
                        rcpt: addr.clone(),
                        platform: platform.to_string(),
                        reply: reply.to_string(),
                        reason: "rejected by platform".into(),
                    });
                    let status = reply.enhanced_string().unwrap_or_else(|| "5.0.0".into());
                    failed.push(dsn_rcpt(
                        addr,
                        params,
                        "failed",
                        &status,
                        &reply.to_string(),
                        out.host.clone(),
                    ));
                }
                RcptOutcome::Permanent(reply) | RcptOutcome::Transient(reply) => {
                    self.defer(
                        h,
                        i,
                        r,
                        platform,
                        out.host.clone(),
                        &reply.to_string(),
                        None,
                        now,
                    );
                }
            }
            records.push(status_rec(i, r));
        }
        records
    }

    async fn write_back(&self, id: &str, rcpts: Vec<RcptRt>) {
        let inner = &self.0;
        let (all_final, ops) = {
            let mut st = inner.state.lock().unwrap();
            let Some(e) = st.msgs.get_mut(id) else { return };
            e.rcpts = rcpts;
            e.in_flight = false;
            (
                e.rcpts.iter().all(|r| r.status.is_final()),
                std::mem::take(&mut e.pending_ops),
            )
        };
        if all_final {
            {
                let mut st = inner.state.lock().unwrap();
                st.schedule(id, None);
                st.msgs.remove(id);
            }
            let spool = inner.spool.clone();
            let qid = id.to_string();
            match tokio::task::spawn_blocking(move || spool.remove_durable(&qid)).await {
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(e) => tracing::error!("{e}"),
                Ok(Ok(())) => {}
            }
            return;
        }
        for (op, actor) in ops {
            let sel = Selector {
                queue_id: Some(id.to_string()),
                ..Default::default()
            };
            self.apply_op(&op, &sel, &actor);
        }
        let mut st = inner.state.lock().unwrap();
        let Some(e) = st.msgs.get_mut(id) else { return };
        let recheck = std::mem::take(&mut e.recheck);
        if recheck {
            let now = now_ms();
            e.rcpts
                .iter_mut()
                .filter(|r| !r.status.is_final() && !r.operator_hold)
                .for_each(|r| r.next_ms = now);
            st.schedule(id, Some(now));
            drop(st);
            inner.wake.notify_one();
        } else {
            let due = next_due(&e.rcpts);
            st.schedule(id, due);
        }
    }

    /// Builds a DSN and queues it like any other message (traced, retried).
    async fn send_dsn(&self, sp: &Spooled, rcpts: Vec<DsnRcpt>) {
        let inner = &self.0;
        let h = &sp.header;
        // Never a DSN about a DSN, nor to the null sender (RFC 3461 6.2).
        if h.envelope.mail_from.is_empty() || h.kind.is_some() {
            return;
        }
        let spool = inner.spool.clone();
        let sp2 = sp.clone();
        let body = tokio::task::spawn_blocking(move || spool.read_body(&sp2))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let action = rcpts[0].action.to_string();
        let message = dsn::build(&inner.config.hostname, h, &body, &rcpts, now_ms());
        let header = Header {
            queue_id: inner.spool.new_queue_id(),
            arrival_ms: now_ms(),
            message_id: Some(format!("<{}.dsn@{}>", h.queue_id, inner.config.hostname)),
            envelope: Envelope {
                mail_from: String::new(),
                mail_params: MailParams::default(),
                rcpts: vec![(h.envelope.mail_from.clone(), RcptParams::default())],
                helo: inner.config.hostname.clone(),
                esmtp: true,
                client_ip: "127.0.0.1".into(),
                tls: false,
            },
            kind: Some("dsn".into()),
        };
        let spool = inner.spool.clone();
        let hdr = header.clone();
        match tokio::task::spawn_blocking(move || spool.store(&hdr, &message)).await {
            Ok(Ok(stored)) => {
                inner.events.emit(Event::DsnQueued {
                    queue_id: header.queue_id.clone(),
                    original_queue_id: h.queue_id.clone(),
                    original_message_id: h.message_id.clone(),
                    to: h.envelope.mail_from.clone(),
                    action,
                    rcpts: rcpts.iter().map(|r| r.address.clone()).collect(),
                });
                self.enqueue(stored);
            }
            Ok(Err(e)) => tracing::error!("cannot queue DSN for {}: {e}", h.queue_id),
            Err(e) => tracing::error!("cannot queue DSN for {}: {e}", h.queue_id),
        }
    }

    /// Of `idxs`, the recipients of message `id` that may still be sent:
    /// none if the message was deleted, none on operator hold.
    fn still_deliverable(&self, id: &str, idxs: &[usize]) -> Vec<usize> {
        let st = self.0.state.lock().unwrap();
        let Some(e) = st.msgs.get(id) else {
            return Vec::new();
        };
        idxs.iter()
            .copied()
            .filter(|&i| !e.rcpts.get(i).is_some_and(|r| r.operator_hold))
            .collect()
    }

    /// Applies an operator's queue command to the messages in memory (and
    /// their spool records). Returns how many recipients (or, for delete,
    /// messages) it affected.
    pub fn apply_op(&self, op: &QueueOp, sel: &Selector, actor: &str) -> usize {
        let inner = &self.0;
        let now = now_ms();
        let mut affected = 0;
        let mut to_delete = Vec::new();
        let mut records: Vec<(String, Vec<StatusRecord>)> = Vec::new();
        let mut wake = false;
        {
            let mut st = inner.state.lock().unwrap();
            let ids: Vec<String> = st.msgs.keys().cloned().collect();
            for id in ids {
                let e = st.msgs.get_mut(&id).unwrap();
                let h = e.sp.header.clone();
                let matching: Vec<usize> = h
                    .envelope
                    .rcpts
                    .iter()
                    .enumerate()
                    .filter(|(i, (addr, _))| {
                        let r = &e.rcpts[*i];
                        let route = r
                            .last_route
                            .clone()
                            .unwrap_or_else(|| inner.routes.decide(addr).route);
                        !r.status.is_final() && sel.matches(&h, addr, &route, now)
                    })
                    .map(|(i, _)| i)
                    .collect();
                if matching.is_empty() {
                    continue;
                }
                if e.in_flight && *op != QueueOp::Delete {
                    if *op == QueueOp::Hold {
                        // Seen at once by `still_deliverable`; the pending op
                        // makes it stick (and emits the event) after the attempt.
                        for &i in &matching {
                            e.rcpts[i].operator_hold = true;
                        }
                    }
                    e.pending_ops.push((op.clone(), actor.to_string()));
                    affected += matching.len();
                    continue;
                }
                let mut recs = Vec::new();
                match op {
                    QueueOp::Delete => {
                        to_delete.push((
                            id.clone(),
                            h.message_id.clone(),
                            matching
                                .iter()
                                .map(|&i| h.envelope.rcpts[i].0.clone())
                                .collect::<Vec<_>>(),
                        ));
                        affected += 1;
                        continue;
                    }
                    QueueOp::Hold => {
                        for &i in &matching {
                            let r = &mut e.rcpts[i];
                            if !r.operator_hold {
                                r.operator_hold = true;
                                r.status = RcptStatus::Held;
                                recs.push(status_rec(i, r));
                                inner.events.emit(Event::Held {
                                    queue_id: id.clone(),
                                    message_id: h.message_id.clone(),
                                    rcpt: h.envelope.rcpts[i].0.clone(),
                                    why: format!("operator hold by {actor}"),
                                });
                                affected += 1;
                            }
                        }
                    }
                    QueueOp::Release | QueueOp::Flush | QueueOp::Requeue => {
                        for &i in &matching {
                            let r = &mut e.rcpts[i];
                            if *op == QueueOp::Release {
                                if !r.operator_hold && r.status != RcptStatus::Held {
                                    continue;
                                }
                                r.operator_hold = false;
                                inner.events.emit(Event::Released {
                                    queue_id: id.clone(),
                                    message_id: h.message_id.clone(),
                                    rcpt: h.envelope.rcpts[i].0.clone(),
                                    actor: actor.to_string(),
                                });
                            } else if r.operator_hold {
                                continue; // flush does not override a hold
                            }
                            if *op == QueueOp::Requeue {
                                r.last_route = None;
                            }
                            r.status = RcptStatus::Deferred;
                            r.next_ms = now;
                            recs.push(status_rec(i, r));
                            affected += 1;
                        }
                    }
                }
                if !recs.is_empty() {
                    records.push((id.clone(), recs));
                }
                let due = next_due(&e.rcpts);
                st.schedule(&id, due);
                wake = true;
            }
            for (id, _, _) in &to_delete {
                st.schedule(id, None);
                st.msgs.remove(id);
            }
        }
        for (id, recs) in records {
            if let Err(e) = inner.spool.record_many(&id, &recs) {
                tracing::error!("{e}");
            }
        }
        for (id, message_id, rcpts) in to_delete {
            if let Err(e) = inner.spool.remove_durable(&id) {
                tracing::error!("{e}");
            }
            inner.events.emit(Event::QueueDeleted {
                queue_id: id,
                message_id,
                rcpts,
                actor: actor.to_string(),
            });
        }
        if wake {
            inner.wake.notify_one();
        }
        affected
    }
}

fn dsn_rcpt(
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

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}
