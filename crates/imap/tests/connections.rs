//! A source that allows 2 connections per user (`mail_max_userip_connections`)
//! and 8 accounts that all read the same source mailbox: the per-server cap
//! keeps godwit at 2 connections, so the sync completes without refusals.

mod common;

use common::*;
use godwit_imap::engine::{SyncOptions, sync_account};
use godwit_imap::verify::verify_account;
use std::sync::Arc;

const SHARED: &str = "shared@example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_accounts_through_a_two_connection_source() {
    let targets: Vec<String> = (1..=8).map(|i| format!("u{i}@example.com")).collect();
    let target_users: Vec<&str> = targets.iter().map(String::as_str).collect();
    let source = Dovecot::start_with(
        Flavor::Source,
        &[SHARED],
        "protocol imap {\n  mail_max_userip_connections = 2\n}\n",
    );
    let target = Dovecot::start(Flavor::Exchange, &target_users);
    let mut src = login(source.port, SHARED).await;
    create(&mut src, "Projekte.Grüße").await;
    for i in 0..12 {
        let folder = if i % 3 == 0 {
            "Projekte.Grüße"
        } else {
            "INBOX"
        };
        append(
            &mut src,
            folder,
            "(\\Seen)",
            "01-Jan-2019 00:00:00 +0000",
            &message(Some(&format!("<c{i}@x>")), "c", "c"),
        )
        .await;
    }
    src.logout().await.unwrap();

    let ep = Arc::new(endpoints(&source, &target, 2));
    let store = Arc::new(store(tempfile::tempdir().unwrap().keep().as_path()).await);
    let mut tasks = tokio::task::JoinSet::new();
    for t in &targets {
        let (ep, store, t) = (ep.clone(), store.clone(), t.clone());
        tasks.spawn(async move {
            let opts = SyncOptions {
                max_reconnects: 0,
                ..Default::default()
            };
            let r = sync_account(
                &store,
                &ep,
                &t,
                &login_of(SHARED),
                &login_of(&t),
                &opts,
                Arc::new(Default::default()),
            )
            .await;
            let v = verify_account(&store, &ep, &t, &login_of(SHARED), &login_of(&t)).await;
            (r, v)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (r, v) = done.unwrap();
        assert_eq!(r.error.as_deref(), None, "{r:#?}");
        // Dovecot 2.3 sometimes panics on concurrent index locking and drops a
        // session (a real server crash, resumed by a reconnect); a refusal for
        // too many connections must never be among the reasons.
        assert!(
            r.interruptions
                .iter()
                .all(|i| !i.contains("onnections") && !i.contains("throttl")),
            "{r:#?}"
        );
        assert_eq!(r.copied(), 12);
        assert!(
            v.clean,
            "{}",
            godwit_imap::verify::render(std::slice::from_ref(&v))
        );
    }
    assert!(
        ep.source.limits.peak_connections() <= 2,
        "peak {}",
        ep.source.limits.peak_connections()
    );
    assert_eq!(
        ep.source.limits.peak_connections(),
        2,
        "the cap was used, not bypassed"
    );
    assert!(
        !source.log().contains("Maximum number of connections"),
        "{}",
        source.log()
    );
    for t in &targets {
        let mut s = login(target.port, t).await;
        assert_eq!(count(&mut s, "INBOX").await, 8);
        assert_eq!(count(&mut s, "Projekte/Grüße").await, 4);
    }
}

/// TLS both ways: implicit TLS (imaps://) to the source, STARTTLS (imap://,
/// offered in the greeting) to the target, with self-signed certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_over_implicit_tls_and_starttls() {
    const EVE: &str = "eve@example.com";
    let source = Dovecot::start_tls(Flavor::Source, &[EVE]);
    let target = Dovecot::start_tls(Flavor::Exchange, &[EVE]);
    let mut src = login(source.port, EVE).await;
    for i in 0..5 {
        append(
            &mut src,
            "INBOX",
            "(\\Seen)",
            "01-Jan-2019 00:00:00 +0000",
            &message(Some(&format!("<t{i}@x>")), "t", "tls"),
        )
        .await;
    }
    let mut ep = endpoints(&source, &target, 4);
    ep.source = godwit_imap::conn::Server {
        tls_insecure: true,
        ..godwit_imap::conn::Server::from_url(&format!("imaps://127.0.0.1:{}", source.imaps_port))
            .unwrap()
    };
    ep.target.tls_insecure = true;
    // Without tls_insecure the self-signed certificate is refused.
    let mut strict = ep.clone();
    strict.source.tls_insecure = false;
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let opts = SyncOptions {
        max_reconnects: 0,
        ..Default::default()
    };
    let r = sync_account(
        &store,
        &strict,
        EVE,
        &login_of(EVE),
        &login_of(EVE),
        &opts,
        Arc::new(Default::default()),
    )
    .await;
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains("TLS")),
        "{r:#?}"
    );

    let r = sync_account(
        &store,
        &ep,
        EVE,
        &login_of(EVE),
        &login_of(EVE),
        &opts,
        Arc::new(Default::default()),
    )
    .await;
    assert_eq!((r.error.as_deref(), r.copied()), (None, 5), "{r:#?}");
    let v = verify_account(&store, &ep, EVE, &login_of(EVE), &login_of(EVE)).await;
    assert!(v.clean);
    // The target saw only TLS sessions (Dovecot logs "TLS" for each login).
    let log = target.log();
    let logins: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Login: user=<eve@example.com>"))
        .collect();
    assert!(
        !logins.is_empty() && logins.iter().all(|l| l.contains("TLS")),
        "{log}"
    );
}
