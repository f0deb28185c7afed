//! `godwit sync` killed with SIGKILL in the middle of a copy, then run again:
//! no duplicates, nothing missing. The sync runs in a child process (the
//! `sync` example, which calls `run_sync` as the main binary does).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const USER: &str = "carol@example.com";
const MESSAGES: usize = 400;

fn example_binary() -> PathBuf {
    // target/debug/deps/interrupt-HASH -> target/debug/examples/sync
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("sync");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "godwit-imap", "--example", "sync"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    bin
}

fn write_config(dir: &Path, source: &Dovecot, target: &Dovecot) -> PathBuf {
    std::fs::write(
        dir.join("accounts.csv"),
        format!("address,source_user,source_password,target_user,target_password\n{USER},{USER},env:GODWIT_TEST_PW,{USER},env:GODWIT_TEST_PW\n"),
    )
    .unwrap();
    let config = format!(
        r#"data_dir = "{d}/data"
[domains]
accepted = ["example.com"]
[platforms.old]
relay = ["127.0.0.1:2601"]
[store]
url = "sqlite://{d}/state.db?mode=rwc"
[sync]
accounts = "{d}/accounts.csv"
fetch_batch = 40
[sync.source]
url = "{}"
[sync.target]
url = "{}"
"#,
        source.url(),
        target.url(),
        d = dir.display()
    );
    let path = dir.join("godwit.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_copy_then_rerun_leaves_no_duplicates_and_nothing_missing() {
    let source = Dovecot::start(Flavor::Source, &[USER]);
    let target = Dovecot::start(Flavor::Exchange, &[USER]);
    let mut src = login(source.port, USER).await;
    for i in 0..MESSAGES {
        let id = if i % 7 == 0 {
            None
        } else {
            Some(format!("<k{i}@example.com>"))
        };
        let body = format!(
            "message {i}\r\n{}",
            "x".repeat(60 + (i * 37) % 100).repeat(300)
        );
        append(
            &mut src,
            "INBOX",
            "(\\Seen)",
            "05-May-2015 08:00:00 +0200",
            &message(id.as_deref(), &format!("k{i}"), &body),
        )
        .await;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), &source, &target);
    let bin = example_binary();

    let mut child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .args(["sync", "--no-progress"])
        .env("GODWIT_TEST_PW", PASSWORD)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut tgt = login(target.port, USER).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let n = count(&mut tgt, "INBOX").await as usize;
        if n >= 60 {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            break n;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "sync finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let after_kill = count(&mut tgt, "INBOX").await as usize;
    assert!(
        after_kill < MESSAGES,
        "killed mid-run: {at_kill} then {after_kill} of {MESSAGES}"
    );

    let out = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .args(["sync", "--no-progress", "--json"])
        .env("GODWIT_TEST_PW", PASSWORD)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["verify"][0]["clean"], true);
    let copied: u64 = report["sync"][0]["folders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["copied"].as_u64().unwrap())
        .sum();
    assert!(
        copied as usize <= MESSAGES - after_kill,
        "copied {copied} after {after_kill} were there"
    );

    // Independent check: the same messages, once each.
    let s = dump(&mut src).await;
    let t = dump(&mut tgt).await;
    assert_eq!(t["INBOX"].len(), MESSAGES);
    assert_eq!(s["INBOX"], t["INBOX"]);

    // `godwit verify` agrees, and says so in its exit code.
    let out = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .args(["verify"])
        .env("GODWIT_TEST_PW", PASSWORD)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.contains("verified clean"), "{table}");
    assert!(!table.contains(PASSWORD), "password printed");
}

/// The source drops every session mid-copy (`doveadm kick`): godwit reconnects,
/// resumes from its state and finishes, without duplicates. It logs in as a
/// Dovecot master user (`user*admin`), as a migration with no user passwords does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_resumed_and_master_login_works() {
    use godwit_imap::engine::{SyncOptions, sync_account};
    const DAN: &str = "dan@example.com";
    let source = Dovecot::start(Flavor::Source, &[DAN]);
    let target = Dovecot::start(Flavor::Exchange, &[DAN]);
    let mut src = login(source.port, DAN).await;
    create(&mut src, "Big").await;
    for i in 0..400 {
        let folder = if i % 2 == 0 { "INBOX" } else { "Big" };
        let body = format!("kick {i}\r\n{}", "y".repeat(30_000));
        append(
            &mut src,
            folder,
            "(\\Seen)",
            "07-Jul-2017 07:07:07 +0000",
            &message(Some(&format!("<d{i}@x>")), "d", &body),
        )
        .await;
    }
    src.logout().await.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let store = common::store(tmp.path()).await;
    let mut ep = endpoints(&source, &target, 4);
    ep.source.master = Some(("admin".into(), PASSWORD.into()));
    // 12 MB at 2 MB/s: the copy is still running when the kick comes (with
    // MULTIAPPEND an unthrottled copy could finish between the 30th message
    // landing and the kick).
    ep.source.limits =
        std::sync::Arc::new(godwit_imap::limits::ServerLimits::new(4, Some(2_000_000)));
    let wrong = godwit_imap::conn::Login {
        user: DAN.into(),
        password: "not-the-user-password".into(),
    };
    let opts = SyncOptions {
        max_reconnects: 20,
        ..Default::default()
    };
    let sync = {
        let (store, ep, opts, wrong) = (store.clone(), ep.clone(), opts.clone(), wrong.clone());
        tokio::spawn(async move {
            sync_account(
                &store,
                &ep,
                DAN,
                &wrong,
                &login_of(DAN),
                &opts,
                std::sync::Arc::new(Default::default()),
            )
            .await
        })
    };
    let mut tgt = login(target.port, DAN).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&mut tgt, "INBOX").await < 30 {
        assert!(!sync.is_finished(), "finished before the kick");
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!sync.is_finished(), "finished before the kick");
    // Both sides: the target loses APPENDs whose UIDs were not recorded yet.
    source.doveadm(&["kick", DAN]);
    target.doveadm(&["kick", DAN]);
    let r = sync.await.unwrap();
    assert_eq!(r.error, None, "{r:#?}");
    assert!(r.reconnects >= 1, "the kick was noticed: {r:#?}");
    let mut src = login(source.port, DAN).await;
    let mut tgt = login(target.port, DAN).await; // the kick closed the old one too
    let (s, t) = (dump(&mut src).await, dump(&mut tgt).await);
    assert_eq!(s["INBOX"], t["INBOX"]);
    assert_eq!(s["Big"], t["Big"]);
    let check = godwit_imap::verify::verify_account(&store, &ep, DAN, &wrong, &login_of(DAN)).await;
    assert!(
        check.clean,
        "{}",
        godwit_imap::verify::render(std::slice::from_ref(&check))
    );
}
