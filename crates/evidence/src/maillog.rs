//! Postfix-style log lines (`QUEUEID: to=<...>, relay=..., delay=..., dsn=X.Y.Z,
//! status=sent|deferred|bounced (reply)`), written from the event stream so
//! that an operator's grep habits and pflogsumm (`--syslog-name=godwit`) work.

use crate::metrics::code_of;
use godwit_events::{Event, Record};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

/// "127.0.0.1:2601" -> "127.0.0.1[127.0.0.1]:2601", as Postfix writes relays.
fn relay(host: &str) -> String {
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
            ..
        } => vec![
            format!("{} {queue_id}: client={helo}[{client_ip}]", head("smtpd")),
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
        Event::Delivered {
            queue_id,
            rcpt,
            host,
            reply,
            delay_ms,
            ..
        } => vec![format!(
            "{} {queue_id}: to=<{rcpt}>, relay={}, delay={:.2}, delays=0/0/0/0, dsn={}, status=sent ({reply})",
            head("smtp"),
            relay(host),
            *delay_ms as f64 / 1000.0,
            dsn(reply, "2.0.0")
        )],
        Event::Deferred {
            queue_id,
            rcpt,
            host,
            reply,
            ..
        } => vec![format!(
            "{} {queue_id}: to=<{rcpt}>, relay={}, delay=0, delays=0/0/0/0, dsn={}, status=deferred ({reply})",
            head("smtp"),
            host.as_deref().map_or("none".into(), relay),
            dsn(reply, "4.0.0")
        )],
        Event::Failed {
            queue_id,
            rcpt,
            reply,
            ..
        } => vec![format!(
            "{} {queue_id}: to=<{rcpt}>, relay=none, delay=0, delays=0/0/0/0, dsn={}, status=bounced ({reply})",
            head("smtp"),
            dsn(reply, "5.0.0")
        )],
        Event::MessageRefused {
            client_ip,
            stage,
            reply,
            ..
        } if *stage == "rcpt" || *stage == "data" => {
            vec![format!(
                "{} NOQUEUE: reject: {} from unknown[{client_ip}]: {reply}; proto=ESMTP",
                head("smtpd"),
                stage.to_uppercase()
            )]
        }
        _ => Vec::new(),
    }
}

pub async fn run(path: PathBuf, hostname: String, mut rx: UnboundedReceiver<Arc<Record>>) {
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
