//! `check smtp` against a real Postfix with STARTTLS certificates made by rcgen.
//! Port slots 31540-31569 belong to this file (see `common::port`).

mod common;

use common::*;
use godwit_check::finding::Severity;
use godwit_check::smtp::{SmtpCheck, check};
use std::time::Duration;

fn probe(port: u16, tls_name: &str, ca: Option<&std::path::Path>) -> SmtpCheck {
    let mut o = SmtpCheck::new(&format!("127.0.0.1:{port}"));
    o.tls_name = Some(tls_name.to_string());
    o.ca_files = ca.map(|p| vec![p.to_path_buf()]).unwrap_or_default();
    o.timeout = Duration::from_secs(10);
    o.mail_from = "external-test@sender.example".into();
    o
}

#[tokio::test]
async fn starttls_certificates_valid_expiring_expired_wrong_name_self_signed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let name = "mx.test.example";
    let valid = pki.leaf(dir.path(), "valid", &[name], -1, 90, false);
    let expiring = pki.leaf(dir.path(), "expiring", &[name], -60, 10, false);
    let expired = pki.leaf(dir.path(), "expired", &[name], -90, -2, false);
    let wrong = pki.leaf(dir.path(), "wrong", &["other.example.net"], -1, 90, false);
    let selfsigned = pki.leaf(dir.path(), "self", &[name], -1, 90, true);
    let ca = pki.ca_file(dir.path());
    let _pf = Postfix::start(
        dir.path(),
        &[
            (port(31540), tls_opts(&valid)),
            (port(31541), tls_opts(&expiring)),
            (port(31542), tls_opts(&expired)),
            (port(31543), tls_opts(&wrong)),
            (port(31544), tls_opts(&selfsigned)),
            (port(31545), vec!["smtpd_tls_security_level=none".into()]),
            // Refuses every client at connect time: 554 instead of the 220 banner.
            (
                port(31549),
                vec![
                    "smtpd_delay_reject=no".into(),
                    "smtpd_client_restrictions=reject".into(),
                ],
            ),
        ],
    );

    // Valid, signed by the test CA passed with --ca: nothing to report.
    let f = check(&probe(port(31540), name, Some(&ca))).await.unwrap();
    assert_sev(
        one(&f, "smtp.banner", &format!("{}", port(31540))),
        Severity::Ok,
    );
    assert!(
        one(&f, "smtp.banner", &format!("{}", port(31540)))
            .meaning
            .contains("ESMTP Postfix")
    );
    let ehlo = one(&f, "smtp.ehlo", &format!("{}", port(31540)));
    assert!(
        ehlo.meaning.contains("STARTTLS") && ehlo.meaning.contains("PIPELINING"),
        "{}",
        ehlo.meaning
    );
    assert_sev(
        one(&f, "smtp.starttls", &format!("{}", port(31540))),
        Severity::Ok,
    );
    let info = one(&f, "tls.certificate", &format!("{}", port(31540)));
    assert!(
        info.meaning.contains("SANs=mx.test.example"),
        "{}",
        info.meaning
    );
    assert!(
        info.meaning.contains("issuer=CN=godwit test CA"),
        "{}",
        info.meaning
    );
    assert!(info.meaning.contains("chain of 2"), "{}", info.meaning);
    for check in ["tls.expiry", "tls.name", "tls.trust"] {
        assert_sev(one(&f, check, &format!("{}", port(31540))), Severity::Ok);
    }
    assert!(f.iter().all(|f| f.severity == Severity::Ok), "{f:#?}");

    // The same server without --ca: the private CA is not in the system roots.
    let f = check(&probe(port(31540), name, None)).await.unwrap();
    let trust = one(&f, "tls.trust", &format!("{}", port(31540)));
    assert_sev(trust, Severity::Block);
    assert!(trust.meaning.contains("UnknownIssuer"), "{}", trust.meaning);

    let f = check(&probe(port(31541), name, Some(&ca))).await.unwrap();
    let exp = one(&f, "tls.expiry", &format!("{}", port(31541)));
    assert_sev(exp, Severity::Warn);
    assert!(exp.meaning.contains("days left"), "{}", exp.meaning);

    let f = check(&probe(port(31542), name, Some(&ca))).await.unwrap();
    let exp = one(&f, "tls.expiry", &format!("{}", port(31542)));
    assert_sev(exp, Severity::Block);
    assert!(exp.meaning.contains("expired on"), "{}", exp.meaning);
    // Expiry does not hide the rest: the chain itself is still trusted.
    assert_sev(
        one(&f, "tls.trust", &format!("{}", port(31542))),
        Severity::Ok,
    );

    let f = check(&probe(port(31543), name, Some(&ca))).await.unwrap();
    let n = one(&f, "tls.name", &format!("{}", port(31543)));
    assert_sev(n, Severity::Block);
    assert!(
        n.meaning.contains("does not name mx.test.example")
            && n.meaning.contains("other.example.net")
    );

    let f = check(&probe(port(31544), name, Some(&ca))).await.unwrap();
    let t = one(&f, "tls.trust", &format!("{}", port(31544)));
    assert_sev(t, Severity::Block);
    assert!(t.meaning.contains("self-signed"), "{}", t.meaning);
    assert_sev(
        one(&f, "tls.name", &format!("{}", port(31544))),
        Severity::Ok,
    );
    // Vouching for that very certificate with --ca makes it trusted.
    let f = check(&probe(
        port(31544),
        name,
        Some(std::path::Path::new(&selfsigned.0)),
    ))
    .await
    .unwrap();
    assert_sev(
        one(&f, "tls.trust", &format!("{}", port(31544))),
        Severity::Ok,
    );

    let f = check(&probe(port(31549), name, None)).await.unwrap();
    let b = one(&f, "smtp.banner", &format!("{}", port(31549)));
    assert_sev(b, Severity::Block);
    assert!(b.meaning.contains("554"), "{}", b.meaning);

    let f = check(&probe(port(31545), name, None)).await.unwrap();
    let s = one(&f, "smtp.starttls", &format!("{}", port(31545)));
    assert_sev(s, Severity::Warn);
    assert!(s.meaning.starts_with("No STARTTLS"));
}

#[tokio::test]
async fn rcpt_checks_acceptance_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let cert = pki.leaf(dir.path(), "valid", &["mx.test.example"], -1, 90, false);
    let ca = pki.ca_file(dir.path());
    let pf = Postfix::start(dir.path(), &[(port(31546), tls_opts(&cert))]);

    let mut o = probe(port(31546), "mx.test.example", Some(&ca));
    o.rcpt = Some("user@example.com".into());
    let f = check(&o).await.unwrap();
    let r = one(&f, "smtp.rcpt", "user@example.com");
    assert_sev(r, Severity::Ok);
    assert!(r.meaning.contains("250 2.1.5"), "{}", r.meaning);

    o.rcpt = Some("someone@other.example".into());
    let f = check(&o).await.unwrap();
    let r = one(&f, "smtp.rcpt", "someone@other.example");
    assert_sev(r, Severity::Block);
    assert!(
        r.meaning.contains("554") && r.meaning.contains("Relay access denied"),
        "{}",
        r.meaning
    );

    // Both sessions ended; Postfix logs a session's end with "disconnect from".
    let log = pf.wait_log("disconnect from");
    assert!(
        !log.contains("message-id="),
        "--rcpt must not send a message:\n{log}"
    );
}

#[tokio::test]
async fn send_delivers_a_labelled_message_and_reports_the_queue_id() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let cert = pki.leaf(dir.path(), "valid", &["mx.test.example"], -1, 90, false);
    let ca = pki.ca_file(dir.path());
    let pf = Postfix::start(dir.path(), &[(port(31547), tls_opts(&cert))]);

    let mut o = probe(port(31547), "mx.test.example", Some(&ca));
    o.rcpt = Some("user@example.com".into());
    o.send = true;
    let f = check(&o).await.unwrap();
    let s = one(&f, "smtp.send", "user@example.com");
    assert_sev(s, Severity::Ok);
    let id = s
        .meaning
        .split("queue ID ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(
        id.len() >= 6 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "queue id {id:?}: {}",
        s.meaning
    );
    // Postfix's own log ties that queue ID to our labelled message and its delivery.
    let log = pf.wait_log("status=sent");
    assert!(
        log.contains(&format!("{id}: message-id=<godwit-check.")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{id}: to=<user@example.com>")),
        "{log}"
    );
}

#[tokio::test]
async fn unreachable_host_blocks() {
    let f = check(&probe(port(31548), "mx.test.example", None))
        .await
        .unwrap();
    assert_sev(
        one(&f, "smtp.connect", &format!("{}", port(31548))),
        Severity::Block,
    );
}
