//! Delivery status notifications (RFC 3464) in a multipart/report (RFC 6522),
//! sent with the null reverse-path (RFC 5321 4.5.5) so that a DSN never
//! causes another.

use godwit_spool::Header;
use mail_builder::MessageBuilder;
use mail_builder::headers::content_type::ContentType;
use mail_builder::mime::{BodyPart, MimePart};

#[derive(Debug, Clone)]
pub struct DsnRcpt {
    pub address: String,
    pub orcpt: Option<String>,
    /// "failed" or "delayed" (RFC 3464 2.3.3).
    pub action: &'static str,
    /// Enhanced status, e.g. "5.1.1" or "4.4.7".
    pub status: String,
    pub diagnostic: String,
    pub remote_mta: Option<String>,
}

/// Messages larger than this come back as headers only.
const MAX_RETURNED: usize = 1_000_000;

/// How much of an original of `body_len` bytes `build` needs: all of one
/// it returns whole, one byte past MAX_RETURNED of a larger one (whose
/// header section alone goes back), so a 50 MB bounce never reads 50 MB.
pub fn needed(body_len: u64) -> u64 {
    body_len.min(MAX_RETURNED as u64 + 1)
}

pub(crate) fn date(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc2822)
                .ok()
        })
        .unwrap_or_default()
}

/// Whether this recipient wants a DSN for `action` (RFC 3461 4.1): NEVER
/// wants none; absent NOTIFY means FAILURE (and DELAY at our discretion).
pub fn wanted(notify: &[String], action: &str) -> bool {
    if notify.iter().any(|n| n == "NEVER") {
        return false;
    }
    if notify.is_empty() {
        return true;
    }
    let want = if action == "failed" {
        "FAILURE"
    } else {
        "DELAY"
    };
    notify.iter().any(|n| n == want)
}

pub fn build(
    reporting_mta: &str,
    original: &Header,
    body: &[u8],
    rcpts: &[DsnRcpt],
    now_ms: i64,
) -> Vec<u8> {
    let delayed = rcpts.iter().all(|r| r.action == "delayed");
    let subject = if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let mut human = format!(
        "This is the mail gateway at {reporting_mta}.\r\n\r\n{}\r\n\r\n",
        if delayed {
            "Your message could not be delivered yet. It is still queued and delivery will be retried; you do not need to resend it."
        } else {
            "Your message could not be delivered to one or more recipients. It is attached below."
        }
    );
    for r in rcpts {
        human.push_str(&format!("<{}>: {}\r\n", r.address, r.diagnostic));
    }
    human.push_str(&format!("\r\nQueue ID: {}\r\n", original.queue_id));

    let mut status = format!(
        "Reporting-MTA: dns; {reporting_mta}\r\nX-Godwit-Queue-ID: {}\r\n",
        original.queue_id
    );
    if let Some(envid) = &original.envelope.mail_params.envid {
        status.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    status.push_str(&format!("Arrival-Date: {}\r\n", date(original.arrival_ms)));
    for r in rcpts {
        status.push_str("\r\n");
        status.push_str(&format!("Final-Recipient: rfc822; {}\r\n", r.address));
        if let Some(o) = &r.orcpt {
            let (kind, a) = o.split_once(';').unwrap_or(("rfc822", o));
            status.push_str(&format!("Original-Recipient: {kind}; {a}\r\n"));
        }
        status.push_str(&format!("Action: {}\r\nStatus: {}\r\n", r.action, r.status));
        if let Some(m) = &r.remote_mta {
            status.push_str(&format!("Remote-MTA: dns; {m}\r\n"));
        }
        status.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\nLast-Attempt-Date: {}\r\n",
            r.diagnostic,
            date(now_ms)
        ));
    }

    let headers_only =
        original.envelope.mail_params.ret.as_deref() == Some("HDRS") || body.len() > MAX_RETURNED;
    let returned = if headers_only {
        let end = body
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(body.len(), |p| p + 2);
        MimePart::new(
            ContentType::new("text/rfc822-headers"),
            BodyPart::Binary(body[..end].to_vec().into()),
        )
        .transfer_encoding("8bit")
    } else {
        // 7bit/8bit, never base64: RFC 2046 5.2.1 forbids encoding message/rfc822.
        let enc = if body.is_ascii() { "7bit" } else { "8bit" };
        MimePart::new(
            ContentType::new("message/rfc822"),
            BodyPart::Binary(body.to_vec().into()),
        )
        .transfer_encoding(enc)
    };
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        BodyPart::Multipart(vec![
            MimePart::new(ContentType::new("text/plain"), BodyPart::Text(human.into()))
                .transfer_encoding("7bit"),
            MimePart::new(
                ContentType::new("message/delivery-status"),
                BodyPart::Text(status.into()),
            )
            .transfer_encoding("7bit"),
            returned,
        ]),
    );
    MessageBuilder::new()
        .from((
            "Mail Delivery System",
            format!("MAILER-DAEMON@{reporting_mta}").as_str(),
        ))
        .to(original.envelope.mail_from.as_str())
        .subject(subject)
        .header(
            "Auto-Submitted",
            mail_builder::headers::raw::Raw::new("auto-replied"),
        )
        .message_id(format!("{}.dsn@{reporting_mta}", original.queue_id))
        .body(report)
        .write_to_vec()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_smtp_proto::{Envelope, MailParams, RcptParams};
    use mail_parser::MimeHeaders;

    fn header(ret: Option<&str>) -> Header {
        Header {
            queue_id: "Q123".into(),
            arrival_ms: 1_700_000_000_000,
            message_id: Some("<orig@test>".into()),
            envelope: Envelope {
                mail_from: "sender@outside.test".into(),
                mail_params: MailParams {
                    envid: Some("E1".into()),
                    ret: ret.map(String::from),
                    ..Default::default()
                },
                rcpts: vec![("u@example.com".into(), RcptParams::default())],
                helo: "c".into(),
                esmtp: true,
                client_ip: "1.2.3.4".into(),
                tls: false,
            },
            kind: None,
            accept_ms: 0,
            journal: None,
        }
    }

    #[test]
    fn dsn_parses_as_a_delivery_report() {
        let body = b"Message-ID: <orig@test>\r\nSubject: hi\r\n\r\nthe body\r\n";
        let r = DsnRcpt {
            address: "u@example.com".into(),
            orcpt: Some("rfc822;U@example.com".into()),
            action: "failed",
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no such user".into(),
            remote_mta: Some("127.0.0.1:2601".into()),
        };
        let raw = build(
            "gw.test",
            &header(None),
            body,
            std::slice::from_ref(&r),
            1_700_000_100_000,
        );
        let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
        assert_eq!(msg.content_type().unwrap().ctype(), "multipart");
        assert_eq!(msg.content_type().unwrap().subtype(), Some("report"));
        assert_eq!(
            msg.content_type().unwrap().attribute("report-type"),
            Some("delivery-status")
        );
        assert_eq!(msg.parts.len(), 4, "root + text + status + message");
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("Content-Type: message/delivery-status"));
        assert!(text.contains("Final-Recipient: rfc822; u@example.com"));
        assert!(text.contains("Original-Recipient: rfc822; U@example.com"));
        assert!(text.contains("Action: failed") && text.contains("Status: 5.1.1"));
        assert!(text.contains("Original-Envelope-Id: E1"));
        assert!(text.contains("Content-Type: message/rfc822"));
        assert!(
            !text.to_ascii_lowercase().contains("base64"),
            "message/* parts must not be base64"
        );
        assert!(text.contains("the body"));
        assert!(text.contains("Auto-Submitted: auto-replied"));
        // RET=HDRS returns the header only.
        let raw = build("gw.test", &header(Some("HDRS")), body, &[r], 0);
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("text/rfc822-headers") && !text.contains("the body"));
    }

    /// A large original read only as far as `needed` still comes back as
    /// its header section; a small one is read whole.
    #[test]
    fn a_large_original_is_read_only_as_far_as_its_headers_go_back() {
        assert_eq!(needed(4096), 4096);
        assert_eq!(needed(50_000_000), MAX_RETURNED as u64 + 1);
        let mut body = b"Message-ID: <big@test>\r\nSubject: big\r\n\r\n".to_vec();
        body.resize(3_000_000, b'z');
        let r = DsnRcpt {
            address: "u@example.com".into(),
            orcpt: None,
            action: "failed",
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 no such user".into(),
            remote_mta: None,
        };
        let part = &body[..needed(body.len() as u64) as usize];
        let raw = build("gw.test", &header(None), part, &[r], 0);
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("text/rfc822-headers"), "{text}");
        assert!(text.contains("Subject: big") && !text.contains("zzzz"));
    }

    #[test]
    fn notify_rules() {
        assert!(wanted(&[], "failed"));
        assert!(!wanted(&["NEVER".into()], "failed"));
        assert!(!wanted(&["SUCCESS".into()], "failed"));
        assert!(wanted(&["FAILURE".into(), "DELAY".into()], "delayed"));
        assert!(!wanted(&["FAILURE".into()], "delayed"));
    }
}
