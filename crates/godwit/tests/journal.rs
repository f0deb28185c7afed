//! `[journal]` against real peers: every accepted message also reaches the
//! archive as a journal report (the original as message/rfc822 after an
//! envelope report naming every recipient, Bcc ones too), durably from the
//! 250 on, and a failing archive never delays or bounces the original.

mod support;

use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(30);

/// A gateway with a third platform, `archive`, for journal reports.
fn gateway(po: u16, pn: u16, pa: u16) -> Gateway {
    Gateway::start(
        po,
        pn,
        "",
        &format!(
            "[platforms.archive]\nrelay = [\"127.0.0.1:{pa}\"]\n\
             [journal]\naddress = \"journal@archive.example.net\"\nplatform = \"archive\"\n"
        ),
    )
}

/// The original message as sent in DATA (dot-stuffed, RFC 5321 4.5.2):
/// Bob in To, Carol in Cc, Dave only in the envelope.
fn original(id: &str) -> String {
    format!(
        "Message-ID: <{id}>\r\nSubject: quarterly {id}\r\nFrom: Alice <alice@sender.test>\r\n\
         To: \"Bob, B.\" <bob@example.com>\r\nCc: carol@example.com\r\n\r\n\
         ..a line that starts with a dot\r\nthe body of {id}"
    )
}

fn send(gw: &Gateway, id: &str) -> String {
    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "alice@sender.test",
        &["bob@example.com", "carol@example.com", "dave@example.com"],
        &original(id),
    );
    assert!(r.starts_with("250"), "{r}");
    r
}

/// Python's email module reads the archive's copy: an independent check of
/// the MIME structure and the envelope report. Prints one JSON object.
fn verify_with_python(dump: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.eml");
    std::fs::write(&path, dump).unwrap();
    let script = r#"
import email, email.policy, json, sys
m = email.message_from_binary_file(open(sys.argv[1], "rb"), policy=email.policy.default)
parts = list(m.iter_parts())
report, attached = parts[0], parts[1]
inner = attached.get_content()
print(json.dumps({
  "mail_args": m["X-Mail-Args"],
  "rcpt_args": m.get_all("X-Rcpt-Args"),
  "content_type": m.get_content_type(),
  "journal_header": "X-MS-Journal-Report" in m,
  "to": str(m["To"]),
  "report_type": report.get_content_type(),
  "report": report.get_content(),
  "attached_type": attached.get_content_type(),
  "attached_message_id": str(inner["Message-ID"]),
  "attached_cc": str(inner["Cc"]),
  "attached_received": inner.get_all("Received") or [],
  "attached_body": inner.get_content(),
}))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python could not read the journal report: {}\n{dump}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn journal_copies(archive: &Sink, id: &str) -> Vec<String> {
    archive
        .messages()
        .into_iter()
        .filter(|m| m.contains(&format!("<{id}>")))
        .collect()
}

#[test]
fn a_journal_report_reaches_the_archive_with_its_envelope_report() {
    let (po, pn, pa) = (free_port(), free_port(), free_port());
    let old = Sink::start(po, &[]);
    let _new = Sink::start(pn, &[]);
    let archive = Sink::start(pa, &[]);
    let gw = gateway(po, pn, pa);
    send(&gw, "j1@test");
    let dump = wait_for("the journal report at the archive", T, || {
        journal_copies(&archive, "j1@test").into_iter().next()
    });
    let v = verify_with_python(&dump);
    // Null reverse-path: a report never bounces to the original sender.
    assert_eq!(v["mail_args"], "<>", "{v}");
    // NOTIFY=NEVER (RFC 3461): no DSN about the journal copy, ever.
    assert_eq!(
        v["rcpt_args"],
        serde_json::json!(["<journal@archive.example.net> NOTIFY=NEVER"]),
        "{v}"
    );
    assert_eq!(v["content_type"], "multipart/mixed", "{v}");
    assert_eq!(v["journal_header"], true, "{v}");
    assert_eq!(v["report_type"], "text/plain", "{v}");
    let report = v["report"].as_str().unwrap();
    for line in [
        "Sender: alice@sender.test",
        "Subject: quarterly j1@test",
        "Message-Id: <j1@test>",
        "To: bob@example.com",
        "Cc: carol@example.com",
        // Only the envelope knew Dave: the report keeps him.
        "Bcc: dave@example.com",
    ] {
        assert!(
            report.lines().any(|l| l == line),
            "missing {line:?} in\n{report}"
        );
    }
    assert!(!report.contains("journal@archive"), "{report}");
    assert_eq!(v["attached_type"], "message/rfc822", "{v}");
    assert_eq!(v["attached_message_id"], "<j1@test>", "{v}");
    assert_eq!(v["attached_cc"], "carol@example.com", "{v}");
    // The copy is the message as accepted: our Received header, the
    // client's lines (the dot line unstuffed again), nothing re-encoded.
    assert!(
        v["attached_received"][0]
            .as_str()
            .unwrap()
            .contains("gw.test"),
        "{v}"
    );
    assert_eq!(
        v["attached_body"].as_str().unwrap().replace("\r\n", "\n"),
        ".a line that starts with a dot\nthe body of j1@test\n",
        "{v}"
    );
    // The original went to its platform once, without the journal recipient.
    wait_for("the original at old", T, || {
        (old.count_containing("<j1@test>") == 1).then_some(())
    });
    let at_old = old.messages().concat();
    assert!(!at_old.contains("journal@archive"), "{at_old}");
    assert!(!at_old.contains("X-MS-Journal-Report"), "{at_old}");
    let queued = gw.wait_event("journal.queued", T, |_| true);
    assert_eq!(queued["rcpt"], "journal@archive.example.net");
    assert_eq!(queued["platform"], "archive");
    gw.wait_queue_empty(T);
}

#[test]
fn sigkill_after_the_250_loses_neither_copy() {
    // Nothing listens yet: the message and its journal copy exist only in the
    // spool when the gateway is killed right after the 250.
    let (po, pn, pa) = (free_port(), free_port(), free_port());
    let mut gw = gateway(po, pn, pa);
    send(&gw, "j2@test");
    gw.kill9();
    let old = Sink::start(po, &[]);
    let _new = Sink::start(pn, &[]);
    let archive = Sink::start(pa, &[]);
    gw.restart();
    wait_for("both copies after the restart", T, || {
        (old.count_containing("<j2@test>") == 1 && journal_copies(&archive, "j2@test").len() == 1)
            .then_some(())
    });
    gw.wait_queue_empty(T);
    assert_eq!(old.count_containing("<j2@test>"), 1);
    let copies = journal_copies(&archive, "j2@test");
    assert_eq!(copies.len(), 1);
    let v = verify_with_python(&copies[0]);
    assert!(
        v["report"]
            .as_str()
            .unwrap()
            .contains("Bcc: dave@example.com"),
        "{v}"
    );
}

#[test]
fn a_failing_archive_never_delays_or_bounces_the_original() {
    let (po, pn, pa) = (free_port(), free_port(), free_port());
    let old = Sink::start(po, &[]);
    let _new = Sink::start(pn, &[]);
    // The archive refuses every recipient, first with 4xx (-r), and for the
    // second message with 5xx (-f): both only ever defer the journal copy.
    let mut archive = Sink::start(pa, &["-r", "rcpt"]);
    let mut gw = gateway(po, pn, pa);
    send(&gw, "j3@test");
    let delivered = gw.wait_event("delivery.delivered", T, |e| e["rcpt"] == "bob@example.com");
    // The original's queue time is its own: the journal copy held up nothing.
    let queue_ms = delivered["delays"]["queue_ms"].as_u64().unwrap();
    assert!(
        queue_ms < 5000,
        "original waited {queue_ms} ms: {delivered}"
    );
    gw.wait_event("delivery.deferred", T, |e| {
        e["rcpt"] == "journal@archive.example.net"
            && e["platform"] == "archive"
            && e["reply"].as_str().is_some_and(|r| r.starts_with("4"))
    });
    wait_for("the original at old", T, || {
        (old.count_containing("<j3@test>") == 1).then_some(())
    });
    // The journal copy is retried, and shown queued meanwhile.
    gw.wait_event("delivery.deferred", T, |e| {
        e["rcpt"] == "journal@archive.example.net" && e["attempts"].as_u64() >= Some(2)
    });
    let (_, list) = gw.cli(&["queue", "list"]);
    assert!(list.contains("journal@archive.example.net"), "{list}");

    archive.stop();
    let archive = Sink::start(pa, &["-f", "rcpt"]);
    gw.kill9();
    gw.restart();
    send(&gw, "j4@test");
    gw.wait_event("delivery.delivered", T, |e| {
        e["rcpt"] == "dave@example.com"
            && e["message_id"]
                .as_str()
                .is_some_and(|m| m.contains("j4@test"))
    });
    gw.wait_event("delivery.deferred", T, |e| {
        e["rcpt"] == "journal@archive.example.net"
            && e["reply"].as_str().is_some_and(|r| r.starts_with("5"))
    });
    // A 5xx from the archive failed nothing and produced no DSN.
    assert!(gw.events_named("delivery.failed").is_empty());
    assert!(gw.events_named("dsn.queued").is_empty());
    drop(archive);
    // Once the archive takes mail, both journal copies arrive.
    let archive = Sink::start(pa, &[]);
    wait_for("both journal copies", Duration::from_secs(60), || {
        (journal_copies(&archive, "j3@test").len() == 1
            && journal_copies(&archive, "j4@test").len() == 1)
            .then_some(())
    });
    gw.wait_queue_empty(T);
}
