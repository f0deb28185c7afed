//! The cutover guard trusts only proof (issue 13): against two real Dovecot
//! instances, a wave cuts over only the members whose last verify was clean,
//! came after their last sync run and is at most `directory.max_verify_age`
//! old. `--force` still passes, and is recorded in the history.

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use imap_common::{Dovecot, Flavor};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::*;

const USERS: [&str; 3] = ["alice@example.com", "bob@example.com", "carol@example.com"];

fn run(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(godwit_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Setup {
    src: Dovecot,
    dst: Dovecot,
    dir: tempfile::TempDir,
}

impl Setup {
    /// Two Dovecots with three mailboxes of three messages each, a directory
    /// of the three on `old`, and a wave `w` holding them.
    fn new() -> Setup {
        let src = Dovecot::start(Flavor::Source, &USERS);
        let dst = Dovecot::start(Flavor::Exchange, &USERS);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            for u in USERS {
                let mut s = imap_common::login(src.port, u).await;
                for i in 0..3 {
                    let body = imap_common::message(
                        Some(&format!("<{i}.{u}>")),
                        &format!("message {i}"),
                        "body",
                    );
                    imap_common::append(
                        &mut s,
                        "INBOX",
                        "(\\Seen)",
                        "28-Nov-2026 10:00:00 +0000",
                        &body,
                    )
                    .await;
                }
                s.logout().await.unwrap();
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut csv =
            String::from("address,source_user,source_password,target_user,target_password\n");
        let mut directory = String::from("address,display_name,kind,aliases,members,platform\n");
        for u in USERS {
            csv.push_str(&format!("{u},{u},{0},{u},{0}\n", imap_common::PASSWORD));
            directory.push_str(&format!("{u},{u},user,,,old\n"));
        }
        std::fs::write(dir.path().join("accounts.csv"), csv).unwrap();
        std::fs::write(dir.path().join("directory.csv"), directory).unwrap();
        let s = Setup { src, dst, dir };
        s.write_config("guard.toml", "24h");
        let cfg = s.config("guard.toml");
        let d = s.dir.path().join("directory.csv");
        let (ok, out) = run(
            &cfg,
            &["directory", "import", d.to_str().unwrap(), "--apply"],
        );
        assert!(ok, "{out}");
        let mut args = vec!["wave", "create", "w", "--members"];
        args.extend(USERS);
        let (ok, out) = run(&cfg, &args);
        assert!(ok, "{out}");
        s
    }

    fn config(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// A file with the gateway's and the sync's sections (one store).
    fn write_config(&self, name: &str, max_verify_age: &str) {
        let d = self.dir.path();
        let text = format!(
            r#"hostname = "gw.test"
data_dir = "{data}"
[domains]
accepted = ["example.com"]
[platforms.old]
relay = ["127.0.0.1:1"]
[platforms.new]
relay = ["127.0.0.1:2"]
[directory]
max_verify_age = "{max_verify_age}"
[sync]
accounts = "{accounts}"
command_timeout = "20s"
watch_interval = "1s"
[sync.source]
url = "{src}"
[sync.target]
url = "{dst}"
"#,
            data = d.join("data").display(),
            accounts = d.join("accounts.csv").display(),
            src = self.src.url(),
            dst = self.dst.url(),
        );
        std::fs::write(d.join(name), text).unwrap();
    }
}

#[test]
fn cutover_refuses_a_member_whose_verify_found_a_difference_and_force_passes() {
    let s = Setup::new();
    let cfg = s.config("guard.toml");

    // Copied but not verified: `ready` is not enough.
    let (_, out) = run(&cfg, &["sync", "--no-progress", "--no-verify"]);
    assert!(out.contains("alice@example.com: 3 copied"), "{out}");
    let (ok, out) = run(&cfg, &["wave", "cutover", "w", "--dry-run"]);
    assert!(!ok, "{out}");
    assert!(
        // A dry run prints the plan, each member held back with its reason.
        out.matches(" blocked: ").count() == 3
            && out.contains("bob@example.com blocked: copied but not verified"),
        "{out}"
    );

    let (ok, out) = run(&cfg, &["verify"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&cfg, &["wave", "cutover", "w", "--dry-run"]);
    assert!(ok, "all three verified clean: {out}");

    // One message disappears from bob's target; verify finds it and demotes him.
    s.dst.doveadm(&[
        "expunge",
        "-u",
        "bob@example.com",
        "mailbox",
        "INBOX",
        "uid",
        "2",
    ]);
    let (ok, out) = run(&cfg, &["verify"]);
    assert!(!ok, "{out}");
    let (ok, out) = run(&cfg, &["wave", "cutover", "w"]);
    assert!(!ok, "{out}");
    assert!(out.contains("1 of 3 mailbox(es) are not ready"), "{out}");
    assert!(
        out.contains("bob@example.com: the last verify found differences")
            && out.contains("1 missing on target"),
        "{out}"
    );
    assert!(!out.contains("alice@example.com:"), "{out}");

    // The reason is shown where operators look.
    let (_, out) = run(&cfg, &["wave", "show", "w"]);
    let bob = out.lines().find(|l| l.contains("bob@example.com")).unwrap();
    assert!(
        bob.contains("sync: differs: the last verify found differences"),
        "{out}"
    );
    let alice = out
        .lines()
        .find(|l| l.contains("alice@example.com"))
        .unwrap();
    assert!(alice.contains("sync: verified clean"), "{out}");
    let (_, out) = run(&cfg, &["directory", "list"]);
    assert!(
        out.lines()
            .any(|l| l.contains("bob@example.com") && l.contains("sync: differs")),
        "{out}"
    );
    let (_, out) = run(&cfg, &["route", "explain", "bob@example.com"]);
    assert!(
        out.contains("sync:      differs: the last verify found differences: verify: 1 folder pair(s) differ (INBOX: 1 missing on target)"),
        "{out}"
    );

    // --force passes and is recorded.
    let (ok, out) = run(&cfg, &["wave", "cutover", "w", "--force"]);
    assert!(ok, "{out}");
    assert!(out.contains("3 address(es) moved"), "{out}");
    let (_, out) = run(&cfg, &["history"]);
    let version = out
        .lines()
        .find(|l| l.contains("wave cutover w --force"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no forced cutover in the history: {out}"))
        .to_string();
    let (_, out) = run(&cfg, &["history", "show", &version]);
    assert!(
        out.contains("--force: 1 mailbox(es) cut over without a proven sync: bob@example.com (the last verify found differences"),
        "{out}"
    );
}

#[test]
fn a_verify_older_than_max_verify_age_or_before_the_last_sync_is_refused() {
    let s = Setup::new();
    let cfg = s.config("guard.toml");
    let (ok, out) = run(&cfg, &["sync", "--no-progress"]);
    assert!(ok, "{out}");
    let (ok, out) = run(&cfg, &["wave", "cutover", "w", "--dry-run"]);
    assert!(ok, "{out}");

    // The same store, with a short max_verify_age: the verify ages out.
    s.write_config("short.toml", "2s");
    let short = s.config("short.toml");
    let out = wait_for("the verify to age out", Duration::from_secs(20), || {
        let (_, out) = run(&short, &["wave", "cutover", "w", "--dry-run"]);
        (out.matches(" blocked: ").count() == 3).then_some(out)
    });
    assert!(
        out.matches(" blocked: ").count() == 3
            && out.contains("more than directory.max_verify_age (2s)"),
        "{out}"
    );

    // A sync run after the verify: the verify no longer proves the copy.
    let (_, out) = run(
        &cfg,
        &[
            "sync",
            "--no-progress",
            "--no-verify",
            "--mailbox",
            "carol@example.com",
        ],
    );
    assert!(out.contains("carol@example.com:"), "{out}");
    let (ok, out) = run(&cfg, &["wave", "cutover", "w", "--dry-run"]);
    assert!(!ok, "{out}");
    assert!(
        out.matches(" blocked: ").count() == 1
            && out.contains("carol@example.com blocked: copied but not verified"),
        "{out}"
    );
}

/// `--final-sync` on a wave of three, one of which differs: a delta and a
/// verify for each, then two move and the third is named with its reason.
#[test]
fn final_sync_cuts_over_only_the_members_that_verify_clean() {
    let s = Setup::new();
    let cfg = s.config("guard.toml");
    let (ok, out) = run(&cfg, &["sync", "--no-progress"]);
    assert!(ok, "{out}");
    // A second copy of one of bob's messages on the target: a duplicate the
    // delta does not remove, so bob's verify stays unclean.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut t = imap_common::login(s.dst.port, "bob@example.com").await;
        let body = imap_common::message(Some("<1.bob@example.com>"), "message 1", "body");
        imap_common::append(
            &mut t,
            "INBOX",
            "(\\Seen)",
            "28-Nov-2026 10:00:00 +0000",
            &body,
        )
        .await;
        t.logout().await.unwrap();
    });
    let (ok, out) = run(&cfg, &["wave", "cutover", "w", "--final-sync"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "not cut over: bob@example.com: verify: 1 folder pair(s) differ (INBOX: 1 duplicated)"
        ),
        "{out}"
    );
    assert!(
        out.contains("final sync: 3 member(s) synced, 2 verified clean, 1 stay where they are"),
        "{out}"
    );
    assert!(out.contains("2 address(es) moved"), "{out}");
    let (_, out) = run(&cfg, &["wave", "show", "w"]);
    for (who, state) in [
        ("alice@example.com", "cutover"),
        ("bob@example.com", "pending"),
        ("carol@example.com", "cutover"),
    ] {
        let line = out.lines().find(|l| l.contains(who)).unwrap();
        assert!(line.contains(&format!("{who}  {state}")), "{out}");
    }
}

/// `godwit sync --watch` keeps running deltas: mail that reaches the source
/// after it started is on the target within a few intervals; SIGTERM ends it.
#[test]
fn sync_watch_repeats_deltas_until_stopped() {
    let s = Setup::new();
    let cfg = s.config("guard.toml");
    let mut child = Command::new(godwit_bin())
        .args([
            "sync",
            "--watch",
            "--no-progress",
            "--mailbox",
            "alice@example.com",
            "--config",
        ])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let on_target = |n: u32| {
        rt.block_on(async {
            let mut t = imap_common::login(s.dst.port, "alice@example.com").await;
            let c = imap_common::count(&mut t, "INBOX").await;
            t.logout().await.unwrap();
            c >= n
        })
    };
    wait_for("the first round", Duration::from_secs(30), || {
        on_target(3).then_some(())
    });
    rt.block_on(async {
        let mut src = imap_common::login(s.src.port, "alice@example.com").await;
        let body = imap_common::message(Some("<late@example.com>"), "late", "body");
        imap_common::append(&mut src, "INBOX", "()", "29-Nov-2026 10:00:00 +0000", &body).await;
        src.logout().await.unwrap();
    });
    wait_for(
        "a later round to copy the new message",
        Duration::from_secs(30),
        || on_target(4).then_some(()),
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_for("sync --watch to stop", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Teams run the pre-seed long before the gateway: a file with only the
/// sync's sections runs `godwit sync`, one with only the gateway's keys runs
/// the gateway's commands, and each names the section the other command needs.
#[test]
fn a_sync_only_file_and_a_gateway_only_file_each_work_for_their_commands() {
    let s = Setup::new();
    let d = s.dir.path();
    let sync_only = d.join("sync-only.toml");
    std::fs::write(
        &sync_only,
        format!(
            "data_dir = \"{}\"\n[sync]\naccounts = \"{}\"\n[sync.source]\nurl = \"{}\"\n[sync.target]\nurl = \"{}\"\n",
            d.join("pre-seed").display(),
            d.join("accounts.csv").display(),
            s.src.url(),
            s.dst.url()
        ),
    )
    .unwrap();
    let (ok, out) = run(&sync_only, &["sync", "--no-progress"]);
    assert!(ok, "{out}");
    assert!(out.contains("alice@example.com: verified clean"), "{out}");
    let (ok, out) = run(&sync_only, &["wave", "list"]);
    assert!(
        !ok && out.contains("configuration section [domains] is missing"),
        "{out}"
    );

    let gateway_only = d.join("gateway-only.toml");
    let text = std::fs::read_to_string(s.config("guard.toml")).unwrap();
    let gateway = &text[..text.find("[sync]").unwrap()];
    std::fs::write(&gateway_only, gateway).unwrap();
    let (ok, out) = run(&gateway_only, &["directory", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains("3 object(s)"), "{out}");
    let (ok, out) = run(&gateway_only, &["sync", "--no-progress"]);
    assert!(
        !ok && out.contains("configuration section [sync] is missing"),
        "{out}"
    );
}

/// The accounts file's source_url column: one account comes from another old
/// server, in the same run as the others.
#[test]
fn per_account_source_url_syncs_that_row_from_its_own_server() {
    let s = Setup::new();
    let other = Dovecot::start(Flavor::Source, &["carol@example.com"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o = imap_common::login(other.port, "carol@example.com").await;
        let body = imap_common::message(Some("<elsewhere@example.com>"), "elsewhere", "body");
        imap_common::append(&mut o, "INBOX", "()", "29-Nov-2026 10:00:00 +0000", &body).await;
        o.logout().await.unwrap();
    });
    let pw = imap_common::PASSWORD;
    let mut csv = String::from(
        "address,source_user,source_password,target_user,target_password,source_url,target_url\n",
    );
    for u in USERS {
        let url = if u.starts_with("carol") {
            other.url()
        } else {
            String::new()
        };
        csv.push_str(&format!("{u},{u},{pw},{u},{pw},{url},\n"));
    }
    std::fs::write(s.dir.path().join("accounts.csv"), csv).unwrap();
    let (ok, out) = run(&s.config("guard.toml"), &["sync", "--no-progress"]);
    assert!(ok, "{out}");
    assert!(out.contains("carol@example.com: 1 copied"), "{out}");
    assert!(out.contains("alice@example.com: 3 copied"), "{out}");
    // imapsync-style totals end the run, summed over every account.
    let copied: u64 = out
        .lines()
        .filter_map(|l| {
            l.split_once(": ")?
                .1
                .split_once(" copied")?
                .0
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(out.contains("++++ Statistics"), "{out}");
    assert!(
        out.contains(&format!("Messages transferred        : {copied}\n")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "Accounts synced             : {} (0 failed",
            USERS.len()
        )),
        "{out}"
    );
    assert!(out.contains("Errors                      : 0"), "{out}");
    let n = rt.block_on(async {
        let mut t = imap_common::login(s.dst.port, "carol@example.com").await;
        let held = imap_common::dump(&mut t).await;
        t.logout().await.unwrap();
        held["INBOX"].len()
    });
    assert_eq!(n, 1);
}
