//! Folder ACLs (RFC 4314) between two Dovecots with the acl plugin (vfile):
//! the owner, a delegate (another account of the file), `anyone` and an
//! identifier no account maps are copied or reported, and verify reports a
//! difference the target later gains.

mod common;

use common::*;
use godwit_imap::verify::verify_account;
use std::sync::Arc;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const ACL: &str = "mail_plugins = $mail_plugins acl\nprotocol imap {\n  mail_plugins = $mail_plugins acl imap_acl\n}\nplugin {\n  acl = vfile\n  acl_anyone = allow\n}\n";

async fn getacl(port: u16, user: &str, folder: &str) -> String {
    let mut s = login(port, user).await;
    // async-imap has no GETACL; the raw answer is what we compare.
    s.run_command(format!("GETACL \"{folder}\"")).await.unwrap();
    let mut out = String::new();
    loop {
        let r = s.read_response().await.unwrap().unwrap();
        let text = String::from_utf8_lossy(r.borrow_owner()).to_string();
        // Untagged data until the tagged completion (RFC 3501 7.1).
        if !text.starts_with('*') {
            assert!(text.contains(" OK "), "{text}");
            break;
        }
        out.push_str(&text);
    }
    s.logout().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acls_are_copied_mapped_and_verified() {
    let source = Dovecot::start_with(Flavor::Source, &[ALICE, BOB], ACL);
    let target = Dovecot::start_with(Flavor::Exchange, &[ALICE, BOB], ACL);
    let mut s = login(source.port, ALICE).await;
    create(&mut s, "Shared").await;
    append(
        &mut s,
        "Shared",
        "()",
        "28-Nov-2026 10:00:00 +0000",
        &message(Some("<s@x>"), "s", "b"),
    )
    .await;
    for (id, rights) in [
        (BOB, "lrs"),
        ("anyone", "lr"),
        ("ghost@elsewhere.test", "lr"),
    ] {
        s.run_command_and_check_ok(&format!("SETACL \"Shared\" \"{id}\" \"{rights}\""))
            .await
            .unwrap();
    }
    s.logout().await.unwrap();

    let mut ep = endpoints(&source, &target, 8);
    ep.acls = true;
    ep.acl_users = Arc::new(
        [(ALICE, ALICE), (BOB, BOB)]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let report = sync_user(&store, &ep, ALICE).await;
    assert!(report.error.is_none(), "{report:#?}");
    let rendered = godwit_imap::cli::render_sync(&report);
    assert!(
        rendered.contains("Shared -> Shared: ACL: bob@example.com set to lrs"),
        "{rendered}"
    );
    assert!(
        rendered.contains("Shared -> Shared: ACL: anyone set to lr"),
        "{rendered}"
    );
    assert!(
        rendered.contains("Shared -> Shared: ACL: `ghost@elsewhere.test` (lr) is not a user in the accounts file; not copied"),
        "{rendered}"
    );
    let on_target = getacl(target.port, ALICE, "Shared").await;
    assert!(on_target.contains("bob@example.com lrs"), "{on_target}");
    assert!(on_target.contains("anyone lr"), "{on_target}");
    assert!(!on_target.contains("ghost"), "{on_target}");

    let check = verify_account(&store, &ep, ALICE, &login_of(ALICE), &login_of(ALICE)).await;
    assert!(
        check.clean,
        "{}",
        godwit_imap::verify::render(std::slice::from_ref(&check))
    );
    let shared = check.folders.iter().find(|f| f.source == "Shared").unwrap();
    assert!(
        shared
            .notes
            .iter()
            .any(|n| n.contains("`ghost@elsewhere.test` (lr) is not a user")),
        "{shared:#?}"
    );

    // The delegate loses a right on the target: verify says so, per folder.
    let mut t = login(target.port, ALICE).await;
    t.run_command_and_check_ok("SETACL \"Shared\" \"bob@example.com\" \"l\"")
        .await
        .unwrap();
    t.logout().await.unwrap();
    let check = verify_account(&store, &ep, ALICE, &login_of(ALICE), &login_of(ALICE)).await;
    assert!(!check.clean);
    let shared = check.folders.iter().find(|f| f.source == "Shared").unwrap();
    assert_eq!(
        shared.acl_differences,
        vec!["bob@example.com: lrs on the source, l on the target"],
        "{shared:#?}"
    );
    let table = godwit_imap::verify::render(std::slice::from_ref(&check));
    assert!(
        table.contains("ACL differs: bob@example.com: lrs on the source, l on the target"),
        "{table}"
    );
}
