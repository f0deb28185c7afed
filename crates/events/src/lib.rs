//! Every decision the gateway makes is one typed event with a stable name
//! (`message.accepted`, `delivery.deferred`, ...). Events go to JSON lines
//! under `data_dir/events/` (one file per UTC day) and to stderr through
//! tracing. Consumers (trace, metrics, dashboard, reports) read these types;
//! nothing parses log text back.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Where a recipient's time went, as Postfix's `delays=a/b/c/d`: `accept`
/// from the client's MAIL FROM to the end of its DATA, `queue` from then
/// (the spool's fsync and our 250 included) to the start of this attempt (earlier
/// attempts and backoff included), `connect` the connection setup (TCP,
/// greeting, EHLO, STARTTLS and the TLS handshake; near 0 on a reused
/// connection), `transmit` from MAIL FROM to the final reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delays {
    pub accept_ms: u64,
    pub queue_ms: u64,
    pub connect_ms: u64,
    pub transmit_ms: u64,
}

impl Delays {
    /// The whole delay, arrival at our edge to this attempt's end: Postfix's `delay=`.
    pub fn total_ms(&self) -> u64 {
        self.accept_ms + self.queue_ms + self.connect_ms + self.transmit_ms
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum Event {
    #[serde(rename = "gateway.started")]
    GatewayStarted {
        hostname: String,
        listen: Vec<String>,
        recovered: usize,
        routing_version: i64,
    },
    /// The gateway stopped: `reason` is the signal. `sessions_cut` counts
    /// sessions still open when the drain's deadline passed.
    #[serde(rename = "gateway.stopped")]
    GatewayStopped {
        reason: String,
        #[serde(default)]
        sessions_cut: usize,
    },
    /// SIGTERM (or SIGINT): listeners closed, idle sessions answered 421,
    /// sessions in DATA finishing; queued mail stays in the spool.
    #[serde(rename = "gateway.draining")]
    GatewayDraining { reason: String, sessions: usize },
    /// SIGHUP: the configuration file was read again and applied. Keys in
    /// `restart_needed` changed but take effect only after a restart.
    #[serde(rename = "gateway.reloaded")]
    GatewayReloaded {
        config: String,
        applied: Vec<String>,
        restart_needed: Vec<String>,
    },
    /// SIGHUP with a file that does not load: nothing changed.
    #[serde(rename = "gateway.reload_failed")]
    GatewayReloadFailed { config: String, error: String },
    #[serde(rename = "connection.opened")]
    ConnectionOpened { session: u64, client_ip: String },
    #[serde(rename = "connection.refused")]
    ConnectionRefused {
        client_ip: String,
        reply: String,
        reason: String,
    },
    #[serde(rename = "connection.closed")]
    ConnectionClosed {
        session: u64,
        client_ip: String,
        messages: u32,
        reason: String,
    },
    #[serde(rename = "connection.tls")]
    ConnectionTls {
        session: u64,
        client_ip: String,
        protocol: String,
        cipher: String,
    },
    /// An SMTP AUTH on a submission listener (`listener` is `submission`
    /// or `submission_tls`). `result` is `ok` or `failed`; `reason` says why
    /// it failed (`auth`, `unknown`, `foreign_domain`, `locked_out`,
    /// `unavailable`, ...), `backend_reply` is the platform's own answer.
    /// Never a password.
    #[serde(rename = "submission.auth")]
    SubmissionAuth {
        session: u64,
        client_ip: String,
        listener: String,
        method: String,
        user: String,
        result: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        platform: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend_reply: Option<String>,
    },
    /// `failures` failed AUTHs from `client_ip` within `window_s` seconds:
    /// further AUTHs from it are refused unchecked until they age out.
    /// `user` is the one the last attempt named.
    #[serde(rename = "submission.lockout")]
    SubmissionLockout {
        client_ip: String,
        user: String,
        failures: u32,
        window_s: u64,
    },
    #[serde(rename = "message.accepted")]
    MessageAccepted {
        queue_id: String,
        message_id: Option<String>,
        session: u64,
        client_ip: String,
        helo: String,
        tls: bool,
        mail_from: String,
        rcpts: Vec<String>,
        size: u64,
        /// `outbound` for mail accepted on the relay port (or after AUTH)
        /// with a recipient outside our domains; absent for inbound mail.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        direction: Option<String>,
        /// On the submission listener: the SASL mechanism and user of the
        /// session's AUTH, as Postfix logs them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sasl_method: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sasl_username: Option<String>,
    },
    /// A recipient that is a group, expanded before the message was queued
    /// (`directory.expand_groups`). With `over_limit` it was not expanded
    /// and goes to its own route, whose platform expands it.
    #[serde(rename = "recipient.expanded")]
    RecipientExpanded {
        queue_id: String,
        rcpt: String,
        members: Vec<String>,
        /// Nested groups expanded on the way.
        groups: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        over_limit: Option<usize>,
    },
    /// A message came back carrying more `X-Godwit-Trace` headers than
    /// `smtp.max_trace_hops`: a routing loop. It is held (every recipient,
    /// an operator hold), never bounced and never relayed again. `trace_hops`
    /// are the queue IDs of those headers, newest first; `path` the Received
    /// hops as "HOST QUEUEID", oldest first.
    /// `[journal]`: the message's journal copy was queued (recipient `rcpt`)
    /// in the same spool write as the message; its deliveries, deferrals
    /// and holds are the usual recipient events for `rcpt`.
    #[serde(rename = "journal.queued")]
    JournalQueued {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        platform: Option<String>,
    },
    #[serde(rename = "message.loop")]
    MessageLoop {
        queue_id: String,
        message_id: Option<String>,
        rcpts: Vec<String>,
        trace_hops: Vec<String>,
        path: Vec<String>,
        max_trace_hops: usize,
    },
    /// A soaking wave crossed a `--rollback-if` threshold and godwit rolled
    /// it back by itself (routing version `version`), with the measurements
    /// of mail to its members since the cutover.
    #[serde(rename = "wave.rolled_back")]
    WaveRolledBack {
        wave: String,
        version: i64,
        breaches: Vec<String>,
        measurements: serde_json::Value,
        node: String,
    },
    /// A wave's soak ended without a breach.
    #[serde(rename = "wave.soak_passed")]
    WaveSoakPassed {
        wave: String,
        measurements: serde_json::Value,
    },
    /// A command or message refused: `stage` is command, mail, rcpt or data.
    #[serde(rename = "message.refused")]
    MessageRefused {
        session: u64,
        client_ip: String,
        stage: String,
        reply: String,
        detail: Option<String>,
        /// The open transaction's sender, the refused recipient, and the
        /// HELO name and protocol, as Postfix's reject lines carry them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mail_from: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rcpt: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        helo: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        proto: Option<String>,
    },
    #[serde(rename = "queue.recovered")]
    QueueRecovered {
        queue_id: String,
        message_id: Option<String>,
        pending: Vec<String>,
    },
    #[serde(rename = "queue.corrupt")]
    QueueCorrupt { file: String, reason: String },
    /// A message taken over from the spool of a node that will not come back
    /// (`godwit spool adopt`); this node delivers it from now on.
    #[serde(rename = "queue.adopted")]
    QueueAdopted {
        queue_id: String,
        message_id: Option<String>,
        /// The node whose spool it was (its `node_name`), if known.
        from_node: Option<String>,
        /// The spool folder it was taken from.
        from_dir: String,
        /// Recipients still to deliver; final ones are never sent again.
        pending: Vec<String>,
    },
    #[serde(rename = "delivery.routed")]
    Routed {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        route: String,
        why: String,
        routing_version: i64,
    },
    #[serde(rename = "delivery.attempt")]
    Attempt {
        queue_id: String,
        message_id: Option<String>,
        platform: String,
        host: String,
        rcpts: Vec<String>,
        code: u16,
        enhanced: Option<String>,
        reply: String,
        duration_ms: u64,
        tls: bool,
        /// Whether the platform's certificate verified (absent without TLS).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls_verified: Option<bool>,
    },
    #[serde(rename = "delivery.delivered")]
    Delivered {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        platform: String,
        host: String,
        reply: String,
        remote_queue_id: Option<String>,
        /// Accept-to-delivered, for latency percentiles.
        delay_ms: u64,
        #[serde(default)]
        delays: Delays,
    },
    #[serde(rename = "delivery.deferred")]
    Deferred {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        platform: String,
        host: Option<String>,
        reply: String,
        attempts: u32,
        next_attempt_in_s: u64,
        #[serde(default)]
        delays: Delays,
    },
    #[serde(rename = "delivery.failed")]
    Failed {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        platform: String,
        reply: String,
        reason: String,
        #[serde(default)]
        delays: Delays,
    },
    #[serde(rename = "delivery.held")]
    Held {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        why: String,
    },
    #[serde(rename = "route.changed")]
    RouteChanged {
        version: i64,
        actor: String,
        command: String,
        changes: usize,
        /// How this gateway heard of it: "listen" (PostgreSQL NOTIFY) or
        /// "poll" (the version check; SQLite, or the listener was down).
        #[serde(default)]
        via: String,
    },
    #[serde(rename = "delivery.released")]
    Released {
        queue_id: String,
        message_id: Option<String>,
        rcpt: String,
        actor: String,
    },
    /// A DSN (RFC 3464) generated for `original_queue_id`, queued as `queue_id`.
    #[serde(rename = "dsn.queued")]
    DsnQueued {
        queue_id: String,
        original_queue_id: String,
        original_message_id: Option<String>,
        to: String,
        action: String,
        rcpts: Vec<String>,
    },
    #[serde(rename = "queue.deleted")]
    QueueDeleted {
        queue_id: String,
        message_id: Option<String>,
        rcpts: Vec<String>,
        actor: String,
    },
    /// An operator's queue command, as executed by one node (or offline).
    #[serde(rename = "queue.command")]
    QueueCommand {
        op: String,
        /// The selector's JSON; written into the log as an object.
        #[serde(with = "json_object")]
        selector: String,
        actor: String,
        affected: usize,
        /// Where it ran: the node's name, or "offline" (the spool changed
        /// directly). Written as `executed_on`: the record has its own `node`.
        #[serde(rename = "executed_on", alias = "node")]
        node: String,
    },
    #[serde(rename = "destination.state")]
    DestinationState {
        platform: String,
        circuit: String,
        limit: usize,
        reason: String,
    },
    /// The state store (PostgreSQL for a fleet) became unreachable (`up`
    /// false, with the error) or reachable again. While it is down the
    /// gateway accepts and delivers with the routing it last applied.
    #[serde(rename = "store.state")]
    StoreState { up: bool, error: String },
    /// A mailbox login at the access front (IMAP or POP3). `result` is `ok`
    /// or `failed`; `reason` says why a login failed (`auth`, `unknown`,
    /// `foreign_domain`, `rate_limited`, `unavailable`, ...) and
    /// `backend_reply` is the platform's own answer. Never a password.
    #[serde(rename = "access.login")]
    AccessLogin {
        session: u64,
        address: String,
        client_ip: String,
        protocol: String,
        platform: Option<String>,
        result: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backend_reply: Option<String>,
    },
    /// A logged-in session closed because its mailbox now routes elsewhere
    /// (`access.disconnect_on_move`): the client reconnects to `to`.
    #[serde(rename = "access.moved")]
    AccessMoved {
        session: u64,
        address: String,
        client_ip: String,
        protocol: String,
        from_platform: String,
        to_platform: String,
    },
}

/// A field that holds JSON text in Rust and is a JSON value in the log, so
/// readers do not parse twice. Older lines with the text as a string read too.
mod json_object {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(v) => v.serialize(s),
            Err(_) => s.serialize_str(text),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => s,
            v => v.to_string(),
        })
    }
}

impl Event {
    /// The stable name, as written in the `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::GatewayStarted { .. } => "gateway.started",
            Event::MessageLoop { .. } => "message.loop",
            Event::JournalQueued { .. } => "journal.queued",
            Event::WaveRolledBack { .. } => "wave.rolled_back",
            Event::WaveSoakPassed { .. } => "wave.soak_passed",
            Event::GatewayStopped { .. } => "gateway.stopped",
            Event::GatewayDraining { .. } => "gateway.draining",
            Event::GatewayReloaded { .. } => "gateway.reloaded",
            Event::GatewayReloadFailed { .. } => "gateway.reload_failed",
            Event::ConnectionOpened { .. } => "connection.opened",
            Event::ConnectionRefused { .. } => "connection.refused",
            Event::ConnectionClosed { .. } => "connection.closed",
            Event::ConnectionTls { .. } => "connection.tls",
            Event::SubmissionAuth { .. } => "submission.auth",
            Event::SubmissionLockout { .. } => "submission.lockout",
            Event::MessageAccepted { .. } => "message.accepted",
            Event::RecipientExpanded { .. } => "recipient.expanded",
            Event::MessageRefused { .. } => "message.refused",
            Event::QueueRecovered { .. } => "queue.recovered",
            Event::QueueCorrupt { .. } => "queue.corrupt",
            Event::QueueAdopted { .. } => "queue.adopted",
            Event::Routed { .. } => "delivery.routed",
            Event::Attempt { .. } => "delivery.attempt",
            Event::Delivered { .. } => "delivery.delivered",
            Event::Deferred { .. } => "delivery.deferred",
            Event::Failed { .. } => "delivery.failed",
            Event::Held { .. } => "delivery.held",
            Event::RouteChanged { .. } => "route.changed",
            Event::Released { .. } => "delivery.released",
            Event::DsnQueued { .. } => "dsn.queued",
            Event::QueueDeleted { .. } => "queue.deleted",
            Event::QueueCommand { .. } => "queue.command",
            Event::DestinationState { .. } => "destination.state",
            Event::StoreState { .. } => "store.state",
            Event::AccessLogin { .. } => "access.login",
            Event::AccessMoved { .. } => "access.moved",
        }
    }
}

/// One line of the event log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 UTC with milliseconds.
    pub ts: String,
    pub node: String,
    #[serde(flatten)]
    pub event: Event,
}

/// A record as emitted: shared by the log writer and every tap, and
/// serialised to its JSON line at most once, by whichever reader needs it
/// first (the writer for the file, the index for its `body` column). Each
/// event used to be serialised twice and deep-cloned for the taps.
#[derive(Debug)]
pub struct Logged {
    pub record: Record,
    json: std::sync::OnceLock<String>,
    /// The emitting log's flow state, whose count of records some reader
    /// still holds this one is in (`EventLog::pending`); `None` for a
    /// record made outside a log.
    flow: Option<std::sync::Arc<Flow>>,
}

impl Logged {
    pub fn new(record: Record) -> Logged {
        Logged {
            record,
            json: std::sync::OnceLock::new(),
            flow: None,
        }
    }

    fn counted(record: Record, flow: &std::sync::Arc<Flow>) -> Logged {
        use std::sync::atomic::Ordering::Relaxed;
        let pending = flow.live.fetch_add(1, Relaxed) + 1;
        flow.peak.fetch_max(pending, Relaxed);
        Logged {
            record,
            json: std::sync::OnceLock::new(),
            flow: Some(flow.clone()),
        }
    }

    /// The record's JSON line, without the newline.
    pub fn json(&self) -> &str {
        self.json
            .get_or_init(|| serde_json::to_string(&self.record).unwrap_or_default())
    }
}

impl Drop for Logged {
    /// The last reader is done with it: one fewer pending.
    fn drop(&mut self) {
        if let Some(flow) = &self.flow {
            flow.live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Records some reader (the log writer, the event index, a tap) may leave
/// unfinished before new work waits for it: `events.max_lag`'s default.
/// Each costs its record and JSON line, about 1 KB, so 30,000 bound the lag
/// to some 30 MB. During a 100,000-message fill the index fell 100,000 to
/// 200,000 records behind and the gateway grew past 800 MB.
pub const PENDING_HIGH: usize = 30_000;
/// How long new work waits at most before it goes on regardless: a stuck
/// reader (a store that stopped answering) slows mail, it never stops it.
pub const FLOW_MAX: std::time::Duration = std::time::Duration::from_secs(1);
const FLOW_STEP: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether new work waits, and how long before it looks again: Postfix's
/// `in_flow_delay`, which paces smtpd when mail arrives faster than the
/// queue manager takes it, with the readers' lag as the measure.
pub fn flow_delay(
    pending: usize,
    max_lag: usize,
    waited: std::time::Duration,
) -> Option<std::time::Duration> {
    (pending > max_lag && waited < FLOW_MAX).then(|| FLOW_STEP.min(FLOW_MAX - waited))
}

impl std::ops::Deref for Logged {
    type Target = Record;
    fn deref(&self) -> &Record {
        &self.record
    }
}

/// Cheap to clone; sending never blocks the SMTP or delivery paths.
#[derive(Clone)]
pub struct EventLog {
    tx: mpsc::UnboundedSender<std::sync::Arc<Logged>>,
    node: std::sync::Arc<str>,
    /// Other readers of the same stream (index, metrics, Postfix-style log).
    taps: std::sync::Arc<std::sync::Mutex<Vec<mpsc::UnboundedSender<std::sync::Arc<Logged>>>>>,
    /// `log.format = "json"`: events go to stderr as JSON objects in the
    /// shape tracing's JSON lines have, not as a string inside `message`.
    json: std::sync::Arc<std::sync::atomic::AtomicBool>,
    flow: std::sync::Arc<Flow>,
}

/// The lag new work waits on, and what it has cost so far.
#[derive(Debug)]
struct Flow {
    /// Records emitted that a reader still holds (see `PENDING_HIGH`).
    live: std::sync::atomic::AtomicUsize,
    max_lag: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    waited_ms: std::sync::atomic::AtomicU64,
}

impl Default for Flow {
    fn default() -> Flow {
        Flow {
            live: 0.into(),
            max_lag: PENDING_HIGH.into(),
            peak: 0.into(),
            waited_ms: 0.into(),
        }
    }
}

pub struct EventWriter {
    rx: mpsc::UnboundedReceiver<std::sync::Arc<Logged>>,
    dir: PathBuf,
}

impl EventLog {
    /// Creates the log and its writer; run `EventWriter::run` on a task.
    pub fn new(dir: &Path, node: &str) -> std::io::Result<(EventLog, EventWriter)> {
        std::fs::create_dir_all(dir)?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            EventLog {
                tx,
                node: node.into(),
                taps: Default::default(),
                json: Default::default(),
                flow: Default::default(),
            },
            EventWriter {
                rx,
                dir: dir.to_path_buf(),
            },
        ))
    }

    /// A log whose records go nowhere but stderr (CLI commands without a data dir).
    pub fn discard(node: &str) -> EventLog {
        let (tx, _rx) = mpsc::unbounded_channel();
        EventLog {
            tx,
            node: node.into(),
            taps: Default::default(),
            json: Default::default(),
            flow: Default::default(),
        }
    }

    /// Writes events to stderr as JSON objects (`log.format = "json"`).
    pub fn stderr_json(&self, on: bool) {
        self.json.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A new reader of every event emitted from now on.
    pub fn tap(&self) -> mpsc::UnboundedReceiver<std::sync::Arc<Logged>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.taps.lock().unwrap().push(tx);
        rx
    }

    /// Records emitted here that some reader has not finished with.
    pub fn pending(&self) -> usize {
        self.flow.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most records ever pending at once, since start.
    pub fn pending_peak(&self) -> usize {
        self.flow.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Time new work has spent waiting for the readers, since start.
    pub fn flow_waited(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.flow
                .waited_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// `events.max_lag` (shared by every clone of this log).
    pub fn set_max_lag(&self, records: usize) {
        self.flow
            .max_lag
            .store(records, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits while the readers lag more than `events.max_lag` records
    /// behind, for at most `FLOW_MAX`. Called before a new message is
    /// spooled and before the scheduler starts more attempts: the work that
    /// makes records waits, so the lag (and the memory it holds) is bounded.
    pub async fn wait_for_readers(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let max_lag = self.flow.max_lag.load(Relaxed);
        let Some(mut step) = flow_delay(self.pending(), max_lag, std::time::Duration::ZERO) else {
            return;
        };
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(step).await;
            match flow_delay(self.pending(), max_lag, started.elapsed()) {
                Some(s) => step = s,
                None => break,
            }
        }
        let waited = started.elapsed();
        self.flow
            .waited_ms
            .fetch_add(waited.as_millis() as u64, Relaxed);
        // One warning a minute at most: every session would repeat it.
        static WARNED_S: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if waited >= FLOW_MAX && self.pending() > max_lag && now_s >= WARNED_S.load(Relaxed) + 60 {
            WARNED_S.store(now_s, Relaxed);
            tracing::warn!(
                pending = self.pending(),
                "the event readers (log writer, index) lag more than events.max_lag = {max_lag} records; going on after {FLOW_MAX:?}"
            );
        }
    }

    pub fn emit(&self, event: Event) {
        let record = Record {
            ts: now_rfc3339(),
            node: self.node.to_string(),
            event,
        };
        if tracing::enabled!(target: "godwit::event", tracing::Level::INFO) {
            if self.json.load(std::sync::atomic::Ordering::Relaxed) {
                let line = stderr_json_line(&record);
                // One write per line, so lines from other threads never interleave.
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            } else if let Ok(line) = serde_json::to_string(&record.event) {
                tracing::info!(target: "godwit::event", "{line}");
            }
        }
        let shared = std::sync::Arc::new(Logged::counted(record, &self.flow));
        for t in self.taps.lock().unwrap().iter() {
            let _ = t.send(shared.clone());
        }
        let _ = self.tx.send(shared);
    }
}

impl EventWriter {
    /// Appends records until every `EventLog` is dropped. Buffers while more
    /// records are queued and flushes when the queue drains, so a burst costs
    /// one write and the file is current within one scheduler tick.
    pub async fn run(mut self) {
        let mut current: Option<(String, std::io::BufWriter<std::fs::File>)> = None;
        while let Some(first) = self.rx.recv().await {
            // Let the tasks already runnable go first: the events they emit
            // join this batch, so a burst costs one wake-up and one write,
            // not one per event (each wake-up is a futex or eventfd call).
            // No timer: the file stays current within a scheduler tick.
            tokio::task::yield_now().await;
            let mut batch = vec![first];
            while let Ok(r) = self.rx.try_recv() {
                batch.push(r);
                if batch.len() >= 4096 {
                    break;
                }
            }
            for record in batch {
                let day = record.ts.get(..10).unwrap_or("unknown").to_string();
                if current.as_ref().is_none_or(|(d, _)| *d != day) {
                    let path = self.dir.join(format!("events-{day}.jsonl"));
                    match std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                    {
                        Ok(f) => {
                            current = Some((day, std::io::BufWriter::with_capacity(1 << 16, f)))
                        }
                        Err(e) => {
                            tracing::error!("cannot open event log {}: {e}", path.display());
                            continue;
                        }
                    }
                }
                if let Some((_, w)) = current.as_mut() {
                    let _ = w.write_all(record.json().as_bytes());
                    let _ = w.write_all(b"\n");
                }
            }
            if let Some((_, w)) = current.as_mut()
                && let Err(e) = w.flush()
            {
                tracing::error!("cannot write event log: {e}");
            }
        }
    }
}

/// One stderr line for `record`, shaped as tracing-subscriber's JSON lines
/// (`timestamp`, `level`, `target`, `fields`), with the event's own fields as
/// an object in `fields`, so a log shipper parses it once.
pub fn stderr_json_line(record: &Record) -> String {
    let fields = serde_json::to_value(&record.event).unwrap_or_default();
    let mut line = serde_json::json!({
        "timestamp": record.ts,
        "level": "INFO",
        "target": "godwit::event",
        "node": record.node,
        "fields": fields,
    })
    .to_string();
    line.push('\n');
    line
}

/// Reads every record in `dir`, oldest file first. Lines that do not parse
/// (a torn last line after a crash) are skipped.
pub fn read_all(dir: &Path) -> std::io::Result<Vec<Record>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Record>(l).ok()),
        );
    }
    Ok(out)
}

/// UTC, always with three fractional digits, so that timestamps sort as text
/// and slice at fixed offsets.
pub fn now_rfc3339() -> String {
    rfc3339_ms(time::OffsetDateTime::now_utc())
}

/// `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339), written digit by digit:
/// through `format!` each timestamp cost ~2,800 instructions (seven padded
/// integers), 4% of a relayed message's. Years outside 0..=9999 are clamped;
/// they cannot come from the system clock.
fn rfc3339_ms(t: time::OffsetDateTime) -> String {
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, t.year().clamp(0, 9999) as u32);
    put(5, 2, u8::from(t.month()).into());
    put(8, 2, t.day().into());
    put(11, 2, t.hour().into());
    put(14, 2, t.minute().into());
    put(17, 2, t.second().into());
    put(20, 3, t.millisecond().into());
    // Only ASCII digits and separators were written.
    String::from_utf8(b.to_vec()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_work_waits_while_readers_lag_and_never_for_long() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let cases = [
            // (pending, waited so far, wait again for)
            (0, ms(0), None),
            (PENDING_HIGH, ms(0), None),
            (PENDING_HIGH + 1, ms(0), Some(ms(10))),
            (1_000_000, ms(500), Some(ms(10))),
            (1_000_000, ms(995), Some(ms(5))),
            (1_000_000, FLOW_MAX, None),
            (1_000_000, FLOW_MAX + ms(1), None),
        ];
        for (pending, waited, want) in cases {
            assert_eq!(
                flow_delay(pending, PENDING_HIGH, waited),
                want,
                "{pending} after {waited:?}"
            );
        }
        // events.max_lag moves the line.
        assert_eq!(flow_delay(101, 100, ms(0)), Some(ms(10)));
        assert_eq!(flow_delay(100, 100, ms(0)), None);
    }

    #[tokio::test]
    async fn a_record_is_pending_until_its_last_reader_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = EventLog::new(dir.path(), "n").unwrap();
        let mut tap = log.tap();
        for i in 0..3 {
            log.emit(Event::GatewayDraining {
                reason: "test".into(),
                sessions: i,
            });
        }
        assert_eq!(log.pending(), 3);
        assert_eq!(log.pending_peak(), 3);
        // Nothing waits below PENDING_HIGH.
        tokio::time::timeout(std::time::Duration::from_millis(1), log.wait_for_readers())
            .await
            .unwrap();
        // The writer writes them and lets go; the tap still holds them.
        let w = tokio::spawn(writer.run());
        let held: Vec<_> = (0..3).map(|_| tap.try_recv().unwrap()).collect();
        let flow = held[0].flow.clone().unwrap();
        drop(log);
        w.await.unwrap();
        assert_eq!(flow.live.load(std::sync::atomic::Ordering::Relaxed), 3);
        drop(held);
        assert_eq!(flow.live.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn new_work_waits_until_the_readers_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = EventLog::new(dir.path(), "n").unwrap();
        log.set_max_lag(2);
        for i in 0..3 {
            log.emit(Event::GatewayDraining {
                reason: "test".into(),
                sessions: i,
            });
        }
        let waiting = log.clone();
        let waiter = tokio::spawn(async move {
            waiting.wait_for_readers().await;
            waiting.pending()
        });
        // The writer (the only reader) catches up 100 ms later, well inside
        // FLOW_MAX: the waiter returns only then, and sees none pending.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(writer);
        assert_eq!(waiter.await.unwrap(), 0);
        assert!(log.flow_waited() >= std::time::Duration::from_millis(90));
        assert!(log.flow_waited() < FLOW_MAX);
    }

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds() {
        use time::macros::datetime;
        let cases = [
            (
                datetime!(2026-12-01 20:34:21.123 UTC),
                "2026-12-01T20:34:21.123Z",
            ),
            (
                datetime!(2026-01-09 03:04:05.007 UTC),
                "2026-01-09T03:04:05.007Z",
            ),
            (
                datetime!(1999-12-31 23:59:59.999999 UTC),
                "1999-12-31T23:59:59.999Z",
            ),
            (
                datetime!(0042-02-28 00:00:00 UTC),
                "0042-02-28T00:00:00.000Z",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(rfc3339_ms(t), want);
            // The form the old format! wrote, field for field.
            let old = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            );
            assert_eq!(rfc3339_ms(t), old);
        }
    }

    #[test]
    fn queue_command_has_one_node_key_and_an_object_selector() {
        let r = Record {
            ts: "2026-01-01T00:00:00.000Z".into(),
            node: "gw1".into(),
            event: Event::QueueCommand {
                op: "hold".into(),
                selector: r#"{"all":false,"platform":"new"}"#.into(),
                actor: "ops".into(),
                affected: 2,
                node: "gw1".into(),
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line.matches("\"node\"").count(), 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["selector"]["platform"], "new");
        assert_eq!(v["executed_on"], "gw1");
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.event, r.event);
    }

    #[test]
    fn json_stderr_lines_carry_the_event_as_an_object() {
        let r = Record {
            ts: "2026-01-01T00:00:00.000Z".into(),
            node: "n1".into(),
            event: Event::GatewayReloadFailed {
                config: "/etc/godwit.toml".into(),
                error: "bad".into(),
            },
        };
        let line = stderr_json_line(&r);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["fields"]["event"], "gateway.reload_failed");
        assert_eq!(v["fields"]["config"], "/etc/godwit.toml");
        assert_eq!(v["level"], "INFO");
        assert!(v["fields"].get("message").is_none());
    }

    #[tokio::test]
    async fn records_round_trip_with_stable_names() {
        let dir = tempfile::tempdir().unwrap();
        let (log, writer) = EventLog::new(dir.path(), "n1").unwrap();
        let task = tokio::spawn(writer.run());
        let ev = Event::Held {
            queue_id: "Q".into(),
            message_id: Some("<m@x>".into()),
            rcpt: "a@b".into(),
            why: "route hold".into(),
        };
        log.emit(ev.clone());
        drop(log);
        task.await.unwrap();
        let records = read_all(dir.path()).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].event, ev);
        let raw = std::fs::read_to_string(
            std::fs::read_dir(dir.path())
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path(),
        )
        .unwrap();
        assert!(raw.contains("\"event\":\"delivery.held\""), "{raw}");
        assert_eq!(ev.name(), "delivery.held");
        let ts = &records[0].ts;
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok()
        );
    }
}
