//! A message the target will not take (over its size limit) is reported by
//! folder and Message-ID, never silently dropped, and verify is not clean.

mod common;

use common::*;
use godwit_imap::engine::{SyncOptions, sync_account};
use godwit_imap::verify::verify_account;
use std::sync::Arc;

const USER: &str = "dave@example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_reported_not_dropped() {
    let source = Dovecot::start(Flavor::Source, &[USER]);
    let quota = "mail_plugins = $mail_plugins quota\nplugin {\n  quota = count:User quota\n  quota_vsizes = yes\n  quota_rule = *:storage=1G\n  quota_max_mail_size = 1M\n}\n";
    let target = Dovecot::start_with(Flavor::Exchange, &[USER], quota);
    let mut src = login(source.port, USER).await;
    append(
        &mut src,
        "INBOX",
        "(\\Seen)",
        "01-Jan-2020 00:00:00 +0000",
        &message(Some("<small1@x>"), "s", "small"),
    )
    .await;
    append(
        &mut src,
        "INBOX",
        "(\\Seen)",
        "01-Jan-2020 00:00:00 +0000",
        &with_attachment("<huge@x>", 1_200_000),
    )
    .await;
    append(
        &mut src,
        "INBOX",
        "()",
        "01-Jan-2020 00:00:00 +0000",
        &message(Some("<small2@x>"), "s", "small two"),
    )
    .await;

    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let ep = endpoints(&source, &target, 4);
    let opts = SyncOptions::default();
    for run in 0..2 {
        let r = sync_account(
            &store,
            &ep,
            USER,
            &login_of(USER),
            &login_of(USER),
            &opts,
            Arc::new(Default::default()),
        )
        .await;
        assert_eq!(r.error, None, "{r:#?} {}", target.log());
        let inbox = r.folders.iter().find(|f| f.source == "INBOX").unwrap();
        assert_eq!(inbox.copied, if run == 0 { 2 } else { 0 }, "{inbox:#?}");
        assert_eq!(inbox.skipped.len(), 1, "{inbox:#?}");
        assert!(inbox.skipped[0].contains("<huge@x>"), "{inbox:#?}");
        let rendered = godwit_imap::cli::render_sync(&r);
        assert!(
            rendered.contains("INBOX -> INBOX: skipped") && rendered.contains("<huge@x>"),
            "{rendered}"
        );
    }
    let mut tgt = login(target.port, USER).await;
    assert_eq!(count(&mut tgt, "INBOX").await, 2);

    // Pretend an earlier verify passed: a failing one must take "verified" away.
    godwit_imap::state::set_account_status(
        &store,
        USER,
        godwit_imap::state::Status::Verified,
        None,
    )
    .await
    .unwrap();
    let check = verify_account(&store, &ep, USER, &login_of(USER), &login_of(USER)).await;
    assert!(!check.clean);
    let st = godwit_imap::state::account_status(&store, USER)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.status, godwit_imap::state::Status::Differs, "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("differ")),
        "{st:?}"
    );
    let inbox = check.folders.iter().find(|f| f.source == "INBOX").unwrap();
    assert_eq!(inbox.missing_on_target, vec!["<huge@x>"]);
    assert_eq!(inbox.skipped.len(), 1);
    assert_eq!(inbox.skipped[0].message_id.as_deref(), Some("<huge@x>"));
    let table = godwit_imap::verify::render(std::slice::from_ref(&check));
    assert!(
        table.contains("NOT clean") && table.contains("skipped UID"),
        "{table}"
    );
    let json = serde_json::to_value(&check).unwrap();
    assert_eq!(
        json["folders"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["source"] == "INBOX")
            .unwrap()["skipped"][0]["message_id"],
        "<huge@x>"
    );
}

/// A refused login names the server's own words (its RFC 5530 code and
/// text), not the IMAP library's Debug rendering of the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_reports_the_servers_text() {
    let source = Dovecot::start(Flavor::Source, &[USER]);
    let target = Dovecot::start(Flavor::Exchange, &[USER]);
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let ep = endpoints(&source, &target, 4);
    let wrong = godwit_imap::conn::Login {
        user: USER.into(),
        password: "not-the-password".into(),
    };
    let r = sync_account(
        &store,
        &ep,
        USER,
        &wrong,
        &login_of(USER),
        &SyncOptions::default(),
        Arc::new(Default::default()),
    )
    .await;
    let err = r.error.expect("the login is refused");
    assert!(err.contains("NO [AUTHENTICATIONFAILED]"), "{err}");
    assert!(
        !err.contains("code: None") && !err.contains("info: Some"),
        "{err}"
    );
}
