//! `check imap` against a real Dovecot. Port slots 31570-31589 belong to this file (see `common::port`).

mod common;

use common::*;
use godwit_check::finding::Severity;
use godwit_check::imap::{ImapCheck, ImapUrl, check};
use std::time::Duration;

fn probe(port: u16, password: &str) -> ImapCheck {
    ImapCheck {
        url: ImapUrl::parse(&format!("imap://127.0.0.1:{port}")).unwrap(),
        user: "alice@example.com".into(),
        password: password.into(),
        ca_files: vec![],
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn dovecot_capabilities_folders_and_special_use() {
    let dir = tempfile::tempdir().unwrap();
    let _dv = Dovecot::start(dir.path(), port(31570), true);
    let f = check(&probe(port(31570), "secret")).await.unwrap();
    assert_sev(
        one(&f, "imap.login", &format!("{}", port(31570))),
        Severity::Ok,
    );
    let caps = one(&f, "imap.capabilities", &format!("{}", port(31570)));
    for cap in [
        "UIDPLUS",
        "CONDSTORE",
        "QRESYNC",
        "SPECIAL-USE",
        "LITERAL+",
        "MOVE",
        "COMPRESS=DEFLATE",
    ] {
        assert!(
            caps.meaning.contains(cap),
            "{cap} missing from {}",
            caps.meaning
        );
    }
    // Nothing is missing, so no per-extension finding.
    for check in [
        "imap.uidplus",
        "imap.condstore",
        "imap.qresync",
        "imap.special-use",
        "imap.compress",
    ] {
        assert!(
            find(&f, check, &format!("{}", port(31570))).is_empty(),
            "{check}: {f:#?}"
        );
    }
    let folders = one(&f, "imap.folders", &format!("{}", port(31570)));
    assert!(
        folders.meaning.starts_with("6 folders"),
        "{}",
        folders.meaning
    );
    assert!(
        folders.meaning.contains("separator \".\""),
        "{}",
        folders.meaning
    );
    let su = one(&f, "imap.special-use-folders", &format!("{}", port(31570)));
    assert_sev(su, Severity::Ok);
    for s in [
        r#"\Sent = "Sent Items""#,
        r#"\Trash = "Deleted Items""#,
        r#"\Junk = "Junk Email""#,
        r#"\Archive = "Archive""#,
    ] {
        assert!(su.meaning.contains(s), "{s} missing from {}", su.meaning);
    }
}

#[tokio::test]
async fn no_special_use_folders_warns_and_bad_password_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let _dv = Dovecot::start(dir.path(), port(31571), false);
    let f = check(&probe(port(31571), "secret")).await.unwrap();
    let su = one(&f, "imap.special-use-folders", &format!("{}", port(31571)));
    assert_sev(su, Severity::Warn);
    assert!(su.meaning.contains("\\Sent"), "{}", su.meaning);

    let f = check(&probe(port(31571), "wrong")).await.unwrap();
    let login = one(&f, "imap.login", &format!("{}", port(31571)));
    assert_sev(login, Severity::Block);
    assert!(login.meaning.contains("failed"), "{}", login.meaning);
}

#[tokio::test]
async fn unreachable_imap_blocks() {
    let f = check(&probe(port(31572), "secret")).await.unwrap();
    assert_sev(
        one(&f, "imap.connect", &format!("{}", port(31572))),
        Severity::Block,
    );
}

#[tokio::test]
async fn imaps_verifies_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let cert = pki.leaf(dir.path(), "imap", &["127.0.0.1"], -1, 90, false);
    let ca = pki.ca_file(dir.path());
    let dv_dir = dir.path().join("dovecot");
    std::fs::create_dir(&dv_dir).unwrap();
    let _dv = Dovecot::start_with(&dv_dir, port(31573), true, Some((port(31574), cert)));
    let mut o = probe(port(31573), "secret");
    o.url = ImapUrl::parse(&format!("imaps://127.0.0.1:{}", port(31574))).unwrap();
    o.ca_files = vec![ca];
    let f = check(&o).await.unwrap();
    assert_sev(one(&f, "imap.login", "imaps://"), Severity::Ok);
    assert!(find(&f, "imap.tls", "imaps://").is_empty(), "{f:#?}");

    // Without the private CA, the handshake fails and the sync could not connect.
    o.ca_files = vec![];
    let f = check(&o).await.unwrap();
    let tls = one(&f, "imap.tls", "imaps://");
    assert_sev(tls, Severity::Block);
    assert!(tls.meaning.contains("UnknownIssuer"), "{}", tls.meaning);
}
