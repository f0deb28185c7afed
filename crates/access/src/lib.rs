//! Mailbox access: one stable IMAP and POP3 name for every user. Each login
//! is looked up in the routing map (the one inbound mail follows) and sent
//! to that platform's server with the client's own credentials; after that
//! the front relays bytes both ways without parsing, so the user sees what
//! the platform serves (folders, IDLE, COMPRESS). When a mailbox moves,
//! `disconnect_on_move` closes its sessions so clients reconnect and land
//! on the new platform. Autoconfig and autodiscover name the front.
//!
//! The protocol rules are pure (`imap`, `pop3`, `sasl`, `limits`,
//! `routing`, `autoconfig`); this module is the thin tokio driver.

pub mod autoconfig;
pub mod backend;
pub mod check;
mod conn;
pub mod imap;
pub mod limits;
pub mod pop3;
pub mod routing;
pub mod sasl;
mod zerocopy;

use anyhow::Context;
use backend::{BackendError, Target};
use conn::Conn;
use godwit_config::{AccessConfig, Config};
use godwit_events::{Event, EventLog};
use godwit_route::{MigrationState, SharedRoutes};
use godwit_store::Store;
use limits::{Caps, Limits, Refusal};
use routing::Step;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Imap,
    Pop3,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
        }
    }
}

/// A logged-in, spliced session.
struct Live {
    address: String,
    platform: String,
    protocol: Protocol,
    client_ip: IpAddr,
    /// Fired with the new platform when the mailbox moves.
    kick: Option<oneshot::Sender<String>>,
}

#[derive(Default)]
struct Counters {
    /// (platform, protocol) → successful logins.
    logins: BTreeMap<(String, &'static str), u64>,
    /// (reason, protocol) → failed logins.
    failures: BTreeMap<(String, &'static str), u64>,
    moved: u64,
}

pub struct Access {
    config: Arc<Config>,
    ac: AccessConfig,
    routes: SharedRoutes,
    store: Store,
    events: EventLog,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    client_tls: [Arc<rustls::ClientConfig>; 2],
    limits: Mutex<Limits>,
    sessions: Mutex<HashMap<u64, Live>>,
    counters: Mutex<Counters>,
    next_session: AtomicU64,
}

/// What a login attempt came to.
enum Login {
    Ok {
        backend: Conn,
        reply: Vec<u8>,
        platform: String,
        address: String,
    },
    /// Refused like a wrong password (after the failure delay).
    Failed,
    /// The platform could not be reached; try again later.
    Unavailable,
    TooManySessions,
}

fn acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert)
            .with_context(|| format!("access: cannot open certificate {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("access: certificate {} is not PEM", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key)
            .with_context(|| format!("access: cannot open key {}", key.display()))?,
    ))
    .with_context(|| format!("access: key {} is not PEM", key.display()))?
    .with_context(|| format!("access: no private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("access: the certificate and key do not form a usable pair")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl Access {
    /// Binds every `[access]` listener and starts serving; `None` when the
    /// configuration has no `[access]` section.
    pub async fn start(
        config: Arc<Config>,
        routes: SharedRoutes,
        store: Store,
        events: EventLog,
    ) -> anyhow::Result<Option<Arc<Access>>> {
        let Some(ac) = config.access.clone() else {
            return Ok(None);
        };
        let acceptor = match ac.cert(&config) {
            Some((c, k)) => Some(acceptor(&c, &k)?),
            None => None,
        };
        let caps = Caps {
            max_connections: ac.max_connections,
            max_connections_per_ip: ac.max_connections_per_ip,
            max_sessions_per_user: ac.max_sessions_per_user,
            max_failures_per_ip: ac.max_failures_per_ip,
            max_failures_per_user: ac.max_failures_per_user,
            failure_window: ac.failure_window,
        };
        let access = Arc::new(Access {
            client_tls: [
                godwit_tls::client_config(false),
                godwit_tls::client_config(true),
            ],
            limits: Mutex::new(Limits::new(caps)),
            sessions: Mutex::new(HashMap::new()),
            counters: Mutex::new(Counters::default()),
            next_session: AtomicU64::new(1),
            ac: ac.clone(),
            config,
            routes,
            store,
            events,
            acceptor,
        });
        let groups = [
            ("access.imap_listen", &ac.imap_listen, Protocol::Imap, false),
            (
                "access.imaps_listen",
                &ac.imaps_listen,
                Protocol::Imap,
                true,
            ),
            ("access.pop3_listen", &ac.pop3_listen, Protocol::Pop3, false),
            (
                "access.pop3s_listen",
                &ac.pop3s_listen,
                Protocol::Pop3,
                true,
            ),
        ];
        for (key, addrs, protocol, implicit) in groups {
            for addr in addrs {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("{key}: cannot listen on {addr}"))?;
                tokio::spawn(access.clone().accept(l, protocol, implicit));
                tracing::info!(
                    "access: {} on {addr}{}",
                    protocol.as_str(),
                    if implicit { " (TLS)" } else { "" }
                );
            }
        }
        for addr in &ac.http_listen {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("access.http_listen: cannot listen on {addr}"))?;
            let router = access.clone().router();
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, router).await {
                    tracing::error!("access.http_listen: {e}");
                }
            });
            tracing::info!("access: autoconfig on http://{addr}/");
        }
        Ok(Some(access))
    }

    /// Autoconfig, autodiscover and `/metrics` (the front's sessions and
    /// logins in Prometheus text).
    pub fn router(self: Arc<Self>) -> axum::Router {
        let endpoints = autoconfig::Endpoints::from_config(&self.config, &self.ac);
        autoconfig::router(endpoints).route(
            "/metrics",
            axum::routing::get(move || {
                let me = self.clone();
                async move { me.metrics_text() }
            }),
        )
    }

    async fn accept(self: Arc<Self>, l: TcpListener, protocol: Protocol, implicit: bool) {
        loop {
            match l.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let me = self.clone();
                    tokio::spawn(
                        async move { me.connection(stream, peer, protocol, implicit).await },
                    );
                }
                Err(e) => {
                    tracing::warn!("access: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        protocol: Protocol,
        implicit: bool,
    ) {
        let ip = peer.ip();
        let mut conn = Conn::new(stream, self.ac.idle_timeout);
        let admitted = self.limits.lock().unwrap().connect(ip);
        if let Err(r) = admitted {
            let line = match protocol {
                Protocol::Imap => "* BYE [LIMIT] Too many connections.\r\n",
                Protocol::Pop3 => "-ERR [SYS/TEMP] Too many connections.\r\n",
            };
            if !implicit {
                let _ = conn.write(line.as_bytes()).await;
            }
            tracing::debug!("access: {ip} refused: {}", r.reason());
            return;
        }
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let result = async {
            if implicit {
                let a = self.acceptor.as_ref().context("no certificate")?;
                conn = conn.accept_tls(a).await?;
            }
            match protocol {
                Protocol::Imap => self.imap(conn, session, ip).await,
                Protocol::Pop3 => self.pop3(conn, session, ip).await,
            }
        }
        .await;
        if let Err(e) = result {
            tracing::debug!("access: session {session} from {ip}: {e}");
        }
        self.limits.lock().unwrap().disconnect(ip);
    }

    fn plaintext_ok(&self, conn: &Conn) -> bool {
        conn.tls || self.ac.allow_plaintext_login
    }

    async fn imap(&self, mut c: Conn, session: u64, ip: IpAddr) -> anyhow::Result<()> {
        let tls_available = self.acceptor.is_some();
        c.write(
            format!(
                "* OK [CAPABILITY {}] godwit ready.\r\n",
                imap::capabilities(tls_available, c.tls, self.ac.allow_plaintext_login)
            )
            .as_bytes(),
        )
        .await?;
        let mut errors = 0;
        loop {
            if errors >= 10 {
                c.write(b"* BYE Too many invalid commands.\r\n").await?;
                return Ok(());
            }
            let Some(mut cmd) = (match c.read_line(imap::MAX_LINE).await {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    c.write(b"* BYE Line too long.\r\n").await?;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    // RFC 3501 5.4: the autologout is at least 30 minutes.
                    c.write(b"* BYE Disconnected for inactivity.\r\n").await?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }) else {
                return Ok(());
            };
            // Literals (RFC 3501 4.3): a synchronizing one waits for our `+`;
            // LITERAL+ (RFC 7888) does not.
            while let Some(lit) = imap::trailing_literal(&cmd) {
                if lit.len > imap::MAX_LITERAL {
                    c.write(b"* BYE Literal too large before login.\r\n")
                        .await?;
                    return Ok(());
                }
                if !lit.non_sync {
                    c.write(b"+ OK\r\n").await?;
                }
                cmd.extend_from_slice(b"\r\n");
                cmd.extend(c.read_exact(lit.len).await?);
                let Some(rest) = c.read_line(imap::MAX_LINE).await? else {
                    return Ok(());
                };
                cmd.extend(rest);
            }
            let t = match imap::parse(&cmd) {
                Ok(t) => t,
                Err(e) => {
                    errors += 1;
                    let tag = e.tag.as_deref().unwrap_or("*");
                    c.write(format!("{tag} BAD {}\r\n", e.reason).as_bytes())
                        .await?;
                    continue;
                }
            };
            let tag = t.tag;
            let credentials = match t.command {
                imap::Command::Capability => {
                    let caps =
                        imap::capabilities(tls_available, c.tls, self.ac.allow_plaintext_login);
                    c.write(
                        format!("* CAPABILITY {caps}\r\n{tag} OK Capability completed.\r\n")
                            .as_bytes(),
                    )
                    .await?;
                    continue;
                }
                imap::Command::Noop => {
                    c.write(format!("{tag} OK NOOP completed.\r\n").as_bytes())
                        .await?;
                    continue;
                }
                imap::Command::Id => {
                    c.write(format!("* ID NIL\r\n{tag} OK ID completed.\r\n").as_bytes())
                        .await?;
                    continue;
                }
                imap::Command::Logout => {
                    c.write(
                        format!("* BYE Logging out.\r\n{tag} OK Logout completed.\r\n").as_bytes(),
                    )
                    .await?;
                    return Ok(());
                }
                imap::Command::StartTls => {
                    let Some(a) = self.acceptor.as_ref().filter(|_| !c.tls) else {
                        errors += 1;
                        c.write(format!("{tag} BAD STARTTLS not available.\r\n").as_bytes())
                            .await?;
                        continue;
                    };
                    c.write(format!("{tag} OK Begin TLS negotiation now.\r\n").as_bytes())
                        .await?;
                    c = c.accept_tls(a).await?;
                    continue;
                }
                imap::Command::Other(_) => {
                    errors += 1;
                    c.write(format!("{tag} BAD Log in first.\r\n").as_bytes())
                        .await?;
                    continue;
                }
                _ if !self.plaintext_ok(&c) => {
                    // RFC 3501 6.2.3 (LOGINDISABLED), RFC 5530 PRIVACYREQUIRED.
                    c.write(
                        format!("{tag} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections; use STARTTLS.\r\n")
                            .as_bytes(),
                    )
                    .await?;
                    continue;
                }
                imap::Command::Login { user, password } => Ok((user, password)),
                imap::Command::Authenticate { mechanism, initial } => {
                    if mechanism != "PLAIN" {
                        c.write(
                            format!("{tag} NO [CANNOT] Unsupported authentication mechanism.\r\n")
                                .as_bytes(),
                        )
                        .await?;
                        continue;
                    }
                    let response = match initial {
                        Some(ir) => ir,
                        None => {
                            c.write(b"+ \r\n").await?;
                            let Some(l) = c.read_line(imap::MAX_LINE).await? else {
                                return Ok(());
                            };
                            String::from_utf8_lossy(&l).into_owned()
                        }
                    };
                    if response == "*" {
                        // RFC 3501 6.2.2: the client cancelled.
                        c.write(format!("{tag} BAD Authentication aborted.\r\n").as_bytes())
                            .await?;
                        continue;
                    }
                    match sasl::decode_plain(&response) {
                        Ok(p) => Ok((p.user, p.password)),
                        Err(sasl::PlainError::Malformed) => {
                            errors += 1;
                            c.write(
                                format!("{tag} BAD Invalid SASL PLAIN response.\r\n").as_bytes(),
                            )
                            .await?;
                            continue;
                        }
                        Err(sasl::PlainError::Authzid) => Err("authzid"),
                    }
                }
            };
            let outcome = match credentials {
                Ok((user, password)) => {
                    self.login(Protocol::Imap, session, ip, &user, &password, &tag)
                        .await
                }
                Err(reason) => {
                    self.failed(Protocol::Imap, session, ip, "", None, reason, None)
                        .await;
                    Login::Failed
                }
            };
            match outcome {
                Login::Ok {
                    backend,
                    reply,
                    platform,
                    address,
                } => {
                    return self
                        .splice(c, backend, reply, session, ip, Protocol::Imap, address, platform)
                        .await;
                }
                Login::Failed => {
                    errors += 1;
                    c.write(format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n").as_bytes())
                        .await?
                }
                Login::Unavailable => {
                    c.write(
                        format!("{tag} NO [UNAVAILABLE] The mailbox server is unavailable; try again later.\r\n")
                            .as_bytes(),
                    )
                    .await?
                }
                Login::TooManySessions => {
                    c.write(format!("{tag} NO [LIMIT] Too many sessions for this user.\r\n").as_bytes())
                        .await?
                }
            }
        }
    }

    async fn pop3(&self, mut c: Conn, session: u64, ip: IpAddr) -> anyhow::Result<()> {
        let tls_available = self.acceptor.is_some();
        c.write(b"+OK godwit ready.\r\n").await?;
        let mut user: Option<String> = None;
        let mut errors = 0;
        loop {
            if errors >= 10 {
                c.write(b"-ERR Too many invalid commands.\r\n").await?;
                return Ok(());
            }
            let line = match c.read_line(pop3::MAX_LINE).await {
                Ok(Some(l)) => String::from_utf8_lossy(&l).into_owned(),
                Ok(None) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    c.write(b"-ERR Line too long.\r\n").await?;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    c.write(b"-ERR Disconnected for inactivity.\r\n").await?;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let cmd = match pop3::parse(&line) {
                Ok(cmd) => cmd,
                Err(e) => {
                    errors += 1;
                    c.write(format!("-ERR {e}\r\n").as_bytes()).await?;
                    continue;
                }
            };
            let plaintext_ok = self.plaintext_ok(&c);
            let privacy = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections; use STLS.\r\n";
            let credentials = match cmd {
                pop3::Command::Capa => {
                    let mut out = String::from("+OK\r\n");
                    for cap in
                        pop3::capabilities(tls_available, c.tls, self.ac.allow_plaintext_login)
                    {
                        out.push_str(cap);
                        out.push_str("\r\n");
                    }
                    out.push_str("IMPLEMENTATION godwit\r\n.\r\n");
                    c.write(out.as_bytes()).await?;
                    continue;
                }
                pop3::Command::Quit => {
                    c.write(b"+OK Logging out.\r\n").await?;
                    return Ok(());
                }
                pop3::Command::Stls => {
                    let Some(a) = self.acceptor.as_ref().filter(|_| !c.tls) else {
                        errors += 1;
                        c.write(b"-ERR STLS not available.\r\n").await?;
                        continue;
                    };
                    c.write(b"+OK Begin TLS negotiation now.\r\n").await?;
                    c = c.accept_tls(a).await?;
                    user = None;
                    continue;
                }
                pop3::Command::Other(_) => {
                    errors += 1;
                    c.write(b"-ERR Unknown command or not logged in.\r\n")
                        .await?;
                    continue;
                }
                pop3::Command::User(_) | pop3::Command::Pass(_) if !plaintext_ok => {
                    c.write(privacy).await?;
                    continue;
                }
                pop3::Command::User(u) => {
                    // Always +OK: the answer must not tell which users exist.
                    user = Some(u);
                    c.write(b"+OK\r\n").await?;
                    continue;
                }
                pop3::Command::Pass(p) => match user.take() {
                    Some(u) => Ok((u, p)),
                    None => {
                        errors += 1;
                        c.write(b"-ERR No USER given.\r\n").await?;
                        continue;
                    }
                },
                pop3::Command::Auth {
                    mechanism: None, ..
                } => {
                    c.write(b"+OK\r\nPLAIN\r\n.\r\n").await?;
                    continue;
                }
                pop3::Command::Auth { .. } if !plaintext_ok => {
                    c.write(privacy).await?;
                    continue;
                }
                pop3::Command::Auth {
                    mechanism: Some(m),
                    initial,
                } => {
                    if m != "PLAIN" {
                        c.write(b"-ERR Unsupported authentication mechanism.\r\n")
                            .await?;
                        continue;
                    }
                    let response = match initial {
                        Some(ir) => ir,
                        None => {
                            c.write(b"+ \r\n").await?;
                            let Some(l) = c.read_line(pop3::MAX_LINE).await? else {
                                return Ok(());
                            };
                            String::from_utf8_lossy(&l).into_owned()
                        }
                    };
                    if response == "*" {
                        // RFC 5034 4: the client cancelled.
                        c.write(b"-ERR Authentication aborted.\r\n").await?;
                        continue;
                    }
                    match sasl::decode_plain(&response) {
                        Ok(p) => Ok((p.user, p.password)),
                        Err(sasl::PlainError::Malformed) => {
                            errors += 1;
                            c.write(b"-ERR Invalid SASL PLAIN response.\r\n").await?;
                            continue;
                        }
                        Err(sasl::PlainError::Authzid) => Err("authzid"),
                    }
                }
            };
            let outcome = match credentials {
                Ok((user, password)) => {
                    self.login(Protocol::Pop3, session, ip, &user, &password, "")
                        .await
                }
                Err(reason) => {
                    self.failed(Protocol::Pop3, session, ip, "", None, reason, None)
                        .await;
                    Login::Failed
                }
            };
            match outcome {
                Login::Ok {
                    backend,
                    reply,
                    platform,
                    address,
                } => {
                    return self
                        .splice(
                            c,
                            backend,
                            reply,
                            session,
                            ip,
                            Protocol::Pop3,
                            address,
                            platform,
                        )
                        .await;
                }
                // RFC 3206 4: [AUTH] for credentials, [SYS/TEMP] for us.
                Login::Failed => {
                    errors += 1;
                    c.write(b"-ERR [AUTH] Authentication failed.\r\n").await?
                }
                Login::Unavailable => {
                    c.write(
                        b"-ERR [SYS/TEMP] The mailbox server is unavailable; try again later.\r\n",
                    )
                    .await?
                }
                Login::TooManySessions => {
                    c.write(b"-ERR [IN-USE] Too many sessions for this user.\r\n")
                        .await?
                }
            }
        }
    }

    /// Where `address` logs in now, or the reason it is refused.
    pub async fn resolve(&self, address: &str) -> Result<String, &'static str> {
        login_platform(&self.config, &self.routes, &self.store, address).await
    }

    async fn login(
        &self,
        protocol: Protocol,
        session: u64,
        ip: IpAddr,
        user: &str,
        password: &str,
        tag: &str,
    ) -> Login {
        let address = godwit_route::normalize_address(user);
        let now = Instant::now();
        let allowed = self.limits.lock().unwrap().may_attempt(ip, &address, now);
        if let Err(r) = allowed {
            self.failed(protocol, session, ip, &address, None, r.reason(), None)
                .await;
            return Login::Failed;
        }
        let platform = match self.resolve(&address).await {
            Ok(p) => p,
            Err(reason) => {
                self.limits.lock().unwrap().failed(ip, &address, now);
                self.failed(protocol, session, ip, &address, None, reason, None)
                    .await;
                return Login::Failed;
            }
        };
        let pc = &self.config.platforms[&platform];
        let url = match protocol {
            Protocol::Imap => pc.imap.as_ref(),
            Protocol::Pop3 => pc.pop3.as_ref(),
        };
        let Some(url) = url else {
            let reason = format!("platforms.{platform}.{} is not set", protocol.as_str());
            self.unavailable(protocol, session, ip, &address, &platform, reason);
            return Login::Unavailable;
        };
        let target = Target {
            url,
            tls: pc.tls,
            client_tls: self.client_tls[pc.tls_insecure as usize].clone(),
            timeout: self.ac.backend_timeout,
        };
        let master = match (&pc.imap_master_user, &pc.imap_master_password) {
            (Some(m), Some(mp)) if protocol == Protocol::Imap => {
                match mp.resolve(&format!("platforms.{platform}.imap_master_password")) {
                    Ok(pw) => Some((m.as_str(), pc.imap_master_separator.as_str(), pw)),
                    Err(reason) => {
                        self.unavailable(protocol, session, ip, &address, &platform, reason);
                        return Login::Unavailable;
                    }
                }
            }
            _ => None,
        };
        let r = match (protocol, master) {
            (Protocol::Imap, Some((m, sep, mpw))) => {
                match backend::imap_verify(&target, user, password).await {
                    Ok(()) => backend::imap_master_login(&target, user, (m, sep, &mpw), tag).await,
                    Err(e) => Err(e),
                }
            }
            (Protocol::Imap, None) => backend::imap_login(&target, user, password, tag).await,
            (Protocol::Pop3, _) => backend::pop3_login(&target, user, password).await,
        };
        match r {
            Ok((backend, reply)) => {
                let admitted = self.limits.lock().unwrap().login(&address);
                if let Err(Refusal::TooManySessions) = admitted {
                    self.count_failure("max_sessions_per_user", protocol);
                    return Login::TooManySessions;
                }
                self.events.emit(Event::AccessLogin {
                    session,
                    address: address.clone(),
                    client_ip: ip.to_string(),
                    protocol: protocol.as_str().into(),
                    platform: Some(platform.clone()),
                    result: "ok".into(),
                    reason: None,
                    backend_reply: None,
                });
                *self
                    .counters
                    .lock()
                    .unwrap()
                    .logins
                    .entry((platform.clone(), protocol.as_str()))
                    .or_default() += 1;
                Login::Ok {
                    backend,
                    reply,
                    platform,
                    address,
                }
            }
            Err(BackendError::Auth(reply)) => {
                self.limits.lock().unwrap().failed(ip, &address, now);
                self.failed(
                    protocol,
                    session,
                    ip,
                    &address,
                    Some(platform),
                    "auth",
                    Some(reply),
                )
                .await;
                Login::Failed
            }
            Err(BackendError::Unavailable(why)) => {
                self.unavailable(protocol, session, ip, &address, &platform, why);
                Login::Unavailable
            }
        }
    }

    fn count_failure(&self, reason: &str, protocol: Protocol) {
        *self
            .counters
            .lock()
            .unwrap()
            .failures
            .entry((reason.to_string(), protocol.as_str()))
            .or_default() += 1;
    }

    fn unavailable(
        &self,
        protocol: Protocol,
        session: u64,
        ip: IpAddr,
        address: &str,
        platform: &str,
        why: String,
    ) {
        tracing::warn!(
            "access: {} login for {address} cannot reach {platform}: {why}",
            protocol.as_str()
        );
        self.count_failure("unavailable", protocol);
        self.events.emit(Event::AccessLogin {
            session,
            address: address.into(),
            client_ip: ip.to_string(),
            protocol: protocol.as_str().into(),
            platform: Some(platform.into()),
            result: "failed".into(),
            reason: Some("unavailable".into()),
            backend_reply: Some(why),
        });
    }

    /// Records a refused login, then waits `login_failure_delay` before the
    /// caller answers, so guessing passwords is slow whatever the reason.
    #[allow(clippy::too_many_arguments)]
    async fn failed(
        &self,
        protocol: Protocol,
        session: u64,
        ip: IpAddr,
        address: &str,
        platform: Option<String>,
        reason: &str,
        backend_reply: Option<String>,
    ) {
        self.count_failure(reason, protocol);
        self.events.emit(Event::AccessLogin {
            session,
            address: address.into(),
            client_ip: ip.to_string(),
            protocol: protocol.as_str().into(),
            platform,
            result: "failed".into(),
            reason: Some(reason.into()),
            backend_reply,
        });
        tokio::time::sleep(self.ac.login_failure_delay).await;
    }

    /// Relays bytes both ways until either side closes, or the mailbox
    /// moves (then the client is told so and disconnected).
    #[allow(clippy::too_many_arguments)]
    async fn splice(
        &self,
        mut client: Conn,
        mut backend: Conn,
        reply: Vec<u8>,
        session: u64,
        ip: IpAddr,
        protocol: Protocol,
        address: String,
        platform: String,
    ) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.sessions.lock().unwrap().insert(
            session,
            Live {
                address: address.clone(),
                platform: platform.clone(),
                protocol,
                client_ip: ip,
                kick: Some(tx),
            },
        );
        let result = async {
            // Registered first, so a move from now on reaches this session.
            client.write(&reply).await?;
            // Whatever either side sent ahead (pipelined commands, or data
            // after the platform's OK) goes on first.
            if !client.buf.is_empty() {
                let b = std::mem::take(&mut client.buf);
                backend.write(&b).await?;
            }
            if !backend.buf.is_empty() {
                let b = std::mem::take(&mut backend.buf);
                client.write(&b).await?;
            }
            enum End {
                Closed,
                Moved(String),
            }
            let end = tokio::select! {
                _ = relay(&mut client.io, &mut backend.io) => End::Closed,
                Ok(to) = rx => End::Moved(to),
            };
            if let End::Moved(to) = end {
                // RFC 5530 UNAVAILABLE; RFC 3206 SYS/TEMP.
                let bye: &[u8] = match protocol {
                    Protocol::Imap => b"* BYE [UNAVAILABLE] Your mailbox has moved to another server; please reconnect.\r\n",
                    Protocol::Pop3 => b"-ERR [SYS/TEMP] Your mailbox has moved to another server; please reconnect.\r\n",
                };
                let _ = client.write(bye).await;
                use tokio::io::AsyncWriteExt;
                let _ = client.io.shutdown().await;
                self.counters.lock().unwrap().moved += 1;
                self.events.emit(Event::AccessMoved {
                    session,
                    address: address.clone(),
                    client_ip: ip.to_string(),
                    protocol: protocol.as_str().into(),
                    from_platform: platform.clone(),
                    to_platform: to,
                });
            }
            anyhow::Ok(())
        }
        .await;
        self.sessions.lock().unwrap().remove(&session);
        self.limits.lock().unwrap().logout(&address);
        result
    }

    /// Call when the routing map changed (the same signal the relay gets).
    /// With `disconnect_on_move`, every session whose mailbox now logs in
    /// elsewhere is closed; the client reconnects and lands on the new
    /// platform.
    pub fn routes_changed(self: &Arc<Self>) {
        if !self.ac.disconnect_on_move {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let live: Vec<(u64, String, String)> = me
                .sessions
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, l)| l.kick.is_some())
                .map(|(id, l)| (*id, l.address.clone(), l.platform.clone()))
                .collect();
            let mut now: HashMap<String, Result<String, &'static str>> = HashMap::new();
            for (id, address, platform) in live {
                if !now.contains_key(&address) {
                    let r = me.resolve(&address).await;
                    now.insert(address.clone(), r);
                }
                let Ok(to) = &now[&address] else { continue };
                if *to == platform {
                    continue;
                }
                let kick = me
                    .sessions
                    .lock()
                    .unwrap()
                    .get_mut(&id)
                    .and_then(|l| l.kick.take());
                if let Some(k) = kick {
                    let _ = k.send(to.clone());
                }
            }
        });
    }

    /// Prometheus text: sessions per platform and protocol, logins, and
    /// failures by reason.
    pub fn metrics_text(&self) -> String {
        let mut sessions: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for l in self.sessions.lock().unwrap().values() {
            *sessions
                .entry((l.platform.clone(), l.protocol.as_str()))
                .or_default() += 1;
        }
        for (p, _) in self.config.platforms.iter() {
            for proto in ["imap", "pop3"] {
                sessions.entry((p.clone(), proto)).or_default();
            }
        }
        let c = self.counters.lock().unwrap();
        let mut out = String::new();
        out.push_str("# HELP godwit_access_sessions Logged-in client sessions through the access front.\n# TYPE godwit_access_sessions gauge\n");
        for ((p, proto), n) in &sessions {
            out.push_str(&format!(
                "godwit_access_sessions{{platform=\"{p}\",protocol=\"{proto}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP godwit_access_logins_total Successful logins through the access front.\n# TYPE godwit_access_logins_total counter\n");
        for ((p, proto), n) in &c.logins {
            out.push_str(&format!(
                "godwit_access_logins_total{{platform=\"{p}\",protocol=\"{proto}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP godwit_access_login_failures_total Refused logins, by reason.\n# TYPE godwit_access_login_failures_total counter\n");
        for ((r, proto), n) in &c.failures {
            out.push_str(&format!(
                "godwit_access_login_failures_total{{reason=\"{r}\",protocol=\"{proto}\"}} {n}\n"
            ));
        }
        out.push_str(&format!(
            "# HELP godwit_access_moved_total Sessions closed because their mailbox moved.\n# TYPE godwit_access_moved_total counter\ngodwit_access_moved_total {}\n",
            c.moved
        ));
        out
    }

    /// Logged-in sessions per (platform, protocol), for a dashboard.
    pub fn sessions(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        for l in self.sessions.lock().unwrap().values() {
            *out.entry((l.platform.clone(), l.protocol.as_str().to_string()))
                .or_default() += 1;
        }
        out
    }

    /// Client IPs of logged-in sessions of `address` (for diagnosis).
    pub fn sessions_of(&self, address: &str) -> Vec<IpAddr> {
        let address = godwit_route::normalize_address(address);
        self.sessions
            .lock()
            .unwrap()
            .values()
            .filter(|l| l.address == address)
            .map(|l| l.client_ip)
            .collect()
    }
}

/// Where `address` logs in now, or the reason it is refused.
pub async fn login_platform(
    config: &Config,
    routes: &SharedRoutes,
    store: &Store,
    address: &str,
) -> Result<String, &'static str> {
    let address = godwit_route::normalize_address(address);
    let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    let accepted = config.is_accepted_domain(domain);
    let decision = routes.decide(&address);
    let platform = match routing::classify(&address, accepted, routes.has_directory(), &decision) {
        Step::Refuse(r) => return Err(r),
        Step::Platform(p) => p,
        Step::ByState => {
            let (owner, state) = mailbox_state(store, &address).await.ok_or("unknown")?;
            routing::by_state(&owner, state, config.target_platform())
                .ok_or("no_target_platform")?
        }
    };
    if !config.platforms.contains_key(&platform) {
        return Err("no_platform");
    }
    Ok(platform)
}

/// The owning platform and migration state of a mailbox, or of the
/// mailbox an alias names.
async fn mailbox_state(store: &Store, address: &str) -> Option<(String, MigrationState)> {
    let direct: Option<(String, String)> =
        sqlx::query_as("SELECT platform, state FROM directory_objects WHERE address = $1")
            .bind(address)
            .fetch_optional(&store.pool)
            .await
            .ok()?;
    let row = match direct {
        Some(r) => r,
        None => sqlx::query_as(
            "SELECT o.platform, o.state FROM directory_aliases a JOIN directory_objects o ON o.address = a.mailbox WHERE a.alias = $1",
        )
        .bind(address)
        .fetch_optional(&store.pool)
        .await
        .ok()??,
    };
    Some((row.0, row.1.parse().ok()?))
}

/// Both directions of a logged-in session until both have ended: in the kernel
/// (splice(2)) when both sides are plain TCP, else through tokio's buffers.
async fn relay(
    client: &mut conn::Stream,
    backend: &mut conn::Stream,
) -> std::io::Result<(u64, u64)> {
    use conn::Stream::Tcp;
    match (client, backend) {
        (Tcp(c), Tcp(b)) => zerocopy::bidirectional(c, b).await,
        (c, b) => tokio::io::copy_bidirectional(c, b).await,
    }
}
