//! `check dns` against real dnsmasq instances serving test zones.
//! Port slots 31500-31539 belong to this file, one per test (see `common::port`).

mod common;

use common::*;
use godwit_check::dns::{DnsCheck, check_domain};
use godwit_check::finding::Severity;
use std::time::Duration;

fn resolver(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn opts(ports: &[u16]) -> DnsCheck {
    DnsCheck {
        resolvers: ports.iter().map(|p| resolver(*p)).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn two_resolvers_with_different_mx_are_propagation_and_ttl_is_advised() {
    let old = [
        "--mx-host=example.com,mx1.oldmail.example.com,10".to_string(),
        "--mx-host=example.com,mx2.oldmail.example.com,20".to_string(),
    ];
    let new = ["--mx-host=example.com,mx-gw.example.com,10".to_string()];
    let _a = dnsmasq(port(31500), 3600, &old);
    let _b = dnsmasq(port(31501), 3600, &new);
    let mut o = opts(&[port(31500), port(31501)]);
    o.cutover_window = Some(Duration::from_secs(600));
    let f = check_domain("example.com", &o).await.unwrap();

    let prop = one(&f, "mx.propagation", "example.com");
    assert_sev(prop, Severity::Warn);
    assert!(
        prop.meaning.contains("mx1.oldmail.example.com")
            && prop.meaning.contains("mx-gw.example.com")
    );
    assert!(prop.action.contains("dual acceptance"));
    let a = one(&f, "mx.records", &format!("127.0.0.1:{}", port(31500)));
    assert!(
        a.meaning
            .contains("10 mx1.oldmail.example.com, 20 mx2.oldmail.example.com"),
        "{}",
        a.meaning
    );
    assert!(a.meaning.contains("TTL 3600s"));

    let ttl = one(&f, "mx.ttl", "example.com");
    assert_sev(ttl, Severity::Warn);
    assert!(ttl.action.contains("wait at least 1h"), "{}", ttl.action);

    // The same two answers from both resolvers are no propagation, and a TTL
    // inside the window is fine.
    let mut same = opts(&[port(31500), port(31500)]);
    same.cutover_window = Some(Duration::from_secs(7200));
    let f = check_domain("example.com", &same).await.unwrap();
    assert_sev(one(&f, "mx.propagation", "example.com"), Severity::Ok);
    assert_sev(one(&f, "mx.ttl", "example.com"), Severity::Ok);
}

#[tokio::test]
async fn missing_mx_blocks() {
    let _d = dnsmasq(port(31502), 300, &[txt("nomx.example.com", "v=spf1 -all")]);
    let f = check_domain("nomx.example.com", &opts(&[port(31502)]))
        .await
        .unwrap();
    assert_sev(one(&f, "mx.missing", "nomx.example.com"), Severity::Block);
}

#[tokio::test]
async fn spf_nested_includes_list_sources_and_judge_new_senders() {
    let _d = dnsmasq(
        port(31503),
        300,
        &[
            "--mx-host=example.com,mx1.example.com,10".into(),
            "--host-record=mx1.example.com,192.0.2.25".into(),
            "--host-record=mail.example.com,192.0.2.1".into(),
            "--host-record=out.newmail.example,198.51.100.7".into(),
            "--host-record=out.unlisted.example,192.0.2.200".into(),
            txt(
                "example.com",
                "v=spf1 ip4:203.0.113.10 include:_spf.vendor-a.example a:mail.example.com mx -all",
            ),
            txt(
                "_spf.vendor-a.example",
                "v=spf1 ip4:198.18.0.0/15 include:_spf.vendor-b.example ~all",
            ),
            txt(
                "_spf.vendor-b.example",
                "v=spf1 ip4:198.51.100.0/24 ip6:2001:db8::/32 ?all",
            ),
        ],
    );
    let mut o = opts(&[port(31503)]);
    o.new_senders = vec![
        "198.51.100.7".into(),         // authorized two includes deep
        "out.newmail.example".into(),  // the same, by name
        "192.0.2.25".into(),           // authorized through mx
        "out.unlisted.example".into(), // not authorized: blocks
        "203.0.113.99".into(),         // not authorized: blocks
    ];
    let f = check_domain("example.com", &o).await.unwrap();
    assert_sev(one(&f, "spf.record", "example.com"), Severity::Ok);
    assert_sev(one(&f, "spf.all", "example.com"), Severity::Ok);
    let limit = one(&f, "spf.lookup-limit", "example.com");
    assert_sev(limit, Severity::Ok);
    assert!(
        limit.meaning.contains("needs 4 of the 10"),
        "{}",
        limit.meaning
    );

    let sources = one(&f, "spf.sources", "example.com");
    for s in [
        "ip4:203.0.113.10",
        "ip4:198.18.0.0/15  [example.com > _spf.vendor-a.example]",
        "ip4:198.51.100.0/24  [example.com > _spf.vendor-a.example > _spf.vendor-b.example]",
        "ip6:2001:db8::/32",
        "a:mail.example.com = 192.0.2.1",
        "mx:example.com = mx1.example.com (192.0.2.25)",
    ] {
        assert!(
            sources.meaning.contains(s),
            "missing {s} in {}",
            sources.meaning
        );
    }

    assert_sev(one(&f, "spf.new-sender", "/ 198.51.100.7"), Severity::Ok);
    assert_sev(
        one(&f, "spf.new-sender", "out.newmail.example (198.51.100.7)"),
        Severity::Ok,
    );
    assert_sev(one(&f, "spf.new-sender", "/ 192.0.2.25"), Severity::Ok);
    let unlisted = one(&f, "spf.new-sender", "out.unlisted.example");
    assert_sev(unlisted, Severity::Block);
    assert!(
        unlisted.meaning.contains("\"fail\"") && unlisted.meaning.contains("silent deliverability")
    );
    assert_sev(one(&f, "spf.new-sender", "203.0.113.99"), Severity::Block);
}

#[tokio::test]
async fn spf_over_ten_lookups_blocks_and_new_sender_past_the_limit_permerrors() {
    // example.com includes l0 .. l10: eleven lookups before the last source.
    let mut args = vec![
        "--mx-host=example.com,mx1.example.com,10".to_string(),
        txt("example.com", "v=spf1 include:l0.example -all"),
    ];
    for i in 0..10 {
        args.push(txt(
            &format!("l{i}.example"),
            &format!("v=spf1 include:l{}.example -all", i + 1),
        ));
    }
    args.push(txt("l10.example", "v=spf1 ip4:192.0.2.99 -all"));
    let _d = dnsmasq(port(31504), 300, &args);
    let mut o = opts(&[port(31504)]);
    o.new_senders = vec!["192.0.2.99".into()];
    let f = check_domain("example.com", &o).await.unwrap();
    let limit = one(&f, "spf.lookup-limit", "example.com");
    assert_sev(limit, Severity::Block);
    assert!(
        limit.meaning.contains("needs 11 DNS lookups"),
        "{}",
        limit.meaning
    );
    let ns = one(&f, "spf.new-sender", "192.0.2.99");
    assert_sev(ns, Severity::Block);
    assert!(ns.meaning.contains("permerror"), "{}", ns.meaning);
}

#[tokio::test]
async fn spf_missing_include_multiple_records_plus_all_and_no_record() {
    let _d = dnsmasq(
        port(31505),
        300,
        &[
            txt(
                "example.com",
                "v=spf1 include:_spf.gone.example ip4:192.0.2.1 -all",
            ),
            txt("two.example.com", "v=spf1 ip4:192.0.2.1 -all"),
            txt("two.example.com", "v=spf1 ip4:192.0.2.2 -all"),
            txt("open.example.com", "v=spf1 +all"),
            txt("neutral.example.com", "v=spf1 ip4:192.0.2.1 ?all"),
            txt("none.example.com", "google-site-verification=abc"),
            txt("broken.example.com", "v=spf1 ip4:192.0.2.300 -all"),
            txt("typo.example.com", "v=spf1 includ:_spf.vendor.example -all"),
        ],
    );
    let o = opts(&[port(31505)]);
    let f = check_domain("example.com", &o).await.unwrap();
    let inc = one(&f, "spf.include", "example.com");
    assert_sev(inc, Severity::Block);
    assert!(
        inc.meaning
            .contains("include:_spf.gone.example has no SPF record"),
        "{}",
        inc.meaning
    );

    let f = check_domain("two.example.com", &o).await.unwrap();
    assert_sev(one(&f, "spf.record", "two.example.com"), Severity::Block);
    let f = check_domain("open.example.com", &o).await.unwrap();
    assert_sev(one(&f, "spf.all", "open.example.com"), Severity::Block);
    let f = check_domain("neutral.example.com", &o).await.unwrap();
    assert_sev(one(&f, "spf.all", "neutral.example.com"), Severity::Warn);
    let f = check_domain("none.example.com", &o).await.unwrap();
    let none = one(&f, "spf.record", "none.example.com");
    assert_sev(none, Severity::Warn);
    assert!(none.meaning.starts_with("No SPF record"));
    let f = check_domain("broken.example.com", &o).await.unwrap();
    assert_sev(one(&f, "spf.record", "broken.example.com"), Severity::Block);
    // mail-auth skips an unknown mechanism; receivers permerror on it.
    let f = check_domain("typo.example.com", &o).await.unwrap();
    let typo = one(&f, "spf.record", "typo.example.com");
    assert_sev(typo, Severity::Block);
    assert!(
        typo.meaning.contains("includ:_spf.vendor.example"),
        "{}",
        typo.meaning
    );
}

#[tokio::test]
async fn dmarc_policies_and_syntax_error() {
    let _d = dnsmasq(
        port(31506),
        300,
        &[
            txt(
                "_dmarc.none.example.com",
                "v=DMARC1; p=none; rua=mailto:d@example.com",
            ),
            txt(
                "_dmarc.quar.example.com",
                "v=DMARC1; p=quarantine; pct=50; rua=mailto:d@example.com",
            ),
            txt(
                "_dmarc.strict.example.com",
                "v=DMARC1; p=reject; rua=mailto:dmarc-reports@example.com; ruf=mailto:dmarc-forensics@example.com; adkim=s; aspf=s",
            ),
            txt(
                "_dmarc.broken.example.com",
                "v=DMARC1; p=rejected; rua=mailto:d@example.com",
            ),
            txt("_dmarc.norua.example.com", "v=DMARC1; p=quarantine"),
            // A parent with a policy, and a "record" there that is not DMARC.
            txt(
                "_dmarc.parent.example.com",
                "v=DMARC1; p=none; sp=quarantine; rua=mailto:d@example.com",
            ),
            txt("_dmarc.a.parent.example.com", "not a dmarc record"),
        ],
    );
    let o = opts(&[port(31506)]);
    let f = check_domain("none.example.com", &o).await.unwrap();
    let p = one(&f, "dmarc.policy", "none.example.com");
    assert_sev(p, Severity::Ok);
    assert!(p.meaning.contains("p=none") && p.meaning.contains("Monitoring only"));

    let f = check_domain("quar.example.com", &o).await.unwrap();
    let p = one(&f, "dmarc.policy", "quar.example.com");
    assert!(
        p.meaning.contains("p=quarantine") && p.meaning.contains("pct=50"),
        "{}",
        p.meaning
    );
    assert_sev(one(&f, "dmarc.pct", "quar.example.com"), Severity::Ok);

    let f = check_domain("strict.example.com", &o).await.unwrap();
    let p = one(&f, "dmarc.policy", "strict.example.com");
    assert_sev(p, Severity::Warn);
    assert!(p.meaning.contains("unforgiving during migration"));
    assert!(
        p.meaning.contains("ruf=mailto:dmarc-forensics@example.com"),
        "{}",
        p.meaning
    );
    assert!(p.action.contains("temporary policy relaxation"));

    let f = check_domain("broken.example.com", &o).await.unwrap();
    assert_sev(
        one(&f, "dmarc.syntax", "broken.example.com"),
        Severity::Warn,
    );
    let f = check_domain("norua.example.com", &o).await.unwrap();
    assert_sev(one(&f, "dmarc.rua", "norua.example.com"), Severity::Warn);
    let f = check_domain("missing.example.com", &o).await.unwrap();
    assert_sev(
        one(&f, "dmarc.record", "missing.example.com"),
        Severity::Warn,
    );
    assert!(find(&f, "dmarc.inherited", "").is_empty());

    // No record of its own (a TXT that is not DMARC does not count): the
    // tree walk finds the nearest ancestor's, two labels up.
    let f = check_domain("mail.a.parent.example.com", &o).await.unwrap();
    let i = one(&f, "dmarc.inherited", "_dmarc.mail.a.parent.example.com");
    assert_sev(i, Severity::Ok);
    assert!(
        i.meaning.contains("_dmarc.parent.example.com"),
        "{}",
        i.meaning
    );
    let p = one(&f, "dmarc.policy", "_dmarc.parent.example.com");
    assert!(p.meaning.contains("sp=quarantine"), "{}", p.meaning);
    assert!(find(&f, "dmarc.record", "").is_empty(), "{f:#?}");
}

#[tokio::test]
async fn dkim_keys_of_each_kind() {
    let dir = tempfile::tempdir().unwrap();
    let k512 = rsa_public_key_b64(dir.path(), 512);
    let k1024 = rsa_public_key_b64(dir.path(), 1024);
    let k2048 = rsa_public_key_b64(dir.path(), 2048);
    let _d = dnsmasq(
        port(31507),
        300,
        &[
            txt(
                "s512._domainkey.example.com",
                &format!("v=DKIM1; k=rsa; p={k512}"),
            ),
            txt(
                "s1024._domainkey.example.com",
                &format!("v=DKIM1; k=rsa; p={k1024}"),
            ),
            txt(
                "s2048._domainkey.example.com",
                &format!("v=DKIM1; k=rsa; p={k2048}"),
            ),
            txt("old._domainkey.example.com", "v=DKIM1; k=rsa; p="),
        ],
    );
    let mut o = opts(&[port(31507)]);
    o.dkim_selectors = ["s512", "s1024", "s2048", "old", "missing"]
        .map(String::from)
        .to_vec();
    let f = check_domain("example.com", &o).await.unwrap();
    let k = one(&f, "dkim.key", "s2048._domainkey");
    assert_sev(k, Severity::Ok);
    assert!(k.meaning.contains("RSA key of 2048 bits"), "{}", k.meaning);
    let k = one(&f, "dkim.key", "s1024._domainkey");
    assert_sev(k, Severity::Ok);
    assert!(
        k.meaning.contains("RSA key of 1024 bits")
            && k.meaning.contains("2048 bits is recommended")
    );
    assert_sev(one(&f, "dkim.weak-key", "s512._domainkey"), Severity::Block);
    assert_sev(one(&f, "dkim.revoked", "old._domainkey"), Severity::Block);
    assert_sev(
        one(&f, "dkim.missing", "missing._domainkey"),
        Severity::Block,
    );
}

#[tokio::test]
async fn mta_sts_and_tls_rpt_records() {
    let _d = dnsmasq(
        port(31508),
        300,
        &[
            txt("_mta-sts.example.com", "v=STSv1; id=20261128T000000"),
            txt(
                "_smtp._tls.example.com",
                "v=TLSRPTv1; rua=mailto:tls-reports@example.com",
            ),
            txt("_smtp._tls.bad.example.com", "v=TLSRPTv1; rua=nowhere"),
        ],
    );
    let o = opts(&[port(31508)]);
    let f = check_domain("example.com", &o).await.unwrap();
    let sts = one(&f, "mta-sts.record", "example.com");
    assert!(
        sts.meaning.contains("id=20261128T000000"),
        "{}",
        sts.meaning
    );
    let rpt = one(&f, "tls-rpt.record", "example.com");
    assert_sev(rpt, Severity::Ok);
    assert!(rpt.meaning.contains("mailto:tls-reports@example.com"));
    let f = check_domain("bad.example.com", &o).await.unwrap();
    assert_sev(one(&f, "tls-rpt.record", "bad.example.com"), Severity::Warn);
    assert!(
        one(&f, "mta-sts.record", "bad.example.com")
            .meaning
            .starts_with("No MTA-STS")
    );
}

#[tokio::test]
async fn unreachable_resolver_is_reported_not_fatal() {
    // Nothing listens on 31509: the MX query times out and is a warning, and
    // the policy records are read through the resolver that did answer.
    let _d = dnsmasq(
        port(31510),
        300,
        &[
            "--mx-host=example.com,mx1.example.com,10".into(),
            txt("example.com", "v=spf1 ip4:192.0.2.1 -all"),
        ],
    );
    let f = check_domain("example.com", &opts(&[port(31509), port(31510)]))
        .await
        .unwrap();
    assert_sev(
        one(
            &f,
            "mx.resolver-error",
            &format!("127.0.0.1:{}", port(31509)),
        ),
        Severity::Warn,
    );
    assert_sev(
        one(&f, "mx.records", &format!("127.0.0.1:{}", port(31510))),
        Severity::Ok,
    );
    assert_sev(one(&f, "spf.record", "example.com"), Severity::Ok);
}

/// A small HTTPS server standing in for the MTA-STS policy host: it serves
/// `policies[Host]` at /.well-known/mta-sts.txt, 404 otherwise.
async fn policy_server(
    port: u16,
    pki: &TestPki,
    dir: &std::path::Path,
    policies: Vec<(&'static str, &'static str)>,
) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (crt, key) = pki.leaf(
        dir,
        "sts",
        &["mta-sts.example.com", "mta-sts.example.net"],
        -1,
        90,
        false,
    );
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&crt)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let policies = policies.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).to_string();
                let host = req
                    .lines()
                    .find_map(|l| l.strip_prefix("Host: "))
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let policy = policies.iter().find(|(h, _)| *h == host).map(|(_, p)| *p);
                let resp = match (req.starts_with("GET /.well-known/mta-sts.txt "), policy) {
                    (true, Some(p)) => {
                        format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{p}")
                    }
                    _ => "HTTP/1.0 404 Not Found\r\n\r\n".to_string(),
                };
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
}

#[tokio::test]
async fn mta_sts_policy_mode_and_mx_coverage() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    policy_server(
        port(31511),
        &pki,
        dir.path(),
        vec![
            ("mta-sts.example.com", "version: STSv1\r\nmode: enforce\r\nmx: mx1.oldmail.example.com\r\nmax_age: 604800\r\n"),
            ("mta-sts.example.net", "version: STSv1\nmode: testing\nmx: *.example.net\nmax_age: 86400\n"),
        ],
    )
    .await;
    let _d = dnsmasq(
        port(31512),
        300,
        &[
            // The MX already moved to the gateway; the enforcing policy still names the old host.
            "--mx-host=example.com,mx-gw.example.com,10".into(),
            txt("_mta-sts.example.com", "v=STSv1; id=20261128T000000"),
            "--host-record=mta-sts.example.com,127.0.0.1".into(),
            "--mx-host=example.net,mx1.example.net,10".into(),
            txt("_mta-sts.example.net", "v=STSv1; id=1"),
            "--host-record=mta-sts.example.net,127.0.0.1".into(),
            "--mx-host=nopolicy.example.com,mx1.example.com,10".into(),
            txt("_mta-sts.nopolicy.example.com", "v=STSv1; id=1"),
            "--host-record=mta-sts.nopolicy.example.com,127.0.0.1".into(),
        ],
    );
    let mut o = opts(&[port(31512)]);
    o.mta_sts_port = port(31511);
    o.ca_files = vec![pki.ca_file(dir.path())];

    let f = check_domain("example.com", &o).await.unwrap();
    let p = one(&f, "mta-sts.policy", "example.com");
    assert_sev(p, Severity::Block);
    assert!(
        p.meaning.contains("mode enforce")
            && p.meaning.contains("mx-gw.example.com is not covered"),
        "{}",
        p.meaning
    );
    assert!(
        p.meaning.contains("max_age 604800s (7days)"),
        "{}",
        p.meaning
    );

    let f = check_domain("example.net", &o).await.unwrap();
    let p = one(&f, "mta-sts.policy", "example.net");
    assert_sev(p, Severity::Ok);
    assert!(p.meaning.contains("mode testing"), "{}", p.meaning);

    // A record without a policy behind it (404, and a certificate that does not name the host).
    let f = check_domain("nopolicy.example.com", &o).await.unwrap();
    let p = one(&f, "mta-sts.policy", "nopolicy.example.com");
    assert_sev(p, Severity::Warn);
    assert!(p.meaning.contains("cannot be used"), "{}", p.meaning);
}

#[tokio::test]
async fn spf_macros_are_decided_per_new_sender_by_a_full_evaluation() {
    // exists:%{i}._spf.example.com authorizes exactly the IPs that have a
    // name there (RFC 7208 7.3): only a per-sender evaluation can tell.
    let _d = dnsmasq(
        port(31513),
        300,
        &[
            "--mx-host=example.com,mx1.example.com,10".into(),
            txt("example.com", "v=spf1 exists:%{i}._spf.example.com -all"),
            "--host-record=192.0.2.5._spf.example.com,127.0.0.2".into(),
        ],
    );
    let mut o = opts(&[port(31513)]);
    o.new_senders = vec!["192.0.2.5".into(), "192.0.2.6".into()];
    let f = check_domain("example.com", &o).await.unwrap();
    let sources = one(&f, "spf.sources", "example.com");
    assert!(
        sources
            .meaning
            .contains("exists:%{i}._spf.example.com (depends on the sender)"),
        "{}",
        sources.meaning
    );
    let yes = one(&f, "spf.new-sender", "192.0.2.5");
    assert_sev(yes, Severity::Ok);
    assert!(yes.meaning.contains("macros expanded"), "{}", yes.meaning);
    let no = one(&f, "spf.new-sender", "192.0.2.6");
    assert_sev(no, Severity::Block);
    assert!(no.meaning.contains("\"fail\""), "{}", no.meaning);
}
