//! One authenticated IMAP connection: TCP or TLS, login (optionally as a master
//! user), capabilities, and the few commands async-imap does not do the way a
//! migration needs (APPEND with LITERAL+ that returns APPENDUID).

use crate::ImapError;
use crate::limits::{Bandwidth, ConnectionSlot, ServerLimits};
use async_imap::Session;
use async_imap::imap_proto::rfc4315::UidSetMember;
use async_imap::imap_proto::{Response, ResponseCode, Status};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The connection under the IMAP session. Every read is bounded twice
/// against a hostile or silent server:
/// - in time: a read that gets no byte for `idle` (sync.command_timeout)
///   fails, so no command and no response can hang forever;
/// - in size: the `Framer` follows the response syntax (lines and literals,
///   RFC 3501 4.3 and 7.5) and fails a response that announces, or grows to,
///   more than `max_response` bytes before async-imap buffers it.
#[derive(Debug)]
pub struct MailStream {
    io: Io,
    idle: Duration,
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    framer: Framer,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl MailStream {
    fn plain(tcp: TcpStream, server: &Server) -> MailStream {
        Self::new(Io::Plain(tcp), server)
    }
    fn new(io: Io, server: &Server) -> MailStream {
        MailStream {
            io,
            idle: server.command_timeout,
            silence: None,
            framer: Framer::new(server.max_response),
        }
    }
}

impl AsyncRead for MailStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match r {
            Poll::Ready(Ok(())) => {
                this.silence = None;
                this.framer
                    .feed(&buf.filled()[before..])
                    .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidData, m))?;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let idle = this.idle;
                let silence = this
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if silence.as_mut().poll(cx).is_ready() {
                    this.silence = None;
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the server sent nothing for {idle:?} (sync.command_timeout)"),
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for MailStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        // A command goes out: the wait for its answer starts now, not at a
        // read that an earlier, cancelled wait left behind.
        this.silence = None;
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Follows the server's byte stream just enough to know how large the
/// response being received is: a response is lines, each of which may end in
/// a literal announcement `{N}` (RFC 3501 4.3; `{N+}` too, RFC 7888) whose N
/// octets follow the CRLF. A response ends at a CRLF that announces nothing.
/// Literal bytes are skipped in bulk, so the copy path pays for the protocol
/// lines only.
#[derive(Debug, Clone)]
pub struct Framer {
    cap: u64,
    /// Bytes of the response under way.
    size: u64,
    /// Literal bytes still to come.
    literal: u64,
    scan: Announce,
}

/// Where the end of the current line is in `{digits[+]}CRLF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announce {
    No,
    Open,
    Digits(u64),
    Plus(u64),
    Close(u64),
    Cr(u64),
}

impl Framer {
    pub fn new(cap: u64) -> Framer {
        Framer {
            cap,
            size: 0,
            literal: 0,
            scan: Announce::No,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        use Announce::*;
        while !data.is_empty() {
            if self.literal > 0 {
                let n = (self.literal).min(data.len() as u64);
                self.literal -= n;
                self.size += n;
                data = &data[n as usize..];
                continue;
            }
            let b = data[0];
            data = &data[1..];
            self.size += 1;
            self.scan = match (self.scan, b) {
                (_, b'{') => Open,
                (Open, d @ b'0'..=b'9') => Digits(u64::from(d - b'0')),
                // Saturating: a thousand digits still reads as "too large".
                (Digits(n), d @ b'0'..=b'9') => {
                    Digits(n.saturating_mul(10).saturating_add(u64::from(d - b'0')))
                }
                (Digits(n), b'+') => Plus(n),
                (Digits(n) | Plus(n), b'}') => Close(n),
                (Close(n), b'\r') => Cr(n),
                (Cr(n), b'\n') => {
                    if n > self.cap.saturating_sub(self.size) {
                        return Err(format!(
                            "the server announced a literal of {n} bytes; at most {} bytes are accepted per response (sync.max_message_size)",
                            self.cap
                        ));
                    }
                    self.literal = n;
                    No
                }
                (_, b'\n') => {
                    self.size = 0;
                    No
                }
                _ => No,
            };
            if self.size > self.cap {
                return Err(format!(
                    "a response grew past {} bytes (sync.max_message_size)",
                    self.cap
                ));
            }
        }
        Ok(())
    }
}

/// At most `max` printable characters of a server's text, for errors that
/// end up on the terminal and in the store: a hostile server must not be able
/// to fill either with its response (async-imap puts the whole unparsed
/// buffer into its parse errors).
/// The server's own words in an async-imap error: its NO/BAD carries
/// `code: ..., info: Some("[AUTHENTICATIONFAILED] Authentication failed.")`
/// (Debug text); an operator wants "NO [AUTHENTICATIONFAILED] Authentication
/// failed." (RFC 5530 response codes included).
pub fn server_text(e: &async_imap::error::Error) -> String {
    use async_imap::error::Error as E;
    let (kind, t) = match e {
        E::No(t) => ("NO", t),
        E::Bad(t) => ("BAD", t),
        other => return other.to_string(),
    };
    let Some(start) = t.find("info: Some(\"") else {
        return format!("{kind} {t}");
    };
    let quoted = &t[start + "info: Some(\"".len()..];
    let quoted = quoted.strip_suffix("\")").unwrap_or(quoted);
    let mut text = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                text.push(n);
            }
        } else {
            text.push(c);
        }
    }
    format!("{kind} {text}")
}

pub fn excerpt(text: &str, max: usize) -> String {
    let text = match text.split_once(" during parsing of ") {
        Some((_, input)) => {
            return format!(
                "cannot parse the server's response: {}",
                excerpt(input, max)
            );
        }
        None => text,
    };
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push_str(&format!("... ({} bytes in all)", text.len()));
            break;
        }
        out.push(if c.is_control() { '.' } else { c });
    }
    out
}

/// An I/O error as the sync reports it: short and printable.
pub fn io_error(e: impl std::fmt::Display) -> ImapError {
    ImapError::Io(excerpt(&e.to_string(), 200))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// `imaps://`: TLS from the first byte (RFC 8314 3.3).
    Implicit,
    /// `imap://`: STARTTLS when the server offers it (RFC 3501 6.2.1).
    StartTls,
}

/// Where a server is and how to log in to it. Secrets stay out of Debug.
#[derive(Clone)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub tls_insecure: bool,
    pub master: Option<(String, String)>,
    pub namespace_prefix: Option<String>,
    pub limits: Arc<ServerLimits>,
    pub command_timeout: Duration,
    /// Bytes one response may hold: the largest message plus a margin.
    pub max_response: u64,
    pub auth: Auth,
}

/// How to authenticate (sync.source.auth / sync.target.auth).
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// LOGIN (RFC 3501 6.2.3).
    #[default]
    Login,
    /// AUTHENTICATE PLAIN (RFC 4616); with a master user, as its authcid.
    Plain,
    /// AUTHENTICATE XOAUTH2 with an OAuth 2.0 access token.
    XOAuth2(Arc<crate::oauth::TokenSource>),
    /// AUTHENTICATE OAUTHBEARER (RFC 7628).
    OAuthBearer(Arc<crate::oauth::TokenSource>),
}

/// Room for a FETCH response's other items around the largest message.
pub const RESPONSE_MARGIN: u64 = 1 << 20;

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Server {
    pub fn from_url(url: &str) -> Result<Server, ImapError> {
        let (security, rest, default_port) = if let Some(r) = url.strip_prefix("imaps://") {
            (Security::Implicit, r, 993)
        } else if let Some(r) = url.strip_prefix("imap://") {
            (Security::StartTls, r, 143)
        } else {
            return Err(ImapError::Config(format!(
                "`{url}` is not an imap:// or imaps:// URL"
            )));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse()
                    .map_err(|_| ImapError::Config(format!("`{url}`: bad port")))?,
            ),
            _ => (rest.to_string(), default_port),
        };
        Ok(Server {
            host,
            port,
            security,
            tls_insecure: false,
            master: None,
            namespace_prefix: None,
            limits: Arc::new(ServerLimits::new(8, None)),
            command_timeout: Duration::from_secs(300),
            max_response: 150_000_000 + RESPONSE_MARGIN,
            auth: Auth::Login,
        })
    }
}

/// Credentials for one mailbox on one server.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (password hidden)", self.user)
    }
}

pub struct Conn {
    pub session: Session<MailStream>,
    caps: HashSet<String>,
    pub server: Server,
    pub bandwidth: Option<Arc<Bandwidth>>,
    _slot: ConnectionSlot,
}

async fn tls(server: &Server, tcp: TcpStream) -> Result<MailStream, ImapError> {
    let name = rustls::pki_types::ServerName::try_from(server.host.clone()).map_err(|_| {
        ImapError::Config(format!("`{}` is not a valid TLS server name", server.host))
    })?;
    let stream = tokio_rustls::TlsConnector::from(godwit_tls::client_config(server.tls_insecure))
        .connect(name, tcp)
        .await
        .map_err(|e| ImapError::Connect {
            server: format!("{server:?}"),
            message: format!("TLS: {e}"),
        })?;
    Ok(MailStream::new(Io::Tls(Box::new(stream)), server))
}

/// Throttling answers seen from Exchange Online, Gmail, Dovecot and Courier.
pub fn is_throttling(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    [
        "too many connections",
        "[throttled]",
        "request is throttled",
        "try again later",
        "[unavailable]",
        "rate limit",
        "too many simultaneous",
        "maximum number of connections",
    ]
    .iter()
    .any(|p| t.contains(p))
}

impl Conn {
    /// Connects and logs in. Waits for a slot under the server's connection cap
    /// first, so the cap holds across all accounts.
    pub async fn open(server: &Server, login: &Login) -> Result<Conn, ImapError> {
        let slot = server.limits.connection_slot().await;
        Self::open_in(server, login, slot).await
    }

    /// Like `open`, but only when the server's cap has a free slot right now.
    pub async fn try_open(server: &Server, login: &Login) -> Option<Result<Conn, ImapError>> {
        let slot = server.limits.try_connection_slot().await?;
        Some(Self::open_in(server, login, slot).await)
    }

    async fn open_in(
        server: &Server,
        login: &Login,
        permit: ConnectionSlot,
    ) -> Result<Conn, ImapError> {
        let err = |message: String| ImapError::Connect {
            server: format!("{server:?}"),
            message,
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(30),
            TcpStream::connect((server.host.as_str(), server.port)),
        )
        .await
        .map_err(|_| err("connect timed out".into()))?
        .map_err(|e| err(excerpt(&e.to_string(), 200)))?;
        let _ = tcp.set_nodelay(true);
        let stream = match server.security {
            Security::Implicit => tls(server, tcp).await?,
            Security::StartTls => MailStream::plain(tcp, server),
        };
        let mut client = async_imap::Client::new(stream);
        let greeting = client
            .read_response()
            .await
            .map_err(|e| err(excerpt(&e.to_string(), 200)))?;
        // RFC 3501 7.1: the greeting may carry the capabilities; most servers send them.
        let mut starttls = false;
        let mut greeting_caps = false;
        if let Some(g) = &greeting {
            match g.parsed() {
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    let text = outcome.information.as_deref().unwrap_or("").to_string();
                    return Err(if is_throttling(&text) {
                        ImapError::Throttled(text)
                    } else {
                        err(format!("BYE {text}"))
                    });
                }
                Response::Data { outcome, .. } => {
                    if let Some(ResponseCode::Capabilities(c)) = &outcome.code {
                        greeting_caps = true;
                        starttls = c.iter().any(|c| matches!(c, async_imap::imap_proto::Capability::Atom(a) if a.eq_ignore_ascii_case("STARTTLS")));
                    }
                }
                _ => {}
            }
        }
        if server.security == Security::StartTls && !greeting_caps {
            // Ask (RFC 3501 6.1.1), so that a password never goes out in clear
            // text to a server that offers STARTTLS without announcing it. A
            // private tag: async-imap's own counter never produces it.
            let io = |e: std::io::Error| err(excerpt(&e.to_string(), 200));
            client
                .get_mut()
                .write_all(b"gw0 CAPABILITY\r\n")
                .await
                .map_err(io)?;
            client.get_mut().flush().await.map_err(io)?;
            loop {
                let r = client
                    .read_response()
                    .await
                    .map_err(io)?
                    .ok_or_else(|| err("connection closed".into()))?;
                match r.parsed() {
                    Response::Capabilities(c) => {
                        starttls = c.iter().any(|c| {
                            matches!(c, async_imap::imap_proto::Capability::Atom(a) if a.eq_ignore_ascii_case("STARTTLS"))
                        });
                    }
                    Response::Done { tag, .. } if tag.0 == "gw0" => break,
                    _ => {}
                }
            }
        }
        if server.security == Security::StartTls && starttls {
            client
                .run_command_and_check_ok("STARTTLS", None)
                .await
                .map_err(|e| err(format!("STARTTLS: {e}")))?;
            let Io::Plain(tcp) = client.into_inner().io else {
                unreachable!("plain before STARTTLS")
            };
            client = async_imap::Client::new(tls(server, tcp).await?);
        }
        let refused = |text: String| {
            let text = excerpt(&text, 300);
            if is_throttling(&text) {
                ImapError::Throttled(text)
            } else {
                ImapError::Login {
                    server: format!("{server:?}"),
                    user: login.user.clone(),
                    message: text,
                }
            }
        };
        let mut session = match &server.auth {
            Auth::Login => {
                // Dovecot-style master login: "user*master" with the master's password.
                let (user, password) = match &server.master {
                    Some((master, master_password)) => (
                        format!("{}*{}", login.user, master),
                        master_password.as_str(),
                    ),
                    None => (login.user.clone(), login.password.as_str()),
                };
                client
                    .login(&user, password)
                    .await
                    .map_err(|(e, _)| refused(server_text(&e)))?
            }
            Auth::Plain => {
                // RFC 4616 2: authzid NUL authcid NUL passwd; a master user
                // authenticates as itself and acts as the mailbox's user.
                let msg = match &server.master {
                    Some((master, pw)) => format!("{}\0{master}\0{pw}", login.user),
                    None => format!("\0{}\0{}", login.user, login.password),
                };
                client
                    .authenticate("PLAIN", crate::oauth::Plain(Some(msg.into_bytes())))
                    .await
                    .map_err(|(e, _)| refused(server_text(&e)))?
            }
            Auth::XOAuth2(source) | Auth::OAuthBearer(source) => {
                let token = source.token(&login.user).await?;
                let (mech, bearer) = match &server.auth {
                    Auth::XOAuth2(_) => (
                        "XOAUTH2",
                        crate::oauth::Bearer::xoauth2(&login.user, &token),
                    ),
                    _ => (
                        "OAUTHBEARER",
                        crate::oauth::Bearer::oauthbearer(
                            &login.user,
                            &token,
                            &server.host,
                            server.port,
                        ),
                    ),
                };
                let challenge = bearer.challenge.clone();
                client.authenticate(mech, bearer).await.map_err(|(e, _)| {
                    // The server's own words: its NO text, and the JSON
                    // status it sent (RFC 7628 3.2.2), for consent and
                    // scope problems.
                    let mut text = e.to_string();
                    if let Some(c) = challenge.lock().unwrap().take() {
                        text.push_str(&format!(" ({mech} status: {c})"));
                    }
                    refused(text)
                })?
            }
        };
        let mut caps = HashSet::new();
        let c = session
            .capabilities()
            .await
            .map_err(|e| err(excerpt(&e.to_string(), 200)))?;
        for cap in c.iter() {
            if let async_imap::types::Capability::Atom(a) = cap {
                caps.insert(a.to_ascii_uppercase());
            }
        }
        let bandwidth = server.limits.bandwidth.clone();
        let mut conn = Conn {
            session,
            caps,
            server: server.clone(),
            bandwidth,
            _slot: permit,
        };
        conn.drain_unsolicited();
        Ok(conn)
    }

    pub fn has(&self, cap: &str) -> bool {
        self.caps.contains(cap)
    }

    /// RFC 7889: the largest message the server accepts, when it says.
    pub fn append_limit(&self) -> Option<u64> {
        self.caps
            .iter()
            .find_map(|c| c.strip_prefix("APPENDLIMIT=").and_then(|n| n.parse().ok()))
    }

    /// async-imap queues unsolicited responses in a bounded channel; drop them so
    /// it never fills.
    pub fn drain_unsolicited(&mut self) {
        while self.session.unsolicited_responses.try_recv().is_ok() {}
    }

    /// Appends messages so that a batch costs one round trip (see `append_send`),
    /// and returns per message the target UID from APPENDUID (RFC 4315 3),
    /// or the server's refusal text.
    pub async fn append_batch(
        &mut self,
        mailbox_wire: &str,
        messages: &[AppendItem<'_>],
    ) -> Result<Vec<AppendOutcome>, ImapError> {
        let sent = self.append_send(mailbox_wire, messages).await?;
        self.append_collect(sent, messages).await
    }

    /// Sends a batch's APPENDs without waiting for their answers, so the
    /// caller can fetch the next batch meanwhile; `append_collect` reads the
    /// answers. How, `append_mode` decides: one MULTIAPPEND (RFC 3502) for
    /// the batch, one APPEND per message with LITERAL+ (RFC 7888), or, with
    /// neither, each literal waiting for its continuation (RFC 3501 7.5) and
    /// its answer read at once.
    pub async fn append_send(
        &mut self,
        mailbox_wire: &str,
        messages: &[AppendItem<'_>],
    ) -> Result<Sent, ImapError> {
        match append_mode(
            self.has("MULTIAPPEND"),
            self.has("LITERAL+"),
            messages.len(),
        ) {
            AppendMode::Multi => self.multiappend_send(mailbox_wire, messages).await,
            mode => Ok(Sent(Flight::Each(
                self.append_each(mailbox_wire, messages, mode == AppendMode::Pipelined)
                    .await?,
            ))),
        }
    }

    async fn append_each(
        &mut self,
        mailbox_wire: &str,
        messages: &[AppendItem<'_>],
        pipelined: bool,
    ) -> Result<Vec<Each>, ImapError> {
        let mut out = Vec::with_capacity(messages.len());
        let io = |e: std::io::Error| io_error(e);
        for m in messages {
            let tag = self
                .append_begin(
                    mailbox_wire,
                    &m.flags,
                    m.internal_date.as_deref(),
                    m.body.len() as u32,
                )
                .await?;
            let stream = self.session.get_mut();
            stream.write_all(m.body).await.map_err(io)?;
            stream.write_all(b"\r\n").await.map_err(io)?;
            if pipelined {
                out.push(Each::Pending(tag));
            } else {
                stream.flush().await.map_err(io)?;
                out.push(Each::Done(self.read_done(&tag).await?));
            }
        }
        self.session.get_mut().flush().await.map_err(io)?;
        Ok(out)
    }

    /// RFC 3502 3: `APPEND mailbox (flags) date {n+}` then, after each
    /// literal, the next message's ` (flags) date {n+}`, and CRLF after the
    /// last. The server commits the batch as one transaction (Dovecot: one
    /// index update and one fsync pass instead of one per message). A refusal
    /// covers all of them: the caller keeps the messages until
    /// `append_collect`, which is given them again (no copy is kept here, so
    /// a batch is in memory once).
    async fn multiappend_send(
        &mut self,
        mailbox_wire: &str,
        messages: &[AppendItem<'_>],
    ) -> Result<Sent, ImapError> {
        let io = |e: std::io::Error| io_error(e);
        let mut tag = None;
        // The socket is unbuffered with TCP_NODELAY: small messages and their
        // parts are gathered into one write of up to WRITE_CHUNK bytes, not
        // three segments per message.
        const WRITE_CHUNK: usize = 256 << 10;
        let mut out: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
        for m in messages {
            let part = append_part(&m.flags, m.internal_date.as_deref(), m.body.len(), true);
            match tag {
                None => {
                    let cmd = format!("APPEND {} {part}", quote(mailbox_wire));
                    tag = Some(self.session.run_command(&cmd).await?);
                }
                Some(_) => {
                    out.push(b' ');
                    out.extend_from_slice(part.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
            if out.len() + m.body.len() > WRITE_CHUNK {
                let stream = self.session.get_mut();
                stream.write_all(&out).await.map_err(io)?;
                out.clear();
                stream.write_all(m.body).await.map_err(io)?;
            } else {
                out.extend_from_slice(m.body);
            }
        }
        out.extend_from_slice(b"\r\n");
        let stream = self.session.get_mut();
        stream.write_all(&out).await.map_err(io)?;
        stream.flush().await.map_err(io)?;
        Ok(Sent(Flight::Multi {
            tag: tag.ok_or_else(|| ImapError::Io("MULTIAPPEND of no message".into()))?,
            mailbox: mailbox_wire.to_string(),
            count: messages.len(),
        }))
    }

    /// The answers to `append_send`, one per message, in order; `messages`
    /// are the ones `append_send` was given. A refused MULTIAPPEND appended
    /// nothing (RFC 3502 6.3.11), so its messages are sent again one APPEND
    /// each: each then gets its own answer, and only the message the server
    /// will not take is reported refused.
    pub async fn append_collect(
        &mut self,
        sent: Sent,
        messages: &[AppendItem<'_>],
    ) -> Result<Vec<AppendOutcome>, ImapError> {
        let out = match sent.0 {
            Flight::Each(each) => self.collect_each(each).await?,
            Flight::Multi {
                tag,
                mailbox,
                count,
            } => {
                let answer = self.read_answer(&tag, count).await?;
                match multi_outcomes(answer, count) {
                    Some(out) => out,
                    None if messages.len() != count => {
                        return Err(ImapError::Io(format!(
                            "MULTIAPPEND of {count} refused; {} given to retry",
                            messages.len()
                        )));
                    }
                    None => {
                        tracing::debug!(mailbox, "MULTIAPPEND refused; appending one by one");
                        let pipelined = self.has("LITERAL+");
                        let each = self.append_each(&mailbox, messages, pipelined).await?;
                        self.collect_each(each).await?
                    }
                }
            }
        };
        self.drain_unsolicited();
        Ok(out)
    }

    async fn collect_each(&mut self, each: Vec<Each>) -> Result<Vec<AppendOutcome>, ImapError> {
        let mut out = Vec::with_capacity(each.len());
        for s in each {
            out.push(match s {
                Each::Pending(tag) => self.read_done(&tag).await?,
                Each::Done(r) => r,
            });
        }
        Ok(out)
    }

    /// Starts an APPEND whose literal is then written in slices with
    /// `write_literal` and closed by `append_end` (RFC 3501 6.3.11, RFC 7888).
    pub async fn append_begin(
        &mut self,
        mailbox_wire: &str,
        flags: &[String],
        internal_date: Option<&str>,
        size: u32,
    ) -> Result<async_imap::imap_proto::RequestId, ImapError> {
        let literal_plus = self.has("LITERAL+");
        let cmd = format!(
            "APPEND {} {}",
            quote(mailbox_wire),
            append_part(flags, internal_date, size as usize, literal_plus)
        );
        let tag = self.session.run_command(&cmd).await?;
        if !literal_plus {
            loop {
                let r = self
                    .session
                    .read_response()
                    .await
                    .map_err(io_error)?
                    .ok_or(ImapError::ConnectionLost)?;
                match r.parsed() {
                    Response::Continue { .. } => break,
                    Response::Done {
                        status, outcome, ..
                    } => {
                        return Err(ImapError::Command {
                            command: "APPEND".into(),
                            message: format!(
                                "{status:?} {}",
                                outcome.information.as_deref().unwrap_or("")
                            ),
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(tag)
    }

    pub async fn write_literal(&mut self, data: &[u8]) -> Result<(), ImapError> {
        self.session
            .get_mut()
            .write_all(data)
            .await
            .map_err(io_error)
    }

    pub async fn append_end(
        &mut self,
        tag: &async_imap::imap_proto::RequestId,
    ) -> Result<Result<Option<(u32, u32)>, String>, ImapError> {
        let stream = self.session.get_mut();
        stream.write_all(b"\r\n").await.map_err(io_error)?;
        stream.flush().await.map_err(io_error)?;
        let r = self.read_done(tag).await;
        self.drain_unsolicited();
        r
    }

    async fn read_done(
        &mut self,
        tag: &async_imap::imap_proto::RequestId,
    ) -> Result<AppendOutcome, ImapError> {
        Ok(self
            .read_answer(tag, 1)
            .await?
            .map(|a| a.and_then(|(v, uids)| uids.first().map(|u| (v, *u)))))
    }

    /// The tagged answer to an APPEND: APPENDUID's UIDVALIDITY and up to
    /// `max_uids` UIDs (a uid-set after MULTIAPPEND, RFC 4315 3), or the
    /// refusal text.
    async fn read_answer(
        &mut self,
        tag: &async_imap::imap_proto::RequestId,
        max_uids: usize,
    ) -> Result<Result<Option<(u32, Vec<u32>)>, String>, ImapError> {
        loop {
            let r = tokio::time::timeout(self.server.command_timeout, self.session.read_response())
                .await
                .map_err(|_| ImapError::Io("timed out waiting for the server".into()))?
                .map_err(io_error)?
                .ok_or(ImapError::ConnectionLost)?;
            match r.parsed() {
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if t == tag => {
                    let text = outcome.information.as_deref().unwrap_or("").to_string();
                    return match status {
                        Status::Ok => Ok(Ok(match &outcome.code {
                            Some(ResponseCode::AppendUid(validity, uids)) => {
                                Some((*validity, expand_uids(uids, max_uids)))
                            }
                            _ => None,
                        })),
                        _ if is_throttling(&text) => Err(ImapError::Throttled(text)),
                        Status::Bye => Err(ImapError::ConnectionLost),
                        _ => Ok(Err(format!("{status:?} {text}"))),
                    };
                }
                Response::Data {
                    status: Status::Bye,
                    outcome,
                } => {
                    let text = outcome.information.as_deref().unwrap_or("").to_string();
                    return Err(if is_throttling(&text) {
                        ImapError::Throttled(text)
                    } else {
                        ImapError::ConnectionLost
                    });
                }
                _ => {}
            }
        }
    }

    /// STATUS (RFC 3501 6.3.10, HIGHESTMODSEQ from RFC 7162 3.1.3) for many
    /// folders in one round trip: all commands are sent, then the replies read
    /// in order (a server answers pipelined commands in sequence, RFC 3501 5.5).
    /// async-imap's own `status` also drops the answer when the name needed
    /// quoting escapes, so the reply is matched by position, not by spelling.
    pub async fn status_many(
        &mut self,
        mailboxes_wire: &[String],
        items: &str,
    ) -> Result<Vec<Result<FolderStatus, String>>, ImapError> {
        use async_imap::imap_proto::{MailboxDatum, StatusAttribute};
        let mut tags = Vec::with_capacity(mailboxes_wire.len());
        for m in mailboxes_wire {
            tags.push(
                self.session
                    .run_command(format!("STATUS {} {items}", quote(m)))
                    .await?,
            );
        }
        let mut out = Vec::with_capacity(tags.len());
        let mut st = FolderStatus::default();
        while out.len() < tags.len() {
            let r = tokio::time::timeout(self.server.command_timeout, self.session.read_response())
                .await
                .map_err(|_| ImapError::Io("timed out waiting for STATUS".into()))?
                .map_err(io_error)?
                .ok_or(ImapError::ConnectionLost)?;
            match r.parsed() {
                Response::MailboxData(MailboxDatum::Status { status, .. }) => {
                    for a in status {
                        match a {
                            StatusAttribute::Messages(n) => st.messages = *n,
                            StatusAttribute::UidNext(n) => st.uid_next = *n,
                            StatusAttribute::UidValidity(n) => st.uid_validity = *n,
                            StatusAttribute::HighestModSeq(n) => st.highest_modseq = *n,
                            _ => {}
                        }
                    }
                }
                Response::Done {
                    tag,
                    status,
                    outcome,
                } if *tag == tags[out.len()] => {
                    let text = outcome.information.as_deref().unwrap_or("").to_string();
                    out.push(match status {
                        Status::Ok => Ok(std::mem::take(&mut st)),
                        _ if is_throttling(&text) => return Err(ImapError::Throttled(text)),
                        _ => Err(text),
                    });
                    st = FolderStatus::default();
                }
                Response::Data {
                    status: Status::Bye,
                    ..
                } => return Err(ImapError::ConnectionLost),
                _ => {}
            }
        }
        self.drain_unsolicited();
        Ok(out)
    }

    /// `RIGHTS=` from the capabilities (RFC 4314 2.1).
    pub fn rights_capability(&self) -> Option<String> {
        self.caps
            .iter()
            .find_map(|c| c.strip_prefix("RIGHTS=").map(|r| r.to_ascii_lowercase()))
    }

    /// GETACL (RFC 4314 3.3): the folder's entries, identifier → rights.
    pub async fn get_acl(&mut self, mailbox_wire: &str) -> Result<crate::acl::Acl, ImapError> {
        let tag = self
            .session
            .run_command(format!("GETACL {}", quote(mailbox_wire)))
            .await?;
        let mut out = crate::acl::Acl::new();
        loop {
            let r = self
                .session
                .read_response()
                .await
                .map_err(io_error)?
                .ok_or(ImapError::ConnectionLost)?;
            match r.parsed() {
                Response::Acl(acl) => {
                    for e in &acl.acls {
                        let rights: String = e.rights.iter().map(|r| char::from(*r)).collect();
                        out.insert(e.identifier.to_string(), rights);
                    }
                }
                Response::Done {
                    tag: t,
                    status,
                    outcome,
                } if *t == tag => {
                    let text = outcome.information.as_deref().unwrap_or("");
                    return match status {
                        Status::Ok => Ok(out),
                        _ => Err(ImapError::Command {
                            command: format!("GETACL {mailbox_wire}"),
                            message: excerpt(text, 200),
                        }),
                    };
                }
                Response::Data {
                    status: Status::Bye,
                    ..
                } => return Err(ImapError::ConnectionLost),
                _ => {}
            }
        }
    }

    /// SETACL (RFC 4314 3.1), replacing the identifier's rights.
    pub async fn set_acl(
        &mut self,
        mailbox_wire: &str,
        identifier: &str,
        rights: &str,
    ) -> Result<(), ImapError> {
        self.session
            .run_command_and_check_ok(&format!(
                "SETACL {} {} {}",
                quote(mailbox_wire),
                quote(identifier),
                quote(rights)
            ))
            .await
            .map_err(|e| ImapError::Command {
                command: format!("SETACL {mailbox_wire} {identifier}"),
                message: excerpt(&e.to_string(), 200),
            })
    }

    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.logout()).await;
    }
}

/// An APPEND's answer: the target (UIDVALIDITY, UID) when the server sent
/// APPENDUID, or its refusal text.
pub type AppendOutcome = Result<Option<(u32, u32)>, String>;

/// A batch's APPENDs, sent and not yet all answered (`Conn::append_send`).
pub struct Sent(Flight);

enum Flight {
    Each(Vec<Each>),
    Multi {
        tag: async_imap::imap_proto::RequestId,
        mailbox: String,
        count: usize,
    },
}

/// One message's APPEND: pending (LITERAL+), or answered already.
enum Each {
    Pending(async_imap::imap_proto::RequestId),
    Done(AppendOutcome),
}

/// How a batch of APPENDs goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendMode {
    /// One MULTIAPPEND command (RFC 3502) with LITERAL+ literals (RFC 7888).
    Multi,
    /// One APPEND per message, all sent before any answer is read (LITERAL+).
    Pipelined,
    /// One APPEND per message, each literal after its continuation.
    Synchronous,
}

/// MULTIAPPEND only with LITERAL+: without it every literal of the one
/// command waits for a continuation, which saves nothing over single
/// APPENDs. A batch of one is a plain APPEND.
pub fn append_mode(multiappend: bool, literal_plus: bool, messages: usize) -> AppendMode {
    match (multiappend, literal_plus) {
        (true, true) if messages > 1 => AppendMode::Multi,
        (_, true) => AppendMode::Pipelined,
        (_, false) => AppendMode::Synchronous,
    }
}

/// One message's part of an APPEND (RFC 3501 6.3.11): `(flags) "date" {n}`,
/// `{n+}` with LITERAL+.
fn append_part(flags: &[String], internal_date: Option<&str>, size: usize, plus: bool) -> String {
    let date = internal_date
        .map(|d| format!(" \"{d}\""))
        .unwrap_or_default();
    let plus = if plus { "+" } else { "" };
    format!("({}){date} {{{size}{plus}}}", flags.join(" "))
}

/// APPENDUID's uid-set as UIDs, in order, at most `max` of them (a hostile
/// range must not allocate without bound).
fn expand_uids(set: &[UidSetMember], max: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for m in set {
        let (a, b) = match m {
            UidSetMember::Uid(u) => (*u, *u),
            UidSetMember::UidRange(r) => (*r.start(), *r.end()),
        };
        for u in a..=b {
            if out.len() > max {
                return out;
            }
            out.push(u);
        }
    }
    out
}

/// Each message's outcome from a MULTIAPPEND's answer, or None when the
/// server refused it, so nothing was appended (RFC 3502 6.3.11). The UIDs of
/// APPENDUID follow the messages' order (RFC 4315 3); a set of another size
/// names no message for sure, and each is then recorded without its UID, as
/// with a server without UIDPLUS.
pub fn multi_outcomes(
    answer: Result<Option<(u32, Vec<u32>)>, String>,
    messages: usize,
) -> Option<Vec<AppendOutcome>> {
    match answer {
        Err(_) => None,
        Ok(Some((validity, uids))) if uids.len() == messages => {
            Some(uids.into_iter().map(|u| Ok(Some((validity, u)))).collect())
        }
        Ok(_) => Some(vec![Ok(None); messages]),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FolderStatus {
    pub messages: u32,
    pub uid_next: u32,
    pub uid_validity: u32,
    pub highest_modseq: u64,
}

pub struct AppendItem<'a> {
    pub flags: Vec<String>,
    /// RFC 3501 9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz".
    pub internal_date: Option<String>,
    pub body: &'a [u8],
}

/// An IMAP quoted string (RFC 3501 4.3).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_modes() {
        use AppendMode::*;
        // (MULTIAPPEND, LITERAL+, messages) -> mode
        for (multi, plus, n, want) in [
            (true, true, 2, Multi),
            (true, true, 64, Multi),
            (true, true, 1, Pipelined),
            (false, true, 5, Pipelined),
            (true, false, 5, Synchronous),
            (false, false, 5, Synchronous),
        ] {
            assert_eq!(append_mode(multi, plus, n), want, "{multi} {plus} {n}");
        }
    }

    #[test]
    fn multiappend_answers() {
        assert_eq!(
            multi_outcomes(Ok(Some((7, vec![4, 5, 6]))), 3),
            Some(vec![Ok(Some((7, 4))), Ok(Some((7, 5))), Ok(Some((7, 6)))])
        );
        // A uid-set of another size names no message for sure.
        assert_eq!(
            multi_outcomes(Ok(Some((7, vec![4, 5]))), 3),
            Some(vec![Ok(None); 3])
        );
        assert_eq!(multi_outcomes(Ok(None), 2), Some(vec![Ok(None); 2]));
        // Refused: nothing was appended (RFC 3502), each is sent again.
        assert_eq!(multi_outcomes(Err("NO [LIMIT]".into()), 2), None);
        let set = [
            UidSetMember::Uid(3),
            UidSetMember::UidRange(5..=7),
            UidSetMember::UidRange(9..=u32::MAX),
        ];
        assert_eq!(expand_uids(&set[..2], 10), vec![3, 5, 6, 7]);
        assert_eq!(
            expand_uids(&set, 5).len(),
            6,
            "a hostile range stops past max"
        );
        assert_eq!(
            append_part(
                &["\\Seen".into()],
                Some("01-Jan-2020 00:00:00 +0000"),
                12,
                true
            ),
            "(\\Seen) \"01-Jan-2020 00:00:00 +0000\" {12+}"
        );
        assert_eq!(append_part(&[], None, 3, false), "() {3}");
    }

    #[test]
    fn throttling_answers_are_recognised() {
        for t in [
            "[THROTTLED] Request is throttled. Suggested Backoff Time: 1000 milliseconds",
            "Too many connections from this IP",
            "Maximum number of connections from user+IP exceeded (mail_max_userip_connections=2)",
            "[UNAVAILABLE] Try again later",
        ] {
            assert!(is_throttling(t), "{t}");
        }
        for t in [
            "Mailbox doesn't exist: Foo",
            "[LIMIT] Mail size is too large",
            "Quota exceeded",
        ] {
            assert!(!is_throttling(t), "{t}");
        }
        let e: ImapError = async_imap::error::Error::No("[THROTTLED] slow down".into()).into();
        assert!(matches!(e, ImapError::Throttled(_)) && e.is_transient());
        let e: ImapError = async_imap::error::Error::No("Mailbox doesn't exist".into()).into();
        assert!(!e.is_transient());
    }

    #[test]
    fn urls_and_secrets() {
        let s = Server::from_url("imaps://mail.example.com").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.security),
            ("mail.example.com", 993, Security::Implicit)
        );
        let s = Server::from_url("imap://127.0.0.1:1143/").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.security),
            ("127.0.0.1", 1143, Security::StartTls)
        );
        assert!(Server::from_url("http://x").is_err());
        let mut s = Server::from_url("imap://h").unwrap();
        s.master = Some(("admin".into(), "hunter2".into()));
        let l = Login {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{s:?}{l:?}").contains("hunter2"));
        assert_eq!(quote(r#"Tom &- "Jerry" \ x"#), r#""Tom &- \"Jerry\" \\ x""#);
    }

    /// The framer follows lines and literals and refuses a response over its
    /// cap: announced (before a byte of it is read) or grown.
    #[test]
    fn framer_caps_each_response() {
        let ok: [&[u8]; 4] = [
            b"* 1 FETCH (UID 1 BODY[] {5}\r\nhello)\r\n",
            b"* 1 FETCH (UID 1 BODY[] {5+}\r\nhello)\r\n* 2 FETCH (UID 2 BODY[] {60}\r\n",
            b"* OK {not a literal}\r\n",
            b"a1 OK done\r\n",
        ];
        for bytes in ok {
            let mut f = Framer::new(100);
            f.feed(bytes).unwrap();
        }
        // Byte by byte, the same as in one piece.
        let mut f = Framer::new(100);
        for b in b"* 1 FETCH (BODY[] {5}\r\nhel" {
            f.feed(&[*b]).unwrap();
        }
        f.feed(b"lo)\r\n* 2 FETCH (BODY[] {60}\r\n").unwrap();
        let mut f = Framer::new(100);
        let e = f.feed(b"* 1 FETCH (BODY[] {2147483648}\r\n").unwrap_err();
        assert!(e.contains("literal of 2147483648 bytes"), "{e}");
        let mut f = Framer::new(100);
        let e = f
            .feed(b"* 1 FETCH (BODY[] {99999999999999999999999}\r\n")
            .unwrap_err();
        assert!(e.contains("literal of"), "{e}");
        // Two literals in one response add up.
        let mut f = Framer::new(100);
        f.feed(b"* 1 FETCH (A {60}\r\n").unwrap();
        f.feed(&[b'x'; 60]).unwrap();
        assert!(f.feed(b" B {60}\r\n").is_err());
        // A line without end grows past the cap.
        let mut f = Framer::new(100);
        assert!(f.feed(&[b'*'; 101]).is_err());
    }

    #[test]
    fn server_text_is_the_servers_own_words() {
        let e = async_imap::error::Error::No(
            "code: None, info: Some(\"[AUTHENTICATIONFAILED] Authentication \\\"failed\\\".\")"
                .into(),
        );
        assert_eq!(
            server_text(&e),
            "NO [AUTHENTICATIONFAILED] Authentication \"failed\"."
        );
        let e = async_imap::error::Error::Bad("outcome: Bad".into());
        assert_eq!(server_text(&e), "BAD outcome: Bad");
        assert_eq!(
            server_text(&async_imap::error::Error::ConnectionLost),
            "connection lost"
        );
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        let buf = format!("* 1 FETCH {}\u{1}\u{2}", "*".repeat(10_000));
        let nom = format!("Error {{ input: [42, 32], code: Tag }} during parsing of {buf:?}");
        let e = excerpt(&nom, 80);
        assert!(
            e.starts_with("cannot parse the server's response: \"* 1 FETCH"),
            "{e}"
        );
        assert!(e.len() < 200 && e.ends_with("bytes in all)"), "{e}");
        assert_eq!(excerpt("a\r\nb", 80), "a..b");
    }
}
