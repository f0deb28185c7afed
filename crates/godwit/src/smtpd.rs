//! The SMTP listener (Postfix's smtpd + cleanup): owns sockets, limits,
//! timeouts and TLS; feeds bytes to the pure session state machine; makes
//! each message durable in the spool before the 250 reply.

use godwit_config::{BareNewline, Config, SenderRestriction};
use godwit_events::{Event, EventLog};
use godwit_relay::Relay;
use godwit_route::{Expansion, SharedRoutes, normalize_address};
use godwit_smtp_proto::{
    AuthRules, Envelope, Limits, NewlinePolicy, Output, RcptPolicy, Reply, Session,
};
use godwit_spool::{Header, Spill, Spool, now_ms};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

pub struct Smtpd {
    /// What a reload (SIGHUP) may replace; each session takes a snapshot
    /// when it starts, so a reload never changes a session midway.
    live: RwLock<Live>,
    pub spool: Arc<Spool>,
    pub relay: Relay,
    pub events: EventLog,
    connections: Arc<Semaphore>,
    /// The permits `connections` was created or last resized with.
    connection_limit: Mutex<usize>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    session_ids: AtomicU64,
    data_memory: DataMemory,
    /// Set once on SIGTERM: listeners stop accepting, idle sessions are closed
    /// with 421, and a session in DATA finishes its message first.
    draining: tokio::sync::watch::Sender<bool>,
    /// Sessions running now, and a wake-up for whoever waits for none.
    active: AtomicUsize,
    idle: tokio::sync::Notify,
    /// `[submission]`: set once at start when configured.
    submission: std::sync::OnceLock<Submission>,
}

/// The submission listeners' password check and certificate.
pub struct Submission {
    pub auth: godwit_auth::Authenticator,
    pub tls: TlsAcceptor,
    /// As read at start: `[submission]` changes need a restart (reload says so).
    pub config: godwit_config::SubmissionConfig,
}

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// smtp.listen: the MX gateway for our domains.
    Mx,
    /// submission.listen: STARTTLS, then AUTH (RFC 6409).
    Submission,
    /// submission.listen_tls: implicit TLS (RFC 8314).
    SubmissionTls,
    /// outbound.listen: the relay port for platforms' outbound connectors
    /// and apps; relaying for clients in `outbound.relay_networks`.
    Relay,
}

impl Listener {
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Mx => "smtp",
            Listener::Submission => "submission",
            Listener::SubmissionTls => "submission_tls",
            Listener::Relay => "relay",
        }
    }
}

#[derive(Clone)]
struct Live {
    config: Arc<Config>,
    tls: Option<TlsAcceptor>,
}

/// DATA content held in memory by all sessions (`smtp.max_data_memory`):
/// each session charges what its message buffer holds as it grows.
struct DataMemory {
    used: AtomicU64,
    max: AtomicU64,
}

impl DataMemory {
    fn try_charge(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + bytes <= self.max.load(Ordering::Relaxed)).then_some(u + bytes)
            })
            .is_ok()
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// What one session has charged to `DataMemory`; released when it ends.
struct Charged<'a> {
    memory: &'a DataMemory,
    bytes: u64,
}

impl Charged<'_> {
    /// Brings the charge to what `session` holds now. If the memory is not
    /// there, the session's DATA is abandoned (452 4.3.1 at its end) and the
    /// charge dropped; returns false then.
    fn follow(&mut self, session: &mut Session) -> bool {
        let now = session.data_held() as u64;
        if now <= self.bytes {
            self.memory.release(self.bytes - now);
            self.bytes = now;
            return true;
        }
        if self.memory.try_charge(now - self.bytes) {
            self.bytes = now;
            return true;
        }
        session.abandon_data();
        self.memory.release(self.bytes);
        self.bytes = 0;
        false
    }
}

impl Drop for Charged<'_> {
    fn drop(&mut self) {
        self.memory.release(self.bytes);
    }
}

/// DATA content a session holds in memory before the rest of its message
/// goes to disk as it arrives (`Spool::spill`): a 50 MB message then needs
/// about this much memory, not 50 MB (and most mail never reaches it, so
/// the common path writes its queue file once, from memory).
const SPILL_AT: usize = 512 * 1024;
/// What stays in memory of a spilled message: its header section, for the
/// checks at the end of DATA (Received count, header From, Message-ID,
/// loop trace), up to this size (the journal reads as much).
const HEAD_MAX: usize = 256 * 1024;

/// A message in DATA being written to disk as it arrives: `keep` bytes of
/// head stay in the session, the rest is in `spill`.
struct Spilling {
    spill: Spill,
    keep: usize,
}

/// How much of a message's start to keep in memory once it spills: its
/// header section with the empty line ending it (RFC 5322 2.1), at most
/// `HEAD_MAX` bytes.
fn head_to_keep(content: &[u8]) -> usize {
    if content.starts_with(b"\r\n") {
        return 2; // no header fields at all
    }
    let limit = content.len().min(HEAD_MAX);
    content[..limit]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(limit, |p| p + 4)
}

/// Only our domains are accepted: godwit is never an open relay. Once a
/// directory is imported, `directory.unknown_recipient = "reject"` also
/// refuses addresses it does not know.
struct Domains<'a> {
    config: &'a Config,
    routes: &'a godwit_route::SharedRoutes,
    /// Foreign recipients are accepted for relaying: set after a successful
    /// AUTH on the submission listener (and for relay_networks clients on
    /// the outbound listener).
    relay_permitted: bool,
    /// After AUTH with `sender_restriction = "directory"`: the user and the
    /// addresses it may send as (MAIL FROM and header From).
    senders: Option<(String, Vec<String>)>,
}

impl<'a> Domains<'a> {
    fn new(config: &'a Config, routes: &'a godwit_route::SharedRoutes) -> Domains<'a> {
        Domains {
            config,
            routes,
            relay_permitted: false,
            senders: None,
        }
    }
}

impl RcptPolicy for Domains<'_> {
    /// Postfix's reject_sender_login_mismatch: 553 5.7.1 (RFC 3463 5.7.1,
    /// delivery not authorized). The null sender (DSNs, MDNs) is allowed.
    fn check_mail(&self, address: &str) -> Result<(), Reply> {
        match &self.senders {
            Some((user, ids))
                if !address.is_empty() && !godwit_auth::sender::may_send_as(ids, address) =>
            {
                Err(Reply::new(
                    553,
                    (5, 7, 1),
                    format!("<{address}>: Sender address rejected: not owned by user {user}"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Every address in the header From must be the user's too (RFC 5322
    /// 3.6.2), so a message cannot claim another author.
    fn check_message(&self, _mail_from: &str, message: &[u8]) -> Result<(), Reply> {
        let Some((user, ids)) = &self.senders else {
            return Ok(());
        };
        let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
            return Ok(());
        };
        let Some(from) = parsed.from() else {
            return Ok(());
        };
        for a in from.iter() {
            let addr = a.address().unwrap_or_default();
            if !godwit_auth::sender::may_send_as(ids, addr) {
                return Err(Reply::new(
                    553,
                    (5, 7, 1),
                    format!("Header From <{addr}> is not owned by user {user}"),
                ));
            }
        }
        Ok(())
    }

    fn check_rcpt(&self, address: &str) -> Result<(), Reply> {
        // RFC 5321 4.5.1: <postmaster> without a domain must be accepted.
        if address.eq_ignore_ascii_case("postmaster") {
            return Ok(());
        }
        match address.rsplit_once('@') {
            Some((local, domain))
                if !local.is_empty() && self.config.is_accepted_domain(domain) =>
            {
                // As Postfix's relay_recipient_maps: refuse at RCPT rather than
                // accept and bounce later (RFC 5321 4.2.2: 550 for a mailbox
                // that does not exist; RFC 3463 5.1.1 bad destination mailbox).
                if self.routes.rejects_unknown(address) {
                    return Err(Reply::new(
                        550,
                        (5, 1, 1),
                        format!("<{address}>: Recipient address rejected: User unknown"),
                    ));
                }
                Ok(())
            }
            // A foreign recipient from a client allowed to relay: it leaves
            // by the outbound route.
            Some((local, _)) if !local.is_empty() && self.relay_permitted => Ok(()),
            // RFC 5321 3.6.2 / 7.1: never an open relay; RFC 3463 5.7.1.
            Some(_) => Err(Reply::new(
                554,
                (5, 7, 1),
                format!("<{address}>: Relay access denied"),
            )),
            None => Err(Reply::new(
                501,
                (5, 1, 3),
                format!("<{address}>: recipient address needs a domain"),
            )),
        }
    }
}

impl Smtpd {
    pub fn new(
        config: Arc<Config>,
        spool: Arc<Spool>,
        relay: Relay,
        events: EventLog,
    ) -> anyhow::Result<Arc<Smtpd>> {
        let tls = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        let data_memory = DataMemory {
            used: AtomicU64::new(0),
            max: AtomicU64::new(config.smtp.max_data_memory),
        };
        Ok(Arc::new(Smtpd {
            connections: Arc::new(Semaphore::new(config.smtp.max_connections)),
            connection_limit: Mutex::new(config.smtp.max_connections),
            live: RwLock::new(Live { config, tls }),
            spool,
            relay,
            events,
            per_ip: Mutex::new(HashMap::new()),
            session_ids: AtomicU64::new(1),
            data_memory,
            draining: tokio::sync::watch::channel(false).0,
            active: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            submission: std::sync::OnceLock::new(),
        }))
    }

    /// Applies a reloaded configuration to new sessions: limits, timeouts,
    /// accepted domains and the TLS certificate (read again from its files).
    /// An unreadable certificate fails the whole reload, and nothing changes.
    pub fn reload(&self, config: Arc<Config>) -> anyhow::Result<()> {
        let tls = match (&config.smtp.tls_cert, &config.smtp.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
            _ => None,
        };
        self.data_memory
            .max
            .store(config.smtp.max_data_memory, Ordering::Relaxed);
        {
            let mut limit = self.connection_limit.lock().unwrap();
            let want = config.smtp.max_connections;
            if want > *limit {
                self.connections.add_permits(want - *limit);
            } else if want < *limit {
                // Permits held by running sessions are forgotten as they come
                // back; until then the old limit still counts them.
                self.connections.forget_permits(*limit - want);
            }
            *limit = want;
        }
        *self.live.write().unwrap() = Live { config, tls };
        Ok(())
    }

    /// SIGTERM: stop accepting and close idle sessions; resolves when every
    /// session has ended or `deadline` passed. Returns the sessions left.
    pub async fn drain(&self, deadline: std::time::Duration) -> usize {
        self.draining.send_replace(true);
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.active.load(Ordering::Acquire)
    }

    /// Turns the submission listeners on (once, at start).
    pub fn enable_submission(&self, s: Submission) {
        let _ = self.submission.set(s);
    }

    pub fn sessions(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The certificate a listener offers.
    fn acceptor(&self, live: &Live, listener: Listener) -> Option<TlsAcceptor> {
        match listener {
            // The relay port offers STARTTLS with the MX certificate.
            Listener::Mx | Listener::Relay => live.tls.clone(),
            _ => self.submission.get().map(|s| s.tls.clone()),
        }
    }

    fn limits(&self, live: &Live, listener: Listener) -> Limits {
        let s = &live.config.smtp;
        let auth = match (listener, self.submission.get()) {
            (Listener::Mx | Listener::Relay, _) | (_, None) => None,
            (_, Some(sub)) => Some(AuthRules {
                allow_plaintext: sub.config.allow_plaintext_auth,
                required: true,
            }),
        };
        Limits {
            hostname: live.config.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_command_line: s.max_command_line,
            max_errors: s.max_errors,
            newline_policy: match s.bare_newline {
                BareNewline::Reject => NewlinePolicy::Reject,
                BareNewline::Normalize => NewlinePolicy::Normalize,
            },
            max_received_headers: s.max_received_headers,
            tls_available: self.acceptor(live, listener).is_some(),
            auth,
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_as(listener, Listener::Mx).await
    }

    pub async fn serve_as(self: Arc<Self>, listener: TcpListener, kind: Listener) {
        let mut draining = self.draining.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                // Dropping the listener closes the socket: new clients get a
                // connection refused and try another MX (RFC 5321 5.1).
                _ = draining.wait_for(|d| *d) => return,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = self.clone();
            me.active.fetch_add(1, Ordering::AcqRel);
            // Boxed: the session's future is tens of KB (every await of
            // the SMTP dialogue, DATA and the spool write nest in it), and
            // `tokio::spawn` moves a future by value into its task cell and
            // again through each stage change. A box moves 8 bytes: the
            // copies were 12% of a relayed message's instructions.
            tokio::spawn(Box::pin(async move {
                me.clone().connection(stream, peer, kind).await;
                if me.active.fetch_sub(1, Ordering::AcqRel) == 1 {
                    me.idle.notify_waiters();
                }
            }));
        }
    }

    async fn refuse(&self, mut stream: TcpStream, ip: IpAddr, reply: Reply, reason: &str) {
        let _ = stream.write_all(&reply.to_wire()).await;
        let _ = stream.shutdown().await;
        self.events.emit(Event::ConnectionRefused {
            client_ip: ip.to_string(),
            reply: reply.to_string(),
            reason: reason.into(),
        });
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, kind: Listener) {
        let ip = peer.ip();
        let live = self.live.read().unwrap().clone();
        let Ok(_permit) = self.connections.clone().try_acquire_owned() else {
            return self
                .refuse(
                    stream,
                    ip,
                    Reply::new(
                        421,
                        (4, 7, 0),
                        format!("{} Error: too many connections", live.config.hostname),
                    ),
                    "max_connections",
                )
                .await;
        };
        let over = {
            let mut per_ip = self.per_ip.lock().unwrap();
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= live.config.smtp.max_connections_per_ip {
                true
            } else {
                *n += 1;
                false
            }
        };
        if over {
            let r = Reply::new(
                421,
                (4, 7, 0),
                format!(
                    "{} Error: too many connections from {ip}",
                    live.config.hostname
                ),
            );
            return self.refuse(stream, ip, r, "max_connections_per_ip").await;
        }
        let session_id = self.session_ids.fetch_add(1, Ordering::Relaxed);
        self.events.emit(Event::ConnectionOpened {
            session: session_id,
            client_ip: ip.to_string(),
        });
        let (messages, reason) = self.run_session(&live, stream, ip, session_id, kind).await;
        self.events.emit(Event::ConnectionClosed {
            session: session_id,
            client_ip: ip.to_string(),
            messages,
            reason,
        });
        let mut per_ip = self.per_ip.lock().unwrap();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    async fn run_session(
        &self,
        live: &Live,
        stream: TcpStream,
        ip: IpAddr,
        sid: u64,
        kind: Listener,
    ) -> (u32, String) {
        let _ = stream.set_nodelay(true);
        if kind == Listener::SubmissionTls {
            return self.run_implicit_tls(live, stream, ip, sid).await;
        }
        let delay = live.config.smtp.greeting_delay;
        // The pregreet test is for MX traffic; submission clients are MUAs.
        if !delay.is_zero() && kind == Listener::Mx {
            // Postscreen-style pregreet test: a client that talks before the
            // greeting is not speaking SMTP (RFC 5321 4.3.1), usually a bot.
            let deadline = tokio::time::Instant::now() + delay;
            let mut talked = false;
            // readable() may wake spuriously: keep waiting out the delay.
            while let Ok(Ok(())) = tokio::time::timeout_at(deadline, stream.readable()).await {
                let mut probe = [0u8; 1];
                match stream.try_read(&mut probe) {
                    Ok(n) => {
                        talked = n > 0;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                }
            }
            {
                if talked {
                    let r = Reply::new(554, (5, 5, 1), "Error: talking before the greeting");
                    self.events.emit(Event::MessageRefused {
                        session: sid,
                        client_ip: ip.to_string(),
                        stage: "connect".into(),
                        reply: r.to_string(),
                        detail: Some("early talker".into()),
                        mail_from: None,
                        rcpt: None,
                        helo: None,
                        proto: None,
                    });
                    let mut stream = stream;
                    let _ = stream.write_all(&r.to_wire()).await;
                    return (0, "early talker".into());
                }
            }
        }
        let mut session = Session::new(self.limits(live, kind), ip.to_string());
        let mut messages = 0u32;
        let mut stream = stream;
        let greeting = session.greeting().to_wire();
        if stream.write_all(&greeting).await.is_err() {
            return (0, "write failed".into());
        }
        match self
            .drive(live, &mut stream, &mut session, sid, &mut messages, kind)
            .await
        {
            End::StartTls => {
                let Some(acceptor) = self.acceptor(live, kind) else {
                    return (messages, "tls unavailable".into());
                };
                match tokio::time::timeout(
                    live.config.smtp.command_timeout,
                    acceptor.accept(stream),
                )
                .await
                {
                    Ok(Ok(mut tls)) => {
                        self.tls_event(sid, ip, tls.get_ref().1);
                        session.tls_started();
                        match self
                            .drive(live, &mut tls, &mut session, sid, &mut messages, kind)
                            .await
                        {
                            End::Closed(reason) => (messages, reason),
                            End::StartTls => (messages, "second STARTTLS".into()),
                        }
                    }
                    Ok(Err(e)) => (messages, format!("TLS handshake failed: {e}")),
                    Err(_) => (messages, "TLS handshake timed out".into()),
                }
            }
            End::Closed(reason) => (messages, reason),
        }
    }

    /// submission.listen_tls (RFC 8314 3.3): TLS from the first byte, then
    /// the greeting; STARTTLS is not offered on top.
    async fn run_implicit_tls(
        &self,
        live: &Live,
        stream: TcpStream,
        ip: IpAddr,
        sid: u64,
    ) -> (u32, String) {
        let kind = Listener::SubmissionTls;
        let Some(acceptor) = self.acceptor(live, kind) else {
            return (0, "tls unavailable".into());
        };
        let mut tls =
            match tokio::time::timeout(live.config.smtp.command_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return (0, format!("TLS handshake failed: {e}")),
                Err(_) => return (0, "TLS handshake timed out".into()),
            };
        self.tls_event(sid, ip, tls.get_ref().1);
        let mut session = Session::new(self.limits(live, kind), ip.to_string());
        session.tls_started();
        let mut messages = 0u32;
        if tls.write_all(&session.greeting().to_wire()).await.is_err() {
            return (0, "write failed".into());
        }
        match self
            .drive(live, &mut tls, &mut session, sid, &mut messages, kind)
            .await
        {
            End::Closed(reason) => (messages, reason),
            End::StartTls => (messages, "STARTTLS under implicit TLS".into()),
        }
    }

    fn tls_event(&self, sid: u64, ip: IpAddr, conn: &rustls::ServerConnection) {
        let protocol = conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default();
        self.events.emit(Event::ConnectionTls {
            session: sid,
            client_ip: ip.to_string(),
            protocol,
            cipher,
        });
    }

    /// Checks AUTH credentials; on success the session may relay and send
    /// as the user's identities. A failure is answered after
    /// `auth_failure_delay`, so guessing is slow (as Dovecot and Postfix do).
    async fn authenticate(
        &self,
        session: &mut Session,
        sid: u64,
        kind: Listener,
        creds: godwit_smtp_proto::Credentials,
        policy: &mut Domains<'_>,
    ) -> Option<(String, String)> {
        let Some(sub) = self.submission.get() else {
            session.auth_failed(Some(Reply::new(
                454,
                (4, 7, 0),
                "Temporary authentication failure",
            )));
            return None;
        };
        let sc = &sub.config;
        let ip: IpAddr = session
            .client_ip
            .parse()
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let user = godwit_route::normalize_address(&creds.user);
        let method = creds.mechanism.as_str().to_string();
        let checked = sub.auth.check(ip, &creds.user, &creds.password).await;
        drop(creds);
        let reason = checked.verdict.reason().to_string();
        let (result, platform, backend_reply) = match &checked.verdict {
            godwit_auth::Verdict::Ok { platform } => ("ok", platform.clone(), None),
            godwit_auth::Verdict::Failed {
                platform, reply, ..
            } => ("failed", platform.clone(), reply.clone()),
            _ => ("failed", None, None),
        };
        self.events.emit(Event::SubmissionAuth {
            session: sid,
            client_ip: session.client_ip.clone(),
            listener: kind.as_str().into(),
            method: method.clone(),
            user: user.clone(),
            result: result.into(),
            reason: (result != "ok").then(|| reason.clone()),
            platform,
            backend_reply,
        });
        if checked.locked_now {
            self.events.emit(Event::SubmissionLockout {
                client_ip: session.client_ip.clone(),
                user: user.clone(),
                failures: checked.failures,
                window_s: sc.failure_window.as_secs(),
            });
        }
        match checked.verdict {
            godwit_auth::Verdict::Ok { .. } => {
                policy.relay_permitted = true;
                if sc.sender_restriction == SenderRestriction::Directory {
                    let ids = sub.auth.identities(&user).await;
                    policy.senders = Some((user.clone(), ids));
                }
                session.auth_succeeded(&user);
                Some((method, user))
            }
            godwit_auth::Verdict::Unavailable { reason } => {
                tracing::warn!(
                    session = sid,
                    "submission: cannot check the password of {user}: {reason}"
                );
                // RFC 4954 6: 454 4.7.0, the client may try again later.
                session.auth_failed(Some(Reply::new(
                    454,
                    (4, 7, 0),
                    "Temporary authentication failure",
                )));
                None
            }
            _ => {
                tokio::time::sleep(sc.auth_failure_delay).await;
                session.auth_failed(None);
                None
            }
        }
    }

    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        live: &Live,
        stream: &mut S,
        session: &mut Session,
        sid: u64,
        messages: &mut u32,
        kind: Listener,
    ) -> End {
        let mut policy = Domains::new(&live.config, self.relay.routes());
        // The relay port: clients inside outbound.relay_networks may send to
        // any recipient; everyone else only to ours (or after AUTH).
        let ip: Option<IpAddr> = session.client_ip.parse().ok();
        policy.relay_permitted = kind == Listener::Relay
            && live.config.outbound.as_ref().is_some_and(|o| {
                ip.is_some_and(|ip| godwit_outbound::relay_permitted(ip, &o.relay_networks))
            });
        // The SASL method and user of this session's AUTH.
        let mut sasl: Option<(String, String)> = None;
        let mut draining = self.draining.subscribe();
        // Read into spare capacity (`read_buf`): a zeroed 64 KB buffer cost
        // every connection a 64 KB memset and its page faults, most of it
        // never read into (8% of a relayed 4 KB message's instructions).
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        let mut charged = Charged {
            memory: &self.data_memory,
            bytes: 0,
        };
        let mut was_data = false;
        // The message in DATA, once it outgrew SPILL_AT, and the buffer its
        // bytes go to disk from (reused).
        let mut spilling: Option<Spilling> = None;
        let mut spill_buf: Vec<u8> = Vec::new();
        // When the bytes carrying this transaction's MAIL FROM arrived: the
        // start of the `accept` delay (Postfix's `a` of delays=a/b/c/d).
        let mut tx_started = std::time::Instant::now();
        let mut deadline = tokio::time::Instant::now() + live.config.smtp.command_timeout;
        loop {
            while let Some(o) = session.next(&policy) {
                match o {
                    Output::Reply(r) => {
                        // A new DATA begins: whatever spilled belonged to
                        // a message that ended (refused) before it.
                        if r.code == 354 {
                            spilling = None;
                        }
                        out.extend_from_slice(&r.to_wire())
                    }
                    Output::Authenticate(creds) => {
                        if let Some(s) = self
                            .authenticate(session, sid, kind, creds, &mut policy)
                            .await
                        {
                            sasl = Some(s);
                        }
                    }
                    // A failed AUTH is its own event (submission.auth).
                    Output::Refused {
                        stage: "auth",
                        reply,
                        ..
                    } if matches!(reply.code, 535 | 454) => {}
                    Output::Refused {
                        stage,
                        reply,
                        context,
                    } => self.events.emit(Event::MessageRefused {
                        session: sid,
                        client_ip: session.client_ip.clone(),
                        stage: stage.into(),
                        reply: reply.to_string(),
                        detail: None,
                        mail_from: context.mail_from,
                        rcpt: context.rcpt,
                        helo: context.helo,
                        proto: context.proto.map(str::to_string),
                    }),
                    Output::Message { envelope, message } => {
                        let reply = self
                            .accept(
                                live,
                                session,
                                sid,
                                envelope,
                                message,
                                spilling.take(),
                                sasl.as_ref(),
                                tx_started,
                            )
                            .await;
                        if reply.code == 250 {
                            *messages += 1;
                        }
                        out.extend_from_slice(&reply.to_wire());
                    }
                    Output::StartTls => {
                        if stream.write_all(&out).await.is_err() {
                            return End::Closed("write failed".into());
                        }
                        return End::StartTls;
                    }
                    Output::Close => {
                        let _ = stream.write_all(&out).await;
                        let _ = stream.shutdown().await;
                        return End::Closed("quit".into());
                    }
                }
            }
            if !out.is_empty() {
                if stream.write_all(&out).await.is_err() {
                    return End::Closed("write failed".into());
                }
                out.clear();
            }
            if session.in_data() {
                self.spill(session, &mut spilling, &mut spill_buf).await;
            } else {
                spilling = None;
            }
            if !charged.follow(session) {
                tracing::warn!(
                    session = sid,
                    "smtp.max_data_memory ({} bytes) reached: this DATA is discarded and will be answered 452 4.3.1",
                    live.config.smtp.max_data_memory
                );
            }
            let in_data = session.in_data();
            if !in_data && *draining.borrow() {
                // RFC 5321 3.8: a server shutting down answers 421 and closes;
                // the client keeps its mail and tries again.
                let r = Reply::new(
                    421,
                    (4, 3, 2),
                    format!("{} Service shutting down", live.config.hostname),
                );
                let _ = stream.write_all(&r.to_wire()).await;
                let _ = stream.shutdown().await;
                return End::Closed("gateway shutting down".into());
            }
            // RFC 5321 4.5.3.2: the timeouts bound a whole command line, and
            // the whole DATA phase, not each read: a client sending a byte
            // every few seconds must not hold a session for ever. A new
            // command's clock starts once the previous one is consumed.
            if in_data != was_data || (!in_data && session.buffered() == 0) {
                deadline = tokio::time::Instant::now()
                    + if in_data {
                        live.config.smtp.data_timeout
                    } else {
                        live.config.smtp.command_timeout
                    };
                was_data = in_data;
            }
            buf.clear();
            let read = async {
                if in_data {
                    // A message in DATA is finished before the session closes.
                    return Some(
                        tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await,
                    );
                }
                tokio::select! {
                    r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => Some(r),
                    _ = draining.wait_for(|d| *d) => None,
                }
            };
            let Some(read) = read.await else { continue };
            match read {
                Ok(Ok(0)) => {
                    return End::Closed(if session.in_data() {
                        "lost connection in DATA".into()
                    } else {
                        "client disconnected".into()
                    });
                }
                Ok(Ok(n)) => {
                    if !session.in_transaction() {
                        tx_started = std::time::Instant::now();
                    }
                    session.push(&buf[..n])
                }
                Ok(Err(e)) => return End::Closed(format!("read error: {e}")),
                Err(_) => {
                    // RFC 5321 4.5.3.2: the server may close after its timeout.
                    let r = Reply::new(
                        421,
                        (4, 4, 2),
                        format!("{} Error: timeout exceeded", live.config.hostname),
                    );
                    let _ = stream.write_all(&r.to_wire()).await;
                    return End::Closed("timeout".into());
                }
            }
        }
    }

    /// Moves the content of a message in DATA past its head to its spill
    /// file once the session holds SPILL_AT bytes (written in a blocking
    /// thread, unsynced: the queue file's data sync covers the copy). If the
    /// disk refuses, the DATA is abandoned: 452 4.3.1 at its end, and the
    /// client retries.
    async fn spill(
        &self,
        session: &mut Session,
        spilling: &mut Option<Spilling>,
        buf: &mut Vec<u8>,
    ) {
        if session.data().len() < SPILL_AT {
            return;
        }
        let keep = spilling
            .as_ref()
            .map_or_else(|| head_to_keep(session.data()), |s| s.keep);
        session.spill_data(keep, buf);
        let spool = self.spool.clone();
        let (current, mut bytes) = (spilling.take().map(|s| s.spill), std::mem::take(buf));
        let written = tokio::task::spawn_blocking(move || {
            let r = match current {
                Some(s) => Ok(s),
                None => spool.spill(),
            }
            .and_then(|mut s| s.write(&bytes).map(|()| s));
            bytes.clear();
            (r, bytes)
        })
        .await;
        match written {
            Ok((Ok(spill), bytes)) => {
                *buf = bytes;
                *spilling = Some(Spilling { spill, keep });
            }
            Ok((Err(e), bytes)) => {
                *buf = bytes;
                tracing::error!("spool write failed (spilling a message in DATA): {e}");
                session.abandon_data();
            }
            Err(e) => {
                tracing::error!("spilling a message in DATA: {e}");
                session.abandon_data();
            }
        }
    }

    /// A looping message: every recipient gets an operator hold, written in
    /// the spool file with the message itself, before its one data sync and
    /// the 250, so it is never relayed again (not even after a crash) and
    /// never bounced (a bounce would loop too); `queue release` frees it once
    /// the route is fixed. A journal copy is not held: the archive is no
    /// part of the loop.
    fn loop_hold(
        h: &Header,
        trace_hops: &[String],
        path: &[String],
        max_trace_hops: usize,
    ) -> (String, Vec<godwit_spool::StatusRecord>) {
        let why = format!(
            "mail loop: {} X-Godwit-Trace headers (smtp.max_trace_hops = {max_trace_hops}); path {}",
            trace_hops.len(),
            path.join(" -> ")
        );
        let now = now_ms();
        let recs = (0..h.envelope.rcpts.len())
            .filter(|&i| !h.is_journal(i))
            .map(|i| godwit_spool::StatusRecord {
                rcpt: i,
                status: godwit_spool::RcptStatus::Held,
                at_ms: now,
                attempts: 0,
                next_ms: 0,
                platform: None,
                reply: Some(why.clone()),
                delivered_to: Vec::new(),
                operator_hold: true,
                warned: false,
            })
            .collect();
        (why, recs)
    }

    /// The events of a loop hold already in the spool.
    fn loop_events(
        &self,
        h: &Header,
        why: &str,
        trace_hops: Vec<String>,
        path: Vec<String>,
        max_trace_hops: usize,
    ) {
        let held: Vec<String> = h
            .envelope
            .rcpts
            .iter()
            .enumerate()
            .filter(|(i, _)| !h.is_journal(*i))
            .map(|(_, (a, _))| a.clone())
            .collect();
        self.events.emit(Event::MessageLoop {
            queue_id: h.queue_id.clone(),
            message_id: h.message_id.clone(),
            rcpts: held.clone(),
            trace_hops,
            path,
            max_trace_hops,
        });
        for a in held {
            self.events.emit(Event::Held {
                queue_id: h.queue_id.clone(),
                message_id: h.message_id.clone(),
                rcpt: a,
                why: why.to_string(),
            });
        }
    }

    /// Makes the message durable, then hands it to the relay. The reply is 250
    /// only after the spool file and its directory are fsynced.
    #[allow(clippy::too_many_arguments)]
    async fn accept(
        &self,
        live: &Live,
        session: &mut Session,
        sid: u64,
        envelope: godwit_smtp_proto::Envelope,
        message: Vec<u8>,
        spilled: Option<Spilling>,
        sasl: Option<&(String, String)>,
        tx_started: std::time::Instant,
    ) -> Reply {
        // The event readers (log writer, index) far behind: this message
        // waits for them (at most FLOW_MAX) before it is spooled, so their
        // lag, and the memory it holds, stays bounded during a fill.
        self.events.wait_for_readers().await;
        let queue_id = self.spool.new_queue_id();
        let message_id = message_id_of(&message);
        let received = received_header(&live.config.hostname, &envelope, &queue_id, sasl.is_some());
        let (envelope, expansions) = expand_groups(self.relay.routes(), envelope);
        // Our own trace header back more than max_trace_hops times: a loop.
        let trace_hops = godwit_relay::loops::trace_hops(&message);
        let looped =
            godwit_relay::loops::is_loop(trace_hops.len(), live.config.smtp.max_trace_hops).then(
                || {
                    let mut path = godwit_relay::loops::received_path(&message);
                    path.push(format!("{} {queue_id}", live.config.hostname));
                    (trace_hops, path)
                },
            );
        let mut header = Header {
            queue_id: queue_id.clone(),
            arrival_ms: now_ms(),
            message_id: message_id.clone(),
            envelope: envelope.clone(),
            kind: None,
            accept_ms: tx_started.elapsed().as_millis() as u64,
            journal: None,
        };
        if let Some(j) = &live.config.journal {
            header.journal = Some(crate::journal::add_recipient(&mut header.envelope, j));
        }
        let hold = looped.as_ref().map(|(hops, path)| {
            Self::loop_hold(&header, hops, path, live.config.smtp.max_trace_hops)
        });
        let spool = self.spool.clone();
        let size =
            (received.len() + message.len()) as u64 + spilled.as_ref().map_or(0, |s| s.spill.len());
        let (stored_header, recs) = (
            header.clone(),
            hold.as_ref().map(|(_, r)| r.clone()).unwrap_or_default(),
        );
        let stored = tokio::task::spawn_blocking(move || {
            // A spilled message is its head, the spill, then what followed.
            let keep = spilled.as_ref().map_or(message.len(), |s| s.keep);
            let (head, tail) = message.split_at(keep);
            spool.store_spilled(
                &header,
                &[received.as_bytes(), head],
                spilled.as_ref().map(|s| &s.spill),
                &[tail],
                &recs,
            )
        })
        .await;
        match stored {
            Ok(Ok(spooled)) => {
                self.events.emit(Event::MessageAccepted {
                    queue_id: queue_id.clone(),
                    message_id,
                    session: sid,
                    client_ip: envelope.client_ip.clone(),
                    helo: envelope.helo.clone(),
                    tls: envelope.tls,
                    mail_from: envelope.mail_from.clone(),
                    rcpts: envelope.rcpts.iter().map(|(a, _)| a.clone()).collect(),
                    size,
                    direction: envelope
                        .rcpts
                        .iter()
                        .any(|(a, _)| godwit_relay::outbound::is_foreign(&live.config, a))
                        .then(|| "outbound".to_string()),
                    sasl_method: sasl.map(|s| s.0.clone()),
                    sasl_username: sasl.map(|s| s.1.clone()),
                });
                for (rcpt, e) in expansions {
                    let (members, groups, over_limit) = match e {
                        Expansion::Members { members, groups } => (members, groups, None),
                        Expansion::OverLimit { limit } => (Vec::new(), Vec::new(), Some(limit)),
                        Expansion::Itself => continue,
                    };
                    self.events.emit(Event::RecipientExpanded {
                        queue_id: queue_id.clone(),
                        rcpt,
                        members,
                        groups,
                        over_limit,
                    });
                }
                if let Some(j) = &stored_header.journal {
                    let (addr, _) = &stored_header.envelope.rcpts[j.rcpt];
                    self.events.emit(Event::JournalQueued {
                        queue_id: queue_id.clone(),
                        message_id: stored_header.message_id.clone(),
                        rcpt: addr.clone(),
                        platform: j.platform.clone(),
                    });
                }
                if let (Some((hops, path)), Some((why, _))) = (looped, hold) {
                    self.loop_events(
                        &stored_header,
                        &why,
                        hops,
                        path,
                        live.config.smtp.max_trace_hops,
                    );
                }
                self.relay.enqueue(spooled);
                session.queued(&queue_id)
            }
            other => {
                let detail = match other {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => unreachable!(),
                };
                tracing::error!("spool write failed: {detail}");
                // RFC 3463 4.3.1: the client keeps the message and retries.
                let r = Reply::new(
                    452,
                    (4, 3, 1),
                    "Error: insufficient system storage, try again later",
                );
                self.events.emit(Event::MessageRefused {
                    session: sid,
                    client_ip: envelope.client_ip,
                    stage: "data".into(),
                    reply: r.to_string(),
                    detail: Some(detail),
                    mail_from: Some(envelope.mail_from.clone()),
                    rcpt: None,
                    helo: Some(envelope.helo.clone()),
                    proto: Some(if envelope.esmtp { "ESMTP" } else { "SMTP" }.into()),
                });
                session.refused(r)
            }
        }
    }
}

/// `directory.expand_groups`: replaces each group recipient by its members
/// before the message is queued, as Postfix's cleanup does with
/// virtual_alias_maps, so each member is routed where it is now. Members keep
/// the group's NOTIFY and carry ORCPT=rfc822;GROUP (RFC 3461 4.2) unless the
/// client gave one, so a DSN names the address the sender used. A member
/// already among the recipients is not added twice. A group that expands to
/// nothing stays as addressed: mail is never dropped by expansion.
fn expand_groups(routes: &SharedRoutes, mut env: Envelope) -> (Envelope, Vec<(String, Expansion)>) {
    if !routes.expands_groups() {
        return (env, Vec::new());
    }
    let mut seen: HashSet<String> = env
        .rcpts
        .iter()
        .map(|(a, _)| normalize_address(a))
        .collect();
    let mut rcpts = Vec::with_capacity(env.rcpts.len());
    let mut notes = Vec::new();
    for (rcpt, params) in std::mem::take(&mut env.rcpts) {
        match routes.expand(&rcpt) {
            Expansion::Members { members, groups } if !members.is_empty() => {
                for m in &members {
                    if seen.insert(m.clone()) {
                        let mut p = params.clone();
                        p.orcpt.get_or_insert_with(|| format!("rfc822;{rcpt}"));
                        rcpts.push((m.clone(), p));
                    }
                }
                notes.push((rcpt, Expansion::Members { members, groups }));
            }
            e => {
                if matches!(e, Expansion::OverLimit { .. }) {
                    notes.push((rcpt.clone(), e));
                }
                rcpts.push((rcpt, params));
            }
        }
    }
    env.rcpts = rcpts;
    (env, notes)
}

/// Binds `submission.listen` and `submission.listen_tls` and serves them;
/// returns the addresses bound. Errors name the key.
pub async fn start_submission(
    smtpd: &Arc<Smtpd>,
    config: &Arc<Config>,
    sc: &godwit_config::SubmissionConfig,
    routes: &SharedRoutes,
    store: &godwit_store::Store,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let (cert, key) = sc
        .cert(config)
        .context("submission: no certificate (submission.tls_cert or smtp.tls_cert)")?;
    let tls = crate::tls::acceptor(&cert, &key).context("submission.tls_cert")?;
    let auth =
        godwit_auth::Authenticator::new(config.clone(), sc.clone(), routes.clone(), store.clone())
            .map_err(anyhow::Error::msg)?;
    smtpd.enable_submission(Submission {
        auth,
        tls,
        config: sc.clone(),
    });
    let mut bound = Vec::new();
    for (key, addrs, kind) in [
        ("submission.listen", &sc.listen, Listener::Submission),
        (
            "submission.listen_tls",
            &sc.listen_tls,
            Listener::SubmissionTls,
        ),
    ] {
        for addr in addrs {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("{key}: cannot listen on {addr}"))?;
            bound.push(l.local_addr()?.to_string());
            tokio::spawn(smtpd.clone().serve_as(l, kind));
            tracing::info!("submission ({}) on {addr}", kind.as_str());
        }
    }
    Ok(bound)
}

enum End {
    StartTls,
    Closed(String),
}

fn message_id_of(message: &[u8]) -> Option<String> {
    // Only Message-ID is parsed (as `new()` parses it, RFC 5322 3.6.4); every
    // other header is skipped, not parsed: the Received and Date parsers were
    // most of this call's cost, on every accepted message.
    let parsed = mail_parser::MessageParser::new()
        .header_id(mail_parser::HeaderName::MessageId)
        .default_header_ignore()
        .parse_headers(message)?;
    parsed.message_id().map(|id| format!("<{id}>"))
}

/// RFC 5321 4.4 trace field; RFC 3848 protocol types (ESMTPSA when authenticated).
fn received_header(
    hostname: &str,
    env: &godwit_smtp_proto::Envelope,
    queue_id: &str,
    authenticated: bool,
) -> String {
    let with = match (env.esmtp, env.tls, authenticated) {
        (true, true, true) => "ESMTPSA",
        (true, false, true) => "ESMTPA",
        (true, true, false) => "ESMTPS",
        (true, false, false) => "ESMTP",
        (false, true, _) => "SMTPS",
        (false, false, _) => "SMTP",
    };
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let helo: String = env
        .helo
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    let mut h = format!(
        "Received: from {helo} ([{}])\r\n\tby {hostname} (godwit) with {with} id {queue_id}",
        env.client_ip
    );
    if env.rcpts.len() == 1 {
        h.push_str(&format!("\r\n\tfor <{}>", env.rcpts[0].0));
    }
    h.push_str(&format!("; {date}\r\n"));
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn message_ids_as_the_full_parser_reads_them() {
        let cases: [(&str, Option<&str>); 5] = [
            ("Message-ID: <a@b>\r\nSubject: x\r\n\r\nbody", Some("<a@b>")),
            (
                "Received: from x by y; Tue, 1 Dec 2026 20:00:00 +0000\r\nDate: Tue, 1 Dec 2026 20:00:00 +0000\r\nMessage-Id:\r\n <folded@b>\r\n\r\n",
                Some("<folded@b>"),
            ),
            ("Subject: none\r\n\r\nMessage-ID: <in-body@b>\r\n", None),
            (
                // Two of them: mail-parser's `message_id` reads the last.
                "Message-ID: <first@b>\r\nMessage-ID: <second@b>\r\n\r\n",
                Some("<second@b>"),
            ),
            ("", None),
        ];
        for (m, want) in cases {
            let full = mail_parser::MessageParser::new()
                .parse_headers(m.as_bytes())
                .and_then(|p| p.message_id().map(|id| format!("<{id}>")));
            assert_eq!(super::message_id_of(m.as_bytes()).as_deref(), want, "{m:?}");
            assert_eq!(super::message_id_of(m.as_bytes()), full, "{m:?}");
        }
    }

    use super::*;

    #[test]
    fn the_head_kept_of_a_spilled_message_is_its_header_section() {
        let big = vec![b'x'; HEAD_MAX + 10];
        let mut long_head = b"X: ".to_vec();
        long_head.extend_from_slice(&big);
        let cases: &[(&[u8], usize)] = &[
            (b"Subject: s\r\n\r\nbody\r\n", 14),
            (b"\r\nbody\r\n", 2),
            (b"A: 1\r\nB: 2\r\n\r\n\r\nbody", 14),
            // No end of the header section in sight: at most HEAD_MAX.
            (b"A: 1\r\nB: 2\r\n", 12),
            (&long_head, HEAD_MAX),
        ];
        for (content, want) in cases {
            assert_eq!(
                head_to_keep(content),
                *want,
                "{:?}",
                String::from_utf8_lossy(&content[..content.len().min(40)])
            );
        }
    }
}
