//! The queue manager's driver (Postfix's qmgr): knows every queued message,
//! picks the due ones,
//! plans each with `plan::plan_attempt`, and hands each platform's share to
//! that platform's ready queue. A platform's dispatcher grants its delivery
//! slots (flow control) to the waiting attempts in order; only then is the
//! route checked again and the body read, so a routing change or rollback
//! reaches every message whose SMTP transaction has not begun, and a backlog
//! costs no memory for bodies. The ready queue is capped (KumoMTA's
//! `max_ready`): past it, a due message is parked and waits for a free place.
//!
//! Only messages being planned or delivered (Postfix's active queue) are
//! loaded: header and recipient states. A message that waits (deferred,
//! parked or held) rests as its queue id, due time and a few bytes per
//! recipient (`Resting`), and is read back from the spool when it is due,
//! so a backlog costs memory per message, not per header.

use crate::client::{AttemptOutcome, Body, Platform};
use crate::dsn::{self, DsnRcpt};
use crate::flow::{Admission, Flow, FlowSnapshot, Permit, classify};
use crate::plan::{self, Hold, RcptState, Routed, World};
use crate::queue_op::{self, QueueOp, Selector};
use godwit_config::Config;
use godwit_events::{Event, EventLog};
use godwit_route::SharedRoutes;
use godwit_smtp_proto::{Envelope, MailParams, RcptParams};
use godwit_spool::{Header, RcptStatus, Spool, SpoolError, Spooled, StatusRecord, now_ms};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

/// After this many failed reads of its body, a message is moved to
/// `spool/corrupt/` (with an event) rather than retried for ever.
const MAX_BODY_FAILURES: u32 = 5;

/// A message due sooner than this after its attempt stays loaded: reading
/// it back at once would cost more than it saves.
const REST_MIN_MS: i64 = 2_000;

/// How many resting messages are read back from the spool per batch when a
/// routing change or queue command needs their headers.
const LOAD_BATCH: usize = 256;

/// A message that is planned, delivered or just changed: its header and
/// recipient states.
struct Loaded {
    sp: Arc<Spooled>,
    rcpts: Vec<RcptState>,
}

/// A message that waits, in the compact form it rests in (the rest of its
/// state is its spool file, where every change was recorded).
struct Resting {
    arrival_ms: i64,
    rcpts: Box<[Slim]>,
}

/// One recipient of a resting message: what the due time, `queue flush`,
/// the selectors, `destinations()` and the idle-destination pruning need,
/// and what may differ from its last record (a flush's due time, a route
/// hold: neither is recorded). Its reply, copies and warning flag are read
/// back from the spool.
#[derive(Debug, Clone, PartialEq)]
struct Slim {
    addr: Box<str>,
    /// The route of the last attempt (interned: a few routes for all).
    route: Option<Arc<str>>,
    next_ms: i64,
    attempts: u32,
    status: RcptStatus,
    hold: Hold,
}

impl Slim {
    fn is_movable(&self) -> bool {
        !self.status.is_final() && self.hold == Hold::None
    }
}

enum Held {
    Loaded(Loaded),
    Resting(Resting),
}

/// Whether a message not in flight may rest (its header back in the
/// spool): parked or held, or not due for a while.
fn rests(due: Option<i64>, parked: bool, now: i64) -> bool {
    parked || due.is_none_or(|at| at - now >= REST_MIN_MS)
}

/// The resting form of `l` (`intern` shares the route names).
fn rest(l: &Loaded, intern: &mut dyn FnMut(&str) -> Arc<str>) -> Resting {
    Resting {
        arrival_ms: l.sp.header.arrival_ms,
        rcpts: l
            .sp
            .header
            .envelope
            .rcpts
            .iter()
            .zip(&l.rcpts)
            .map(|((addr, _), r)| Slim {
                addr: addr.as_str().into(),
                route: r.last_route.as_deref().map(&mut *intern),
                next_ms: r.next_ms,
                attempts: r.attempts,
                status: r.status,
                hold: r.hold,
            })
            .collect(),
    }
}

/// A resting message loaded again from its spool file `sp`: the records
/// give each recipient's reply, copies and warning; the resting summary,
/// which was current in memory, gives its status, hold, attempts, due time
/// and route (a flush or a route hold is not recorded).
fn wake(sp: Spooled, r: &Resting, now: i64) -> Loaded {
    let rcpts = sp
        .status
        .iter()
        .zip(r.rcpts.iter())
        .map(|(rec, s)| RcptState {
            status: s.status,
            hold: s.hold,
            attempts: s.attempts,
            next_ms: s.next_ms,
            last_route: s.route.as_deref().map(String::from),
            ..RcptState::from_record(rec.as_ref(), now)
        })
        .collect();
    Loaded {
        sp: Arc::new(sp),
        rcpts,
    }
}

impl Resting {
    /// Whether queue command `op` with `sel` needs this message loaded: any
    /// command but a flush that may touch a recipient, or a flush that must
    /// know the route of a recipient never attempted.
    fn needs_load(&self, qid: &str, op: &QueueOp, sel: &Selector, now: i64) -> bool {
        self.rcpts
            .iter()
            .filter(|s| !s.status.is_final())
            .any(|s| match &s.route {
                None => true,
                Some(route) => {
                    *op != QueueOp::Flush
                        && sel.matches_at(qid, self.arrival_ms, &s.addr, route, now)
                }
            })
    }

    /// `queue flush` in memory (see `apply_op`); returns the recipients it
    /// made due.
    fn flush(&mut self, qid: &str, sel: &Selector, now: i64) -> usize {
        let mut n = 0;
        for s in self.rcpts.iter_mut().filter(|s| !s.status.is_final()) {
            if let Some(route) = &s.route
                && sel.matches_at(qid, self.arrival_ms, &s.addr, route, now)
                && queue_op::flush(&mut s.hold, &mut s.next_ms, now)
            {
                n += 1;
            }
        }
        n
    }

    /// What is known of message `qid` when its file cannot be read back:
    /// its queue id, arrival and recipients.
    fn stand_in(&self, qid: &str) -> Spooled {
        let rcpts = self
            .rcpts
            .iter()
            .map(|s| (s.addr.to_string(), RcptParams::default()))
            .collect();
        Spooled {
            header: Header {
                queue_id: qid.to_string(),
                arrival_ms: self.arrival_ms,
                message_id: None,
                envelope: Envelope {
                    mail_from: String::new(),
                    mail_params: MailParams::default(),
                    rcpts,
                    helo: String::new(),
                    esmtp: true,
                    client_ip: String::new(),
                    tls: false,
                },
                kind: None,
                accept_ms: 0,
                journal: None,
            },
            body_offset: 0,
            body_len: 0,
            status: vec![None; self.rcpts.len()],
        }
    }

    fn next_due(&self) -> Option<i64> {
        self.rcpts
            .iter()
            .filter(|s| s.is_movable())
            .map(|s| s.next_ms)
            .min()
    }
}

struct Entry {
    held: Held,
    /// An attempt owns the message: planning, waiting for slots, or sending.
    in_flight: bool,
    /// Cancelled by a route change while the attempt waits for slots.
    reroute: Option<CancellationToken>,
    /// The attempt's platform groups not finished yet.
    groups_left: usize,
    /// A routing change arrived while in flight: plan again at once after.
    recheck: bool,
    /// Waiting in a full platform's parked list, not in the due set.
    parked: bool,
    body_failures: u32,
    due: Option<i64>,
}

impl Entry {
    /// Whether a recipient not yet done last went to `platform`.
    fn waits_for(&self, platform: &str) -> bool {
        match &self.held {
            Held::Resting(r) => r
                .rcpts
                .iter()
                .any(|s| s.is_movable() && s.route.as_deref() == Some(platform)),
            Held::Loaded(l) => l
                .rcpts
                .iter()
                .any(|r| r.is_movable() && r.last_route.as_deref() == Some(platform)),
        }
    }

    /// The header and recipient states, when loaded (always, while in flight).
    fn loaded(&mut self) -> Option<&mut Loaded> {
        match &mut self.held {
            Held::Loaded(l) => Some(l),
            Held::Resting(_) => None,
        }
    }
}

#[derive(Default)]
struct State {
    msgs: HashMap<String, Entry>,
    due: BTreeSet<(i64, String)>,
    /// Per platform: messages waiting for a place in its ready queue.
    parked: BTreeMap<String, VecDeque<String>>,
    /// The route names resting recipients share.
    routes: std::collections::HashSet<Arc<str>>,
}

impl State {
    /// Lets message `id` rest if it is loaded, not in flight, and
    /// `rests` says so.
    fn settle_down(&mut self, id: &str, now: i64) {
        let State { msgs, routes, .. } = self;
        let Some(e) = msgs.get_mut(id) else { return };
        if e.in_flight || !rests(e.due, e.parked, now) {
            return;
        }
        if let Held::Loaded(l) = &e.held {
            let mut intern = |r: &str| match routes.get(r) {
                Some(a) => a.clone(),
                None => {
                    let a: Arc<str> = r.into();
                    routes.insert(a.clone());
                    a
                }
            };
            e.held = Held::Resting(rest(l, &mut intern));
        }
    }

    /// Loads resting message `id` again from its file `sp` (nothing when it
    /// is loaded already).
    fn install(&mut self, id: &str, sp: Spooled, now: i64) {
        if let Some(e) = self.msgs.get_mut(id)
            && let Held::Resting(r) = &e.held
        {
            e.held = Held::Loaded(wake(sp, r, now));
        }
    }

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

    fn remove(&mut self, id: &str) -> Option<Entry> {
        self.schedule(id, None);
        self.msgs.remove(id)
    }
}

struct Dest {
    platform: Arc<Platform>,
    flow: Arc<Flow>,
    /// Attempts waiting for a delivery slot, oldest first.
    ready: Mutex<VecDeque<oneshot::Sender<Admission>>>,
    ready_changed: Notify,
    /// Cancelled when a reload replaces or removes this destination: its
    /// dispatcher hands the waiting attempts to the replacement and ends.
    /// Transactions already under way finish on it.
    retired: CancellationToken,
    /// When an attempt last began or ended here (for pruning idle
    /// outbound destinations).
    touched: Mutex<std::time::Instant>,
}

impl Dest {
    fn new(platform: Platform, settings: &godwit_config::PlatformConfig) -> Arc<Dest> {
        Arc::new(Dest {
            platform: Arc::new(platform),
            flow: Flow::new(settings),
            ready: Mutex::default(),
            ready_changed: Notify::new(),
            retired: CancellationToken::new(),
            touched: Mutex::new(std::time::Instant::now()),
        })
    }

    fn touch(&self) {
        *self.touched.lock().unwrap() = std::time::Instant::now();
    }
}

/// What a reload (SIGHUP) replaces as one piece: the configuration the
/// engine decides with, and what is built from it.
struct Live {
    config: Arc<Config>,
    platforms: Vec<String>,
    /// DNS for MX delivery (`outbound.resolvers`), when `[outbound]` is set.
    resolver: Option<godwit_outbound::MxResolver>,
    /// `[[dkim]]`: what signs mail on its way out.
    dkim: Arc<godwit_outbound::DkimKeys>,
}

impl Live {
    fn new(config: Arc<Config>, dkim: godwit_outbound::DkimKeys) -> Arc<Live> {
        let resolver = config.outbound.as_ref().and_then(|o| {
            godwit_outbound::MxResolver::new(&o.resolvers, o.mx_port)
                .map_err(|e| tracing::error!("{e}; MX delivery will defer"))
                .ok()
        });
        Arc::new(Live {
            platforms: config.platforms.keys().cloned().collect(),
            config,
            resolver,
            dkim: Arc::new(dkim),
        })
    }
}

struct Inner {
    live: std::sync::RwLock<Arc<Live>>,
    spool: Arc<Spool>,
    routes: SharedRoutes,
    events: EventLog,
    /// The platforms, and outbound destinations (`mx:DOMAIN`,
    /// `smarthost:PLATFORM`) added as mail for them first comes.
    dests: std::sync::RwLock<BTreeMap<String, Arc<Dest>>>,
    state: Mutex<State>,
    wake: Notify,
    /// Attempts under way (planning, waiting for a slot, or sending).
    active: AtomicUsize,
}

/// At most this many attempts are under way at once (Postfix's
/// `qmgr_message_active_limit`): a flushed backlog of 100,000 is loaded and
/// planned a few thousand at a time, the rest resting in the due set, so
/// memory does not grow with what a flush makes due.
const ACTIVE_LIMIT: usize = 4_000;

/// One attempt under way, counted in `Inner::active` for as long as it
/// lives; its end wakes the scheduler, which may start another.
struct Active(Arc<Inner>);

impl Active {
    fn new(relay: &RelayHandle) -> Active {
        relay.0.active.fetch_add(1, Ordering::Relaxed);
        Active(relay.0.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.wake.notify_one();
    }
}

/// The delivery engine. Clone the handle into every place that enqueues.
#[derive(Clone)]
pub struct RelayHandle(Arc<Inner>);
pub type Relay = RelayHandle;

/// What the gateway knows of a queued message without reading its file
/// (`queue list` reads the spool for the rest).
#[derive(Debug, Clone)]
pub struct QueueSnapshot {
    pub queue_id: String,
    pub arrival_ms: i64,
    /// (address, state, attempts, route at the last attempt)
    pub rcpts: Vec<(String, RcptStatus, u32, Option<String>)>,
}

/// What a queue command did in memory, for `apply_op` to record.
#[derive(Default)]
struct Applied {
    affected: usize,
    events: Vec<Event>,
    writes: Vec<(String, Vec<StatusRecord>)>,
    removals: Vec<String>,
}

/// How one platform group of an attempt ended.
enum GroupEnd {
    Done,
    /// The body could not be read: counted, and after too many the message
    /// is quarantined.
    Unreadable(SpoolError),
}

impl RelayHandle {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        routes: SharedRoutes,
        events: EventLog,
    ) -> RelayHandle {
        let dests: BTreeMap<String, Arc<Dest>> = config
            .platforms
            .iter()
            .map(|(name, p)| (name.clone(), Dest::new(Platform::new(name, p), p)))
            .collect();
        // The keys were loaded once already when the gateway started (a bad
        // key stops it there); a failure now leaves mail unsigned, loudly.
        let dkim = godwit_outbound::DkimKeys::load(&config.dkim).unwrap_or_else(|e| {
            tracing::error!("{e}: outbound mail leaves unsigned");
            Default::default()
        });
        RelayHandle(Arc::new(Inner {
            live: std::sync::RwLock::new(Live::new(config, dkim)),
            spool,
            routes,
            events,
            dests: std::sync::RwLock::new(dests),
            state: Mutex::default(),
            wake: Notify::new(),
            active: AtomicUsize::new(0),
        }))
    }

    fn live(&self) -> Arc<Live> {
        self.0.live.read().unwrap().clone()
    }

    /// SIGHUP: runs with `config` from now on (the caller has validated it
    /// and loaded its DKIM keys). A platform whose settings changed gets a
    /// fresh client and flow control: attempts still waiting for a slot move
    /// to it, so new deliveries use the new relay hosts, TLS and limits,
    /// while transactions already under way finish on the old ones. An
    /// added platform starts its dispatcher; a removed one's waiting
    /// attempts are planned again (and defer: no platform of that name).
    /// Outbound destinations are made again from the new settings as mail
    /// for them comes. Returns the destinations replaced or removed.
    pub fn reconfigure(&self, config: Arc<Config>, dkim: godwit_outbound::DkimKeys) -> Vec<String> {
        let old = self.live();
        let outbound_changed = format!("{:?}", old.config.outbound)
            != format!("{:?}", config.outbound)
            || old.config.platforms != config.platforms;
        let mut retired = Vec::new();
        let mut started = Vec::new();
        {
            let mut dests = self.0.dests.write().unwrap();
            *self.0.live.write().unwrap() = Live::new(config.clone(), dkim);
            let names: Vec<String> = dests.keys().cloned().collect();
            for name in names {
                let keep = if crate::outbound::is_outbound(&name) {
                    !outbound_changed
                } else {
                    config.platforms.get(&name) == Some(&dests[&name].platform.config)
                };
                if !keep {
                    retired.push((name.clone(), dests.remove(&name).expect("listed")));
                }
            }
            for (name, p) in &config.platforms {
                if !dests.contains_key(name) {
                    dests.insert(name.clone(), Dest::new(Platform::new(name, p), p));
                    started.push(name.clone());
                }
            }
        }
        // After the swap: a waiter that sees its destination retired looks
        // it up again and finds the replacement.
        for (_, d) in &retired {
            d.retired.cancel();
        }
        for name in started {
            tokio::spawn(self.clone().dispatch(name));
        }
        self.0.wake.notify_one();
        retired.into_iter().map(|(n, _)| n).collect()
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
        let rcpts: Vec<RcptState> = sp
            .status
            .iter()
            .map(|s| RcptState::from_record(s.as_ref(), now))
            .collect();
        let due = plan::next_due(&rcpts);
        let id = sp.header.queue_id.clone();
        let mut st = self.0.state.lock().unwrap();
        st.msgs.insert(
            id.clone(),
            Entry {
                held: Held::Loaded(Loaded {
                    sp: Arc::new(sp),
                    rcpts,
                }),
                in_flight: false,
                reroute: None,
                groups_left: 0,
                recheck: false,
                parked: false,
                body_failures: 0,
                due: None,
            },
        );
        st.schedule(&id, due);
        // A recovered message not due yet rests at once.
        st.settle_down(&id, now);
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
        let parked: BTreeMap<String, usize> = {
            let st = self.0.state.lock().unwrap();
            st.parked
                .iter()
                .map(|(p, q)| {
                    let n = q
                        .iter()
                        .filter(|id| st.msgs.get(*id).is_some_and(|e| e.parked))
                        .count();
                    (p.clone(), n)
                })
                .collect()
        };
        self.dests_now()
            .iter()
            .map(|(n, d)| {
                let mut s = d.flow.snapshot();
                s.down_hosts = d.platform.down_hosts();
                s.ready = d.ready.lock().unwrap().len();
                s.parked = parked.get(n).copied().unwrap_or(0);
                (n.clone(), s)
            })
            .collect()
    }

    /// The event log this relay emits to (its readers' lag is a gauge).
    pub fn events(&self) -> &EventLog {
        &self.0.events
    }

    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        let st = self.0.state.lock().unwrap();
        st.msgs
            .iter()
            .map(|(id, e)| match &e.held {
                Held::Loaded(l) => QueueSnapshot {
                    queue_id: id.clone(),
                    arrival_ms: l.sp.header.arrival_ms,
                    rcpts: l
                        .sp
                        .header
                        .envelope
                        .rcpts
                        .iter()
                        .zip(&l.rcpts)
                        .map(|((a, _), r)| {
                            (
                                a.clone(),
                                r.shown_status(),
                                r.attempts,
                                r.last_route.clone(),
                            )
                        })
                        .collect(),
                },
                Held::Resting(r) => QueueSnapshot {
                    queue_id: id.clone(),
                    arrival_ms: r.arrival_ms,
                    rcpts: r
                        .rcpts
                        .iter()
                        .map(|s| {
                            // As `RcptState::shown_status`.
                            let held = s.hold != Hold::None && !s.status.is_final();
                            (
                                s.addr.to_string(),
                                if held { RcptStatus::Held } else { s.status },
                                s.attempts,
                                s.route.as_deref().map(String::from),
                            )
                        })
                        .collect(),
                },
            })
            .collect()
    }

    fn dests_now(&self) -> BTreeMap<String, Arc<Dest>> {
        self.0.dests.read().unwrap().clone()
    }

    /// The destination called `name`. An outbound one (`mx:DOMAIN`,
    /// `smarthost:PLATFORM`) is made when mail for it first comes, with its
    /// own flow control and dispatcher.
    fn dest(&self, name: &str) -> Option<Arc<Dest>> {
        if let Some(d) = self.0.dests.read().unwrap().get(name) {
            return Some(d.clone());
        }
        if !crate::outbound::is_outbound(name) {
            return None;
        }
        let mut dests = self.0.dests.write().unwrap();
        if let Some(d) = dests.get(name) {
            return Some(d.clone());
        }
        let live = self.live();
        let (platform, settings) =
            crate::outbound::client_for(&live.config, live.resolver.as_ref(), name)?;
        let d = Dest::new(platform, &settings);
        dests.insert(name.to_string(), d.clone());
        drop(dests);
        tokio::spawn(self.clone().dispatch(name.to_string()));
        Some(d)
    }

    /// Forgets outbound destinations that `outbound::should_prune` says
    /// are idle, ending their dispatchers; returns their names.
    fn prune_idle(&self) -> Vec<String> {
        let live = self.live();
        let Some(o) = &live.config.outbound else {
            return Vec::new();
        };
        let queued: HashMap<String, usize> = {
            let st = self.0.state.lock().unwrap();
            let mut q: HashMap<String, usize> = HashMap::new();
            for e in st.msgs.values() {
                let routes: Vec<&str> = match &e.held {
                    Held::Loaded(l) => l
                        .rcpts
                        .iter()
                        .filter(|r| !r.is_final())
                        .filter_map(|r| r.last_route.as_deref())
                        .collect(),
                    Held::Resting(r) => r
                        .rcpts
                        .iter()
                        .filter(|s| !s.status.is_final())
                        .filter_map(|s| s.route.as_deref())
                        .collect(),
                };
                for route in routes {
                    *q.entry(route.to_string()).or_default() += 1;
                }
            }
            for (p, ids) in &st.parked {
                *q.entry(p.clone()).or_default() += ids.len();
            }
            q
        };
        let mut dests = self.0.dests.write().unwrap();
        let now = std::time::Instant::now();
        let gone: Vec<String> = dests
            .iter()
            .filter(|(name, d)| {
                let f = d.flow.snapshot();
                let activity = crate::outbound::DestActivity {
                    queued: queued.get(*name).copied().unwrap_or(0),
                    in_flight: f.in_flight,
                    waiting: d.ready.lock().unwrap().len(),
                    circuit_closed: f.circuit == "closed",
                    idle: now.duration_since(*d.touched.lock().unwrap()),
                };
                let prune = crate::outbound::should_prune(name, &activity, o.destination_idle);
                if prune {
                    tracing::info!(destination = %name, ?activity, "idle outbound destination forgotten");
                }
                prune
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            if let Some(d) = dests.remove(name) {
                // Its dispatcher hands any waiter back (to plan again), as
                // for a destination a reload removed.
                d.retired.cancel();
                d.ready_changed.notify_one();
            }
        }
        drop(dests);
        gone
    }

    /// The route for recipient `addr` of message `h` now: DSNs go to the
    /// DSN platform, whatever the routing map says; a recipient outside our
    /// domains (accepted on the relay port) goes out by the outbound route.
    fn route_of(&self, h: &Header, addr: &str) -> Routed {
        let inner = &self.0;
        let live = self.live();
        // The journal copy goes where `journal.platform` said at accept;
        // without one, the routing map decides as for anyone.
        if let Some(j) = &h.journal
            && let Some(p) = &j.platform
            && h.envelope.rcpts.get(j.rcpt).is_some_and(|(a, _)| a == addr)
        {
            return Routed {
                route: p.clone(),
                why: "journal.platform".into(),
                version: inner.routes.version(),
            };
        }
        if h.kind.is_none()
            && let Some(o) = &live.config.outbound
            && crate::outbound::is_foreign(&live.config, addr)
        {
            let (route, why) = inner
                .routes
                .outbound_route(&h.envelope.mail_from)
                .unwrap_or_else(|| (o.route.clone(), format!("outbound.route = \"{}\"", o.route)));
            return Routed {
                route: crate::outbound::destination(&route, addr),
                why,
                version: inner.routes.version(),
            };
        }
        if h.kind.is_some() {
            return Routed {
                route: live.config.dsn_platform(),
                why: "DSN to the sender".into(),
                version: inner.routes.version(),
            };
        }
        let d = inner.routes.decide(addr);
        Routed {
            route: d.route,
            why: d.why.to_string(),
            version: d.version,
        }
    }

    /// Called when the routing version changes: every queued message with a
    /// recipient whose route is now different becomes due at once, so a
    /// routing change or rollback applies to mail already queued, including
    /// mail waiting for a delivery slot (its wait is cancelled).
    pub fn routes_changed(&self) {
        let now = now_ms();
        let mut st = self.0.state.lock().unwrap();
        let mut due_now = Vec::new();
        let mut resting = Vec::new();
        for (id, e) in st.msgs.iter_mut() {
            let Held::Loaded(l) = &mut e.held else {
                resting.push(id.clone());
                continue;
            };
            if !self.route_moved(l) {
                continue;
            }
            if e.in_flight {
                e.recheck = true;
                if let Some(t) = &e.reroute {
                    t.cancel();
                }
                continue;
            }
            make_due(&mut l.rcpts, now);
            e.parked = false;
            due_now.push(id.clone());
        }
        self.due_at_once(st, &due_now, now);
        if !resting.is_empty() {
            self.reroute_resting(resting);
        }
    }

    /// Whether a recipient of `l` that may move has a route other than its
    /// last one (a DSN goes where it goes whatever the map says).
    fn route_moved(&self, l: &Loaded) -> bool {
        let h = &l.sp.header;
        h.kind.is_none()
            && h.envelope.rcpts.iter().zip(&l.rcpts).any(|((addr, _), r)| {
                !r.is_final()
                    && r.hold != Hold::Operator
                    && r.last_route.as_deref() != Some(self.route_of(h, addr).route.as_str())
            })
    }

    /// `routes_changed` for the resting messages: their headers are read
    /// back from the spool, in batches, off the async workers (a backlog's
    /// worth takes about as long as the recovery scan); each whose route
    /// moved is loaded and due now.
    fn reroute_resting(&self, ids: Vec<String>) {
        let me = self.clone();
        let work = move || {
            for batch in ids.chunks(LOAD_BATCH) {
                let files: Vec<(String, Spooled)> = batch
                    .iter()
                    .filter_map(|id| me.0.spool.load_head(id).ok().map(|sp| (id.clone(), sp)))
                    .collect();
                let now = now_ms();
                let mut st = me.0.state.lock().unwrap();
                let mut due_now = Vec::new();
                for (id, sp) in files {
                    let Some(e) = st.msgs.get_mut(&id) else {
                        continue;
                    };
                    // Loaded since: its attempt plans with the new routes.
                    let Held::Resting(r) = &e.held else { continue };
                    let mut l = wake(sp, r, now);
                    if me.route_moved(&l) {
                        make_due(&mut l.rcpts, now);
                        e.held = Held::Loaded(l);
                        e.parked = false;
                        due_now.push(id);
                    }
                }
                me.due_at_once(st, &due_now, now);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(work)),
            Err(_) => work(),
        }
    }

    /// Runs the scheduler (and each platform's dispatcher) until the process
    /// ends.
    pub async fn run(self) {
        for name in self.dests_now().keys() {
            tokio::spawn(self.clone().dispatch(name.clone()));
        }
        let mut pruned_at = std::time::Instant::now();
        loop {
            let live = self.live();
            let scan = live.config.queue.scan_interval;
            let prune_every = live.config.outbound.as_ref().map(|o| {
                (o.destination_idle / 2).clamp(Duration::from_millis(500), Duration::from_secs(60))
            });
            drop(live);
            if let Some(every) = prune_every
                && pruned_at.elapsed() >= every
            {
                pruned_at = std::time::Instant::now();
                self.prune_idle();
            }
            // Each attempt emits records: none are started while the event
            // readers lag far behind (at most FLOW_MAX; see smtpd's accept).
            self.0.events.wait_for_readers().await;
            self.send_probes();
            let now = now_ms();
            let room = ACTIVE_LIMIT.saturating_sub(self.0.active.load(Ordering::Relaxed));
            let (ready, next) = {
                let mut st = self.0.state.lock().unwrap();
                let mut ready = Vec::new();
                while let Some((at, id)) = st.due.first().cloned() {
                    if at > now || ready.len() >= room {
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
                // At the limit, the end of an attempt wakes this loop.
                let next = st.due.first().map(|(at, _)| *at);
                (ready, next.filter(|&at| at > now || room > 0))
            };
            if !ready.is_empty() {
                // Counted from now, so the next turn sees them under way.
                let ready: Vec<(String, Active)> = ready
                    .into_iter()
                    .map(|id| (id, Active::new(&self)))
                    .collect();
                let me = self.clone();
                tokio::spawn(async move { me.start_attempts(ready).await });
            }
            let wait = next.map_or(scan, |at| {
                Duration::from_millis((at - now).clamp(1, scan.as_millis() as i64) as u64)
            });
            let wait = prune_every.map_or(wait, |every| wait.min(every));
            tokio::select! {
                _ = self.0.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs one attempt in its own task, watched: an attempt that panics is
    /// recorded as a deferral and retried, never left "in flight" for ever
    /// (as mox's queue recovers and reschedules).
    /// Reads the resting ones among `ready` back from the spool in a few
    /// batches (not one blocking task each: a flushed backlog would grow
    /// the blocking pool to hundreds of threads), then starts each attempt.
    async fn start_attempts(&self, ready: Vec<(String, Active)>) {
        let resting: Vec<String> = {
            let st = self.0.state.lock().unwrap();
            ready
                .iter()
                .filter(|(id, _)| {
                    st.msgs
                        .get(id)
                        .is_some_and(|e| matches!(e.held, Held::Resting(_)))
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        self.load_many(resting).await;
        for (id, active) in ready {
            self.spawn_attempt(id, active);
        }
    }

    fn spawn_attempt(&self, id: String, active: Active) {
        let me = self.clone();
        // Boxed, the outer task and the attempt `watched` spawns: an
        // attempt's future is large, and unboxed it was moved by value into
        // each task cell (see smtpd's session spawn).
        tokio::spawn(Box::pin(async move {
            let _active = active;
            let attempt = {
                let me = me.clone();
                let id = id.clone();
                Box::pin(async move { me.attempt(&id).await })
            };
            if let Err(why) = watched(attempt).await {
                me.attempt_crashed(&id, None, &why).await;
            }
        }));
    }

    /// A platform's dispatcher: grants each delivery slot the flow control
    /// allows to the oldest waiting attempt, or tells every waiting attempt
    /// that the circuit is open.
    async fn dispatch(self, name: String) {
        let Some(d) = self.dest(&name) else { return };
        loop {
            loop {
                if d.retired.is_cancelled() {
                    self.hand_over(&name, &d);
                    return;
                }
                if !d.ready.lock().unwrap().is_empty() {
                    break;
                }
                tokio::select! {
                    _ = d.ready_changed.notified() => {}
                    _ = d.retired.cancelled() => {}
                }
            }
            let admission = tokio::select! {
                a = d.flow.admit() => a,
                _ = d.retired.cancelled() => continue,
            };
            match admission {
                Admission::Granted(permit) => {
                    let mut grant = Some(Admission::Granted(permit));
                    while let Some(g) = grant.take() {
                        let Some(tx) = d.ready.lock().unwrap().pop_front() else {
                            break; // every waiter left (rerouted): the slot frees
                        };
                        // A waiter that gave up hands the slot back.
                        grant = tx.send(g).err();
                    }
                    self.unpark(&name, 1);
                }
                Admission::Down(wait) => {
                    let waiting: Vec<_> = d.ready.lock().unwrap().drain(..).collect();
                    for tx in waiting {
                        let _ = tx.send(Admission::Down(wait));
                    }
                    self.unpark(&name, usize::MAX);
                }
            }
        }
    }

    /// A reload retired destination `d`: the attempts waiting for its slots
    /// wait for its replacement's instead (which has its own dispatcher); a
    /// removed destination's waiters are dropped, and plan again.
    fn hand_over(&self, name: &str, d: &Dest) {
        // `retired` is set before this lock is taken, and a waiter checks it
        // under the same lock before it queues: none is left behind.
        let waiting: Vec<_> = d.ready.lock().unwrap().drain(..).collect();
        let next = self.0.dests.read().unwrap().get(name).cloned();
        if let Some(next) = next.filter(|n| !n.retired.is_cancelled()) {
            next.ready.lock().unwrap().extend(waiting);
            next.ready_changed.notify_one();
        }
        self.unpark(name, usize::MAX);
    }

    /// Makes up to `n` messages parked for `platform` due again.
    fn unpark(&self, platform: &str, n: usize) {
        let now = now_ms();
        let mut st = self.0.state.lock().unwrap();
        let mut woken = Vec::new();
        while woken.len() < n {
            let Some(id) = st.parked.get_mut(platform).and_then(|q| q.pop_front()) else {
                break;
            };
            if let Some(e) = st.msgs.get_mut(&id)
                && e.parked
            {
                e.parked = false;
                woken.push(id);
            }
        }
        self.due_at_once(st, &woken, now);
    }

    /// Makes messages `ids` due at `now`, releases the state, and wakes the
    /// scheduler when there is anything to start.
    fn due_at_once(&self, mut st: std::sync::MutexGuard<'_, State>, ids: &[String], now: i64) {
        for id in ids {
            st.schedule(id, Some(now));
        }
        drop(st);
        if !ids.is_empty() {
            self.0.wake.notify_one();
        }
    }

    /// Each platform whose open circuit's cooldown just ended gets one
    /// probe: the earliest-due message waiting for it is made due now. The
    /// rest wait for their own retry time, or for the probe's success.
    fn send_probes(&self) {
        for (name, d) in self.dests_now() {
            if !d.flow.probe_wanted() {
                continue;
            }
            let st = self.0.state.lock().unwrap();
            let pick = st
                .due
                .iter()
                .map(|(_, id)| id)
                .find(|id| {
                    st.msgs
                        .get(*id)
                        .is_some_and(|e| !e.in_flight && e.waits_for(&name))
                })
                .cloned();
            drop(st);
            if let Some(id) = pick {
                tracing::debug!(platform = %name, queue_id = %id, "circuit half-open: probing");
                // Its recipients' retry times are ahead: flushed, it goes now.
                self.flush_soon(
                    Selector {
                        queue_id: Some(id),
                        platform: Some(name),
                        ..Default::default()
                    },
                    "probe",
                );
            }
        }
    }

    /// An in-memory `queue flush` of `sel` (the operator's path, no record
    /// per message), on a task of its own: the caller holds no await.
    fn flush_soon(&self, sel: Selector, actor: &'static str) {
        let me = self.clone();
        tokio::spawn(async move { me.apply_op(&QueueOp::Flush, &sel, actor).await });
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let live = self.live();
        let q = &live.config.queue;
        let base =
            q.min_backoff.as_secs_f64() * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
        let jitter = rand::random_range(0.8..1.2);
        Duration::from_secs_f64(
            (base * jitter).clamp(q.min_backoff.as_secs_f64(), q.max_backoff.as_secs_f64()),
        )
    }

    fn emit_all(&self, events: Vec<Event>) {
        for e in events {
            self.0.events.emit(e);
        }
    }

    /// Appends status records off the async workers: a slow disk stalls one
    /// blocking thread, not every session.
    async fn write_records(&self, qid: &str, recs: Vec<StatusRecord>) {
        if recs.is_empty() {
            return;
        }
        let spool = self.0.spool.clone();
        let qid = qid.to_string();
        match tokio::task::spawn_blocking(move || spool.record_many(&qid, &recs)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(e) => tracing::error!("status record task: {e}"),
        }
    }

    /// Reads resting message `id` back from the spool for its attempt.
    /// Returns false when it is gone.
    async fn load(&self, id: &str) -> bool {
        let inner = &self.0;
        match inner.state.lock().unwrap().msgs.get(id) {
            None => return false,
            Some(e) if matches!(e.held, Held::Loaded(_)) => return true,
            Some(_) => {}
        }
        let spool = inner.spool.clone();
        let qid = id.to_string();
        let loaded = tokio::task::spawn_blocking(move || spool.load_head(&qid)).await;
        let mut st = inner.state.lock().unwrap();
        let now = now_ms();
        match loaded {
            Ok(Ok(sp)) => st.install(id, sp, now),
            Ok(Err(e)) => {
                // Planned from its summary all the same: its delivery cannot
                // read the body either, and takes the unreadable-body path
                // (deferred, then moved to `corrupt/` with an event).
                tracing::error!(queue_id = id, "cannot read the queued message back: {e}");
                let stand_in = st.msgs.get(id).and_then(|e| match &e.held {
                    Held::Resting(r) => Some(r.stand_in(id)),
                    Held::Loaded(_) => None,
                });
                if let Some(sp) = stand_in {
                    st.install(id, sp, now);
                }
            }
            Err(e) => tracing::error!("{e}"),
        }
        st.msgs
            .get(id)
            .is_some_and(|e| matches!(e.held, Held::Loaded(_)))
    }

    async fn attempt(&self, id: &str) {
        let inner = &self.0;
        if !self.load(id).await {
            return;
        }
        let now = now_ms();
        let live = self.live();
        let cap = live.config.queue.max_ready.max(1);
        let backoff = |n| self.backoff(n);
        let (sp, plan, records, token) = {
            let mut guard = inner.state.lock().unwrap();
            let st = &mut *guard;
            let Some(e) = st.msgs.get_mut(id) else { return };
            let Held::Loaded(l) = &mut e.held else { return };
            let sp = l.sp.clone();
            let route = |a: &str| self.route_of(&sp.header, a);
            let circuit = |p: &str| self.dest(p).and_then(|d| d.flow.down_for());
            let world = World {
                now,
                max_lifetime: live.config.queue.max_lifetime,
                delay_warning: live.config.queue.delay_warning,
                platforms: &live.platforms,
                route: &route,
                circuit_open: &circuit,
                backoff: &backoff,
            };
            let mut plan = plan::plan_attempt(&sp.header, &mut l.rcpts, &world);
            let records: Vec<_> = plan
                .changed
                .iter()
                .map(|&i| l.rcpts[i].to_record(i, now))
                .collect();
            let full = plan
                .groups
                .keys()
                .find(|p| {
                    self.dest(p)
                        .is_some_and(|d| d.ready.lock().unwrap().len() >= cap)
                })
                .cloned();
            if let Some(p) = full {
                // No place to wait for a slot: park, costing nothing until a
                // place frees. The recipients stay due.
                plan.groups.clear();
                e.parked = true;
                st.parked.entry(p).or_default().push_back(id.to_string());
            }
            // The journal copy travels alone, as its own transaction with
            // its own body (the report), so it never holds up the others.
            let jobs = split_journal(std::mem::take(&mut plan.groups), &sp.header);
            let token = CancellationToken::new();
            e.reroute = Some(token.clone());
            e.groups_left = jobs.len();
            (sp, (plan, jobs), records, token)
        };
        let (
            plan::Plan {
                events,
                failed,
                delayed,
                ..
            },
            groups,
        ) = plan;
        self.emit_all(events);
        self.write_records(id, records).await;
        if !delayed.is_empty() {
            self.send_dsn(&sp, delayed).await;
        }
        let mut failed = failed;
        let mut tasks = tokio::task::JoinSet::new();
        let mut groups_of = HashMap::new();
        for (platform, idxs) in groups {
            let me = self.clone();
            let (id2, p2, idxs2, token) = (
                id.to_string(),
                platform.clone(),
                idxs.clone(),
                token.clone(),
            );
            let handle = tasks.spawn(Box::pin(async move {
                me.deliver_group(&id2, &p2, &idxs2, token).await
            }));
            groups_of.insert(handle.id(), (platform, idxs));
        }
        while let Some(res) = tasks.join_next_with_id().await {
            match res {
                Ok((tid, (end, mut dsns))) => {
                    failed.append(&mut dsns);
                    if let GroupEnd::Unreadable(err) = end {
                        let (platform, idxs) = &groups_of[&tid];
                        self.body_unreadable(id, platform, idxs, err).await;
                    }
                }
                Err(e) => {
                    let (platform, idxs) = &groups_of[&e.id()];
                    self.attempt_crashed(id, Some((platform, idxs)), &e.to_string())
                        .await;
                }
            }
        }
        self.send_failure_dsn(&sp, failed).await;
        self.finish(id).await;
    }

    /// One platform's share of an attempt: wait for a slot, take the
    /// recipients still bound to the platform, send, and settle.
    async fn deliver_group(
        &self,
        id: &str,
        platform: &str,
        planned: &[usize],
        reroute: CancellationToken,
    ) -> (GroupEnd, Vec<DsnRcpt>) {
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        while let Some(t) = tx.take() {
            let Some(d) = self.dest(platform) else {
                self.group_done(id, false);
                return (GroupEnd::Done, Vec::new());
            };
            d.touch();
            let mut ready = d.ready.lock().unwrap();
            if d.retired.is_cancelled() {
                tx = Some(t); // replaced by a reload just now: look again
                continue;
            }
            ready.push_back(t);
            drop(ready);
            d.ready_changed.notify_one();
        }
        let admission = tokio::select! {
            a = rx => match a {
                Ok(a) => a,
                // Its destination was removed by a reload: plan again.
                Err(_) => {
                    self.group_done(id, true);
                    return (GroupEnd::Done, Vec::new());
                }
            },
            _ = reroute.cancelled() => {
                // The route changed while waiting: plan again at once.
                self.group_done(id, true);
                return (GroupEnd::Done, Vec::new());
            }
        };
        let permit = match admission {
            Admission::Granted(permit) => permit,
            Admission::Down(wait) => {
                let reply = format!("4.4.1 platform {platform} is marked down (circuit open)");
                let recs = self.defer_all(id, platform, planned, &reply, Some(wait));
                self.write_records(id, recs).await;
                self.group_done(id, false);
                return (GroupEnd::Done, Vec::new());
            }
        };
        self.send_with(id, platform, planned, permit).await
    }

    async fn send_with(
        &self,
        id: &str,
        platform: &str,
        planned: &[usize],
        permit: Permit,
    ) -> (GroupEnd, Vec<DsnRcpt>) {
        let inner = &self.0;
        let live = self.live();
        let Some(d) = self.dest(platform) else {
            drop(permit);
            self.group_done(id, false);
            return (GroupEnd::Done, Vec::new());
        };
        // The route is decided again now that a slot is granted: from here
        // on, the transaction has begun and goes where it was bound.
        let bound = {
            let mut st = inner.state.lock().unwrap();
            match st.msgs.get_mut(id) {
                None => None,
                Some(e) => {
                    let Held::Loaded(l) = &e.held else {
                        unreachable!("a message in flight is loaded")
                    };
                    let sp = l.sp.clone();
                    let route = |a: &str| self.route_of(&sp.header, a);
                    let (go, rerouted) = plan::still_bound(
                        &sp.header,
                        &l.rcpts,
                        planned,
                        platform,
                        &live.platforms,
                        &route,
                    );
                    if !rerouted.is_empty() {
                        e.recheck = true;
                    }
                    Some((sp, go))
                }
            }
        };
        let Some((sp, go)) = bound.filter(|(_, go)| !go.is_empty()) else {
            drop(permit);
            self.group_done(id, false);
            return (GroupEnd::Done, Vec::new());
        };
        let spool = inner.spool.clone();
        let sp2 = sp.clone();
        let body = match tokio::task::spawn_blocking(move || {
            let file = spool.open_body(&sp2)?;
            Body::open(file, sp2.body_offset, sp2.body_len).map_err(|e| SpoolError::Corrupt {
                path: spool.queue_dir().join(&sp2.header.queue_id),
                reason: format!("unreadable: {e}"),
            })
        })
        .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                drop(permit);
                self.group_done(id, false);
                return (GroupEnd::Unreadable(e), Vec::new());
            }
            Err(e) => {
                drop(permit);
                self.group_done(id, false);
                return (
                    GroupEnd::Unreadable(SpoolError::Corrupt {
                        path: inner.spool.queue_dir().join(id),
                        reason: e.to_string(),
                    }),
                    Vec::new(),
                );
            }
        };
        let outbound = crate::outbound::is_outbound(platform);
        let journal = go.iter().any(|&i| sp.header.is_journal(i));
        let mut journal_env = None;
        let body = if journal {
            let (report, env) = self.journal_report(&sp).await;
            journal_env = Some(env);
            body.with_prefix(report.prefix).with_suffix(report.suffix)
        } else if outbound {
            body.with_prefix(self.dkim_header(&sp).await)
        } else {
            body
        };
        let envelope = journal_env.as_ref().unwrap_or(&sp.header.envelope);
        let helo = match &live.config.outbound {
            Some(o) if outbound => o.helo.as_deref().unwrap_or(&live.config.hostname),
            _ => &live.config.hostname,
        };
        let out = d
            .platform
            .deliver(helo, &sp.header.queue_id, envelope, &go, &body)
            .await;
        if let Some(reason) = body.error() {
            drop(permit);
            self.group_done(id, false);
            let path = inner.spool.queue_dir().join(id);
            return (
                GroupEnd::Unreadable(SpoolError::Corrupt { path, reason }),
                Vec::new(),
            );
        }
        drop(body);
        let recovered = d
            .flow
            .observe(classify(&out.summary, out.host.is_some()), out.summary.code);
        if recovered {
            // The probe got through: what waited for the platform goes now,
            // as an operator's `queue flush --platform` sends it.
            tracing::info!(
                platform,
                "platform back (its circuit closed): the mail waiting for it is due now"
            );
            self.flush_soon(
                Selector {
                    platform: Some(platform.to_string()),
                    ..Default::default()
                },
                "circuit",
            );
        }
        d.touch();
        drop(permit);
        let failed = self.settle(id, platform, &go, &out, journal).await;
        (GroupEnd::Done, failed)
    }

    /// The journal report for message `sp` and the envelope it goes with.
    /// Only the original's header section is read (for the envelope report's
    /// To/Cc/Bcc); its bytes go out from the spool unmodified.
    async fn journal_report(&self, sp: &Arc<Spooled>) -> (crate::journal::Report, Envelope) {
        const HEAD_MAX: u64 = 256 * 1024;
        let head = self.read_head(sp.clone(), HEAD_MAX).await;
        let h = &sp.header;
        let j = h.journal.as_ref().map_or(0, |j| j.rcpt);
        let live = self.live();
        let input = crate::journal::Input {
            hostname: &live.config.hostname,
            queue_id: &h.queue_id,
            envelope: &h.envelope,
            journal_rcpt: j,
            original_head: &head,
            now_ms: now_ms(),
        };
        let report = crate::journal::compose(&input);
        let utf8 = !report.prefix.is_ascii();
        (report, crate::journal::envelope(&h.envelope, utf8))
    }

    /// The DKIM-Signature for message `sp`, made now (so each attempt has a
    /// fresh `t=`) from the spooled bytes read in chunks, or nothing when no key covers its header From. Signing
    /// failures leave the message unsigned rather than stuck, and say so.
    async fn dkim_header(&self, sp: &Arc<Spooled>) -> Vec<u8> {
        let keys = self.live().dkim.clone();
        if keys.is_empty() {
            return Vec::new();
        }
        let spool = self.0.spool.clone();
        let sp = sp.clone();
        let qid = sp.header.queue_id.clone();
        let signed = tokio::task::spawn_blocking(move || {
            // Streamed from the spool: a 50 MB message is never read whole.
            let mut message = spool.body_reader(&sp).map_err(|e| e.to_string())?;
            keys.sign_reader(&mut message).map_err(|e| e.to_string())
        })
        .await;
        match signed {
            Ok(Ok(Some(s))) => {
                tracing::debug!(queue_id = %qid, domain = %s.domain, selector = %s.selector, "DKIM signed");
                s.header.into_bytes()
            }
            Ok(Ok(None)) => Vec::new(),
            Ok(Err(e)) => {
                tracing::error!(queue_id = %qid, "DKIM signing failed, sending unsigned: {e}");
                Vec::new()
            }
            Err(e) => {
                tracing::error!(queue_id = %qid, "DKIM signing task: {e}");
                Vec::new()
            }
        }
    }

    /// Applies a platform's replies, records them (fdatasync'ed for final
    /// outcomes) right after the reply: the window in which a crash
    /// duplicates a delivery.
    async fn settle(
        &self,
        id: &str,
        platform: &str,
        go: &[usize],
        out: &AttemptOutcome,
        journal: bool,
    ) -> Vec<DsnRcpt> {
        let inner = &self.0;
        let now = now_ms();
        let live = self.live();
        let backoff = |n| self.backoff(n);
        let (settled, recs) = {
            let mut st = inner.state.lock().unwrap();
            let Some(e) = st.msgs.get_mut(id) else {
                tracing::warn!(
                    queue_id = id,
                    platform,
                    "message left the queue during its delivery: {}",
                    out.summary
                );
                return Vec::new();
            };
            let Held::Loaded(l) = &mut e.held else {
                unreachable!("a message in flight is loaded")
            };
            let sp = l.sp.clone();
            let settled = plan::settle(
                &sp.header,
                &mut l.rcpts,
                platform,
                &live.platforms,
                go,
                out,
                // A journal copy is never bounced: a 5xx is retried like a 4xx.
                journal
                    || (live.config.queue.soft_bounce && !crate::outbound::is_outbound(platform)),
                now,
                &backoff,
            );
            e.groups_left = e.groups_left.saturating_sub(1);
            let last = e.groups_left == 0 && !e.recheck;
            let recs: Vec<_> =
                if last && settled.failed.is_empty() && l.rcpts.iter().all(|r| r.is_final()) {
                    // Everything is delivered: the durable removal that follows is
                    // the record (one group-committed directory sync).
                    Vec::new()
                } else {
                    go.iter().map(|&i| l.rcpts[i].to_record(i, now)).collect()
                };
            (settled, recs)
        };
        self.emit_all(settled.events);
        self.write_records(id, recs).await;
        settled.failed
    }

    /// Defers `idxs` of message `id` (those still movable) with `reply`.
    fn defer_all(
        &self,
        id: &str,
        platform: &str,
        idxs: &[usize],
        reply: &str,
        wait: Option<Duration>,
    ) -> Vec<StatusRecord> {
        let now = now_ms();
        let backoff = |n| self.backoff(n);
        let mut st = self.0.state.lock().unwrap();
        let Some(l) = st.msgs.get_mut(id).and_then(|e| e.loaded()) else {
            return Vec::new();
        };
        let sp = l.sp.clone();
        let mut recs = Vec::new();
        for &i in idxs {
            let r = &mut l.rcpts[i];
            if !r.is_movable() {
                continue;
            }
            let at = wait.map(|w| plan::circuit_retry_at(now, w, r.attempts, &backoff));
            let ev = plan::defer(&sp.header, i, r, platform, None, reply, at, now, &backoff);
            self.0.events.emit(ev);
            recs.push(r.to_record(i, now));
        }
        recs
    }

    /// One platform group of an attempt ended (`recheck`: plan again at once).
    fn group_done(&self, id: &str, recheck: bool) {
        let mut st = self.0.state.lock().unwrap();
        if let Some(e) = st.msgs.get_mut(id) {
            e.groups_left = e.groups_left.saturating_sub(1);
            e.recheck |= recheck;
        }
    }

    /// The body of message `id` could not be read for `platform`: defer (the
    /// backoff grows), and after `MAX_BODY_FAILURES` move the file to
    /// `corrupt/` with an event. It is never silently dropped.
    async fn body_unreadable(&self, id: &str, platform: &str, idxs: &[usize], err: SpoolError) {
        let inner = &self.0;
        let quarantine = {
            let mut st = inner.state.lock().unwrap();
            let Some(e) = st.msgs.get_mut(id) else { return };
            e.body_failures += 1;
            let n = e.body_failures;
            tracing::error!(
                queue_id = id,
                failures = n,
                "cannot read message body from the spool: {err}"
            );
            if n >= MAX_BODY_FAILURES {
                st.remove(id);
                true
            } else {
                false
            }
        };
        if quarantine {
            let spool = inner.spool.clone();
            let qid = id.to_string();
            let moved = tokio::task::spawn_blocking(move || spool.quarantine(&qid)).await;
            let file = match moved {
                Ok(Ok(p)) => p.display().to_string(),
                Ok(Err(e)) => {
                    tracing::error!("{e}");
                    inner.spool.queue_dir().join(id).display().to_string()
                }
                Err(e) => {
                    tracing::error!("{e}");
                    inner.spool.queue_dir().join(id).display().to_string()
                }
            };
            inner.events.emit(Event::QueueCorrupt {
                file,
                reason: format!("message body unreadable {MAX_BODY_FAILURES} times: {err}"),
            });
            return;
        }
        let reply = format!("4.3.0 cannot read the message from the spool: {err}");
        let recs = self.defer_all(id, platform, idxs, &reply, None);
        self.write_records(id, recs).await;
    }

    /// An attempt (or one platform group of it) panicked: its recipients
    /// are deferred with a local error and retried after the backoff.
    async fn attempt_crashed(&self, id: &str, group: Option<(&String, &Vec<usize>)>, why: &str) {
        tracing::error!(queue_id = id, "delivery attempt failed internally: {why}");
        let reply = "4.3.0 internal error in the delivery attempt; will retry";
        let target = match group {
            Some((p, idxs)) => Some((p.clone(), idxs.clone())),
            None => {
                let mut st = self.0.state.lock().unwrap();
                let Some(e) = st.msgs.get_mut(id) else { return };
                // None: it never got as far as its plan, nothing to record.
                e.loaded().map(|l| {
                    (
                        l.rcpts
                            .iter()
                            .find_map(|r| r.last_route.clone())
                            .unwrap_or_default(),
                        (0..l.rcpts.len()).collect(),
                    )
                })
            }
        };
        let recs = match target {
            Some((platform, idxs)) => self.defer_all(id, &platform, &idxs, reply, None),
            None => Vec::new(),
        };
        self.write_records(id, recs).await;
        if group.is_some() {
            self.group_done(id, false);
        } else {
            self.finish(id).await;
        }
    }

    /// The attempt is over: remove the message when every recipient is
    /// final, else schedule its next attempt.
    async fn finish(&self, id: &str) {
        let inner = &self.0;
        let now = now_ms();
        let all_final = {
            let mut st = inner.state.lock().unwrap();
            let Some(e) = st.msgs.get_mut(id) else { return };
            e.in_flight = false;
            e.reroute = None;
            let parked = e.parked;
            let recheck = std::mem::take(&mut e.recheck);
            let at = match &mut e.held {
                Held::Loaded(l) if l.rcpts.iter().all(|r| r.is_final()) => None,
                Held::Loaded(l) if recheck => {
                    make_due(&mut l.rcpts, now);
                    Some(Some(now))
                }
                Held::Loaded(l) => Some(plan::next_due(&l.rcpts)),
                Held::Resting(r) => Some(r.next_due()),
            };
            match at {
                None => {
                    st.remove(id);
                    true
                }
                Some(at) => {
                    if !parked {
                        st.schedule(id, at);
                    }
                    // Every change of this attempt is recorded by now: what
                    // waits may rest.
                    st.settle_down(id, now);
                    if parked {
                        return;
                    }
                    false
                }
            }
        };
        if all_final {
            let spool = inner.spool.clone();
            let qid = id.to_string();
            match tokio::task::spawn_blocking(move || spool.remove_durable(&qid)).await {
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(e) => tracing::error!("{e}"),
                Ok(Ok(())) => {}
            }
        } else {
            inner.wake.notify_one();
        }
    }

    /// DSNs for recipients that failed, as their NOTIFY asks (RFC 3461 4.1).
    async fn send_failure_dsn(&self, sp: &Spooled, failed: Vec<DsnRcpt>) {
        let h = &sp.header;
        if failed.is_empty() || h.kind.is_some() {
            return;
        }
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
            self.send_dsn(sp, wanted).await;
        }
    }

    /// The first `max` bytes of a queued message, read in a blocking thread
    /// (empty when the file cannot be read: the caller builds what it can).
    async fn read_head(&self, sp: Arc<Spooled>, max: u64) -> Vec<u8> {
        let spool = self.0.spool.clone();
        tokio::task::spawn_blocking(move || spool.read_head(&sp, max))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default()
    }

    /// Builds a DSN and queues it like any other message (traced, retried).
    async fn send_dsn(&self, sp: &Spooled, rcpts: Vec<DsnRcpt>) {
        let inner = &self.0;
        let h = &sp.header;
        // Never a DSN about a DSN, nor to the null sender (RFC 3461 6.2).
        if h.envelope.mail_from.is_empty() || h.kind.is_some() {
            return;
        }
        // Only as much of the original as the DSN returns (its header
        // section, when large): a bounce never reads a 50 MB body whole.
        let body = self
            .read_head(Arc::new(sp.clone()), dsn::needed(sp.body_len))
            .await;
        let action = rcpts[0].action.to_string();
        let hostname = self.live().config.hostname.clone();
        let message = dsn::build(&hostname, h, &body, &rcpts, now_ms());
        let header = Header {
            queue_id: inner.spool.new_queue_id(),
            arrival_ms: now_ms(),
            message_id: Some(format!("<{}.dsn@{}>", h.queue_id, hostname)),
            envelope: Envelope {
                mail_from: String::new(),
                mail_params: MailParams::default(),
                rcpts: vec![(h.envelope.mail_from.clone(), RcptParams::default())],
                helo: hostname.clone(),
                esmtp: true,
                client_ip: "127.0.0.1".into(),
                tls: false,
            },
            kind: Some("dsn".into()),
            accept_ms: 0,
            journal: None,
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

    /// Applies an operator's queue command to the messages in memory (and
    /// their spool records), through the same `queue_op::apply` the CLI uses
    /// when no gateway runs. Returns how many recipients it affected.
    ///
    /// A flush is not recorded: it only makes recipients due now, and their
    /// attempt follows at once and records its outcome. A restart before
    /// that attempt finds them with their recorded retry time, as if the
    /// flush had not come, which loses no mail (Postfix's `postqueue -f` is
    /// not durable either). So a flush of a backlog costs no I/O per
    /// message: resting messages are flushed in their summary, and only a
    /// recipient never attempted (no route known without its header) is
    /// read back. Hold, release, requeue and delete change what a restart
    /// must remember: their messages are read back and their records written.
    pub async fn apply_op(&self, op: &QueueOp, sel: &Selector, actor: &str) -> usize {
        let inner = &self.0;
        if *op == QueueOp::Flush
            && let Some(d) = sel.platform.as_ref().and_then(|p| self.dest(p))
            && d.flow.down_for().is_some()
        {
            tracing::info!(platform = %d.platform.name, actor, "queue flush closes the platform's open circuit");
            d.flow.close_circuit();
        }
        let now = now_ms();
        // Read back once each: one whose file cannot be read stays resting
        // (its own attempt reports it) and the command passes it by.
        let mut tried = std::collections::HashSet::new();
        let Applied {
            affected,
            events,
            writes,
            removals,
        } = loop {
            match self.apply_loaded(op, sel, actor, now, &tried) {
                Ok(done) => break done,
                Err(wanted) => {
                    tried.extend(wanted.iter().cloned());
                    self.load_many(wanted).await;
                }
            }
        };
        let written: Vec<String> = writes.iter().map(|(id, _)| id.clone()).collect();
        for (id, recs) in writes {
            self.write_records(&id, recs).await;
        }
        {
            // Recorded: what waits (held, not due) may rest again.
            let mut st = inner.state.lock().unwrap();
            for id in &written {
                st.settle_down(id, now_ms());
            }
        }
        for id in removals {
            let spool = inner.spool.clone();
            match tokio::task::spawn_blocking(move || spool.remove_durable(&id)).await {
                Ok(Err(e)) => tracing::error!("{e}"),
                Err(e) => tracing::error!("{e}"),
                Ok(Ok(())) => {}
            }
        }
        self.emit_all(events);
        inner.wake.notify_one();
        affected
    }

    /// `apply_op` under one lock, when every message it may touch is loaded
    /// or is resting and flushed in its summary; else `Err` names the
    /// resting messages to read back first (except those `tried`).
    fn apply_loaded(
        &self,
        op: &QueueOp,
        sel: &Selector,
        actor: &str,
        now: i64,
        tried: &std::collections::HashSet<String>,
    ) -> Result<Applied, Vec<String>> {
        let durable = *op != QueueOp::Flush;
        let mut st = self.0.state.lock().unwrap();
        let wanted: Vec<String> = st
            .msgs
            .iter()
            .filter(|(id, e)| match &e.held {
                Held::Resting(r) => !tried.contains(*id) && r.needs_load(id, op, sel, now),
                Held::Loaded(_) => false,
            })
            .map(|(id, _)| id.clone())
            .collect();
        if !wanted.is_empty() {
            return Err(wanted);
        }
        let mut done = Applied::default();
        let ids: Vec<String> = st.msgs.keys().cloned().collect();
        for id in ids {
            let e = st.msgs.get_mut(&id).unwrap();
            let l = match &mut e.held {
                Held::Loaded(l) => l,
                Held::Resting(r) => {
                    let n = if durable { 0 } else { r.flush(&id, sel, now) };
                    if n > 0 {
                        done.affected += n;
                        e.parked = false;
                        let due = r.next_due();
                        st.schedule(&id, due);
                    }
                    continue;
                }
            };
            let sp = l.sp.clone();
            let route = |a: &str| self.route_of(&sp.header, a).route;
            let fx = queue_op::apply(op, sel, &sp.header, &mut l.rcpts, &route, now, actor);
            if fx.affected == 0 {
                continue;
            }
            done.affected += fx.affected;
            done.events.extend(fx.events);
            if l.rcpts.iter().all(|r| r.is_final()) && !e.in_flight {
                st.remove(&id);
                done.removals.push(id);
                continue;
            }
            if durable {
                done.writes.push((
                    id.clone(),
                    fx.changed
                        .iter()
                        .map(|&i| l.rcpts[i].to_record(i, now))
                        .collect(),
                ));
            }
            if !e.in_flight {
                e.parked = false;
                let due = plan::next_due(&l.rcpts);
                st.schedule(&id, due);
                if !durable {
                    st.settle_down(&id, now);
                }
            }
        }
        Ok(done)
    }

    /// Reads resting messages `ids` back from the spool, in batches off the
    /// async workers, and loads those still resting. One that cannot be
    /// read stays resting: its own attempt reports it.
    async fn load_many(&self, ids: Vec<String>) {
        for batch in ids.chunks(LOAD_BATCH) {
            let spool = self.0.spool.clone();
            let batch = batch.to_vec();
            let files = tokio::task::spawn_blocking(move || {
                batch
                    .into_iter()
                    .filter_map(|id| spool.load_head(&id).ok().map(|sp| (id, sp)))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            let now = now_ms();
            let mut st = self.0.state.lock().unwrap();
            for (id, sp) in files {
                st.install(&id, sp, now);
            }
        }
    }
}

/// Runs `fut` as a task of its own and reports a panic as an error, so the
/// caller can record an outcome instead of losing one.
/// An attempt's platform groups as transactions: the journal recipient, if
/// planned, leaves its group for one of its own (same platform).
fn split_journal(groups: BTreeMap<String, Vec<usize>>, h: &Header) -> Vec<(String, Vec<usize>)> {
    let mut jobs = Vec::new();
    for (p, mut idxs) in groups {
        if let Some(pos) = idxs.iter().position(|&i| h.is_journal(i)) {
            let j = idxs.remove(pos);
            jobs.push((p.clone(), vec![j]));
        }
        if !idxs.is_empty() {
            jobs.push((p, idxs));
        }
    }
    jobs
}

async fn watched<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    tokio::spawn(fut).await.map_err(|e| e.to_string())
}

/// Recipients that are not final and not on operator hold become due now;
/// a route hold is decided again.
fn make_due(rcpts: &mut [RcptState], now: i64) {
    for r in rcpts
        .iter_mut()
        .filter(|r| !r.is_final() && r.hold != Hold::Operator)
    {
        r.hold = Hold::None;
        r.next_ms = now;
    }
}

/// Applies a queue command to a spool that no gateway serves (the caller
/// holds its lock), through the same `queue_op::apply` as a running
/// gateway. Returns the recipients affected.
pub fn apply_offline(
    spool: &Spool,
    routes: &dyn Fn(&str) -> String,
    op: &QueueOp,
    sel: &Selector,
    actor: &str,
    emit: &mut dyn FnMut(Event),
) -> Result<usize, SpoolError> {
    let now = now_ms();
    let (msgs, corrupt) = spool.recover()?;
    for (path, reason) in corrupt {
        emit(Event::QueueCorrupt {
            file: path.display().to_string(),
            reason,
        });
    }
    let mut affected = 0;
    for m in msgs {
        let h = &m.header;
        let mut rcpts: Vec<RcptState> = m
            .status
            .iter()
            .map(|s| RcptState::from_record(s.as_ref(), now))
            .collect();
        let dsn_route;
        let route: &dyn Fn(&str) -> String = if h.kind.is_some() {
            dsn_route = |_: &str| String::new();
            &dsn_route
        } else {
            routes
        };
        let fx = queue_op::apply(op, sel, h, &mut rcpts, route, now, actor);
        if fx.affected == 0 {
            continue;
        }
        affected += fx.affected;
        if rcpts.iter().all(|r| r.is_final()) {
            spool.remove_durable(&h.queue_id)?;
        } else {
            let recs: Vec<_> = fx
                .changed
                .iter()
                .map(|&i| rcpts[i].to_record(i, now))
                .collect();
            spool.record_many(&h.queue_id, &recs)?;
        }
        for e in fx.events {
            emit(e);
        }
    }
    Ok(affected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_rests() {
        let now = 1_000_000;
        // (due, parked) -> rests
        let cases = [
            (Some(now), false, false),
            (Some(now - 5), false, false),
            (Some(now + REST_MIN_MS - 1), false, false),
            (Some(now + REST_MIN_MS), false, true),
            (Some(now + 3_600_000), false, true),
            // Held: nothing due until a command or a route change.
            (None, false, true),
            // Parked: waits for a place in the ready queue.
            (Some(now), true, true),
        ];
        for (n, (due, parked, want)) in cases.into_iter().enumerate() {
            assert_eq!(rests(due, parked, now), want, "case {n}");
        }
    }

    /// Resting keeps what memory knew and the records do not (a flush's
    /// due time, a route hold); waking takes the rest from the records.
    #[test]
    fn a_resting_message_wakes_as_it_was() {
        let now = 5_000;
        let h = crate::plan::tests::header(&["a@x", "b@x", "c@x"], 0);
        let rcpts = vec![
            RcptState {
                status: RcptStatus::Deferred,
                attempts: 2,
                next_ms: now, // flushed: not recorded
                last_route: Some("old".into()),
                last_reply: Some("4.4.1 refused".into()),
                warned: true,
                ..Default::default()
            },
            RcptState {
                status: RcptStatus::Deferred,
                hold: Hold::Route,
                attempts: 1,
                last_route: Some("hold".into()),
                ..Default::default()
            },
            RcptState {
                status: RcptStatus::Delivered,
                attempts: 1,
                last_route: Some("new".into()),
                delivered_to: vec!["new".into()],
                last_reply: Some("250 ok".into()),
                ..Default::default()
            },
        ];
        // On disk: the records of the last attempt (due later than the flush).
        let status: Vec<_> = rcpts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut rec = r.to_record(i, now - 10);
                rec.next_ms = now + 60_000;
                Some(rec)
            })
            .collect();
        let sp = Spooled {
            header: h,
            body_offset: 0,
            body_len: 0,
            status,
        };
        let l = Loaded {
            sp: Arc::new(sp.clone()),
            rcpts: rcpts.clone(),
        };
        let mut interned = Vec::new();
        let r = rest(&l, &mut |s: &str| {
            let a: Arc<str> = s.into();
            interned.push(a.clone());
            a
        });
        assert_eq!(r.next_due(), Some(now), "the flush's due time is kept");
        let back = wake(sp, &r, now + 1);
        assert_eq!(back.rcpts, rcpts);
    }

    fn relay(dir: &std::path::Path) -> RelayHandle {
        let mut config = Config::parse(
            "[domains]\naccepted = [\"example.com\"]\n[platforms.old]\nrelay = [\"127.0.0.1:9\"]\n[queue]\nmin_backoff = \"1m\"",
        )
        .unwrap();
        config.data_dir = dir.to_path_buf();
        let spool = Arc::new(Spool::open(&dir.join("spool")).unwrap());
        let routes = SharedRoutes::new(godwit_route::RoutingMap::new(&config));
        let (events, writer) = EventLog::new(&dir.join("events"), "test").unwrap();
        tokio::spawn(writer.run());
        RelayHandle::new(Arc::new(config), spool, routes, events)
    }

    /// Messages waiting for a retry rest; a flush reaches them in memory
    /// (due now, no record written), while a hold reads its message back
    /// and records the hold.
    #[tokio::test]
    async fn a_waiting_message_rests_and_a_flush_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path());
        let now = now_ms();
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut h = crate::plan::tests::header(&["a@example.com"], now);
            h.queue_id = format!("R{i}");
            let stored = relay.0.spool.store(&h, b"Subject: x\r\n\r\nx\r\n").unwrap();
            let later = RcptState {
                status: RcptStatus::Deferred,
                attempts: 1,
                next_ms: now + 3_600_000,
                last_route: Some("old".into()),
                last_reply: Some("4.4.1 refused".into()),
                ..Default::default()
            };
            relay
                .0
                .spool
                .record(&h.queue_id, &later.to_record(0, now))
                .unwrap();
            let _ = stored;
            relay.enqueue(relay.0.spool.load(&h.queue_id).unwrap());
            ids.push(h.queue_id);
        }
        let size = |id: &str| {
            std::fs::metadata(relay.0.spool.queue_dir().join(id))
                .unwrap()
                .len()
        };
        let sizes: Vec<u64> = ids.iter().map(|id| size(id)).collect();
        let resting = |relay: &RelayHandle, id: &str| {
            matches!(
                relay.0.state.lock().unwrap().msgs[id].held,
                Held::Resting(_)
            )
        };
        assert!(ids.iter().all(|id| resting(&relay, id)));
        let all = Selector {
            all: true,
            ..Default::default()
        };
        assert_eq!(relay.apply_op(&QueueOp::Flush, &all, "ops").await, 3);
        let after = now_ms();
        {
            let st = relay.0.state.lock().unwrap();
            for id in &ids {
                assert!(
                    st.msgs[id].due.is_some_and(|at| at <= after),
                    "{id} due now"
                );
            }
        }
        let unchanged: Vec<u64> = ids.iter().map(|id| size(id)).collect();
        assert_eq!(unchanged, sizes, "a flush writes no record");
        let one = Selector {
            queue_id: Some("R1".into()),
            ..Default::default()
        };
        assert_eq!(relay.apply_op(&QueueOp::Hold, &one, "ops").await, 1);
        assert!(size("R1") > sizes[1], "a hold is recorded");
        assert!(resting(&relay, "R1"), "held, it rests again");
        let m = relay.0.spool.load("R1").unwrap();
        assert!(m.status[0].as_ref().is_some_and(|s| s.operator_hold));
    }

    #[tokio::test]
    async fn a_panic_is_reported_not_lost() {
        let r = watched(async { panic!("boom in an attempt") }).await;
        assert!(r.unwrap_err().contains("panicked"));
        assert_eq!(watched(async { 7 }).await, Ok(7));
    }

    /// An attempt that crashed leaves a recorded, retried deferral: never a
    /// message "in flight" for ever.
    #[tokio::test]
    async fn a_crashed_attempt_is_recorded_and_rescheduled() {
        let dir = tempfile::tempdir().unwrap();
        let relay = relay(dir.path());
        let h = crate::plan::tests::header(&["a@example.com", "b@example.com"], now_ms());
        let stored = relay.0.spool.store(&h, b"Subject: x\r\n\r\nx\r\n").unwrap();
        relay.enqueue(stored);
        relay
            .0
            .state
            .lock()
            .unwrap()
            .msgs
            .get_mut("Q1")
            .unwrap()
            .in_flight = true;
        relay.attempt_crashed("Q1", None, "boom").await;
        {
            let st = relay.0.state.lock().unwrap();
            let e = &st.msgs["Q1"];
            assert!(!e.in_flight);
            assert!(
                e.due.is_some_and(|at| at > now_ms()),
                "retried after the backoff"
            );
            let Held::Resting(r) = &e.held else {
                panic!("a message waiting for its retry rests")
            };
            let l = wake(relay.0.spool.load("Q1").unwrap(), r, now_ms());
            for r in &l.rcpts {
                assert_eq!(r.status, RcptStatus::Deferred);
                assert_eq!(r.attempts, 1);
                assert!(r.last_reply.as_deref().unwrap().starts_with("4.3.0"));
            }
        }
        // And on disk, for a restart.
        let m = relay.0.spool.load("Q1").unwrap();
        assert!(
            m.status
                .iter()
                .all(|s| s.as_ref().is_some_and(|s| s.status == RcptStatus::Deferred))
        );
    }
}
