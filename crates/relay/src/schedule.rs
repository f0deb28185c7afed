//! The queue manager (Postfix's qmgr): which message is due, where each of its
//! recipients goes now, and what happened to each.

use crate::client::{AttemptOutcome, Platform, RcptOutcome};
use godwit_config::{Config, ROUTE_HOLD};
use godwit_events::{Event, EventLog};
use godwit_route::SharedRoutes;
use godwit_spool::{RcptStatus, Spool, Spooled, StatusRecord, now_ms};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

#[derive(Debug, Clone)]
struct RcptRt {
    status: RcptStatus,
    attempts: u32,
    next_ms: i64,
    /// The route used at the last attempt: a change makes the message due now.
    last_route: Option<String>,
}

struct Entry {
    sp: Arc<Spooled>,
    rcpts: Vec<RcptRt>,
    in_flight: bool,
    /// A routing change arrived while in flight.
    recheck: bool,
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

struct Inner {
    config: Arc<Config>,
    spool: Arc<Spool>,
    routes: SharedRoutes,
    events: EventLog,
    platforms: HashMap<String, (Arc<Platform>, Arc<Semaphore>)>,
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
    pub rcpts: Vec<(String, RcptStatus, u32)>,
}

impl RelayHandle {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        routes: SharedRoutes,
        events: EventLog,
    ) -> RelayHandle {
        let platforms = config
            .platforms
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    (
                        Arc::new(Platform::new(name, p)),
                        Arc::new(Semaphore::new(p.max_connections)),
                    ),
                )
            })
            .collect();
        RelayHandle(Arc::new(Inner {
            config,
            spool,
            routes,
            events,
            platforms,
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
        let rcpts: Vec<RcptRt> = sp
            .status
            .iter()
            .map(|s| match s {
                Some(r) => RcptRt {
                    status: r.status,
                    attempts: r.attempts,
                    next_ms: if r.status == RcptStatus::Held {
                        now
                    } else {
                        r.next_ms
                    },
                    last_route: r.platform.clone(),
                },
                None => RcptRt {
                    status: RcptStatus::Pending,
                    attempts: 0,
                    next_ms: now,
                    last_route: None,
                },
            })
            .collect();
        let due = next_due(&rcpts, true);
        let id = sp.header.queue_id.clone();
        let mut st = self.0.state.lock().unwrap();
        st.msgs.insert(
            id.clone(),
            Entry {
                sp: Arc::new(sp),
                rcpts,
                in_flight: false,
                recheck: false,
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
                    .map(|((a, _), r)| (a.clone(), r.status, r.attempts))
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
            let changed =
                e.sp.header
                    .envelope
                    .rcpts
                    .iter()
                    .zip(&e.rcpts)
                    .any(|((addr, _), r)| {
                        !r.status.is_final()
                            && r.last_route.as_deref()
                                != Some(self.0.routes.decide(addr).route.as_str())
                    });
            if changed {
                due_now.push(id.clone());
            }
        }
        for id in &due_now {
            if let Some(e) = st.msgs.get_mut(id) {
                for r in e.rcpts.iter_mut().filter(|r| !r.status.is_final()) {
                    r.next_ms = now;
                }
            }
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
        let qid = &sp.header.queue_id;
        let mid = &sp.header.message_id;
        let expired =
            now - sp.header.arrival_ms > inner.config.queue.max_lifetime.as_millis() as i64;
        let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
        let mut records = Vec::new();
        for (i, (addr, _)) in sp.header.envelope.rcpts.iter().enumerate() {
            let r = &mut rcpts[i];
            if r.status.is_final() || r.next_ms > now {
                continue;
            }
            let d = inner.routes.decide(addr);
            if r.last_route.as_deref() != Some(&d.route) || r.attempts == 0 {
                inner.events.emit(Event::Routed {
                    queue_id: qid.clone(),
                    message_id: mid.clone(),
                    rcpt: addr.clone(),
                    route: d.route.clone(),
                    why: d.why.to_string(),
                    routing_version: d.version,
                });
            }
            r.last_route = Some(d.route.clone());
            if expired {
                let reply = format!(
                    "4.4.7 message expired after {:?} in the queue",
                    inner.config.queue.max_lifetime
                );
                r.status = RcptStatus::Failed;
                records.push(status_rec(i, r, Some(reply.clone())));
                inner.events.emit(Event::Failed {
                    queue_id: qid.clone(),
                    message_id: mid.clone(),
                    rcpt: addr.clone(),
                    platform: d.route.clone(),
                    reply,
                    reason: "expired".into(),
                });
            } else if d.route == ROUTE_HOLD {
                if r.status != RcptStatus::Held {
                    r.status = RcptStatus::Held;
                    records.push(status_rec(i, r, None));
                    inner.events.emit(Event::Held {
                        queue_id: qid.clone(),
                        message_id: mid.clone(),
                        rcpt: addr.clone(),
                        why: d.why.to_string(),
                    });
                }
                r.next_ms = i64::MAX;
            } else if !inner.platforms.contains_key(&d.route) {
                // A route naming a platform this gateway does not know: keep the
                // mail (never bounce on a configuration mistake) and say so.
                r.status = RcptStatus::Deferred;
                r.attempts += 1;
                r.next_ms = now + self.backoff(r.attempts).as_millis() as i64;
                let reply = format!("4.3.5 route `{}` names no configured platform", d.route);
                records.push(status_rec(i, r, Some(reply.clone())));
                inner.events.emit(Event::Deferred {
                    queue_id: qid.clone(),
                    message_id: mid.clone(),
                    rcpt: addr.clone(),
                    platform: d.route.clone(),
                    host: None,
                    reply,
                    attempts: r.attempts,
                    next_attempt_in_s: ((r.next_ms - now) / 1000) as u64,
                });
            } else {
                groups.entry(d.route).or_default().push(i);
            }
        }
        if !records.is_empty() {
            if let Err(e) = inner.spool.record_many(qid, &records) {
                tracing::error!("{e}");
            }
        }
        if !groups.is_empty() {
            let body = {
                let spool = inner.spool.clone();
                let sp2 = sp.clone();
                tokio::task::spawn_blocking(move || spool.read_body(&sp2))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
            };
            match body {
                Some(body) => {
                    let body = Arc::new(body);
                    let mut tasks = Vec::new();
                    for (platform, idxs) in groups {
                        let (p, sem) = inner.platforms[&platform].clone();
                        let sp = sp.clone();
                        let body = body.clone();
                        let helo = inner.config.hostname.clone();
                        tasks.push(tokio::spawn(async move {
                            let _permit = sem.acquire_owned().await;
                            let out = p
                                .deliver(
                                    &helo,
                                    &sp.header.queue_id,
                                    &sp.header.envelope,
                                    &idxs,
                                    &body,
                                )
                                .await;
                            (platform, idxs, out)
                        }));
                    }
                    let single = tasks.len() == 1;
                    for t in tasks {
                        if let Ok((platform, idxs, out)) = t.await {
                            let records = self.settle(&sp, &mut rcpts, &platform, &idxs, out);
                            if single && rcpts.iter().all(|r| r.status.is_final()) {
                                // Everything is final: the durable removal below
                                // is the record (one group-committed sync).
                                continue;
                            }
                            // Written (and fsynced for final outcomes) right after
                            // the platform's reply: the window in which a crash
                            // could duplicate.
                            if let Err(e) = inner.spool.record_many(qid, &records) {
                                tracing::error!("{e}");
                            }
                        }
                    }
                }
                None => {
                    tracing::error!(queue_id = %qid, "cannot read message body from the spool; will retry")
                }
            }
        }
        // Write back and reschedule.
        let all_final = rcpts.iter().all(|r| r.status.is_final());
        let due = next_due(&rcpts, false);
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
        let mut st = inner.state.lock().unwrap();
        if let Some(e) = st.msgs.get_mut(id) {
            e.rcpts = rcpts;
            e.in_flight = false;
        }
        // A message that found nothing due (all held) waits for a route change.
        let recheck = st
            .msgs
            .get_mut(id)
            .is_some_and(|e| std::mem::take(&mut e.recheck));
        if recheck {
            // The routing changed during this attempt: look again now.
            if let Some(e) = st.msgs.get_mut(id) {
                let now = now_ms();
                e.rcpts
                    .iter_mut()
                    .filter(|r| !r.status.is_final())
                    .for_each(|r| r.next_ms = now);
            }
            st.schedule(id, Some(now_ms()));
            drop(st);
            inner.wake.notify_one();
        } else {
            st.schedule(id, due);
        }
    }

    fn settle(
        &self,
        sp: &Spooled,
        rcpts: &mut [RcptRt],
        platform: &str,
        idxs: &[usize],
        out: AttemptOutcome,
    ) -> Vec<StatusRecord> {
        let inner = &self.0;
        let qid = &sp.header.queue_id;
        let mid = &sp.header.message_id;
        let now = now_ms();
        let host = out.host.clone().unwrap_or_default();
        inner.events.emit(Event::Attempt {
            queue_id: qid.clone(),
            message_id: mid.clone(),
            platform: platform.to_string(),
            host: host.clone(),
            rcpts: idxs
                .iter()
                .map(|&i| sp.header.envelope.rcpts[i].0.clone())
                .collect(),
            code: out.summary.code,
            enhanced: out.summary.enhanced_string(),
            reply: out.summary.to_string(),
            duration_ms: out.duration.as_millis() as u64,
            tls: out.tls,
        });
        let mut records = Vec::new();
        for (&i, o) in idxs.iter().zip(out.rcpts) {
            let addr = sp.header.envelope.rcpts[i].0.clone();
            let r = &mut rcpts[i];
            r.attempts += 1;
            match o {
                RcptOutcome::Delivered {
                    reply,
                    remote_queue_id,
                } => {
                    r.status = RcptStatus::Delivered;
                    records.push(status_rec(i, r, Some(reply.to_string())));
                    inner.events.emit(Event::Delivered {
                        queue_id: qid.clone(),
                        message_id: mid.clone(),
                        rcpt: addr,
                        platform: platform.to_string(),
                        host: host.clone(),
                        reply: reply.to_string(),
                        remote_queue_id,
                        delay_ms: (now - sp.header.arrival_ms).max(0) as u64,
                    });
                }
                RcptOutcome::Permanent(reply) if !inner.config.queue.soft_bounce => {
                    r.status = RcptStatus::Failed;
                    records.push(status_rec(i, r, Some(reply.to_string())));
                    inner.events.emit(Event::Failed {
                        queue_id: qid.clone(),
                        message_id: mid.clone(),
                        rcpt: addr,
                        platform: platform.to_string(),
                        reply: reply.to_string(),
                        reason: "rejected by platform".into(),
                    });
                }
                RcptOutcome::Permanent(reply) | RcptOutcome::Transient(reply) => {
                    r.status = RcptStatus::Deferred;
                    r.next_ms = now + self.backoff(r.attempts).as_millis() as i64;
                    records.push(status_rec(i, r, Some(reply.to_string())));
                    inner.events.emit(Event::Deferred {
                        queue_id: qid.clone(),
                        message_id: mid.clone(),
                        rcpt: addr,
                        platform: platform.to_string(),
                        host: out.host.clone(),
                        reply: reply.to_string(),
                        attempts: r.attempts,
                        next_attempt_in_s: ((r.next_ms - now) / 1000).max(0) as u64,
                    });
                }
            }
        }
        records
    }
}

fn status_rec(i: usize, r: &RcptRt, reply: Option<String>) -> StatusRecord {
    StatusRecord {
        rcpt: i,
        status: r.status,
        at_ms: now_ms(),
        attempts: r.attempts,
        next_ms: if r.next_ms == i64::MAX { 0 } else { r.next_ms },
        platform: r.last_route.clone(),
        reply,
    }
}

/// The earliest attempt due among non-final, non-held recipients. Held ones
/// wait for a route change; on recovery they are re-evaluated at once.
fn next_due(rcpts: &[RcptRt], recovering: bool) -> Option<i64> {
    rcpts
        .iter()
        .filter(|r| !r.status.is_final() && (recovering || r.status != RcptStatus::Held))
        .map(|r| r.next_ms)
        .filter(|&t| t != i64::MAX)
        .min()
}
