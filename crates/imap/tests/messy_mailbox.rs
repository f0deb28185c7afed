//! A messy mailbox copied from a maildir++ Dovecot ('.') to an Exchange-like
//! Dovecot ('/', LAYOUT=fs, "Sent Items"...), checked by reading both servers.

mod common;

use common::*;
use futures::TryStreamExt;
use godwit_imap::engine::{SyncOptions, sync_account};
use godwit_imap::state::{self, Status};
use godwit_imap::verify::verify_account;
use std::collections::BTreeMap;
use std::sync::Arc;

const USER: &str = "alice@example.com";

/// Source folder -> where it must land on the Exchange-like target.
const EXPECTED: &[(&str, &str)] = &[
    ("INBOX", "INBOX"),
    ("Sent", "Sent Items"),
    ("Sent.2019", "Sent Items/2019"),
    ("Drafts", "Drafts"),
    ("Drafts.Old", "Drafts/Old"),
    ("Trash", "Deleted Items"),
    ("Trash.Deep.Er", "Deleted Items/Deep/Er"),
    ("Junk", "Junk Email"),
    ("Junk.Sub", "Junk Email/Sub"),
    ("Archive", "Archive"),
    ("Archive.2010", "Archive/2010"),
    ("a.b.c.d.e.f", "a/b/c/d/e/f"),
    ("Réunions", "Réunions"),
    ("Отчёты", "Отчёты"),
    ("日本語のフォルダ", "日本語のフォルダ"),
    ("Tom & \"Jerry\"", "Tom & \"Jerry\""),
    ("With  Spaces here", "With  Spaces here"),
];

fn date(year: i32, n: u32) -> String {
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}-{}-{year} {:02}:17:05 +0{}00",
        1 + n % 27,
        months[(n % 12) as usize],
        n % 24,
        n % 9
    )
}

async fn populate(s: &mut Imap) -> usize {
    for (folder, _) in EXPECTED {
        if !["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"].contains(folder) {
            create(s, folder).await;
        }
    }
    let mut n = 0u32;
    let mut put = async |s: &mut Imap, folder: &str, flags: &str, body: Vec<u8>| {
        n += 1;
        // INTERNALDATEs spread over 15 years, in several zones.
        append(s, folder, flags, &date(2011 + (n % 16) as i32, n), &body).await;
    };
    put(
        s,
        "INBOX",
        "(\\Seen $Forwarded)",
        message(Some("<m1@example.com>"), "first", "hello"),
    )
    .await;
    put(
        s,
        "INBOX",
        "(\\Flagged)",
        message(None, "no id one", "no message-id here"),
    )
    .await;
    put(
        s,
        "INBOX",
        "()",
        message(None, "no id two", "no message-id here either"),
    )
    .await;
    put(
        s,
        "INBOX",
        "(\\Seen)",
        message(Some("<dup@example.com>"), "shared id A", "one"),
    )
    .await;
    put(
        s,
        "INBOX",
        "(\\Answered)",
        message(Some("<dup@example.com>"), "shared id B", "two"),
    )
    .await;
    put(
        s,
        "INBOX",
        "($Label1 Project_X)",
        message(
            Some("<8bit@example.com>"),
            "8-bit",
            "Grüße, 日本語, привет, naïve café",
        ),
    )
    .await;
    put(
        s,
        "INBOX",
        "(\\Seen)",
        with_attachment("<att@example.com>", 200_000),
    )
    .await;
    put(
        s,
        "INBOX",
        "(\\Seen $Label1)",
        with_attachment("<big@example.com>", 4_200_000),
    )
    .await; // ~5.7 MB encoded
    for (i, (folder, _)) in EXPECTED.iter().enumerate().skip(1) {
        let id = format!("<f{i}@example.com>");
        put(
            s,
            folder,
            "(\\Seen)",
            message(Some(&id), folder, &format!("in {folder}")),
        )
        .await;
        put(
            s,
            folder,
            "($Forwarded)",
            message(Some(&format!("<g{i}@example.com>")), folder, "second"),
        )
        .await;
    }
    n as usize
}

/// Asserts that each source folder's messages (bytes, flags, INTERNALDATE) are
/// exactly those of its expected target folder.
fn assert_same(
    src: &BTreeMap<String, Vec<Held>>,
    tgt: &BTreeMap<String, Vec<Held>>,
    except: &[&str],
) {
    for (s, t) in EXPECTED {
        if except.contains(s) {
            continue;
        }
        let sm = src.get(*s).unwrap_or_else(|| panic!("source lacks {s}"));
        let tm = tgt
            .get(*t)
            .unwrap_or_else(|| panic!("target lacks {t}; has {:?}", tgt.keys()));
        assert_eq!(sm, tm, "{s} -> {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messy_mailbox_copies_exactly_reruns_add_nothing_and_deltas_arrive() {
    let source = Dovecot::start(Flavor::Source, &[USER]);
    let target = Dovecot::start(Flavor::Exchange, &[USER]);
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let ep = endpoints(&source, &target, 4);
    let mut src = login(source.port, USER).await;
    let total = populate(&mut src).await;

    let opts = SyncOptions::default();
    let progress = Arc::new(Default::default());
    let r = sync_account(
        &store,
        &ep,
        USER,
        &login_of(USER),
        &login_of(USER),
        &opts,
        progress,
    )
    .await;
    assert_eq!(r.error, None, "{r:#?}");
    assert_eq!(r.copied() as usize, total);
    assert_eq!(
        state::account_status(&store, USER)
            .await
            .unwrap()
            .unwrap()
            .status,
        Status::Ready
    );

    let mut tgt = login(target.port, USER).await;
    let src_dump = dump(&mut src).await;
    let tgt_dump = dump(&mut tgt).await;
    assert_same(&src_dump, &tgt_dump, &[]);
    assert!(
        !tgt_dump.contains_key("Sent"),
        "a second Sent was created: {:?}",
        tgt_dump.keys()
    );
    assert!(!tgt_dump.contains_key("Trash") && !tgt_dump.contains_key("Junk"));
    let big = tgt_dump["INBOX"].iter().map(|h| h.size).max().unwrap();
    assert!(
        big > 5_000_000,
        "the large message arrived whole ({big} bytes)"
    );

    let check = verify_account(&store, &ep, USER, &login_of(USER), &login_of(USER)).await;
    assert!(
        check.clean,
        "{}",
        godwit_imap::verify::render(std::slice::from_ref(&check))
    );
    let st = state::account_status(&store, USER).await.unwrap().unwrap();
    assert_eq!(st.status, Status::Verified);
    assert!(st.verified_at_ms.is_some());

    // Rerun: nothing copied, every folder answered by the CONDSTORE shortcut.
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
    assert_eq!(r.error, None);
    assert_eq!(r.copied(), 0);
    assert!(
        r.folders
            .iter()
            .filter(|f| !f.source.is_empty())
            .all(|f| f.unchanged),
        "{r:#?}"
    );
    assert_eq!(dump(&mut tgt).await, tgt_dump);

    // Delta: new messages, a new nested folder, flag changes, an expunge.
    append(
        &mut src,
        "INBOX",
        "()",
        &date(2026, 3),
        &message(Some("<new1@example.com>"), "new", "new one"),
    )
    .await;
    append(
        &mut src,
        "INBOX",
        "(\\Seen)",
        &date(2026, 4),
        &message(None, "new no id", "new two"),
    )
    .await;
    create(&mut src, "Projects.2026.Q4").await;
    append(
        &mut src,
        "Projects.2026.Q4",
        "(\\Seen)",
        &date(2026, 5),
        &message(Some("<q4@example.com>"), "q4", "plan"),
    )
    .await;
    src.select("INBOX").await.unwrap();
    let _: Vec<_> = src
        .uid_store("1", "FLAGS (\\Seen \\Flagged $Label2)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    src.select(godwit_imap::utf7::encode("Sent.2019"))
        .await
        .unwrap();
    let _: Vec<_> = src
        .uid_store("1", "+FLAGS (\\Deleted)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let _: Vec<_> = src.expunge().await.unwrap().try_collect().await.unwrap();
    src.close().await.unwrap();

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
    assert_eq!(r.error, None);
    assert_eq!(r.copied(), 3, "{r:#?}");
    assert_eq!(r.folders.iter().map(|f| f.flags_updated).sum::<u64>(), 1);
    assert_eq!(
        r.folders.iter().map(|f| f.deleted).sum::<u64>(),
        0,
        "deletes only with --propagate-deletes"
    );
    let src_dump = dump(&mut src).await;
    let tgt_dump = dump(&mut tgt).await;
    assert_same(&src_dump, &tgt_dump, &["Sent.2019"]);
    assert_eq!(src_dump["Projects.2026.Q4"], tgt_dump["Projects/2026/Q4"]);
    assert_eq!(
        tgt_dump["Sent Items/2019"].len(),
        src_dump["Sent.2019"].len() + 1
    );

    let opts = SyncOptions {
        propagate_deletes: true,
        ..SyncOptions::default()
    };
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
    assert_eq!(r.error, None);
    assert_eq!(
        (r.copied(), r.folders.iter().map(|f| f.deleted).sum::<u64>()),
        (0, 1),
        "{r:#?}"
    );
    let tgt_dump = dump(&mut tgt).await;
    assert_same(&src_dump, &tgt_dump, &[]);
    let check = verify_account(&store, &ep, USER, &login_of(USER), &login_of(USER)).await;
    assert!(
        check.clean,
        "{}",
        godwit_imap::verify::render(std::slice::from_ref(&check))
    );
}

/// A Courier-style source: everything below the `INBOX.` personal namespace,
/// special folders known only by name. The prefix is detected and dropped, and
/// the names land in the Exchange-style target's special folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_prefix_and_localized_names_map_to_exchange_folders() {
    const FRED: &str = "fred@example.com";
    let source = Dovecot::start(Flavor::Courier, &[FRED]);
    let target = Dovecot::start(Flavor::Exchange, &[FRED]);
    let mut src = login(source.port, FRED).await;
    let table = [
        ("INBOX", "INBOX"),
        ("INBOX.Sent", "Sent Items"),
        ("INBOX.Trash", "Deleted Items"),
        ("INBOX.Drafts", "Drafts"),
        ("INBOX.Spam", "Junk Email"),
        ("INBOX.Projects", "Projects"),
        ("INBOX.Projects.Alpha", "Projects/Alpha"),
        ("INBOX.Sent.2020", "Sent Items/2020"),
    ];
    for (i, (folder, _)) in table.iter().enumerate() {
        if *folder != "INBOX" {
            create(&mut src, folder).await;
        }
        append(
            &mut src,
            folder,
            "(\\Seen)",
            "03-Mar-2013 13:13:13 +0100",
            &message(Some(&format!("<c{i}@x>")), folder, "c"),
        )
        .await;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let ep = endpoints(&source, &target, 4);
    let r = sync_user(&store, &ep, FRED).await;
    assert_eq!(
        (r.error.as_deref(), r.copied()),
        (None, table.len() as u64),
        "{r:#?}"
    );
    let mut tgt = login(target.port, FRED).await;
    let (s, t) = (dump(&mut src).await, dump(&mut tgt).await);
    for (from, to) in table {
        assert_eq!(
            s[from],
            t.get(to).cloned().unwrap_or_default(),
            "{from} -> {to}; target has {:?}",
            t.keys()
        );
    }
    assert!(
        !t.keys()
            .any(|k| k.starts_with("INBOX/") || k == "Sent" || k == "Spam"),
        "{:?}",
        t.keys()
    );
}
