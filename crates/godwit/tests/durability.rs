//! TLS and the spool's promises against the real binary.

mod support;

use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(20);

fn write_cert(dir: &std::path::Path) -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["gw.test".to_string()]).unwrap();
    let c = dir.join("cert.pem");
    let k = dir.join("key.pem");
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn starttls_inbound_with_a_real_client() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(dir.path());
    let gw = Gateway::start(
        po,
        pn,
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\""),
        "",
    );
    // Python's smtplib with ssl: an independent TLS client.
    let script = format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP("127.0.0.1", {port}, timeout=20)
s.ehlo()
assert s.has_extn("starttls"), s.esmtp_features
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s.starttls(context=ctx)
s.ehlo()
assert not s.has_extn("starttls")
s.sendmail("a@b.test", ["u@example.com"], "Message-ID: <tls@test>\r\nSubject: tls\r\n\r\nover tls\r\n")
s.quit()
print("sent")
"#,
        port = gw.port
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = wait_for("delivery", T, || {
        old.messages().into_iter().find(|m| m.contains("tls@test"))
    });
    assert!(
        m.contains("with ESMTPS id"),
        "Received header must say ESMTPS: {m}"
    );
    let tls = gw.events_named("connection.tls");
    assert_eq!(tls.len(), 1, "{tls:?}");
    assert!(tls[0]["protocol"].as_str().unwrap().contains("TLS"));
    assert_eq!(gw.events_named("message.accepted")[0]["tls"], true);
}

#[test]
fn tls_required_platform_never_gets_clear_text() {
    let (po, pn) = (free_port(), free_port());
    // smtp-sink offers no STARTTLS.
    let old = Sink::start(po, &[]);
    let mut gw = Gateway::start(po, pn, "", "");
    // The platform requires TLS.
    let relay = format!("relay = [\"127.0.0.1:{po}\"]");
    gw.reconfigure(|c| c.replacen(&relay, &format!("{relay}\ntls = \"require\""), 1));
    let mut c = gw.client();
    c.greet();
    assert!(
        c.mail(
            "a@b.test",
            &["u@example.com"],
            &message("cleartext@test", "secret")
        )
        .starts_with("250")
    );
    let d = wait_for("deferral", T, || {
        gw.events_named("delivery.deferred").into_iter().next()
    });
    assert!(d["reply"].as_str().unwrap().contains("4.7.10"), "{d}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(old.messages().len(), 0, "a message went out in clear text");
}

#[test]
fn unwritable_spool_answers_452_never_250() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "", "");
    // Sabotage the spool: its tmp directory becomes a file, so every write fails
    // (root ignores permissions, so a mode change would prove nothing).
    let tmp = gw.data.join("spool/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "a@b.test",
        &["u@example.com"],
        &message("nospace@test", "x"),
    );
    assert!(r.starts_with("452 4.3.1"), "{r}");
    // The session goes on, and the client may retry later.
    assert!(c.cmd("NOOP").starts_with("250"));
    // Events are written asynchronously: wait for the record.
    wait_for("the refusal event", T, || {
        gw.events_named("message.refused")
            .iter()
            .any(|e| e["stage"] == "data" && e["reply"].as_str().unwrap().starts_with("452"))
            .then_some(())
    });
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let r = c.mail("a@b.test", &["u@example.com"], &message("retry@test", "x"));
    assert!(r.starts_with("250"), "{r}");
    wait_for("delivery", T, || {
        (old.count_containing("retry@test") == 1).then_some(())
    });
    assert_eq!(old.count_containing("nospace@test"), 0);
}

#[test]
fn recovery_resumes_delivery_and_never_delivers_a_torn_file() {
    let (po, pn) = (free_port(), free_port());
    let mut gw = Gateway::start(po, pn, "", "");
    // No platform listens: both messages wait in the queue.
    let mut c = gw.client();
    c.greet();
    assert!(
        c.mail("a@b.test", &["u@example.com"], &message("whole@test", "x"))
            .starts_with("250")
    );
    assert!(
        c.mail("a@b.test", &["v@example.com"], &message("torn@test", "y"))
            .starts_with("250")
    );
    drop(c);
    gw.kill9();
    // Tear the second file as a crash mid-write would (its END record is gone).
    let q = gw.data.join("spool/queue");
    let mut files: Vec<_> = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2);
    let torn = files
        .iter()
        .find(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).contains("torn@test"))
        .unwrap()
        .clone();
    let bytes = std::fs::read(&torn).unwrap();
    let end = bytes.windows(4).position(|w| w == b"END!").unwrap();
    std::fs::write(&torn, &bytes[..end - 3]).unwrap();
    let old = Sink::start(po, &[]);
    gw.restart();
    wait_for("recovered delivery", T, || {
        (old.count_containing("whole@test") == 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        old.count_containing("torn@test"),
        0,
        "a torn file was delivered"
    );
    let corrupt = gw.events_named("queue.corrupt");
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
    assert!(gw.data.join("spool/corrupt").read_dir().unwrap().count() == 1);
    assert_eq!(gw.events_named("queue.recovered").len(), 1);
}

#[test]
fn opportunistic_starttls_to_a_platform_that_offers_it() {
    // The platform is another godwit gateway with a certificate (a real
    // STARTTLS server), relaying on to an smtp-sink.
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(dir.path());
    let downstream = Gateway::start(
        sink_port,
        sink_port,
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\""),
        "",
    );
    // A self-signed certificate, and no tls_insecure: opportunistic TLS
    // (Postfix's `may`) encrypts anyway and records that it did not verify.
    // Before, it verified and deferred for ever (an internal CA's platform).
    let gw = Gateway::start(downstream.port, free_port(), "", "");
    let mut c = gw.client();
    c.greet();
    assert!(
        c.mail(
            "a@b.test",
            &["u@example.com"],
            &message("tls-out@test", "x")
        )
        .starts_with("250")
    );
    wait_for("delivery through the TLS platform", T, || {
        (sink.count_containing("tls-out@test") == 1).then_some(())
    });
    let attempt = wait_for("attempt event", T, || {
        gw.events_named("delivery.attempt").into_iter().next()
    });
    assert_eq!(attempt["tls"], true, "{attempt}");
    assert_eq!(attempt["tls_verified"], false, "{attempt}");
    assert_eq!(downstream.events_named("connection.tls").len(), 1);
    let m = sink
        .messages()
        .into_iter()
        .find(|m| m.contains("tls-out@test"))
        .unwrap();
    assert!(
        m.contains("by gw.test (godwit) with ESMTPS"),
        "the hop to the platform was not TLS: {m}"
    );
}

/// `tls = "verify"` delivers only over a certificate that verifies: with
/// the platform's internal CA as `tls_ca` it does (and says so); without
/// it, the public roots refuse the chain and the mail waits, deferred with
/// the reason.
#[test]
fn verify_trusts_the_configured_ca_and_only_it() {
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = ca_signed(dir.path(), "Old Platform Internal CA");
    let (cert, key, ca) = (cert.display(), key.display(), ca.display());
    let downstream = Gateway::start(
        sink_port,
        sink_port,
        &format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\""),
        "",
    );
    let relay = format!("relay = [\"127.0.0.1:{}\"]", downstream.port);
    let mut gw = Gateway::start(downstream.port, free_port(), "", "");
    gw.reconfigure(|c| c.replacen(&relay, &format!("{relay}\ntls = \"verify\""), 1));
    let mut c = gw.client();
    c.greet();
    assert!(
        c.mail(
            "a@b.test",
            &["u@example.com"],
            &message("unverified@test", "x")
        )
        .starts_with("250")
    );
    let deferred = wait_for("a deferral naming the certificate", T, || {
        gw.events_named("delivery.deferred").into_iter().next()
    });
    let reply = deferred["reply"].as_str().unwrap();
    assert!(
        reply.contains("4.7") && reply.to_lowercase().contains("certificate"),
        "{reply}"
    );
    assert_eq!(sink.count_containing("unverified@test"), 0);
    drop(c);
    gw.reconfigure(|c| {
        c.replacen(
            &format!("{relay}\ntls = \"verify\""),
            &format!("{relay}\ntls = \"verify\"\ntls_ca = \"{ca}\""),
            1,
        )
    });
    let (ok, out) = gw.cli(&["queue", "flush", "--all"]);
    assert!(ok, "{out}");
    wait_for("delivery over the verified chain", T, || {
        (sink.count_containing("unverified@test") == 1).then_some(())
    });
    let attempt = wait_for("a verified attempt", T, || {
        gw.events_named("delivery.attempt")
            .into_iter()
            .find(|a| a["code"] == 250)
    });
    assert_eq!(attempt["tls"], true, "{attempt}");
    assert_eq!(attempt["tls_verified"], true, "{attempt}");
}

#[test]
fn total_connection_limit_and_data_timeout() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "max_connections = 2\ndata_timeout = \"1s\"", "");
    let mut a = gw.client();
    assert!(a.reply().starts_with("220"));
    // The harness's own probe session may hold a slot for a few more
    // milliseconds after it saw the close: wait for the slot, then hold it.
    let _b = wait_for("a second connection slot", Duration::from_secs(5), || {
        let mut b = gw.client();
        b.reply().starts_with("220").then_some(b)
    });
    let mut third = gw.client();
    assert!(
        third.reply().starts_with("421 4.7.0"),
        "a third connection over max_connections = 2"
    );
    drop(third);
    // A client that stops in the middle of DATA is cut off, and nothing is queued.
    assert!(a.cmd("EHLO c").starts_with("250"));
    assert!(a.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(a.cmd("RCPT TO:<u@example.com>").starts_with("250"));
    assert!(a.cmd("DATA").starts_with("354"));
    a.send(b"Subject: half\r\n\r\nhalf a message");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(a.reply().starts_with("421 4.4.2"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(old.messages().is_empty());
    let (_, q) = gw.cli(&["queue", "list"]);
    assert!(q.contains("Mail queue is empty"), "{q}");
}
