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
}

/// Decides whether a recipient is ours. Kept as a trait so the session stays
/// pure: the gateway answers from its configuration and in-memory route table.
pub trait RcptPolicy {
    /// `Ok(())` accepts; `Err(reply)` refuses with that reply.
    fn check_rcpt(&self, address: &str) -> Result<(), Reply>;
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
        self.reset_transaction();
        self.state = State::Fresh;
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
                State::Closed | State::AwaitingQueue => return None,
                State::Data(decoder) => {
                    let consumed = decoder.feed(&self.input, &mut self.message);
                    self.input.drain(..consumed);
                    if !decoder.is_done() {
                        return None;
                    }
                    let outcome = decoder.outcome().unwrap_or(DataOutcome::Complete);
                    self.finish_data(outcome);
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

    fn finish_data(&mut self, outcome: DataOutcome) {
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
            Request::Mail { from } => self.mail_from(from),
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
            Request::Auth { .. } => self.error(
                "command",
                Reply::new(
                    502,
                    (5, 5, 1),
                    "Error: AUTH is not offered on the MX gateway",
                ),
            ),
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

    fn mail_from(&mut self, from: smtp_proto::MailFrom<Cow<'_, str>>) {
        if self.helo.is_none() {
            return self.error(
                "mail",
                Reply::new(503, (5, 5, 1), "Error: send HELO/EHLO first"),
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
            proptest::collection::vec(any::<u8>(), 0..20),
        ];
        proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn sessions_never_panic_and_messages_are_clean(input in smtpish(), chunk in 1usize..16) {
            for policy in [NewlinePolicy::Reject, NewlinePolicy::Normalize] {
                let limits = Limits { hostname: "gw".into(), max_message_size: 4096, max_recipients: 100, max_command_line: 512, max_errors: 50, newline_policy: policy, max_received_headers: 50, tls_available: true };
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
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}
