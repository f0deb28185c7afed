//! One delivery attempt to one platform: connect to its relay hosts in
//! order, EHLO, STARTTLS per policy, then MAIL/RCPT/DATA pipelined where the
//! peer offers PIPELINING (RFC 2920), keeping each recipient's own reply.

use godwit_config::{PlatformConfig, TlsPolicy, split_host_port};
use godwit_smtp_proto::{DotStuffer, Envelope, Reply, envelope::xtext_encode};
use mail_send::SmtpClient;
use smtp_proto::{EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SMTP_UTF8, EXT_START_TLS, Response};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A message's bytes in its spool file, read chunk by chunk as they are
/// sent: a 50 MB message never needs 50 MB per copy in flight.
#[derive(Clone)]
pub struct Body {
    file: std::sync::Arc<std::fs::File>,
    offset: u64,
    len: u64,
    /// The first read that failed: the attempt was the spool's fault, not
    /// the platform's (no throttling signal, and the message is counted
    /// towards quarantine).
    error: std::sync::Arc<Mutex<Option<String>>>,
    /// Header lines sent before the spooled bytes: the DKIM-Signature made
    /// for this attempt. The spool keeps the original.
    prefix: std::sync::Arc<Vec<u8>>,
    /// Bytes sent after the spooled ones: a journal report's closing
    /// boundary (the original inside it stays unmodified).
    suffix: std::sync::Arc<Vec<u8>>,
    /// The body's first chunk, read with the open (`Body::open`): most mail
    /// fits in one, so its attempt costs one blocking-thread hop, not two.
    first: std::sync::Arc<Vec<u8>>,
}

/// How much of a body is read, stuffed and written at a time.
const CHUNK: usize = 256 * 1024;

impl Body {
    pub fn new(file: std::fs::File, offset: u64, len: u64) -> Body {
        Body {
            file: std::sync::Arc::new(file),
            offset,
            len,
            error: Default::default(),
            prefix: Default::default(),
            suffix: Default::default(),
            first: Default::default(),
        }
    }

    /// `new`, with the first chunk read now (blocking: call it from the
    /// blocking thread that opened the file).
    pub fn open(file: std::fs::File, offset: u64, len: u64) -> std::io::Result<Body> {
        use std::os::unix::fs::FileExt;
        let mut first = vec![0u8; CHUNK.min(len as usize)];
        file.read_exact_at(&mut first, offset)?;
        let mut b = Body::new(file, offset, len);
        b.first = std::sync::Arc::new(first);
        Ok(b)
    }

    /// What the whole attempt writes at most at a time: one chunk, or the
    /// whole message when smaller (a 4 KB message needs no 256 KB buffer).
    fn wire_capacity(&self) -> usize {
        let whole = self.len as usize + self.prefix.len() + self.suffix.len();
        CHUNK.min(whole) + CHUNK / 16 + 64
    }

    /// The same body with `tail` sent after it.
    pub fn with_suffix(mut self, tail: Vec<u8>) -> Body {
        self.suffix = std::sync::Arc::new(tail);
        self
    }

    /// The same body with `header` (CRLF-terminated lines) put before it.
    pub fn with_prefix(mut self, header: Vec<u8>) -> Body {
        self.prefix = std::sync::Arc::new(header);
        self
    }

    /// Why reading the body failed during an attempt, if it did.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }

    /// Bytes `pos..pos + n` of the message (positional reads, so several
    /// transactions may read one body at once).
    async fn chunk(&self, pos: u64, n: usize) -> std::io::Result<Vec<u8>> {
        if pos == 0 && n == self.first.len() && n > 0 {
            return Ok(self.first.to_vec());
        }
        let file = self.file.clone();
        let at = self.offset + pos;
        let r = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, at)?;
            Ok(buf)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        if let Err(e) = &r {
            self.error
                .lock()
                .unwrap()
                .get_or_insert_with(|| e.to_string());
        }
        r
    }
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type Client = SmtpClient<Box<dyn Stream>>;

#[derive(Debug, Clone)]
pub enum RcptOutcome {
    Delivered {
        reply: Reply,
        remote_queue_id: Option<String>,
    },
    Transient(Reply),
    Permanent(Reply),
}

#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    /// The relay host that answered, if any did.
    pub host: Option<String>,
    pub tls: bool,
    /// Whether the platform's certificate verified (None without TLS).
    pub tls_verified: Option<bool>,
    /// One per recipient given, in order.
    pub rcpts: Vec<RcptOutcome>,
    /// The reply that decided the attempt as a whole (the final DATA reply, or
    /// the failure that stopped it).
    pub summary: Reply,
    pub duration: Duration,
    /// Of `duration`, the part spent getting a connection ready (TCP,
    /// greeting, EHLO, STARTTLS, TLS; failovers included): Postfix's `c`.
    pub connect: Duration,
}

struct Pooled {
    client: Client,
    host: String,
    /// Index of the host in the platform's relay list.
    host_idx: usize,
    caps: u32,
    tls: bool,
    /// Whether the peer's certificate verified (None: no TLS).
    tls_verified: Option<bool>,
    uses: usize,
    idle_since: Instant,
}

#[derive(Debug, Clone, Copy, Default)]
struct HostHealth {
    failures: u32,
    down_until: Option<Instant>,
}

/// How long a host that failed `failures` times in a row is passed over:
/// 5 s, doubling, at most 5 minutes.
fn host_backoff(failures: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(300),
    )
}

/// A host to connect to: a configured relay "host:port", or an MX host's
/// address found in the DNS (then `addr` is set and the evidence names it
/// as Postfix does, `mx1.example.net[192.0.2.1]:25`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Host {
    name: String,
    port: u16,
    addr: Option<std::net::SocketAddr>,
}

impl Host {
    fn label(&self) -> String {
        match self.addr {
            Some(a) => format!("{}[{}]:{}", self.name, a.ip(), a.port()),
            None => format!("{}:{}", self.name, self.port),
        }
    }
}

/// Where an outbound destination finds its hosts: the recipient domain's
/// MX hosts, looked up at each attempt (so DNS changes apply at once).
pub struct MxSource {
    pub resolver: godwit_outbound::MxResolver,
    pub domain: String,
}

/// SMTP AUTH towards a smarthost (RFC 4954): user and password.
#[derive(Clone)]
pub struct SmarthostAuth {
    pub user: String,
    pub password: String,
}

/// A platform's relay hosts, connection pool and TLS settings.
pub struct Platform {
    /// The platform's name in the configuration, for logs.
    pub name: String,
    pub config: PlatformConfig,
    hosts: std::sync::RwLock<Vec<Host>>,
    /// Set for an outbound destination delivering to MX hosts.
    mx: Option<MxSource>,
    /// Set for a platform's outbound smarthost that wants AUTH.
    auth: Option<SmarthostAuth>,
    /// Per relay host: consecutive connection failures, and until when the
    /// host is skipped in favour of the others (as Exim's retry database
    /// does), so a dead or black-holed host costs one connect timeout per
    /// back-off period rather than one per attempt.
    health: Mutex<Vec<HostHealth>>,
    pool: Mutex<Vec<Pooled>>,
    tls: TlsConnector,
    /// For `opportunistic`: checks the chain after an unverified handshake,
    /// so the evidence says whether it would have verified.
    checker: Option<godwit_tls::Checker>,
}

/// Idle connections older than this are not reused: peers time them out.
const POOL_IDLE: Duration = Duration::from_secs(5);

fn reply_of(r: &Response<String>) -> Reply {
    let enhanced = if r.esc[0] != 0 {
        Some((r.esc[0], r.esc[1] as u16, r.esc[2] as u16))
    } else {
        None
    };
    Reply {
        code: r.code,
        enhanced,
        text: r.message.replace("\r\n", " ").replace('\n', " "),
    }
}

fn local(code: u16, e: (u8, u16, u16), text: String) -> Reply {
    Reply::new(code, e, text)
}

impl Platform {
    pub fn new(name: &str, config: &PlatformConfig) -> Platform {
        let hosts: Vec<Host> = config
            .relay
            .iter()
            .filter_map(|r| split_host_port(r).ok())
            .map(|(name, port)| Host {
                name,
                port,
                addr: None,
            })
            .collect();
        // The trust anchors were checked when the configuration loaded; a
        // file that went bad since leaves only the public roots.
        let roots = || {
            godwit_tls::roots(config.tls_ca.as_deref()).unwrap_or_else(|e| {
                tracing::error!(platform = name, "tls_ca: {e}; using the public roots");
                godwit_tls::roots(None).expect("webpki roots")
            })
        };
        let (tls, checker) = match config.tls {
            TlsPolicy::Opportunistic | TlsPolicy::None => (
                godwit_tls::unverified_config(),
                godwit_tls::Checker::new(roots()).ok(),
            ),
            TlsPolicy::Require if config.tls_insecure => (godwit_tls::unverified_config(), None),
            TlsPolicy::Verify | TlsPolicy::Require => (godwit_tls::verifying_config(roots()), None),
        };
        Platform {
            name: name.to_string(),
            config: config.clone(),
            health: Mutex::new(vec![HostHealth::default(); hosts.len()]),
            hosts: std::sync::RwLock::new(hosts),
            mx: None,
            auth: None,
            pool: Mutex::new(Vec::new()),
            tls: TlsConnector::from(tls),
            checker,
        }
    }

    /// An outbound destination for the recipient domain `mx.domain`, its
    /// hosts found in the DNS at each attempt.
    pub fn for_mx(name: &str, config: &PlatformConfig, mx: MxSource) -> Platform {
        let mut p = Platform::new(name, config);
        p.mx = Some(mx);
        p
    }

    /// A platform's outbound smarthost (its `outbound_relay`), with AUTH.
    pub fn with_auth(mut self, auth: Option<SmarthostAuth>) -> Platform {
        self.auth = auth;
        self
    }

    fn host_count(&self) -> usize {
        self.hosts.read().unwrap().len()
    }

    /// Takes the hosts found in the DNS for this attempt. A changed list
    /// replaces the old one (and its health record); the same list keeps it.
    fn set_hosts(&self, hosts: Vec<Host>) {
        let mut health = self.health.lock().unwrap();
        let mut cur = self.hosts.write().unwrap();
        if *cur != hosts {
            *health = vec![HostHealth::default(); hosts.len()];
            *cur = hosts;
            self.pool.lock().unwrap().clear();
        }
    }

    /// For an MX destination: looks the domain up now. An Err is the
    /// outcome of the whole attempt (null MX, no such domain, DNS failure).
    async fn resolve_mx(&self) -> Result<(), Reply> {
        let Some(mx) = &self.mx else { return Ok(()) };
        use godwit_outbound::mx::Resolved;
        match mx.resolver.resolve(&mx.domain).await {
            Resolved::Targets(t) => {
                self.set_hosts(
                    t.into_iter()
                        .map(|t| Host {
                            name: t.host,
                            port: t.addr.port(),
                            addr: Some(t.addr),
                        })
                        .collect(),
                );
                Ok(())
            }
            // RFC 7505 4.1: a null MX domain accepts no mail; fail at once.
            Resolved::NullMx => Err(local(
                556,
                (5, 1, 10),
                format!("{} does not accept mail (null MX, RFC 7505)", mx.domain),
            )),
            Resolved::NoSuchDomain => Err(local(
                550,
                (5, 1, 2),
                format!("recipient domain {} does not exist (NXDOMAIN)", mx.domain),
            )),
            Resolved::TryLater(e) => Err(local(
                451,
                (4, 4, 3),
                format!("cannot look up the mail hosts of {}: {e}", mx.domain),
            )),
        }
    }

    fn take_pooled(&self) -> Option<Pooled> {
        let mut pool = self.pool.lock().unwrap();
        while let Some(p) = pool.pop() {
            if p.idle_since.elapsed() < POOL_IDLE {
                return Some(p);
            }
        }
        None
    }

    fn give_back(&self, mut p: Pooled) {
        p.uses += 1;
        if p.uses < self.config.max_messages_per_connection {
            p.idle_since = Instant::now();
            self.pool.lock().unwrap().push(p);
        }
    }

    /// The hosts not in `tried`, in configured order, those passed over for
    /// recent failures last (soonest back first): when every host is down,
    /// they are still tried rather than the mail waiting.
    fn host_order(&self, tried: &[usize]) -> Vec<usize> {
        let now = Instant::now();
        let health = self.health.lock().unwrap();
        let mut order: Vec<usize> = (0..self.host_count().min(health.len()))
            .filter(|i| !tried.contains(i))
            .collect();
        order.sort_by_key(|&i| match health[i].down_until {
            Some(t) if t > now => (1, Some(t)),
            _ => (0, None),
        });
        order
    }

    fn host_ok(&self, idx: usize) {
        let mut health = self.health.lock().unwrap();
        let Some(h) = health.get_mut(idx) else { return };
        if h.failures > 0 {
            tracing::info!(platform = %self.name, host = %self.label(idx), "relay host is back");
        }
        *h = HostHealth::default();
    }

    fn host_failed(&self, idx: usize, why: &Reply) {
        let mut health = self.health.lock().unwrap();
        let Some(h) = health.get_mut(idx) else { return };
        // One failure per pass-over period: attempts that were already
        // connecting when the host failed (or that tried it as a last
        // resort while it was passed over) say nothing new about it.
        if h.down_until.is_some_and(|t| t > Instant::now()) {
            return;
        }
        h.failures += 1;
        let back_off = host_backoff(h.failures);
        h.down_until = Some(Instant::now() + back_off);
        tracing::warn!(
            platform = %self.name,
            host = %self.label(idx),
            failures = h.failures,
            "relay host passed over for {}s: {why}",
            back_off.as_secs()
        );
    }

    fn label(&self, idx: usize) -> String {
        self.hosts
            .read()
            .unwrap()
            .get(idx)
            .map(Host::label)
            .unwrap_or_default()
    }

    /// Relay hosts now passed over, with the seconds left.
    pub fn down_hosts(&self) -> Vec<(String, u64)> {
        let now = Instant::now();
        let health = self.health.lock().unwrap();
        health
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let t = h.down_until.filter(|t| *t > now)?;
                Some((self.label(i), (t - now).as_secs() + 1))
            })
            .collect()
    }

    /// Connects to the first relay host not in `tried` that greets us.
    /// Connection failures and 4xx greetings move on to the next host.
    async fn connect_from(
        &self,
        helo: &str,
        tried: &mut Vec<usize>,
    ) -> Result<Pooled, (Option<String>, Reply)> {
        let mut last = (
            None,
            local(
                451,
                (4, 4, 1),
                if self.host_count() == 0 {
                    "no relay host configured".into()
                } else {
                    "every relay host was already tried in this attempt".into()
                },
            ),
        );
        for idx in self.host_order(tried) {
            tried.push(idx);
            let Some(host) = self.hosts.read().unwrap().get(idx).cloned() else {
                continue;
            };
            match self.connect_one(&host, helo).await {
                Ok(mut p) => {
                    self.host_ok(idx);
                    p.host_idx = idx;
                    return Ok(p);
                }
                Err(r) => {
                    self.host_failed(idx, &r);
                    last = (Some(self.label(idx)), r);
                }
            }
        }
        Err(last)
    }

    async fn connect_one(&self, target: &Host, helo: &str) -> Result<Pooled, Reply> {
        let label = target.label();
        let host = target.name.as_str();
        let conn_err = |e: String| local(451, (4, 4, 1), format!("connect to {label}: {e}"));
        let connect = async {
            match target.addr {
                Some(a) => TcpStream::connect(a).await,
                None => TcpStream::connect((host, target.port)).await,
            }
        };
        let tcp = tokio::time::timeout(self.config.connect_timeout, connect)
            .await
            .map_err(|_| conn_err("timed out".into()))?
            .map_err(|e| conn_err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut client: SmtpClient<TcpStream> = SmtpClient {
            stream: tcp,
            timeout: self.config.command_timeout,
        };
        let greeting = tokio::time::timeout(self.config.command_timeout, client.read())
            .await
            .map_err(|_| conn_err("greeting timed out".into()))?
            .map_err(|e| conn_err(format!("greeting: {e}")))?;
        if greeting.code != 220 {
            return Err(reply_of(&greeting));
        }
        let ehlo = client
            .ehlo(helo)
            .await
            .map_err(|e| conn_err(format!("EHLO: {e}")))?;
        let mut caps = ehlo.capabilities;
        let offers_tls = caps & EXT_START_TLS != 0;
        let want_tls = match self.config.tls {
            TlsPolicy::None => false,
            TlsPolicy::Opportunistic => offers_tls,
            TlsPolicy::Require | TlsPolicy::Verify => {
                if !offers_tls {
                    return Err(local(
                        451,
                        (4, 7, 10),
                        format!("{label} does not offer STARTTLS and TLS is required"),
                    ));
                }
                true
            }
        };
        if !want_tls {
            self.authenticate(&mut client, &ehlo, &label).await?;
            return Ok(Pooled {
                host_idx: 0,
                client: SmtpClient {
                    stream: Box::new(client.stream),
                    timeout: client.timeout,
                },
                host: label,
                caps,
                tls: false,
                tls_verified: None,
                uses: 0,
                idle_since: Instant::now(),
            });
        }
        let r = client
            .cmd(b"STARTTLS\r\n")
            .await
            .map_err(|e| conn_err(format!("STARTTLS: {e}")))?;
        if r.code != 220 {
            return Err(local(
                451,
                (4, 7, 10),
                format!("{label} refused STARTTLS: {}", reply_of(&r)),
            ));
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|_| {
            local(
                451,
                (4, 7, 10),
                format!("{host} is not a valid TLS server name"),
            )
        })?;
        let tls = tokio::time::timeout(
            self.config.command_timeout,
            self.tls.connect(name.clone(), client.stream),
        )
        .await
        .map_err(|_| {
            local(
                451,
                (4, 7, 10),
                format!("TLS handshake with {label} timed out"),
            )
        })?
        .map_err(|e| {
            local(
                451,
                (4, 7, 10),
                format!("TLS handshake with {label} failed: {e}"),
            )
        })?;
        // Opportunistic TLS encrypts whatever the certificate; whether it
        // would have verified is evidence (Postfix logs "Untrusted TLS").
        let verified = match &self.checker {
            Some(c) => {
                let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
                match c.check(chain, &name) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(platform = %self.name, host = %label, "certificate not verified: {e}");
                        false
                    }
                }
            }
            // verify/require completed a verifying handshake.
            None => !self.config.tls_insecure,
        };
        let mut client: Client = SmtpClient {
            stream: Box::new(tls),
            timeout: self.config.command_timeout,
        };
        // RFC 3207 4.2: capabilities must be learned again after TLS.
        let ehlo = client
            .ehlo(helo)
            .await
            .map_err(|e| conn_err(format!("EHLO after TLS: {e}")))?;
        caps = ehlo.capabilities;
        self.authenticate(&mut client, &ehlo, &label).await?;
        Ok(Pooled {
            host_idx: 0,
            client,
            host: label,
            caps,
            tls: true,
            tls_verified: Some(verified),
            uses: 0,
            idle_since: Instant::now(),
        })
    }

    /// SMTP AUTH (RFC 4954) to a smarthost that has credentials configured.
    /// A refused login is a 4xx for the attempt: the credentials may be fixed
    /// by the operator, and the mail must not bounce for it.
    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<S>,
        ehlo: &smtp_proto::EhloResponse<String>,
        label: &str,
    ) -> Result<(), Reply> {
        let Some(a) = &self.auth else { return Ok(()) };
        let creds = mail_send::Credentials::new(a.user.as_str(), a.password.as_str());
        client
            .authenticate(&creds, ehlo)
            .await
            .map(|_| ())
            .map_err(|e| {
                // Never the password: only the user and the server's words.
                local(
                    454,
                    (4, 7, 0),
                    format!("AUTH as {} at {label} failed: {e}", a.user),
                )
            })
    }

    /// Delivers `body` for `rcpts` (indexes into the envelope) and returns one
    /// outcome per recipient. Never returns an error: failures are outcomes.
    pub async fn deliver(
        &self,
        helo: &str,
        queue_id: &str,
        env: &Envelope,
        rcpts: &[usize],
        body: &Body,
    ) -> AttemptOutcome {
        let started = Instant::now();
        tracing::debug!(platform = %self.name, queue_id, rcpts = rcpts.len(), "delivery attempt");
        let all = |r: &Reply, permanent: bool| {
            rcpts
                .iter()
                .map(|_| {
                    if permanent {
                        RcptOutcome::Permanent(r.clone())
                    } else {
                        RcptOutcome::Transient(r.clone())
                    }
                })
                .collect()
        };
        if let Err(reply) = self.resolve_mx().await {
            let permanent = reply.code >= 500;
            return AttemptOutcome {
                host: None,
                tls: false,
                tls_verified: None,
                rcpts: all(&reply, permanent),
                summary: reply,
                duration: started.elapsed(),
                // The MX lookup is connection setup: Postfix counts DNS in `c`.
                connect: started.elapsed(),
            };
        }
        // Hosts this attempt has used, so a failover never returns to one.
        let mut tried: Vec<usize> = Vec::new();
        let mut use_pool = true;
        // The outcome at an earlier host that answered 4xx, if any.
        let mut last: Option<AttemptOutcome> = None;
        loop {
            let (mut conn, pooled) = match use_pool.then(|| self.take_pooled()).flatten() {
                Some(p) => (p, true),
                None => match self.connect_from(helo, &mut tried).await {
                    Ok(p) => (p, false),
                    Err((host, reply)) => {
                        if let Some(l) = last {
                            return l;
                        }
                        let permanent = reply.code >= 500;
                        return AttemptOutcome {
                            host,
                            tls: false,
                            tls_verified: None,
                            rcpts: all(&reply, permanent),
                            summary: reply,
                            duration: started.elapsed(),
                            connect: started.elapsed(),
                        };
                    }
                },
            };
            use_pool = false;
            let connect = started.elapsed();
            if !tried.contains(&conn.host_idx) {
                tried.push(conn.host_idx);
            }
            let outcome =
                match transaction(&mut conn, queue_id, env, rcpts, body, &self.config).await {
                    Ok((outcomes, summary, reusable)) => {
                        let host = Some(conn.host.clone());
                        let tls = conn.tls;
                        let tls_verified = conn.tls_verified;
                        if reusable {
                            self.give_back(conn);
                        }
                        AttemptOutcome {
                            host,
                            tls,
                            tls_verified,
                            rcpts: outcomes,
                            summary,
                            duration: started.elapsed(),
                            connect,
                        }
                    }
                    // A pooled connection the peer closed while idle: nothing was
                    // sent past MAIL, so a fresh connection is safe, to any
                    // host, that one included.
                    Err(TxError::BeforeData(_)) if pooled => {
                        tried.retain(|&i| i != conn.host_idx);
                        continue;
                    }
                    Err(TxError::BeforeData(r)) => AttemptOutcome {
                        host: Some(conn.host.clone()),
                        tls: conn.tls,
                        tls_verified: conn.tls_verified,
                        rcpts: all(&r, false),
                        summary: r,
                        duration: started.elapsed(),
                        connect,
                    },
                    // The message may have been received: never resend elsewhere now.
                    Err(TxError::AfterData(r)) => {
                        return AttemptOutcome {
                            host: Some(conn.host.clone()),
                            tls: conn.tls,
                            tls_verified: conn.tls_verified,
                            rcpts: all(&r, false),
                            summary: r,
                            duration: started.elapsed(),
                            connect,
                        };
                    }
                };
            // RFC 5321 5.1: on a temporary failure, try the platform's next
            // relay host in the same attempt.
            let all_transient = outcome
                .rcpts
                .iter()
                .all(|o| matches!(o, RcptOutcome::Transient(_)));
            if all_transient && tried.len() < self.host_count() {
                last = Some(outcome);
                continue;
            }
            return outcome;
        }
    }
}

enum TxError {
    BeforeData(Reply),
    /// The message may or may not have been received: a 4.4.2 deferral. The
    /// retry can duplicate; the X-Godwit-Trace header makes that traceable.
    AfterData(Reply),
}

async fn transaction(
    conn: &mut Pooled,
    queue_id: &str,
    env: &Envelope,
    rcpts: &[usize],
    body: &Body,
    cfg: &PlatformConfig,
) -> Result<(Vec<RcptOutcome>, Reply, bool), TxError> {
    let io_err = |stage: &str, e: mail_send::Error| {
        local(451, (4, 4, 2), format!("{stage} with {}: {e}", conn.host))
    };
    let caps = conn.caps;
    let dsn = caps & EXT_DSN != 0;
    let mut mail = format!("MAIL FROM:<{}>", env.mail_from);
    if let Some(body) = &env.mail_params.body
        && caps & EXT_8BIT_MIME != 0
    {
        mail.push_str(&format!(" BODY={body}"));
    }
    if env.mail_params.smtputf8 {
        if caps & EXT_SMTP_UTF8 == 0 {
            // RFC 6531 3.4: cannot be downgraded here.
            let r = local(
                553,
                (5, 6, 7),
                format!(
                    "{} does not offer SMTPUTF8, which this message needs",
                    conn.host
                ),
            );
            return Ok((
                rcpts
                    .iter()
                    .map(|_| RcptOutcome::Permanent(r.clone()))
                    .collect(),
                r,
                true,
            ));
        }
        mail.push_str(" SMTPUTF8");
    }
    if dsn {
        if let Some(ret) = &env.mail_params.ret {
            mail.push_str(&format!(" RET={ret}"));
        }
        if let Some(envid) = &env.mail_params.envid {
            mail.push_str(&format!(" ENVID={}", xtext_encode(envid)));
        }
    }
    mail.push_str("\r\n");
    let mut cmds = vec![mail];
    for &i in rcpts {
        let (addr, p) = &env.rcpts[i];
        let mut c = format!("RCPT TO:<{addr}>");
        if dsn {
            if !p.notify.is_empty() {
                c.push_str(&format!(" NOTIFY={}", p.notify.join(",")));
            }
            if let Some(o) = &p.orcpt {
                // smtp-proto decoded it; xtext-encode the address part again (RFC 3461 4.2).
                let (kind, a) = o.split_once(';').unwrap_or(("rfc822", o));
                c.push_str(&format!(" ORCPT={kind};{}", xtext_encode(a)));
            }
        }
        c.push_str("\r\n");
        cmds.push(c);
    }
    cmds.push("DATA\r\n".into());
    let client = &mut conn.client;
    client.timeout = cfg.command_timeout;
    let replies: Vec<Reply> = if caps & EXT_PIPELINING != 0 {
        pipeline(client, &cmds)
            .await
            .map_err(|e| TxError::BeforeData(io_err("MAIL/RCPT/DATA", e)))?
            .iter()
            .map(reply_of)
            .collect()
    } else {
        let mut out = Vec::new();
        for (n, c) in cmds.iter().enumerate() {
            let r = reply_of(
                &client
                    .cmd(c)
                    .await
                    .map_err(|e| TxError::BeforeData(io_err("command", e)))?,
            );
            let stop = (n == 0 && r.code >= 400) || (n + 1 == cmds.len());
            out.push(r);
            if stop {
                break;
            }
            // Without pipelining, do not send DATA when no recipient was accepted.
            if n + 2 == cmds.len() && out[1..].iter().all(|r| r.code >= 400) {
                break;
            }
        }
        out
    };
    let mail_reply = replies[0].clone();
    if mail_reply.code == 421 {
        // The peer is closing (RFC 5321 3.8): on a pooled connection it
        // timed out while idle, and a fresh connection may do.
        return Err(TxError::BeforeData(mail_reply));
    }
    if mail_reply.code >= 400 {
        let permanent = mail_reply.code >= 500;
        let outs = rcpts
            .iter()
            .map(|_| {
                if permanent {
                    RcptOutcome::Permanent(mail_reply.clone())
                } else {
                    RcptOutcome::Transient(mail_reply.clone())
                }
            })
            .collect();
        // After a failed MAIL, the peer may have a half-transaction: RSET it.
        let ok = client.cmd(b"RSET\r\n").await.is_ok_and(|r| r.code == 250);
        if replies.get(rcpts.len() + 1).is_some_and(|r| r.code == 354) {
            return Err(TxError::BeforeData(mail_reply));
        }
        return Ok((outs, mail_reply, ok));
    }
    let rcpt_replies: Vec<Reply> = (0..rcpts.len())
        .map(|i| {
            replies
                .get(i + 1)
                .cloned()
                .unwrap_or_else(|| local(451, (4, 4, 2), "no reply".into()))
        })
        .collect();
    let data_reply = replies.get(rcpts.len() + 1).cloned();
    let accepted = rcpt_replies.iter().filter(|r| r.code < 400).count();
    let outcome_of = |r: &Reply| {
        if r.code >= 500 {
            RcptOutcome::Permanent(r.clone())
        } else {
            RcptOutcome::Transient(r.clone())
        }
    };
    match data_reply {
        Some(r) if r.code == 354 => {
            if accepted == 0 {
                // RFC 2920 3.1: a 354 with no accepted recipient; send an empty
                // message-less termination is not allowed, so abort the session.
                return Err(TxError::BeforeData(local(
                    451,
                    (4, 4, 2),
                    "354 after all recipients were refused".into(),
                )));
            }
        }
        other => {
            let summary = other.unwrap_or_else(|| rcpt_replies[0].clone());
            let outs = rcpt_replies
                .iter()
                .map(|r| {
                    if r.code < 400 {
                        outcome_of(&summary)
                    } else {
                        outcome_of(r)
                    }
                })
                .collect();
            let ok = client.cmd(b"RSET\r\n").await.is_ok_and(|r| r.code == 250);
            return Ok((outs, summary, ok));
        }
    }
    // Every copy names its queue ID so copies and duplicates can be reconciled.
    let mut stuffer = DotStuffer::default();
    let mut wire = Vec::with_capacity(body.wire_capacity());
    stuffer.push(
        format!("X-Godwit-Trace: {queue_id}\r\n").as_bytes(),
        &mut wire,
    );
    stuffer.push(&body.prefix, &mut wire);
    client.timeout = cfg.data_timeout;
    let sent = tokio::time::timeout(cfg.data_timeout, async {
        let mut pos = 0u64;
        while pos < body.len {
            let n = CHUNK.min((body.len - pos) as usize);
            let chunk = body.chunk(pos, n).await.map_err(|e| (true, e))?;
            pos += n as u64;
            stuffer.push(&chunk, &mut wire);
            if pos < body.len {
                client
                    .stream
                    .write_all(&wire)
                    .await
                    .map_err(|e| (false, e))?;
                wire.clear();
            }
        }
        stuffer.push(&body.suffix, &mut wire);
        stuffer.finish(&mut wire);
        client
            .stream
            .write_all(&wire)
            .await
            .map_err(|e| (false, e))?;
        client.stream.flush().await.map_err(|e| (false, e))
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        // The spool failed us mid-message: no terminator was sent, so the
        // peer discards what it has. Safe to retry; the connection is spent.
        Ok(Err((true, e))) => {
            return Err(TxError::BeforeData(local(
                451,
                (4, 3, 0),
                format!("cannot read the message from the spool while sending it: {e}"),
            )));
        }
        _ => {
            return Err(TxError::AfterData(local(
                451,
                (4, 4, 2),
                format!("connection to {} lost while sending the message", conn.host),
            )));
        }
    }
    let final_reply = match tokio::time::timeout(cfg.data_timeout, client.read()).await {
        Ok(Ok(r)) => reply_of(&r),
        _ => {
            return Err(TxError::AfterData(local(
                451,
                (4, 4, 2),
                format!("no reply from {} after the message", conn.host),
            )));
        }
    };
    let remote = parse_remote_queue_id(&final_reply.text);
    let outs = rcpt_replies
        .iter()
        .map(|r| {
            if r.code >= 400 {
                outcome_of(r)
            } else if final_reply.code < 400 {
                RcptOutcome::Delivered {
                    reply: final_reply.clone(),
                    remote_queue_id: remote.clone(),
                }
            } else {
                outcome_of(&final_reply)
            }
        })
        .collect();
    Ok((outs, final_reply, true))
}

/// The next hop's own queue ID from its 250 text: Postfix and most MTAs say
/// "queued as X"; others "id=X" or "<id> Queued mail". The next link in the
/// chain of custody.
pub fn parse_remote_queue_id(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let token = |from: usize| {
        text[from..]
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';' || c == ')')
            .find(|t| !t.is_empty())
            .map(|t| {
                t.trim_matches(|c| c == '<' || c == '>' || c == '[' || c == ']')
                    .to_string()
            })
    };
    if let Some(p) = lower.find("queued as ") {
        return token(p + 10);
    }
    if let Some(p) = lower.find("id=") {
        return token(p + 3);
    }
    None
}

/// Sends pipelined commands (RFC 2920) and reads their replies, one per
/// command; see `read_replies` for a peer that closes early.
async fn pipeline<T: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<T>,
    cmds: &[String],
) -> mail_send::Result<Vec<Response<String>>> {
    let timeout = client.timeout;
    // One write for the whole group, so it leaves in one segment and one
    // syscall (a write per command cost MAIL, each RCPT and DATA a sendto
    // on a plain TCP stream).
    let group = cmds.concat();
    tokio::time::timeout(timeout, async {
        client.stream.write_all(group.as_bytes()).await?;
        client.stream.flush().await?;
        read_replies(&mut client.stream, cmds.len()).await
    })
    .await
    .map_err(|_| mail_send::Error::Timeout)?
}

/// Reads `num` replies. A server that answers 421 and closes the connection
/// (RFC 5321 3.8, 4.2.6: "service not available, closing transmission
/// channel", e.g. Postfix's smtp-sink -Q, or a server shutting down) gave a
/// valid reply: it stands for every command it left unanswered. Only an EOF
/// after anything else, or bytes that are no reply, are errors.
pub(crate) async fn read_replies<S: AsyncRead + Unpin>(
    stream: &mut S,
    num: usize,
) -> mail_send::Result<Vec<Response<String>>> {
    use smtp_proto::response::parser::ResponseReceiver;
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1024];
    let mut out: Vec<Response<String>> = Vec::with_capacity(num);
    let mut parser = ResponseReceiver::default();
    while out.len() < num {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return match out.last() {
                Some(last) if last.code == 421 => {
                    let last = last.clone();
                    out.resize(num, last);
                    Ok(out)
                }
                _ => Err(mail_send::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {} of {num} replies", out.len()),
                ))),
            };
        }
        let mut it = buf[..n].iter();
        loop {
            match parser.parse(&mut it) {
                Ok(r) => {
                    let closing = r.code == 421;
                    out.push(r);
                    parser.reset();
                    if out.len() == num {
                        break;
                    }
                    if closing {
                        // Nothing follows a 421 (RFC 5321 3.8): don't wait
                        // for the EOF, it may be slow to come.
                        let last = out.last().unwrap().clone();
                        out.resize(num, last);
                        return Ok(out);
                    }
                }
                Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                Err(_) => return Err(mail_send::Error::UnparseableReply),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn pipelined_replies_table() {
        // (what the server sent, commands pipelined, codes read or error)
        type Case<'a> = (&'a str, usize, Result<&'a [u16], &'a str>);
        let cases: &[Case] = &[
            ("250 ok\r\n250 ok\r\n354 go\r\n", 3, Ok(&[250, 250, 354])),
            // smtp-sink -Q rcpt: 421 for the RCPT, then EOF: stands for DATA too.
            ("250 ok\r\n421 4.4.2 bye\r\n", 3, Ok(&[250, 421, 421])),
            ("421 4.3.2 shutting down\r\n", 4, Ok(&[421, 421, 421, 421])),
            // Multi-line replies split over reads still count once each.
            (
                "250-a\r\n250 b\r\n550 no\r\n354 go\r\n",
                3,
                Ok(&[250, 550, 354]),
            ),
            (
                "250 ok\r\n",
                3,
                Err("connection closed after 1 of 3 replies"),
            ),
            ("", 2, Err("connection closed after 0 of 2 replies")),
            ("hello\r\n", 1, Err("Unparseable")),
        ];
        for (wire, num, want) in cases {
            let mut r = wire.as_bytes();
            let got = super::read_replies(&mut r, *num).await;
            match (got, want) {
                (Ok(v), Ok(codes)) => {
                    let c: Vec<u16> = v.iter().map(|r| r.code).collect();
                    assert_eq!(&c, codes, "{wire:?}");
                }
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{wire:?}: {e}"),
                (got, want) => panic!("{wire:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    use super::*;

    #[test]
    fn host_backoff_doubles_from_5s_to_5min() {
        let secs: Vec<u64> = (1..=9).map(|n| host_backoff(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(host_backoff(u32::MAX).as_secs(), 300);
    }

    /// Simultaneous attempts that all fail to connect count as one failure:
    /// the pass-over grows once per period, not once per attempt.
    #[tokio::test]
    async fn concurrent_connect_failures_count_once() {
        // A port with nothing listening (bound, then released): refused at once.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = PlatformConfig {
            relay: vec![format!("127.0.0.1:{port}")],
            ..Default::default()
        };
        let p = std::sync::Arc::new(Platform::new("old", &cfg));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                let mut tried = Vec::new();
                p.connect_from("test", &mut tried).await.is_err()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        let down = p.down_hosts();
        assert_eq!(down.len(), 1);
        assert!(
            down[0].1 <= 6,
            "passed over for {}s after one outage",
            down[0].1
        );
        assert_eq!(p.health.lock().unwrap()[0].failures, 1);
    }

    #[test]
    fn remote_queue_ids() {
        assert_eq!(
            parse_remote_queue_id("Ok: queued as 4XyZ12").as_deref(),
            Some("4XyZ12")
        );
        assert_eq!(
            parse_remote_queue_id("2.0.0 Ok: Queued as ABC (xyz)").as_deref(),
            Some("ABC")
        );
        assert_eq!(
            parse_remote_queue_id("OK id=1qA2b3-000123-AB").as_deref(),
            Some("1qA2b3-000123-AB")
        );
        assert_eq!(parse_remote_queue_id("Ok"), None);
    }
}
