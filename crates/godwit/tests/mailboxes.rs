//! `godwit trace --mailboxes` against two real Dovecot instances: the message
//! the gateway delivered is found by Message-ID in the old mailbox, synced by
//! `godwit sync` into the new one, and found there too.

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use imap_common::{Dovecot, Flavor};
use std::time::Duration;
use support::*;

#[test]
fn trace_finds_the_message_in_both_platforms_mailboxes() {
    let src = Dovecot::start(Flavor::Source, &["alice@example.com"]);
    let dst = Dovecot::start(Flavor::Exchange, &["alice@example.com"]);
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let dir = tempfile::tempdir().unwrap();
    let accounts = dir.path().join("accounts.csv");
    std::fs::write(
        &accounts,
        format!("address,source_user,source_password,target_user,target_password\nalice@example.com,alice@example.com,{0},alice@example.com,{0}\n", imap_common::PASSWORD),
    )
    .unwrap();
    let sync = format!(
        "[sync]\naccounts = \"{}\"\n[sync.source]\nurl = \"{}\"\n[sync.target]\nurl = \"{}\"\n",
        accounts.display(),
        src.url(),
        dst.url()
    );
    let gw = Gateway::start(po, pn, "", &sync);
    let mut c = gw.client();
    c.greet();
    let raw = message("forensic@test", "the evidence");
    assert!(
        c.mail("s@outside.test", &["alice@example.com"], &raw)
            .starts_with("250")
    );
    let delivered = wait_for("delivery to old", Duration::from_secs(20), || {
        old.messages()
            .into_iter()
            .find(|m| m.contains("forensic@test"))
    });
    // The old platform files it into alice's INBOX (what its delivery agent does).
    let body = &delivered[delivered.find("Received:").unwrap()..];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = imap_common::login(src.port, "alice@example.com").await;
        imap_common::append(
            &mut s,
            "INBOX",
            "(\\Seen)",
            "28-Nov-2026 10:00:00 +0000",
            body.as_bytes(),
        )
        .await;
        s.logout().await.unwrap();
    });

    let (_, out) = gw.cli(&["trace", "forensic@test", "--mailboxes"]);
    assert!(
        out.contains("found in old (sync source) <alice@example.com>: INBOX, UID 1"),
        "{out}"
    );
    assert!(
        out.contains("not in new (sync target) <alice@example.com>"),
        "{out}"
    );

    // The pre-seed copies it; now the new mailbox holds it as well.
    let (ok, sync_out) = gw.cli(&["sync", "--mailbox", "alice@example.com", "--no-progress"]);
    assert!(ok, "{sync_out}");
    let (_, out) = gw.cli(&["trace", "forensic@test", "--mailboxes"]);
    assert!(
        out.contains("found in old (sync source) <alice@example.com>: INBOX, UID 1"),
        "{out}"
    );
    assert!(
        out.contains("found in new (sync target) <alice@example.com>: INBOX, UID 1"),
        "{out}"
    );
    assert!(out.contains("verdict: delivered"), "{out}");
    // Sync progress per account reaches the metrics.
    let (_, text) = gw.admin_get("/metrics");
    assert!(
        text.contains("godwit_sync_account_messages_copied{account=\"alice@example.com\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("godwit_sync_account_messages_source{account=\"alice@example.com\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "godwit_sync_account_status{account=\"alice@example.com\",status=\"verified\"} 1"
        ),
        "{text}"
    );
    // The guard's refusing status has its gauge from the start (0 here), so
    // an alert on it needs no first occurrence.
    assert!(
        text.contains(
            "godwit_sync_account_status{account=\"alice@example.com\",status=\"differs\"} 0"
        ),
        "{text}"
    );
    let (_, js) = gw.cli(&["trace", "<forensic@test>", "--mailboxes", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(
        v[0]["mailboxes"][1]["found"][0],
        serde_json::json!(["INBOX", 1])
    );
}
