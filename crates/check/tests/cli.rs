//! The command-line surface as the binary embeds it, and the configuration-driven
//! run against real dnsmasq, Postfix and Dovecot. Port slots 31590-31598 and
//! 31520-31529 belong to this file (see `common::port`).

mod common;

use clap::Parser;
use common::*;
use godwit_check::cli::{CheckArgs, CheckTarget};
use godwit_check::finding::Severity;
use godwit_check::{collect, run};
use std::time::Duration;

/// How the binary wires it: `godwit check ...`.
#[derive(Parser)]
struct Godwit {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    Check(CheckArgs),
}

fn parse(args: &[&str]) -> Result<CheckArgs, clap::Error> {
    let mut all = vec!["godwit", "check"];
    all.extend_from_slice(args);
    Godwit::try_parse_from(all).map(|g| match g.cmd {
        Cmd::Check(a) => a,
    })
}

#[test]
fn arguments_parse_as_the_binary_embeds_them() {
    let a = parse(&[
        "dns",
        "example.com",
        "--resolver",
        "1.1.1.1",
        "--resolver",
        "127.0.0.1:5353",
        "--new-sender",
        "192.0.2.1",
        "--new-sender",
        "out.new.example",
        "--dkim-selector",
        "s1",
        "--cutover-window",
        "10m",
        "--json",
    ])
    .unwrap();
    assert!(matches!(&a.target, Some(CheckTarget::Dns { domain }) if domain == "example.com"));
    assert_eq!(a.resolvers, ["1.1.1.1", "127.0.0.1:5353"]);
    assert_eq!(a.new_senders.len(), 2);
    assert_eq!(a.cutover_window, Some(Duration::from_secs(600)));
    assert!(a.json);

    // Options may come before the subcommand too.
    let a = parse(&[
        "--json",
        "smtp",
        "mx1.example.com:2525",
        "--rcpt",
        "user@example.com",
        "--send",
        "--ca",
        "ca.pem",
    ])
    .unwrap();
    assert!(
        matches!(&a.target, Some(CheckTarget::Smtp { target }) if target == "mx1.example.com:2525")
    );
    assert!(a.send && a.json && a.ca_files.len() == 1);

    let a = parse(&[
        "imap",
        "imaps://alice@mail.example.com",
        "--password-file",
        "/tmp/pw",
    ])
    .unwrap();
    assert!(matches!(&a.target, Some(CheckTarget::Imap { .. })));
    assert!(parse(&[]).unwrap().target.is_none());
    // --send needs a recipient.
    assert!(parse(&["smtp", "mx:25", "--send"]).is_err());
}

#[tokio::test]
async fn exit_codes_follow_the_worst_finding() {
    let _d = dnsmasq(
        port(31520),
        300,
        &[
            "--mx-host=clean.example.com,mx.clean.example.com,10".into(),
            txt("clean.example.com", "v=spf1 ip4:192.0.2.1 -all"),
            txt(
                "_dmarc.clean.example.com",
                "v=DMARC1; p=none; rua=mailto:d@clean.example.com",
            ),
            "--mx-host=warn.example.com,mx.warn.example.com,10".into(),
            txt("warn.example.com", "v=spf1 ip4:192.0.2.1 ?all"),
            txt(
                "_dmarc.warn.example.com",
                "v=DMARC1; p=none; rua=mailto:d@warn.example.com",
            ),
        ],
    );
    let code = |domain: &str, extra: &[&str]| {
        let resolver = format!("127.0.0.1:{}", port(31520));
        let mut args = vec!["dns", domain, "--resolver", &resolver];
        args.extend_from_slice(extra);
        let a = parse(&args).unwrap();
        async move { collect(None, &a).await.unwrap() }
    };
    let r = code("clean.example.com", &[]).await;
    assert_eq!(r.exit_code(), 0, "{}", r.render_text());
    let r = code("warn.example.com", &[]).await;
    assert_eq!(r.exit_code(), 1, "{}", r.render_text());
    let r = code("clean.example.com", &["--new-sender", "203.0.113.5"]).await;
    assert_eq!(r.exit_code(), 2, "{}", r.render_text());
    // run() prints and returns the same code.
    let a = parse(&[
        "dns",
        "clean.example.com",
        "--resolver",
        &format!("127.0.0.1:{}", port(31520)),
        "--json",
    ])
    .unwrap();
    assert_eq!(run(None, &a).await.unwrap(), 0);
    // No subcommand and no configuration is an error, not a verdict.
    assert!(collect(None, &parse(&[]).unwrap()).await.is_err());
}

#[tokio::test]
async fn configuration_run_covers_domains_platforms_listener_and_imap() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let old = pki.leaf(dir.path(), "old", &["127.0.0.1"], -1, 90, false);
    let new = pki.leaf(dir.path(), "new", &["127.0.0.1"], -90, -1, false);
    let lab = pki.leaf(dir.path(), "lab", &["127.0.0.1"], -1, 90, true);
    let gw = pki.leaf(dir.path(), "gw", &["mx.test.example"], -1, 90, false);
    let ca = pki.ca_file(dir.path());
    let pf_dir = dir.path().join("postfix");
    std::fs::create_dir(&pf_dir).unwrap();
    let _pf = Postfix::start(
        &pf_dir,
        &[
            (port(31590), tls_opts(&old)),
            (port(31591), tls_opts(&new)),
            (port(31592), tls_opts(&lab)),
            (port(31593), tls_opts(&gw)),
            (port(31595), vec!["smtpd_tls_security_level=none".into()]),
        ],
    );
    let _d = dnsmasq(
        port(31521),
        3600,
        &[
            "--mx-host=example.com,mx.test.example,10".into(),
            txt("example.com", "v=spf1 ip4:192.0.2.1 -all"),
            txt(
                "_dmarc.example.com",
                "v=DMARC1; p=none; rua=mailto:d@example.com",
            ),
        ],
    );
    let dv_dir = dir.path().join("dovecot");
    std::fs::create_dir(&dv_dir).unwrap();
    let _dv = Dovecot::start(&dv_dir, port(31594), true);
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret\n").unwrap();

    let mut config = godwit_config::Config {
        hostname: "mx.test.example".into(),
        ..Default::default()
    };
    config.domains.accepted = vec!["example.com".into()];
    config.smtp.listen = vec![format!("0.0.0.0:{}", port(31593)).parse().unwrap()];
    let platform = |relay: &str, insecure: bool| godwit_config::PlatformConfig {
        relay: vec![relay.into()],
        tls_insecure: insecure,
        ..Default::default()
    };
    config.platforms.insert(
        "old".into(),
        platform(&format!("127.0.0.1:{}", port(31590)), false),
    );
    config.platforms.insert(
        "new".into(),
        platform(&format!("127.0.0.1:{}", port(31591)), false),
    );
    config.platforms.insert(
        "lab".into(),
        platform(&format!("127.0.0.1:{}", port(31592)), true),
    );
    let mut plain = platform(&format!("127.0.0.1:{}", port(31595)), false);
    plain.tls = godwit_config::TlsPolicy::Require;
    config.platforms.insert("plain".into(), plain);

    let args = parse(&[
        "--resolver",
        &format!("127.0.0.1:{}", port(31521)),
        "--cutover-window",
        "5m",
        "--ca",
        ca.to_str().unwrap(),
        "--imap",
        &format!("imap://alice@example.com@127.0.0.1:{}", port(31594)),
        "--password-file",
        pw.to_str().unwrap(),
        "--timeout",
        "10s",
    ])
    .unwrap();
    let report = collect(Some(&config), &args).await.unwrap();
    let f = &report.findings;
    let text = report.render_text();

    // DNS of the accepted domain, with TTL advice against the window.
    assert_sev(one(f, "mx.records", "example.com"), Severity::Ok);
    assert_sev(one(f, "mx.ttl", "example.com"), Severity::Warn);
    // Each platform relay host.
    for check in ["smtp.starttls", "tls.expiry", "tls.name", "tls.trust"] {
        assert_sev(one(f, check, "(platform old)"), Severity::Ok);
    }
    assert_sev(one(f, "tls.expiry", "(platform new)"), Severity::Block);
    let lab = one(f, "tls.trust", "(platform lab)");
    assert_sev(lab, Severity::Warn);
    assert!(lab.meaning.contains("tls_insecure"), "{}", lab.meaning);
    // tls = "require" towards a platform without STARTTLS defers everything.
    let plain = one(f, "smtp.starttls", "(platform plain)");
    assert_sev(plain, Severity::Block);
    assert!(
        plain.meaning.contains("defer all mail"),
        "{}",
        plain.meaning
    );
    // The gateway's own listener, judged by the configured hostname.
    assert_sev(
        one(
            f,
            "tls.name",
            &format!("127.0.0.1:{} (gateway listener)", port(31593)),
        ),
        Severity::Ok,
    );
    // IMAP from --imap until [sync] exists.
    assert_sev(
        one(f, "imap.login", &format!("{}", port(31594))),
        Severity::Ok,
    );

    println!("{text}");
    assert_eq!(report.exit_code(), 2, "{text}");
    let inbound = text.find("== Inbound delivery ==").unwrap();
    let outbound = text.find("== Outbound sending ==").unwrap();
    let mailbox = text.find("== Mailbox access ==").unwrap();
    assert!(inbound < outbound && outbound < mailbox);
    assert!(
        text.contains("verdict: something blocks the cutover"),
        "{text}"
    );
}
