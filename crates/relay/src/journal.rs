//! Journal reports (`[journal]`): the accepted message, byte for byte, as a
//! `message/rfc822` attachment (RFC 2046 5.2.1), after an envelope report
//! that lists the SMTP sender and every recipient, the envelope-only (Bcc)
//! ones too: RFC 5322 headers lose that data, which is why Exchange's
//! envelope journaling sends the same shape of report.
//!
//! Built by hand rather than with mail-builder: the original must stay
//! unmodified and is streamed from the spool (a 50 MB message is never held
//! whole), so a report is a prefix and a suffix around the spooled bytes.

use godwit_smtp_proto::{Envelope, MailParams};

/// The pieces of a journal report around the original message's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Report headers, the envelope report part, and the attachment's part
    /// headers (ending with the blank line the original follows).
    pub prefix: Vec<u8>,
    /// The closing boundary (RFC 2046 5.1.1: the CRLF before it belongs to
    /// the boundary, so the original keeps its own last CRLF).
    pub suffix: Vec<u8>,
}

/// What the report is about.
pub struct Input<'a> {
    pub hostname: &'a str,
    pub queue_id: &'a str,
    /// The spooled envelope, journal recipient included.
    pub envelope: &'a Envelope,
    /// The journal recipient's index in `envelope.rcpts`.
    pub journal_rcpt: usize,
    /// The original's header section (at least; anything after the blank
    /// line is ignored).
    pub original_head: &'a [u8],
    pub now_ms: i64,
}

/// How a recipient appears in the original's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    To,
    Cc,
    /// Envelope only: in no To or Cc header (Bcc, list expansion, forward).
    Bcc,
}

/// The envelope report's lines, in Exchange's order: Sender, Subject,
/// Message-Id, then one line per recipient (To, Cc, Bcc).
pub fn envelope_report(input: &Input) -> String {
    let head = header_section(input.original_head);
    let to = addresses(header_values(head, "to"));
    let cc = addresses(header_values(head, "cc"));
    let mut out = String::new();
    let sender = &input.envelope.mail_from;
    out.push_str(&format!(
        "Sender: {}\r\n",
        if sender.is_empty() { "<>" } else { sender }
    ));
    if let Some(s) = header_values(head, "subject").first() {
        out.push_str(&format!("Subject: {}\r\n", one_line(s)));
    }
    if let Some(m) = header_values(head, "message-id").first() {
        out.push_str(&format!("Message-Id: {}\r\n", one_line(m)));
    }
    for (i, (addr, _)) in input.envelope.rcpts.iter().enumerate() {
        if i == input.journal_rcpt {
            continue;
        }
        let kind = classify(addr, &to, &cc);
        let label = match kind {
            Kind::To => "To",
            Kind::Cc => "Cc",
            Kind::Bcc => "Bcc",
        };
        out.push_str(&format!("{label}: {addr}\r\n"));
    }
    out.push_str(&format!(
        "Queue-Id: {} {}\r\nClient: {} [{}]\r\n",
        input.hostname, input.queue_id, input.envelope.helo, input.envelope.client_ip
    ));
    out
}

/// Whether `addr` is a To or Cc recipient of the header section, or envelope only.
pub fn classify(addr: &str, to: &[String], cc: &[String]) -> Kind {
    let a = addr.to_ascii_lowercase();
    if to.contains(&a) {
        Kind::To
    } else if cc.contains(&a) {
        Kind::Cc
    } else {
        Kind::Bcc
    }
}

/// The report around the original (see `Report`).
pub fn compose(input: &Input) -> Report {
    let journal = &input.envelope.rcpts[input.journal_rcpt].0;
    // "=_" cannot occur in quoted-printable or base64 text, and the queue ID
    // is unique: the boundary cannot be met inside the original.
    let boundary = format!("=_godwit-journal-{}", input.queue_id);
    let eight = is_8bit(&input.envelope.mail_params);
    let report = envelope_report(input);
    let report_cte = if report.is_ascii() { "7bit" } else { "8bit" };
    let head = header_section(input.original_head);
    let subject = header_values(head, "subject")
        .first()
        .map(|s| one_line(s))
        .unwrap_or_default();
    let mut p = String::new();
    p.push_str(&format!(
        "From: Journal <postmaster@{}>\r\n",
        input.hostname
    ));
    p.push_str(&format!("To: <{journal}>\r\n"));
    p.push_str(&format!("Subject: {subject}\r\n"));
    p.push_str(&format!("Date: {}\r\n", crate::dsn::date(input.now_ms)));
    p.push_str(&format!(
        "Message-ID: <{}.journal@{}>\r\n",
        input.queue_id, input.hostname
    ));
    p.push_str("MIME-Version: 1.0\r\n");
    // Archives (and Exchange) recognise a journal report by this header.
    p.push_str("X-MS-Journal-Report: \r\n");
    p.push_str(&format!("X-Godwit-Journal-Report: {}\r\n", input.queue_id));
    p.push_str(&format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n"
    ));
    p.push_str("This is a journal report.\r\n\r\n");
    p.push_str(&format!("--{boundary}\r\n"));
    p.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    p.push_str(&format!("Content-Transfer-Encoding: {report_cte}\r\n\r\n"));
    p.push_str(&report);
    p.push_str(&format!("\r\n--{boundary}\r\n"));
    p.push_str("Content-Type: message/rfc822\r\n");
    // RFC 2046 5.2.1: message/rfc822 is 7bit, 8bit or binary, never encoded.
    p.push_str(&format!(
        "Content-Transfer-Encoding: {}\r\n",
        if eight { "8bit" } else { "7bit" }
    ));
    p.push_str("Content-Disposition: attachment; filename=\"original.eml\"\r\n\r\n");
    Report {
        prefix: p.into_bytes(),
        suffix: format!("\r\n--{boundary}--\r\n").into_bytes(),
    }
}

/// The journal copy's envelope: the null reverse-path (RFC 5321 4.5.5: a
/// report must never bounce to the original sender), the original's body
/// type, the same recipient list so indexes still match.
pub fn envelope(original: &Envelope, report_is_utf8: bool) -> Envelope {
    let mut e = original.clone();
    e.mail_from = String::new();
    e.mail_params = MailParams {
        body: original.mail_params.body.clone(),
        smtputf8: original.mail_params.smtputf8 || report_is_utf8,
        ..MailParams::default()
    };
    e
}

fn is_8bit(p: &MailParams) -> bool {
    p.smtputf8
        || p.body
            .as_deref()
            .is_some_and(|b| b.eq_ignore_ascii_case("8BITMIME"))
}

/// The bytes up to (not including) the blank line ending the header section.
pub fn header_section(msg: &[u8]) -> &[u8] {
    if msg.starts_with(b"\r\n") {
        return &[];
    }
    match msg.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &msg[..i + 2],
        None => msg,
    }
}

/// The unfolded values of every header field called `name` (RFC 5322 2.2.3).
fn header_values(head: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(head);
    let mut fields: Vec<String> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push_str(line);
            }
        } else if !line.is_empty() {
            fields.push(line.to_string());
        }
    }
    fields
        .into_iter()
        .filter_map(|f| {
            let (n, v) = f.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
        .collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The addr-specs in address-list values, lower-cased: those in angle
/// brackets, or bare ones (quoted display names may hold commas and `@`).
fn addresses(values: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for v in values {
        let mut rest = strip_quoted(&v);
        while let Some(start) = rest.find('<') {
            let Some(end) = rest[start..].find('>') else {
                break;
            };
            out.push(rest[start + 1..start + end].trim().to_ascii_lowercase());
            rest = rest[start + end + 1..].to_string();
        }
        for part in rest.split([',', ';', ':']) {
            let p = part.trim();
            if p.contains('@') && !p.contains(char::is_whitespace) {
                out.push(p.to_ascii_lowercase());
            }
        }
    }
    out
}

/// `v` with quoted strings and comments blanked (they may hold `<`, `@`, `,`).
fn strip_quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let (mut quoted, mut depth, mut escaped) = (false, 0u32, false);
    for c in v.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if quoted || depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_smtp_proto::RcptParams;

    fn env(from: &str, rcpts: &[&str], body: Option<&str>) -> Envelope {
        Envelope {
            mail_from: from.into(),
            mail_params: MailParams {
                body: body.map(String::from),
                envid: Some("E1".into()),
                ret: Some("FULL".into()),
                ..Default::default()
            },
            rcpts: rcpts
                .iter()
                .map(|a| (a.to_string(), RcptParams::default()))
                .collect(),
            helo: "client.example".into(),
            esmtp: true,
            client_ip: "192.0.2.7".into(),
            tls: false,
        }
    }

    #[test]
    fn envelope_report_table() {
        struct Case {
            name: &'static str,
            from: &'static str,
            rcpts: &'static [&'static str],
            head: &'static str,
            want: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "to, cc and a bcc only in the envelope",
                from: "alice@old.example",
                rcpts: &[
                    "bob@x.example",
                    "Carol@X.example",
                    "dave@x.example",
                    "journal@arch",
                ],
                head: "From: a@old.example\r\nTo: Bob <bob@x.example>\r\nCc: carol@x.example\r\nSubject: Q3\r\nMessage-ID: <m1@old>\r\n\r\nbody",
                want: &[
                    "Sender: alice@old.example",
                    "Subject: Q3",
                    "Message-Id: <m1@old>",
                    "To: bob@x.example",
                    "Cc: Carol@X.example",
                    "Bcc: dave@x.example",
                ],
            },
            Case {
                name: "null sender, folded To, quoted display name with a comma and @",
                from: "",
                rcpts: &["b@x", "c@x", "journal@arch"],
                head: "To: \"Smith, J (j@evil)\" <b@x>,\r\n  c@x\r\n\r\n",
                want: &["Sender: <>", "To: b@x", "To: c@x"],
            },
            Case {
                name: "no headers naming anyone: every recipient is envelope-only",
                from: "s@y",
                rcpts: &["b@x", "journal@arch"],
                head: "Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n",
                want: &["Sender: s@y", "Subject: =?utf-8?q?caf=C3=A9?=", "Bcc: b@x"],
            },
        ];
        for c in cases {
            let e = env(c.from, c.rcpts, None);
            let input = Input {
                hostname: "gw.example",
                queue_id: "Q1",
                envelope: &e,
                journal_rcpt: c.rcpts.len() - 1,
                original_head: c.head.as_bytes(),
                now_ms: 0,
            };
            let r = envelope_report(&input);
            let lines: Vec<&str> = r.lines().collect();
            for w in c.want {
                assert!(lines.contains(w), "{}: missing {w:?} in\n{r}", c.name);
            }
            assert!(
                !r.contains("journal@arch"),
                "{}: the journal recipient is not reported",
                c.name
            );
            assert!(r.contains("Queue-Id: gw.example Q1"), "{}", c.name);
        }
    }

    #[test]
    fn report_wraps_the_original_unmodified() {
        for (body, cte) in [(None, "7bit"), (Some("8BITMIME"), "8bit")] {
            let e = env("a@b", &["x@y", "journal@arch"], body);
            let original = b"Subject: hi\r\nTo: x@y\r\n\r\n.leading dot\r\nline\r\n";
            let input = Input {
                hostname: "gw",
                queue_id: "QID",
                envelope: &e,
                journal_rcpt: 1,
                original_head: original,
                now_ms: 1_700_000_000_000,
            };
            let r = compose(&input);
            let mut whole = r.prefix.clone();
            whole.extend_from_slice(original);
            whole.extend_from_slice(&r.suffix);
            let text = String::from_utf8(whole.clone()).unwrap();
            assert!(text.contains("To: <journal@arch>\r\n"));
            assert!(text.contains("X-MS-Journal-Report:"));
            assert!(text.contains(&format!("Content-Transfer-Encoding: {cte}\r\n")));
            // The attachment is the original, byte for byte, between its part
            // headers' blank line and the boundary's CRLF.
            let start = r.prefix.len();
            assert_eq!(&whole[start..start + original.len()], original);
            assert!(r.suffix.starts_with(b"\r\n--=_godwit-journal-QID--"));
            let parsed = mail_parser::MessageParser::default().parse(&whole).unwrap();
            assert_eq!(parsed.attachments().count(), 1);
            let je = envelope(&e, false);
            assert_eq!(je.mail_from, "");
            assert_eq!(je.mail_params.body.as_deref(), body);
            assert!(je.mail_params.envid.is_none() && je.mail_params.ret.is_none());
            assert_eq!(je.rcpts, e.rcpts);
        }
    }

    #[test]
    fn header_section_stops_at_the_blank_line() {
        assert_eq!(header_section(b"A: 1\r\n\r\nB: 2\r\n"), b"A: 1\r\n");
        assert_eq!(header_section(b"\r\nbody"), b"");
        assert_eq!(header_section(b"A: 1\r\n"), b"A: 1\r\n");
    }
}
