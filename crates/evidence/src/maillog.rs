//! Postfix-style log lines (`QUEUEID: to=<...>, relay=..., delay=..., dsn=X.Y.Z,
//! status=sent|deferred|bounced (reply)`), written from the event stream so
//! that an operator's grep habits and pflogsumm (`--syslog-name=godwit`) work.

use crate::metrics::code_of;
use godwit_events::{Delays, Event, Record};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// "127.0.0.1:2601" -> "127.0.0.1[127.0.0.1]:2601", as Postfix writes relays.
fn relay(host: &str) -> String {
    // An MX delivery's host is already `name[ip]:port`.
    if host.contains('[') && !host.starts_with('[') {
        return host.to_string();
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            format!("{h}[{h}]:{p}")
        }
        _ => "none".into(),
    }
}

fn dsn(reply: &str, default: &str) -> String {
    let c = code_of(reply);
    if c.contains('.') {
        c
    } else {
        default.to_string()
    }
}

/// Seconds as Postfix's log_adhoc writes them: two significant digits or so,
/// "0" below 10 ms (delay=0.37, delays=0.08/0.01/0.15/0.13, delay=327).
pub fn secs(ms: u64) -> String {
    let t = ms as f64 / 1000.0;
    let s = if ms < 10 {
        return "0".into();
    } else if t < 10.0 {
        format!("{t:.2}")
    } else if t < 100.0 {
        format!("{t:.1}")
    } else {
        return format!("{t:.0}");
    };
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `delay=T, delays=a/b/c/d` (T is the sum: arrival at our edge to now).
fn delay_fields(d: &Delays, at_least_ms: u64) -> String {
    format!(
        "delay={}, delays={}/{}/{}/{}",
        secs(d.total_ms().max(at_least_ms)),
        secs(d.accept_ms),
        secs(d.queue_ms),
        secs(d.connect_ms),
        secs(d.transmit_ms)
    )
}

/// A reply as the text inside `status=... (TEXT)`: pflogsumm reads up to the
/// first `)`, so inner parentheses become brackets, and Rust's
/// " (os error N)" suffix, which says nothing an operator needs, goes.
pub fn reason(reply: &str) -> String {
    let mut t = reply.trim().to_string();
    while let Some(i) = t.find(" (os error ") {
        match t[i..].find(')') {
            Some(j) => t.replace_range(i..i + j + 1, ""),
            None => break,
        }
    }
    t.replace('(', "[").replace(')', "]")
}

/// The lines for one event (none for most).
pub fn lines(r: &Record, hostname: &str, pid: u32) -> Vec<String> {
    let head = |prog: &str| format!("{} {hostname} godwit/{prog}[{pid}]:", r.ts);
    match &r.event {
        Event::MessageAccepted {
            queue_id,
            message_id,
            client_ip,
            helo,
            mail_from,
            rcpts,
            size,
            sasl_method,
            sasl_username,
            ..
        } => vec![
            match (sasl_method, sasl_username) {
                // As Postfix's smtpd writes an authenticated client.
                (Some(m), Some(u)) => format!(
                    "{} {queue_id}: client={helo}[{client_ip}], sasl_method={m}, sasl_username={u}",
                    head("smtpd")
                ),
                _ => format!("{} {queue_id}: client={helo}[{client_ip}]", head("smtpd")),
            },
            format!(
                "{} {queue_id}: message-id={}",
                head("cleanup"),
                message_id.as_deref().unwrap_or("<>")
            ),
            format!(
                "{} {queue_id}: from=<{mail_from}>, size={size}, nrcpt={} (queue active)",
                head("qmgr"),
                rcpts.len()
            ),
        ],
        Event::SubmissionAuth {
            client_ip,
            method,
            user,
            result,
            reason,
            ..
        } if result != "ok" => vec![format!(
            "{} warning: unknown[{client_ip}]: SASL {method} authentication failed: {}, sasl_username={user}",
            head("submission/smtpd"),
            reason.as_deref().unwrap_or("authentication failure")
        )],
        Event::SubmissionLockout {
            client_ip,
            user,
            failures,
            window_s,
        } => vec![format!(
            "{} warning: unknown[{client_ip}]: SASL authentication locked out after {failures} failures in {window_s}s, sasl_username={user}",
            head("submission/smtpd")
        )],
        Event::Delivered {
            queue_id,
            rcpt,
            host,
            reply,
            delay_ms,
            delays,
            ..
        } => vec![format!(
            "{} {queue_id}: to=<{rcpt}>, relay={}, {}, dsn={}, status=sent ({reply})",
            head("smtp"),
            relay(host),
            delay_fields(delays, *delay_ms),
            dsn(reply, "2.0.0"),
            reply = reason(reply)
        )],
        Event::Deferred {
            queue_id,
            rcpt,
            host,
            reply,
            delays,
            ..
        } => vec![format!(
            "{} {queue_id}: to=<{rcpt}>, relay={}, {}, dsn={}, status=deferred ({reply})",
            head("smtp"),
            host.as_deref().map_or("none".into(), relay),
            delay_fields(delays, 0),
            dsn(reply, "4.0.0"),
            reply = reason(reply)
        )],
        Event::Failed {
            queue_id,
            rcpt,
            reply,
            delays,
            ..
        } => vec![format!(
            "{} {queue_id}: to=<{rcpt}>, relay=none, {}, dsn={}, status=bounced ({reply})",
            head("smtp"),
            delay_fields(delays, 0),
            dsn(reply, "5.0.0"),
            reply = reason(reply)
        )],
        Event::MessageRefused {
            client_ip,
            stage,
            reply,
            mail_from,
            rcpt,
            helo,
            proto,
            ..
        } if *stage == "rcpt" || *stage == "data" || *stage == "mail" => {
            // As Postfix's smtpd writes it, which pflogsumm's reject detail reads.
            let mut line = format!(
                "{} NOQUEUE: reject: {} from unknown[{client_ip}]: {reply};",
                head("smtpd"),
                stage.to_uppercase()
            );
            if let Some(f) = mail_from {
                line.push_str(&format!(" from=<{f}>"));
            }
            if let Some(t) = rcpt {
                line.push_str(&format!(" to=<{t}>"));
            }
            line.push_str(&format!(" proto={}", proto.as_deref().unwrap_or("ESMTP")));
            if let Some(h) = helo {
                line.push_str(&format!(" helo=<{h}>"));
            }
            vec![line]
        }
        // Postfix logs a hold from cleanup (`hold: header ...`); that is the
        // line pflogsumm counts as held and lists in its hold detail.
        Event::Held {
            queue_id,
            rcpt,
            why,
            ..
        } => vec![format!(
            "{} {queue_id}: hold: END-OF-MESSAGE {}; to=<{rcpt}>",
            head("cleanup"),
            reason(why)
        )],
        Event::Released {
            queue_id,
            rcpt,
            actor,
            ..
        } => vec![format!(
            "{} {queue_id}: released from hold: to=<{rcpt}> by {actor}",
            head("postsuper")
        )],
        // postsuper -d writes `QUEUEID: removed`.
        Event::QueueDeleted { queue_id, .. } => {
            vec![format!("{} {queue_id}: removed", head("postsuper"))]
        }
        _ => Vec::new(),
    }
}

pub async fn run(
    path: PathBuf,
    hostname: String,
    mut rx: UnboundedReceiver<Arc<godwit_events::Logged>>,
) {
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("events.postfix_log {}: {e}", path.display());
            return;
        }
    };
    let mut w = std::io::BufWriter::new(file);
    let pid = std::process::id();
    while let Some(r) = rx.recv().await {
        for l in lines(&r, &hostname, pid) {
            let _ = writeln!(w, "{l}");
        }
        while let Ok(r) = rx.try_recv() {
            for l in lines(&r, &hostname, pid) {
                let _ = writeln!(w, "{l}");
            }
        }
        let _ = w.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_have_no_parentheses_pflogsumm_would_cut_at() {
        for (reply, want) in [
            (
                "451 4.4.1 connect to 127.0.0.1:2602: Connection refused (os error 111)",
                "451 4.4.1 connect to 127.0.0.1:2602: Connection refused",
            ),
            (
                "450 4.7.1 try later (greylisted)",
                "450 4.7.1 try later [greylisted]",
            ),
            ("250 2.0.0 Ok: queued as ABC", "250 2.0.0 Ok: queued as ABC"),
        ] {
            assert_eq!(reason(reply), want);
        }
    }

    #[test]
    fn seconds_as_postfix_writes_them() {
        for (ms, want) in [
            (0, "0"),
            (9, "0"),
            (10, "0.01"),
            (80, "0.08"),
            (370, "0.37"),
            (1000, "1"),
            (4200, "4.2"),
            (12_340, "12.3"),
            (327_400, "327"),
        ] {
            assert_eq!(secs(ms), want, "{ms} ms");
        }
    }

    #[test]
    fn deferrals_and_bounces_carry_their_delays() {
        let d = Delays {
            accept_ms: 80,
            queue_ms: 10,
            connect_ms: 150,
            transmit_ms: 130,
        };
        let rec = |event| Record {
            ts: "2026-01-01T00:00:00.000Z".into(),
            node: "n".into(),
            event,
        };
        let deferred = rec(Event::Deferred {
            queue_id: "Q1".into(),
            message_id: None,
            rcpt: "a@example.com".into(),
            platform: "new".into(),
            host: Some("127.0.0.1:2525".into()),
            reply: "451 4.3.0 try later".into(),
            attempts: 1,
            next_attempt_in_s: 60,
            delays: d,
        });
        let l = &lines(&deferred, "gw", 7)[0];
        assert!(
            l.contains("relay=127.0.0.1[127.0.0.1]:2525, delay=0.37, delays=0.08/0.01/0.15/0.13, dsn=4.3.0, status=deferred (451 4.3.0 try later)"),
            "{l}"
        );
        let bounced = rec(Event::Failed {
            queue_id: "Q1".into(),
            message_id: None,
            rcpt: "a@example.com".into(),
            platform: "new".into(),
            reply: "550 5.1.1 no such user".into(),
            reason: "rejected by platform".into(),
            delays: d,
        });
        let l = &lines(&bounced, "gw", 7)[0];
        assert!(
            l.contains("delay=0.37, delays=0.08/0.01/0.15/0.13, dsn=5.1.1, status=bounced"),
            "{l}"
        );
        // A delivery logged before the breakdown existed keeps its delay.
        let delivered = rec(Event::Delivered {
            queue_id: "Q1".into(),
            message_id: None,
            rcpt: "a@example.com".into(),
            platform: "new".into(),
            host: "127.0.0.1:2525".into(),
            reply: "250 2.0.0 Ok".into(),
            remote_queue_id: None,
            delay_ms: 2500,
            delays: Delays::default(),
        });
        let l = &lines(&delivered, "gw", 7)[0];
        assert!(l.contains("delay=2.5, delays=0/0/0/0,"), "{l}");
    }

    #[test]
    fn reject_lines_carry_from_to_proto_and_helo() {
        let r = Record {
            ts: "2026-01-01T00:00:00.000Z".into(),
            node: "n".into(),
            event: Event::MessageRefused {
                session: 1,
                client_ip: "192.0.2.1".into(),
                stage: "rcpt".into(),
                reply: "554 5.7.1 <x@elsewhere.test>: Relay access denied".into(),
                detail: None,
                mail_from: Some("s@outside.test".into()),
                rcpt: Some("x@elsewhere.test".into()),
                helo: Some("client.test".into()),
                proto: Some("ESMTP".into()),
            },
        };
        let l = &lines(&r, "gw", 7)[0];
        assert!(
            l.ends_with(
                "NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 554 5.7.1 <x@elsewhere.test>: Relay access denied; from=<s@outside.test> to=<x@elsewhere.test> proto=ESMTP helo=<client.test>"
            ),
            "{l}"
        );
    }
}
