//! Lost state and UIDVALIDITY changes: the target is matched by Message-ID plus
//! digest and re-paired; nothing is copied twice.

mod common;

use common::*;
use godwit_imap::engine::{SyncOptions, sync_account};
use godwit_imap::state;
use godwit_imap::verify::verify_account;
use std::sync::Arc;

const USER: &str = "bob@example.com";

async fn populate(s: &mut Imap) -> usize {
    create(s, "Work").await;
    let mut n = 0;
    for i in 0..30 {
        // Repeated Message-IDs and missing ones, as in real mailboxes.
        let id = match i % 5 {
            0 => None,
            1 => Some("<shared@example.com>".to_string()),
            _ => Some(format!("<m{i}@example.com>")),
        };
        append(
            s,
            "INBOX",
            "(\\Seen)",
            "01-Feb-2020 10:00:00 +0000",
            &message(id.as_deref(), &format!("m{i}"), &format!("body {i}")),
        )
        .await;
        n += 1;
    }
    // Two byte-identical messages: both must exist on the target, once each.
    for _ in 0..2 {
        append(
            s,
            "Work",
            "()",
            "01-Mar-2021 10:00:00 +0000",
            &message(None, "same", "same bytes"),
        )
        .await;
        n += 1;
    }
    // Over the streaming threshold: copied, and after lost state matched, slice by slice.
    append(
        s,
        "Work",
        "(\\Seen)",
        "01-Mar-2021 10:00:00 +0000",
        &with_attachment("<large@x>", 3_400_000),
    )
    .await;
    n += 1;
    for i in 0..8 {
        append(
            s,
            "Work",
            "($Label1)",
            "01-Mar-2021 10:00:00 +0000",
            &message(Some(&format!("<w{i}@x>")), "w", "work"),
        )
        .await;
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_state_and_uidvalidity_changes_repair_instead_of_copying() {
    let source = Dovecot::start(Flavor::Source, &[USER]);
    let target = Dovecot::start(Flavor::Exchange, &[USER]);
    let ep = endpoints(&source, &target, 4);
    let mut src = login(source.port, USER).await;
    let total = populate(&mut src).await;
    let opts = SyncOptions::default();
    let run = async |store: &godwit_store::Store| {
        let r = sync_account(
            store,
            &ep,
            USER,
            &login_of(USER),
            &login_of(USER),
            &opts,
            Arc::new(Default::default()),
        )
        .await;
        assert_eq!(r.error, None, "{r:#?}");
        r
    };

    let first = tempfile::tempdir().unwrap();
    let r = run(&store(first.path()).await).await;
    assert_eq!(r.copied() as usize, total, "{r:#?}");
    let mut tgt = login(target.port, USER).await;
    let before = dump(&mut tgt).await;
    assert_eq!(before["INBOX"].len() + before["Work"].len(), total);

    // The state is lost: a fresh store. Everything is found on the target; a
    // flag changed on the source meanwhile reaches the matched target copy.
    {
        use futures::TryStreamExt;
        src.select("INBOX").await.unwrap();
        let _: Vec<_> = src
            .uid_store("2", "+FLAGS ($Lost)")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        src.close().await.unwrap();
    }
    let second = tempfile::tempdir().unwrap();
    let store2 = store(second.path()).await;
    let r = run(&store2).await;
    assert_eq!(r.copied(), 0, "{r:#?}");
    assert_eq!(
        r.folders.iter().map(|f| f.matched).sum::<u64>() as usize,
        total
    );
    assert_eq!(
        r.folders.iter().map(|f| f.flags_updated).sum::<u64>(),
        1,
        "{r:#?}"
    );
    let before = dump(&mut tgt).await;
    let now_src = dump(&mut src).await;
    assert_eq!(
        (&before["INBOX"], &before["Work"]),
        (&now_src["INBOX"], &now_src["Work"]),
        "target equals source"
    );

    // UIDVALIDITY changes on the source (RFC 3501 2.3.1.1): re-paired, reported.
    source.doveadm(&[
        "mailbox",
        "update",
        "-u",
        USER,
        "--uid-validity",
        "777",
        "INBOX",
    ]);
    let r = run(&store2).await;
    assert_eq!(r.copied(), 0, "{r:#?}");
    let inbox = r.folders.iter().find(|f| f.source == "INBOX").unwrap();
    assert_eq!(inbox.repaired, 30, "{inbox:#?}");
    assert!(
        inbox
            .notes
            .iter()
            .any(|n| n.contains("UIDVALIDITY changed")),
        "{inbox:#?}"
    );
    let events = state::events(&store2, USER, "uidvalidity").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.contains("INBOX") && e.contains("777")),
        "{events:?}"
    );
    assert_eq!(dump(&mut tgt).await, before, "target unchanged");

    // And on the target.
    target.doveadm(&[
        "mailbox",
        "update",
        "-u",
        USER,
        "--uid-validity",
        "888",
        "Work",
    ]);
    let r = run(&store2).await;
    assert_eq!(r.copied(), 0, "{r:#?}");
    assert_eq!(
        r.folders
            .iter()
            .find(|f| f.source == "Work")
            .unwrap()
            .repaired,
        11,
        "{r:#?}"
    );
    assert_eq!(dump(&mut tgt).await, before, "target unchanged");

    // The state still pairs every message: a flag change reaches the right one.
    src.select("Work").await.unwrap();
    use futures::TryStreamExt;
    let _: Vec<_> = src
        .uid_store("3", "+FLAGS (\\Flagged)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let r = run(&store2).await;
    assert_eq!(
        (
            r.copied(),
            r.folders.iter().map(|f| f.flags_updated).sum::<u64>()
        ),
        (0, 1)
    );
    let check = verify_account(&store2, &ep, USER, &login_of(USER), &login_of(USER)).await;
    assert!(
        check.clean,
        "{}",
        godwit_imap::verify::render(std::slice::from_ref(&check))
    );
    assert_eq!(dump(&mut src).await["Work"], dump(&mut tgt).await["Work"]);
}
