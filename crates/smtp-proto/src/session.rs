//! The server side of one SMTP session (RFC 5321 4.1, 4.3.2), as a state
//! machine: `push` wire bytes, then call `next` until it returns `None`.
//! Replies to pipelined commands come out in order (RFC 2920 3.1); the driver
//! flushes them when `next` has nothing more, which batches them naturally.

use crate::data::{DataDecoder, DataOutcome, NewlinePolicy};
use crate::envelope::{Envelope, MailParams, RcptParams};
use crate::reply::Reply;
use smtp_proto::{Error as ParseError, Request};
use std::borrow::Cow;

#[derive(Debug, Clone)]
pub struct Limits {
    pub hostname: String,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_command_line: usize,
    pub max_errors: usize,
    pub newline_policy: NewlinePolicy,
    pub max_received_headers: usize,
    /// STARTTLS is offered when a certificate is configured.
    pub tls_available: bool,
    /// SMTP AUTH (RFC 4954); `None` on the MX listener, which refuses AUTH.
    pub auth: Option<AuthRules>,
}

/// How a listener offers SMTP AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRules {
    /// Offer and accept AUTH without TLS (loopback tests only): otherwise a
    /// password never crosses the wire in clear (RFC 4954 4, 14).
    pub allow_plaintext: bool,
    /// MAIL needs a successful AUTH first (the submission port, RFC 6409 4.3).
    pub required: bool,
}

/// SASL mechanisms the session speaks (RFC 4616 PLAIN; LOGIN, the de facto
/// mechanism Outlook and older clients still use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// What a client presented in AUTH. Debug never shows the password, so an
/// Output can be logged whole without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub mechanism: Mechanism,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Decides whether a recipient is ours. Kept as a trait so the session stays
/// pure: the gateway answers from its configuration and in-memory route table.
pub trait RcptPolicy {
    /// `Ok(())` accepts; `Err(reply)` refuses with that reply.
    fn check_rcpt(&self, address: &str) -> Result<(), Reply>;

    /// MAIL FROM, after the session's own checks (the submission sender
    /// restriction). Default: any sender.
    fn check_mail(&self, _address: &str) -> Result<(), Reply> {
        Ok(())
    }

    /// A complete message before it is handed out (the header From of an
    /// authenticated sender). Default: any message.
    fn check_message(&self, _mail_from: &str, _message: &[u8]) -> Result<(), Reply> {
        Ok(())
    }
}

#[derive(Debug)]
pub enum Output {
    Reply(Reply),
    /// A complete message: the driver must make it durable, then answer with
    /// `Session::queued` (or refuse with `Session::refused`).
    Message {
        envelope: Envelope,
        message: Vec<u8>,
    },
    /// The 220 reply to STARTTLS was produced (and is the previous Output);
    /// the driver must discard any buffered input (RFC 3207 6: pipelined
    /// commands after STARTTLS are an injection attack) and upgrade.
    StartTls,
    /// AUTH presented credentials: the driver verifies them (I/O), then
    /// answers with `Session::authenticated` or `Session::auth_failed`;
    /// input waits until then.
    Authenticate(Credentials),
    /// Close after flushing (QUIT, too many errors, protocol violation).
    Close,
    /// A refusal the driver should log as an event (the reply already went out
    /// as its own Output).
    Refused {
        stage: &'static str,
        reply: Reply,
        /// What the client had said, for the log line Postfix writes
        /// (`NOQUEUE: reject: RCPT from ...; from=<> to=<> proto= helo=<>`).
        context: Refusal,
    },
}

/// The session's state when a command was refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusal {
    /// MAIL FROM of the open transaction, if any.
    pub mail_from: Option<String>,
    /// The recipient a refused RCPT named.
    pub rcpt: Option<String>,
    pub helo: Option<String>,
    /// "ESMTP" after EHLO, "SMTP" after HELO.
    pub proto: Option<&'static str>,
}

#[derive(Debug)]
enum State {
    /// Before HELO/EHLO.
    Fresh,
    Ready,
    Data(DataDecoder),
    /// A message was handed to the driver; input waits until it answers.
    AwaitingQueue,
    /// AUTH PLAIN sent 334 and waits for the client's response line.
    AuthPlain,
    /// AUTH LOGIN waits for the user name, then for the password.
    AuthLoginUser,
    AuthLoginPassword(String),
    /// Credentials were handed to the driver; input waits until it answers.
    AwaitingAuth,
    Closed,
}

#[derive(Debug)]
pub struct Session {
    limits: Limits,
    state: State,
    input: Vec<u8>,
    helo: Option<String>,
    esmtp: bool,
    mail: Option<(String, MailParams)>,
    rcpts: Vec<(String, RcptParams)>,
    message: Vec<u8>,
    errors: usize,
    /// The address of the RCPT being decided, for a refusal's context.
    attempted_rcpt: Option<String>,
    pub client_ip: String,
    pub tls: bool,
    /// The user a successful AUTH named (RFC 4954 4: one per session).
    authenticated: Option<String>,
    pending: std::collections::VecDeque<Output>,
}

impl Session {
    pub fn new(limits: Limits, client_ip: impl Into<String>) -> Session {
        Session {
            limits,
            state: State::Fresh,
            input: Vec::new(),
            helo: None,
            esmtp: false,
            mail: None,
            rcpts: Vec::new(),
            message: Vec::new(),
            errors: 0,
            attempted_rcpt: None,
            client_ip: client_ip.into(),
            tls: false,
            authenticated: None,
            pending: Default::default(),
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::plain(220, format!("{} ESMTP godwit", self.limits.hostname))
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(_))
    }

    /// A MAIL FROM was accepted and its transaction is still open.
    pub fn in_transaction(&self) -> bool {
        self.mail.is_some()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Bytes received but not yet processed.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// Bytes of message content held for the transaction in DATA.
    pub fn data_held(&self) -> usize {
        self.message.capacity()
    }

    /// The DATA content held so far (decoded, CRLF-normalized).
    pub fn data(&self) -> &[u8] {
        &self.message
    }

    /// Moves the DATA content held past its first `keep` bytes to the end of
    /// `out`, so a driver can write a large message to disk as it arrives
    /// and hold only its head (the header section the checks at the end of
    /// DATA read: Received count, header From). The content handed out at
    /// the end is then the head followed by what arrived after the last
    /// spill. Outside DATA, or with no more than `keep` bytes held, nothing.
    pub fn spill_data(&mut self, keep: usize, out: &mut Vec<u8>) {
        if self.in_data() && self.message.len() > keep {
            out.extend_from_slice(&self.message[keep..]);
            self.message.truncate(keep);
        }
    }

    /// Drops the content held so far and discards the rest of this DATA:
    /// it ends with 452 4.3.1 (the server is short of memory; RFC 3463
    /// 4.3.1), and the client tries again later. Outside DATA, nothing.
    pub fn abandon_data(&mut self) {
        if let State::Data(decoder) = &mut self.state {
            decoder.abandon();
            self.message = Vec::new();
        }
    }

    /// After a TLS upgrade: forget everything learned in clear text (RFC 3207 4.2).
    pub fn tls_started(&mut self) {
        self.input.clear();
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.authenticated = None;
        self.reset_transaction();
        self.state = State::Fresh;
    }

    /// The authenticated user, if AUTH succeeded.
    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// The driver verified the credentials of `Output::Authenticate`.
    pub fn auth_succeeded(&mut self, user: &str) {
        self.authenticated = Some(user.to_string());
        self.state = State::Ready;
        self.emit(Reply::new(235, (2, 7, 0), "Authentication successful"));
    }

    /// The driver refused them (after its failure delay): 535 5.7.8 for bad
    /// credentials, or `reply` (454 4.7.0 when the check could not be made,
    /// RFC 4954 6). Counts towards `max_errors`.
    pub fn auth_failed(&mut self, reply: Option<Reply>) {
        self.state = State::Ready;
        let r = reply.unwrap_or_else(|| Reply::new(535, (5, 7, 8), "Error: authentication failed"));
        self.error("auth", r);
    }

    /// The driver made the message durable under `queue_id`.
    pub fn queued(&mut self, queue_id: &str) -> Reply {
        self.reset_transaction();
        self.state = State::Ready;
        Reply::new(250, (2, 0, 0), format!("Ok: queued as {queue_id}"))
    }

    /// The driver could not make the message durable: `reply` (4xx) goes out instead.
    pub fn refused(&mut self, reply: Reply) -> Reply {
        self.reset_transaction();
        self.state = State::Ready;
        reply
    }

    fn reset_transaction(&mut self) {
        self.mail = None;
        self.rcpts.clear();
        self.message = Vec::new();
    }

    fn emit(&mut self, r: Reply) {
        self.pending.push_back(Output::Reply(r));
    }

    /// A refused command: counts towards `max_errors`, which ends the session.
    fn error(&mut self, stage: &'static str, r: Reply) {
        self.errors += 1;
        self.pending.push_back(Output::Reply(r.clone()));
        let context = Refusal {
            mail_from: self.mail.as_ref().map(|(a, _)| a.clone()),
            rcpt: self.attempted_rcpt.take().filter(|_| stage == "rcpt"),
            helo: self.helo.clone(),
            proto: self
                .helo
                .is_some()
                .then_some(if self.esmtp { "ESMTP" } else { "SMTP" }),
        };
        self.pending.push_back(Output::Refused {
            stage,
            reply: r,
            context,
        });
        if self.errors >= self.limits.max_errors {
            self.emit(Reply::new(
                421,
                (4, 7, 0),
                format!("{} Error: too many errors", self.limits.hostname),
            ));
            self.close();
        }
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.input.clear();
        self.pending.push_back(Output::Close);
    }

    pub fn next(&mut self, policy: &dyn RcptPolicy) -> Option<Output> {
        loop {
            if let Some(o) = self.pending.pop_front() {
                return Some(o);
            }
            match &mut self.state {
                State::Closed | State::AwaitingQueue | State::AwaitingAuth => return None,
                State::AuthPlain | State::AuthLoginUser | State::AuthLoginPassword(_) => {
                    let Some(nl) = memchr::memchr(b'\n', &self.input) else {
                        if self.input.len() > self.limits.max_command_line {
                            self.input.clear();
                            self.state = State::Ready;
                            self.error(
                                "auth",
                                Reply::new(500, (5, 5, 6), "Error: authentication line too long"),
                            );
                            continue;
                        }
                        return None;
                    };
                    let line: Vec<u8> = self.input.drain(..=nl).collect();
                    self.auth_response(&line);
                }
                State::Data(decoder) => {
                    let consumed = decoder.feed(&self.input, &mut self.message);
                    self.input.drain(..consumed);
                    if !decoder.is_done() {
                        return None;
                    }
                    let outcome = decoder.outcome().unwrap_or(DataOutcome::Complete);
                    self.finish_data(outcome, policy);
                }
                State::Fresh | State::Ready => {
                    let Some(nl) = memchr::memchr(b'\n', &self.input) else {
                        if self.input.len() > self.limits.max_command_line {
                            // RFC 5321 4.5.3.1.4; drop the overlong line, keep the session.
                            self.input.clear();
                            self.error(
                                "command",
                                Reply::new(500, (5, 5, 6), "Error: command line too long"),
                            );
                            continue;
                        }
                        return None;
                    };
                    let line: Vec<u8> = self.input.drain(..=nl).collect();
                    if line.len() > self.limits.max_command_line {
                        self.error(
                            "command",
                            Reply::new(500, (5, 5, 6), "Error: command line too long"),
                        );
                        continue;
                    }
                    self.command(&line, policy);
                }
            }
        }
    }

    fn finish_data(&mut self, outcome: DataOutcome, policy: &dyn RcptPolicy) {
        let refuse = |s: &mut Self, stage, r: Reply| {
            s.reset_transaction();
            s.state = State::Ready;
            s.error(stage, r);
        };
        match outcome {
            DataOutcome::TooBig => refuse(
                self,
                "data",
                Reply::new(
                    552,
                    (5, 3, 4),
                    format!(
                        "Error: message exceeds the {} byte limit",
                        self.limits.max_message_size
                    ),
                ),
            ),
            DataOutcome::BareNewline => refuse(
                self,
                "data",
                Reply::new(
                    550,
                    (5, 5, 2),
                    "Error: bare <CR> or <LF> in message data (RFC 5321 2.3.8); lines must end in <CR><LF>",
                ),
            ),
            DataOutcome::Nul => refuse(
                self,
                "data",
                Reply::new(550, (5, 6, 0), "Error: NUL byte in message data"),
            ),
            DataOutcome::Abandoned => refuse(
                self,
                "data",
                Reply::new(
                    452,
                    (4, 3, 1),
                    "Error: insufficient system resources for this message now, try again later",
                ),
            ),
            DataOutcome::Complete => {
                let received = count_received(&self.message);
                if received > self.limits.max_received_headers {
                    // RFC 5321 6.3: refuse a looping message now rather than bounce it later.
                    let r = Reply::new(
                        554,
                        (5, 4, 6),
                        format!("Error: mail loop detected ({received} Received headers)"),
                    );
                    return refuse(self, "data", r);
                }
                if let Some((from, _)) = &self.mail
                    && let Err(r) = policy.check_message(from, &self.message)
                {
                    return refuse(self, "data", r);
                }
                let (mail_from, mail_params) = self.mail.take().unwrap_or_default();
                let envelope = Envelope {
                    mail_from,
                    mail_params,
                    rcpts: std::mem::take(&mut self.rcpts),
                    helo: self.helo.clone().unwrap_or_default(),
                    esmtp: self.esmtp,
                    client_ip: self.client_ip.clone(),
                    tls: self.tls,
                };
                let message = std::mem::take(&mut self.message);
                self.state = State::AwaitingQueue;
                self.pending
                    .push_back(Output::Message { envelope, message });
            }
        }
    }

    fn command(&mut self, line: &[u8], policy: &dyn RcptPolicy) {
        let mut iter = line.iter();
        let request = Request::parse(&mut iter);
        match request {
            Ok(req) => self.request(req, policy),
            Err(e) => {
                let r = parse_error_reply(&e);
                self.error("command", r);
            }
        }
    }

    fn request(&mut self, req: Request<Cow<'_, str>>, policy: &dyn RcptPolicy) {
        let host = self.limits.hostname.clone();
        let host = &host;
        match req {
            Request::Ehlo { host: client } => {
                self.helo = Some(client.into_owned());
                self.esmtp = true;
                self.reset_transaction();
                self.state = State::Ready;
                let mut caps = vec![
                    host.clone(),
                    "PIPELINING".into(),
                    format!("SIZE {}", self.limits.max_message_size),
                    "8BITMIME".into(),
                    "SMTPUTF8".into(),
                    "ENHANCEDSTATUSCODES".into(),
                    "DSN".into(),
                ];
                if self.limits.tls_available && !self.tls {
                    caps.push("STARTTLS".into());
                }
                // RFC 4954 4, RFC 6409 4.3: mechanisms that send a password
                // are offered only under TLS.
                if self
                    .limits
                    .auth
                    .is_some_and(|a| self.tls || a.allow_plaintext)
                {
                    caps.push("AUTH PLAIN LOGIN".into());
                }
                caps.push("VRFY".into());
                self.emit(Reply::plain(250, caps.join("\n")));
            }
            Request::Helo { host: client } => {
                self.helo = Some(client.into_owned());
                self.esmtp = false;
                self.reset_transaction();
                self.state = State::Ready;
                self.emit(Reply::plain(250, host.clone()));
            }
            Request::Lhlo { .. } => self.error(
                "command",
                Reply::new(500, (5, 5, 1), "Error: LHLO is for LMTP"),
            ),
            Request::Mail { from } => self.mail_from(from, policy),
            Request::Rcpt { to } => self.rcpt_to(to, policy),
            Request::Data => {
                if self.mail.is_none() {
                    self.error(
                        "data",
                        Reply::new(503, (5, 5, 1), "Error: need MAIL command"),
                    );
                } else if self.rcpts.is_empty() {
                    // RFC 5321 3.3: no valid recipients.
                    self.error(
                        "data",
                        Reply::new(554, (5, 5, 1), "Error: no valid recipients"),
                    );
                } else {
                    self.state = State::Data(DataDecoder::new(
                        self.limits.newline_policy,
                        self.limits.max_message_size,
                    ));
                    self.emit(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
                }
            }
            Request::Rset => {
                self.reset_transaction();
                self.emit(Reply::new(250, (2, 0, 0), "Ok"));
            }
            Request::Noop { .. } => self.emit(Reply::new(250, (2, 0, 0), "Ok")),
            Request::Quit => {
                self.emit(Reply::new(221, (2, 0, 0), "Bye"));
                self.close();
            }
            // RFC 5321 3.5.3: 252 when VRFY is disabled; never confirm mailboxes.
            Request::Vrfy { .. } => self.emit(Reply::new(
                252,
                (2, 5, 2),
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Request::Expn { .. } => self.error(
                "command",
                Reply::new(502, (5, 5, 1), "Error: EXPN is disabled"),
            ),
            Request::Help { .. } => self.emit(Reply::new(214, (2, 0, 0), "See RFC 5321")),
            Request::StartTls => {
                if !self.limits.tls_available {
                    self.error(
                        "command",
                        Reply::new(502, (5, 5, 1), "Error: STARTTLS not available"),
                    );
                } else if self.tls {
                    self.error(
                        "command",
                        Reply::new(503, (5, 5, 1), "Error: TLS already active"),
                    );
                } else if self.mail.is_some() {
                    self.error(
                        "command",
                        Reply::new(503, (5, 5, 1), "Error: STARTTLS during a transaction"),
                    );
                } else {
                    self.emit(Reply::new(220, (2, 0, 0), "Ready to start TLS"));
                    self.input.clear();
                    self.pending.push_back(Output::StartTls);
                }
            }
            Request::Bdat { .. } => self.error(
                "command",
                Reply::new(502, (5, 5, 1), "Error: BDAT is not supported"),
            ),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response),
            other => self.error(
                "command",
                Reply::new(
                    502,
                    (5, 5, 1),
                    format!("Error: {} is not implemented", other.name()),
                ),
            ),
        }
    }

    /// AUTH (RFC 4954 4): one success per session, never inside a
    /// transaction, and never in clear text unless configured.
    fn auth(&mut self, mechanism: u64, initial: &str) {
        let Some(rules) = self.limits.auth else {
            return self.error(
                "auth",
                Reply::new(
                    502,
                    (5, 5, 1),
                    "Error: AUTH is not offered on the MX gateway",
                ),
            );
        };
        if self.helo.is_none() || !self.esmtp {
            return self.error("auth", Reply::new(503, (5, 5, 1), "Error: send EHLO first"));
        }
        if self.authenticated.is_some() {
            return self.error(
                "auth",
                Reply::new(503, (5, 5, 1), "Error: already authenticated"),
            );
        }
        if self.mail.is_some() {
            return self.error(
                "auth",
                Reply::new(
                    503,
                    (5, 5, 1),
                    "Error: AUTH not permitted during a mail transaction",
                ),
            );
        }
        if !self.tls && !rules.allow_plaintext {
            // RFC 4954 4 and 6: 538 when the mechanism needs an encrypted channel.
            return self.error(
                "auth",
                Reply::new(
                    538,
                    (5, 7, 11),
                    "Error: encryption required for requested authentication mechanism",
                ),
            );
        }
        let mechanism = if mechanism == smtp_proto::AUTH_PLAIN {
            Mechanism::Plain
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            Mechanism::Login
        } else {
            return self.error(
                "auth",
                Reply::new(504, (5, 5, 4), "Error: unrecognized authentication type"),
            );
        };
        match (mechanism, initial) {
            // RFC 4954 4: an empty challenge is "334 " followed by nothing.
            (Mechanism::Plain, "") => {
                self.state = State::AuthPlain;
                self.emit(Reply::plain(334, ""));
            }
            (Mechanism::Plain, r) => self.plain_response(r),
            (Mechanism::Login, "") => {
                self.state = State::AuthLoginUser;
                self.emit(Reply::plain(334, "VXNlcm5hbWU6"));
            }
            // RFC 4954 4: an initial response carries the first answer (the user name).
            (Mechanism::Login, r) => self.login_user(r),
        }
    }

    fn auth_response(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']).trim();
        if text == "*" {
            // RFC 4954 4: the client cancelled the exchange.
            self.state = State::Ready;
            return self.error(
                "auth",
                Reply::new(501, (5, 7, 0), "Error: authentication cancelled"),
            );
        }
        match std::mem::replace(&mut self.state, State::Ready) {
            State::AuthPlain => self.plain_response(text),
            State::AuthLoginUser => self.login_user(text),
            State::AuthLoginPassword(user) => match decode_b64(text) {
                Some(password) => self.hand_out(Mechanism::Login, user, password),
                None => self.bad_b64(),
            },
            other => self.state = other,
        }
    }

    fn bad_b64(&mut self) {
        self.state = State::Ready;
        self.error(
            "auth",
            Reply::new(
                501,
                (5, 5, 2),
                "Error: invalid base64 data in authentication",
            ),
        );
    }

    fn login_user(&mut self, b64: &str) {
        match decode_b64(b64) {
            Some(user) if !user.is_empty() => {
                self.state = State::AuthLoginPassword(user);
                self.emit(Reply::plain(334, "UGFzc3dvcmQ6"));
            }
            _ => self.bad_b64(),
        }
    }

    /// RFC 4616 2: `[authzid] NUL authcid NUL passwd`. An authzid other than
    /// the user (acting for someone else) is refused like bad credentials.
    fn plain_response(&mut self, b64: &str) {
        let raw = if b64 == "=" {
            Some(Vec::new())
        } else {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).ok()
        };
        let Some(raw) = raw else {
            return self.bad_b64();
        };
        let mut parts = raw.split(|&b| b == 0);
        let fields = (parts.next(), parts.next(), parts.next(), parts.next());
        let (Some(authz), Some(user), Some(pass), None) = fields else {
            return self.bad_b64();
        };
        let (Ok(authz), Ok(user), Ok(pass)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(user),
            std::str::from_utf8(pass),
        ) else {
            return self.bad_b64();
        };
        if user.is_empty() {
            return self.bad_b64();
        }
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(user) {
            self.state = State::Ready;
            return self.error(
                "auth",
                Reply::new(
                    535,
                    (5, 7, 8),
                    "Error: authorization identity not permitted",
                ),
            );
        }
        self.hand_out(Mechanism::Plain, user.to_string(), pass.to_string());
    }

    fn hand_out(&mut self, mechanism: Mechanism, user: String, password: String) {
        self.state = State::AwaitingAuth;
        self.pending.push_back(Output::Authenticate(Credentials {
            mechanism,
            user,
            password,
        }));
    }

    fn mail_from(&mut self, from: smtp_proto::MailFrom<Cow<'_, str>>, policy: &dyn RcptPolicy) {
        if self.helo.is_none() {
            return self.error(
                "mail",
                Reply::new(503, (5, 5, 1), "Error: send HELO/EHLO first"),
            );
        }
        if self.limits.auth.is_some_and(|a| a.required) && self.authenticated.is_none() {
            // RFC 4954 6, RFC 6409 4.3.
            return self.error(
                "mail",
                Reply::new(530, (5, 7, 0), "Authentication required"),
            );
        }
        if self.mail.is_some() {
            return self.error(
                "mail",
                Reply::new(503, (5, 5, 1), "Error: nested MAIL command"),
            );
        }
        if from.size as u64 > self.limits.max_message_size {
            // RFC 1870 6.
            return self.error(
                "mail",
                Reply::new(
                    552,
                    (5, 3, 4),
                    format!(
                        "Error: message size exceeds the {} byte limit",
                        self.limits.max_message_size
                    ),
                ),
            );
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !from.address.is_ascii() {
            // RFC 6531 3.4.
            return self.error(
                "mail",
                Reply::new(553, (5, 6, 7), "Error: non-ASCII address requires SMTPUTF8"),
            );
        }
        let body = if from.flags & smtp_proto::MAIL_BODY_8BITMIME != 0 {
            Some("8BITMIME".to_string())
        } else if from.flags & smtp_proto::MAIL_BODY_7BIT != 0 {
            Some("7BIT".to_string())
        } else if from.flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.error(
                "mail",
                Reply::new(
                    555,
                    (5, 5, 4),
                    "Error: BODY=BINARYMIME needs CHUNKING, not offered",
                ),
            );
        } else {
            None
        };
        let ret = if from.flags & smtp_proto::MAIL_RET_FULL != 0 {
            Some("FULL".to_string())
        } else if from.flags & smtp_proto::MAIL_RET_HDRS != 0 {
            Some("HDRS".to_string())
        } else {
            None
        };
        let params = MailParams {
            body,
            smtputf8,
            ret,
            envid: from.env_id.map(Cow::into_owned),
        };
        if let Err(r) = policy.check_mail(&from.address) {
            return self.error("mail", r);
        }
        self.mail = Some((from.address.into_owned(), params));
        self.emit(Reply::new(250, (2, 1, 0), "Ok"));
    }

    fn rcpt_to(&mut self, to: smtp_proto::RcptTo<Cow<'_, str>>, policy: &dyn RcptPolicy) {
        self.attempted_rcpt = Some(to.address.to_string());
        if self.mail.is_none() {
            return self.error(
                "rcpt",
                Reply::new(503, (5, 5, 1), "Error: need MAIL command"),
            );
        }
        if self.rcpts.len() >= self.limits.max_recipients {
            // RFC 5321 4.5.3.1.10: 452 lets the client retry the rest later.
            return self.error(
                "rcpt",
                Reply::new(452, (4, 5, 3), "Error: too many recipients"),
            );
        }
        let smtputf8 = self.mail.as_ref().is_some_and(|(_, p)| p.smtputf8);
        if !smtputf8 && !to.address.is_ascii() {
            return self.error(
                "rcpt",
                Reply::new(553, (5, 6, 7), "Error: non-ASCII address requires SMTPUTF8"),
            );
        }
        let address = to.address.into_owned();
        if let Err(r) = policy.check_rcpt(&address) {
            return self.error("rcpt", r);
        }
        let mut notify = Vec::new();
        for (flag, name) in [
            (smtp_proto::RCPT_NOTIFY_NEVER, "NEVER"),
            (smtp_proto::RCPT_NOTIFY_SUCCESS, "SUCCESS"),
            (smtp_proto::RCPT_NOTIFY_FAILURE, "FAILURE"),
            (smtp_proto::RCPT_NOTIFY_DELAY, "DELAY"),
        ] {
            if to.flags & flag != 0 {
                notify.push(name.to_string());
            }
        }
        // smtp-proto hands ORCPT back decoded and without its addr-type.
        let orcpt = to.orcpt.map(|o| {
            if o.contains(';') {
                o.into_owned()
            } else {
                format!("rfc822;{o}")
            }
        });
        self.rcpts.push((address, RcptParams { notify, orcpt }));
        self.emit(Reply::new(250, (2, 1, 5), "Ok"));
    }
}

fn decode_b64(b64: &str) -> Option<String> {
    let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).ok()?;
    String::from_utf8(raw).ok()
}

fn parse_error_reply(e: &ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::new(500, (5, 5, 2), "Error: command not recognized"),
        ParseError::InvalidSenderAddress => {
            Reply::new(501, (5, 1, 7), "Error: bad sender address syntax")
        }
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, (5, 1, 3), "Error: bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => {
            Reply::new(501, (5, 5, 4), format!("Syntax: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::new(501, (5, 5, 4), format!("Error: invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => Reply::new(
            555,
            (5, 5, 4),
            format!(
                "Error: unsupported parameter {}",
                param.chars().take(40).collect::<String>()
            ),
        ),
        _ => Reply::new(500, (5, 5, 2), "Error: syntax error"),
    }
}

/// Counts `Received:` header fields in the header section (up to the first empty line).
pub fn count_received(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OnlyExample;
    impl RcptPolicy for OnlyExample {
        fn check_rcpt(&self, a: &str) -> Result<(), Reply> {
            if a.to_ascii_lowercase().ends_with("@example.com") {
                Ok(())
            } else {
                Err(Reply::new(554, (5, 7, 1), "Relay access denied"))
            }
        }
    }

    fn limits() -> Limits {
        Limits {
            hostname: "gw.test".into(),
            max_message_size: 1000,
            max_recipients: 100,
            max_command_line: 512,
            max_errors: 5,
            newline_policy: NewlinePolicy::Reject,
            max_received_headers: 3,
            tls_available: false,
            auth: None,
        }
    }

    /// Drives a session with `input`, answering every Message with queue id Q1.
    fn run(l: Limits, input: &[u8]) -> (Vec<String>, Vec<(Envelope, Vec<u8>)>) {
        let mut s = Session::new(l, "127.0.0.1");
        s.push(input);
        let mut replies = Vec::new();
        let mut msgs = Vec::new();
        while let Some(o) = s.next(&OnlyExample) {
            match o {
                Output::Reply(r) => replies.push(r.to_string()),
                Output::Message { envelope, message } => {
                    msgs.push((envelope, message));
                    replies.push(s.queued("Q1").to_string());
                }
                Output::Close => break,
                _ => {}
            }
        }
        (replies, msgs)
    }

    #[test]
    fn pipelined_transaction() {
        let (r, m) = run(
            limits(),
            b"EHLO c\r\nMAIL FROM:<a@b.c> BODY=8BITMIME RET=HDRS ENVID=e1\r\nRCPT TO:<x@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@example.com\r\nRCPT TO:<y@evil.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        );
        assert!(r[0].starts_with("250 gw.test"), "{r:?}");
        assert!(r[0].contains("PIPELINING") && r[0].contains("SIZE 1000") && r[0].contains("DSN"));
        assert_eq!(r[1], "250 2.1.0 Ok");
        assert_eq!(r[2], "250 2.1.5 Ok");
        assert_eq!(r[3], "554 5.7.1 Relay access denied");
        assert!(r[4].starts_with("354"));
        assert_eq!(r[5], "250 2.0.0 Ok: queued as Q1");
        assert_eq!(r[6], "221 2.0.0 Bye");
        let (env, msg) = &m[0];
        assert_eq!(msg, b"hi\r\n");
        assert_eq!(env.rcpts.len(), 1);
        assert_eq!(env.rcpts[0].1.notify, vec!["SUCCESS", "FAILURE"]);
        assert_eq!(
            env.rcpts[0].1.orcpt.as_deref(),
            Some("rfc822;x@example.com")
        );
        assert_eq!(env.mail_params.ret.as_deref(), Some("HDRS"));
        assert_eq!(env.mail_params.envid.as_deref(), Some("e1"));
        assert_eq!(env.mail_params.body.as_deref(), Some("8BITMIME"));
    }

    #[test]
    fn command_order_and_errors() {
        let table: &[(&[u8], &str)] = &[
            (b"MAIL FROM:<a@b>\r\n", "503 5.5.1"),
            (b"HELO c\r\nRCPT TO:<x@example.com>\r\n", "503 5.5.1"),
            (b"HELO c\r\nMAIL FROM:<a@b>\r\nDATA\r\n", "554 5.5.1"),
            (
                b"HELO c\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\n",
                "503 5.5.1",
            ),
            (b"HELO c\r\nMAIL FROM:<a@b> SIZE=5000\r\n", "552 5.3.4"),
            (b"FOO\r\n", "500 5.5.2"),
            (b"VRFY bob\r\n", "252 2.5.2"),
            (b"STARTTLS\r\n", "502 5.5.1"),
            (b"HELO c\r\nMAIL FROM:<\xc3\xa9@b>\r\n", "553 5.6.7"),
        ];
        for (input, want) in table {
            let (r, _) = run(limits(), input);
            assert!(
                r.last().unwrap().starts_with(want),
                "{:?}: {r:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn abandoned_data_is_read_to_its_end_and_answered_452() {
        let mut s = Session::new(limits(), "127.0.0.1");
        let mut replies = Vec::new();
        let step = |s: &mut Session, replies: &mut Vec<String>, input: &[u8]| {
            s.push(input);
            while let Some(o) = s.next(&OnlyExample) {
                match o {
                    Output::Reply(r) => replies.push(r.to_string()),
                    Output::Message { message, .. } => {
                        replies.push(format!("message {}", message.len()));
                        replies.push(s.queued("Q1").to_string());
                    }
                    _ => {}
                }
            }
        };
        step(
            &mut s,
            &mut replies,
            b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nfirst part\r\n",
        );
        assert!(s.data_held() >= 12, "{}", s.data_held());
        s.abandon_data();
        assert_eq!(s.data_held(), 0);
        // The rest is read and dropped; a dot line inside stays content.
        step(&mut s, &mut replies, b"..not the end\r\nmore\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nok\r\n.\r\n");
        let last = replies.len();
        assert_eq!(
            replies[last - 6],
            "452 4.3.1 Error: insufficient system resources for this message now, try again later",
            "{replies:?}"
        );
        // The session goes on: the next transaction is whole.
        assert_eq!(replies[last - 2], "message 4");
        assert_eq!(replies[last - 1], "250 2.0.0 Ok: queued as Q1");
        // Outside DATA it does nothing.
        s.abandon_data();
        step(&mut s, &mut replies, b"NOOP\r\n");
        assert_eq!(replies.last().unwrap(), "250 2.0.0 Ok");
    }

    /// Spilled content leaves the session; the message handed out at the
    /// end is the kept head and what came after the last spill, so head,
    /// spills and tail put together are the whole content, in order.
    #[test]
    fn spilled_data_leaves_the_head_and_the_tail() {
        let mut s = Session::new(limits(), "127.0.0.1");
        let mut spilled = Vec::new();
        let mut got = None;
        let step = |s: &mut Session, got: &mut Option<Vec<u8>>, input: &[u8]| {
            s.push(input);
            while let Some(o) = s.next(&OnlyExample) {
                if let Output::Message { message, .. } = o {
                    *got = Some(message);
                    s.queued("Q1");
                }
            }
        };
        step(
            &mut s,
            &mut got,
            b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nSubject: s\r\n\r\nline one\r\n",
        );
        assert_eq!(s.data(), b"Subject: s\r\n\r\nline one\r\n");
        s.spill_data(14, &mut spilled);
        assert_eq!(spilled, b"line one\r\n");
        assert_eq!(s.data(), b"Subject: s\r\n\r\n");
        // Nothing past the head: nothing moves.
        s.spill_data(14, &mut spilled);
        assert_eq!(spilled, b"line one\r\n");
        step(&mut s, &mut got, b"line two\r\n");
        s.spill_data(14, &mut spilled);
        step(&mut s, &mut got, b"tail\r\n.\r\n");
        let tail = got.expect("the message");
        assert_eq!(tail, b"Subject: s\r\n\r\ntail\r\n");
        assert_eq!(spilled, b"line one\r\nline two\r\n");
        // Outside DATA it does nothing.
        s.spill_data(0, &mut spilled);
        assert_eq!(spilled, b"line one\r\nline two\r\n");
    }

    #[test]
    fn too_many_recipients_is_452() {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\n".to_vec();
        for i in 0..101 {
            input.extend_from_slice(format!("RCPT TO:<u{i}@example.com>\r\n").as_bytes());
        }
        let mut l = limits();
        l.max_errors = 1000;
        let (r, _) = run(l, &input);
        assert_eq!(r.iter().filter(|r| r.starts_with("250 2.1.5")).count(), 100);
        assert!(r.last().unwrap().starts_with("452 4.5.3"));
    }

    #[test]
    fn long_line_and_error_limit() {
        let mut input = vec![b'A'; 600];
        input.extend_from_slice(b"\r\n");
        let (r, _) = run(limits(), &input);
        assert!(r[0].starts_with("500 5.5.6"), "{r:?}");
        let (r, _) = run(limits(), b"X\r\nX\r\nX\r\nX\r\nX\r\nNOOP\r\n");
        assert!(r.last().unwrap().starts_with("421 4.7.0"), "{r:?}");
    }

    #[test]
    fn loop_detection() {
        let msg = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nReceived: 1\r\nReceived: 2\r\nreceived: 3\r\nReceived: 4\r\n\r\nx\r\n.\r\n";
        let (r, m) = run(limits(), msg);
        assert!(m.is_empty());
        assert!(r.last().unwrap().starts_with("554 5.4.6"), "{r:?}");
    }

    #[test]
    fn smuggled_transaction_is_refused_whole() {
        let msg = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nhi\n.\nMAIL FROM:<e@v>\r\nRCPT TO:<y@example.com>\r\nDATA\r\nevil\r\n.\r\nQUIT\r\n";
        let (r, m) = run(limits(), msg);
        assert!(m.is_empty(), "nothing may be queued");
        assert!(r.iter().any(|r| r.starts_with("550 5.5.2")), "{r:?}");
        assert_eq!(r.last().unwrap(), "221 2.0.0 Bye");
    }

    #[test]
    fn starttls_discards_pipelined_input() {
        let mut l = limits();
        l.tls_available = true;
        let mut s = Session::new(l, "1.2.3.4");
        s.push(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x>\r\n");
        let mut saw_tls = false;
        while let Some(o) = s.next(&OnlyExample) {
            if matches!(o, Output::StartTls) {
                saw_tls = true;
                break;
            }
        }
        assert!(saw_tls);
        assert_eq!(s.buffered(), 0);
        s.tls_started();
        s.push(b"MAIL FROM:<a@b>\r\n");
        match s.next(&OnlyExample) {
            Some(Output::Reply(r)) => assert_eq!(r.code, 503, "HELO must be repeated after TLS"),
            o => panic!("{o:?}"),
        }
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;

    /// Accepts example.com recipients; as the submission policy would,
    /// refuses MAIL FROM and header From outside alice's addresses.
    struct Alice;
    impl RcptPolicy for Alice {
        fn check_rcpt(&self, _: &str) -> Result<(), Reply> {
            Ok(())
        }
        fn check_mail(&self, a: &str) -> Result<(), Reply> {
            if a == "alice@example.com" {
                Ok(())
            } else {
                Err(Reply::new(553, (5, 7, 1), "not yours"))
            }
        }
        fn check_message(&self, _: &str, m: &[u8]) -> Result<(), Reply> {
            if m.starts_with(b"From: alice@example.com") {
                Ok(())
            } else {
                Err(Reply::new(553, (5, 7, 1), "header From not yours"))
            }
        }
    }

    fn limits(tls_available: bool, allow_plaintext: bool) -> Limits {
        Limits {
            hostname: "gw.test".into(),
            max_message_size: 1000,
            max_recipients: 100,
            max_command_line: 512,
            max_errors: 10,
            newline_policy: NewlinePolicy::Reject,
            max_received_headers: 3,
            tls_available,
            auth: Some(AuthRules {
                allow_plaintext,
                required: true,
            }),
        }
    }

    fn b64(s: &[u8]) -> String {
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s)
    }

    /// Drives `input`; credentials with password "right" succeed. Returns the
    /// replies and the credentials handed out (password shown).
    fn run(s: &mut Session, input: &str) -> (Vec<String>, Vec<(Mechanism, String, String)>) {
        s.push(input.as_bytes());
        let mut replies = Vec::new();
        let mut creds = Vec::new();
        while let Some(o) = s.next(&Alice) {
            match o {
                Output::Reply(r) => replies.push(r.to_string()),
                Output::Authenticate(c) => {
                    creds.push((c.mechanism, c.user.clone(), c.password.clone()));
                    if c.password == "right" {
                        s.auth_succeeded(&c.user);
                    } else {
                        s.auth_failed(None);
                    }
                }
                Output::Message { .. } => replies.push(s.queued("Q1").to_string()),
                Output::StartTls => s.tls_started(),
                _ => {}
            }
        }
        (replies, creds)
    }

    fn tls_session() -> Session {
        let mut s = Session::new(limits(true, false), "1.2.3.4");
        s.tls_started();
        s
    }

    #[test]
    fn auth_table() {
        let plain = b64(b"\0alice@example.com\0right");
        let wrong = b64(b"\0alice@example.com\0wrong");
        let (u, p) = (b64(b"alice@example.com"), b64(b"right"));
        // (input after EHLO under TLS, last reply, credentials handed out)
        let cases: Vec<(String, &str, usize)> = vec![
            (format!("AUTH PLAIN {plain}\r\n"), "235 2.7.0", 1),
            (format!("AUTH PLAIN\r\n{plain}\r\n"), "235 2.7.0", 1),
            (format!("AUTH LOGIN\r\n{u}\r\n{p}\r\n"), "235 2.7.0", 1),
            (format!("AUTH LOGIN {u}\r\n{p}\r\n"), "235 2.7.0", 1),
            (format!("AUTH PLAIN {wrong}\r\n"), "535 5.7.8", 1),
            ("AUTH PLAIN\r\n*\r\n".into(), "501 5.7.0", 0),
            (format!("AUTH LOGIN\r\n{u}\r\n*\r\n"), "501 5.7.0", 0),
            ("AUTH PLAIN !!notbase64\r\n".into(), "501 5.5.2", 0),
            ("AUTH LOGIN\r\n%%%\r\n".into(), "501 5.5.2", 0),
            (
                format!("AUTH PLAIN {}\r\n", b64(b"a@b\0pw")),
                "501 5.5.2",
                0,
            ),
            (
                format!(
                    "AUTH PLAIN {}\r\n",
                    b64(b"bob@example.com\0alice@example.com\0right")
                ),
                "535 5.7.8",
                0,
            ),
            ("AUTH CRAM-MD5\r\n".into(), "504 5.5.4", 0),
            (
                format!("AUTH PLAIN {plain}\r\nAUTH PLAIN {plain}\r\n"),
                "503 5.5.1",
                1,
            ),
            ("MAIL FROM:<alice@example.com>\r\n".into(), "530 5.7.0", 0),
            (
                format!("AUTH PLAIN {plain}\r\nMAIL FROM:<bob@example.com>\r\n"),
                "553 5.7.1",
                1,
            ),
            (
                format!(
                    "AUTH PLAIN {plain}\r\nMAIL FROM:<alice@example.com>\r\nAUTH PLAIN {plain}\r\n"
                ),
                "503 5.5.1",
                1,
            ),
            (
                format!(
                    "AUTH PLAIN {plain}\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nFrom: alice@example.com\r\n\r\nhi\r\n.\r\n"
                ),
                "250 2.0.0 Ok: queued as Q1",
                1,
            ),
            (
                format!(
                    "AUTH PLAIN {plain}\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nFrom: bob@example.com\r\n\r\nhi\r\n.\r\n"
                ),
                "553 5.7.1",
                1,
            ),
        ];
        for (input, want, n) in cases {
            let mut s = tls_session();
            let (r, creds) = run(&mut s, &format!("EHLO c\r\n{input}"));
            assert!(r.last().unwrap().starts_with(want), "{input:?}: {r:?}");
            assert_eq!(creds.len(), n, "{input:?}: {creds:?}");
        }
        let mut s = tls_session();
        let (_, creds) = run(&mut s, &format!("EHLO c\r\nAUTH LOGIN {u}\r\n{p}\r\n"));
        assert_eq!(
            creds[0],
            (Mechanism::Login, "alice@example.com".into(), "right".into())
        );
        assert_eq!(s.authenticated(), Some("alice@example.com"));
    }

    #[test]
    fn plaintext_rules() {
        let plain = b64(b"\0alice@example.com\0right");
        // Before TLS: no AUTH in EHLO, AUTH refused 538 without asking anyone.
        let mut s = Session::new(limits(true, false), "1.2.3.4");
        let (r, creds) = run(&mut s, &format!("EHLO c\r\nAUTH PLAIN {plain}\r\n"));
        assert!(r[0].contains("STARTTLS") && !r[0].contains("AUTH"), "{r:?}");
        assert!(r[1].starts_with("538 5.7.11"), "{r:?}");
        assert!(creds.is_empty());
        // After STARTTLS: offered.
        run(&mut s, "STARTTLS\r\n");
        let (r, _) = run(&mut s, "EHLO c\r\n");
        assert!(r.last().unwrap().contains("AUTH PLAIN LOGIN"), "{r:?}");
        assert!(!r.last().unwrap().contains("STARTTLS"), "{r:?}");
        // allow_plaintext_auth: offered and accepted in clear.
        let mut s = Session::new(limits(false, true), "127.0.0.1");
        let (r, creds) = run(&mut s, &format!("EHLO c\r\nAUTH PLAIN {plain}\r\n"));
        assert!(r[0].contains("AUTH PLAIN LOGIN"), "{r:?}");
        assert!(r[1].starts_with("235"), "{r:?}");
        assert_eq!(creds.len(), 1);
        // TLS forgets an earlier AUTH (RFC 3207 4.2).
        let mut l = limits(true, true);
        l.tls_available = true;
        let mut s = Session::new(l, "127.0.0.1");
        run(&mut s, &format!("EHLO c\r\nAUTH PLAIN {plain}\r\n"));
        assert!(s.authenticated().is_some());
        run(&mut s, "STARTTLS\r\n");
        assert!(s.authenticated().is_none());
        // The MX listener: AUTH is not offered at all.
        let mut l = limits(true, true);
        l.auth = None;
        let mut s = Session::new(l, "1.2.3.4");
        let (r, _) = run(&mut s, &format!("EHLO c\r\nAUTH PLAIN {plain}\r\n"));
        assert!(!r[0].contains("AUTH"), "{r:?}");
        assert!(r[1].starts_with("502 5.5.1"), "{r:?}");
    }

    #[test]
    fn password_never_in_debug() {
        let c = Credentials {
            mechanism: Mechanism::Plain,
            user: "alice@example.com".into(),
            password: "hunter2".into(),
        };
        let d = format!("{:?}", Output::Authenticate(c));
        assert!(
            d.contains("alice@example.com") && !d.contains("hunter2"),
            "{d}"
        );
    }
}

#[cfg(test)]
mod fuzz_in_suite {
    //! A short fuzz run inside the test suite (proptest); the coverage-guided
    //! targets are in fuzz/ (see README, "Fuzzing").
    use super::*;
    use proptest::prelude::*;

    struct All;
    impl RcptPolicy for All {
        fn check_rcpt(&self, _: &str) -> Result<(), Reply> {
            Ok(())
        }
    }

    fn smtpish() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"EHLO x\r\n".to_vec()),
            Just(b"MAIL FROM:<a@b>\r\n".to_vec()),
            Just(b"RCPT TO:<c@example.com>\r\n".to_vec()),
            Just(b"DATA\r\n".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b"\n.\n".to_vec()),
            Just(b".".to_vec()),
            Just(b"STARTTLS\r\n".to_vec()),
            Just(b"AUTH PLAIN AGFAYgBw\r\n".to_vec()),
            Just(b"AUTH LOGIN\r\n".to_vec()),
            Just(b"*\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn sessions_never_panic_and_messages_are_clean(input in smtpish(), chunk in 1usize..16) {
            for policy in [NewlinePolicy::Reject, NewlinePolicy::Normalize] {
                let limits = Limits { hostname: "gw".into(), max_message_size: 4096, max_recipients: 100, max_command_line: 512, max_errors: 50, newline_policy: policy, max_received_headers: 50, tls_available: true, auth: Some(AuthRules { allow_plaintext: true, required: false }) };
                let mut s = Session::new(limits, "ip");
                for c in input.chunks(chunk) {
                    s.push(c);
                    while let Some(o) = s.next(&All) {
                        match o {
                            Output::Message { message, .. } => {
                                for (i, &b) in message.iter().enumerate() {
                                    if b == b'\n' { prop_assert_eq!(message[i - 1], b'\r'); }
                                    if b == b'\r' { prop_assert_eq!(message.get(i + 1), Some(&b'\n')); }
                                }
                                prop_assert!(!message.contains(&0));
                                s.queued("Q");
                            }
                            Output::StartTls => s.tls_started(),
                            Output::Authenticate(c) => {
                                if c.password.len() % 2 == 0 { s.auth_succeeded(&c.user) } else { s.auth_failed(None) }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}
