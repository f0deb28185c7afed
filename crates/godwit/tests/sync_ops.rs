//! `godwit sync` as an operator runs it, against real Dovecot instances:
//! - shared mailboxes of the directory (`kind = shared`) are synced and
//!   verified with the master user, and the guard treats them like any
//!   mailbox; without a master user, that mailbox fails naming the key;
//! - `--dry-run` says what a run would do and changes nothing, neither on
//!   the target (read back with Python's imaplib) nor in the sync state, and
//!   the real run afterwards does exactly that (issue 19 item 12);
//! - OAuth 2.0 tokens that live 2 s are refreshed during a `--watch` run, from
//!   the token endpoint and from a token_command (issue 13).

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use godwit_testkit::TokenServer;
use imap_common::{Dovecot, Flavor, PASSWORD};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const INFO: &str = "info@example.com";
const ACL: &str = "mail_plugins = $mail_plugins acl\nprotocol imap {\n  mail_plugins = $mail_plugins acl imap_acl\n}\nplugin {\n  acl = vfile\n}\n";

/// (success, stdout, stderr)
fn godwit(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(godwit_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn both(r: (bool, String, String)) -> (bool, String) {
    (r.0, format!("{}{}", r.1, r.2))
}

fn seed(port: u16, user: &str, folder: &str, n: usize, tag: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = imap_common::login(port, user).await;
        for i in 0..n {
            let body = imap_common::message(
                Some(&format!("<{tag}{i}.{user}>")),
                &format!("{tag} {i}"),
                "body",
            );
            imap_common::append(
                &mut s,
                folder,
                "(\\Seen)",
                "28-Nov-2026 10:00:00 +0000",
                &body,
            )
            .await;
        }
        s.logout().await.unwrap();
    });
}

fn count(port: u16, user: &str, folder: &str) -> u32 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = imap_common::login(port, user).await;
        let n = imap_common::count(&mut s, folder).await;
        s.logout().await.unwrap();
        n
    })
}

/// The gateway's sections (for `directory import`) and the sync's.
fn config(
    dir: &Path,
    name: &str,
    src: &Dovecot,
    dst: &Dovecot,
    sync_extra: &str,
    masters: (bool, bool),
) {
    let master = |on: bool| {
        if on {
            format!("master_user = \"admin\"\nmaster_password = \"{PASSWORD}\"\n")
        } else {
            String::new()
        }
    };
    let text = format!(
        r#"hostname = "gw.test"
data_dir = "{data}"
[domains]
accepted = ["example.com"]
[platforms.old]
relay = ["127.0.0.1:1"]
[platforms.new]
relay = ["127.0.0.1:2"]
[sync]
accounts = "{accounts}"
command_timeout = "20s"
{sync_extra}
[sync.source]
url = "{src}"
{src_master}
[sync.target]
url = "{dst}"
{dst_master}
"#,
        data = dir.join("data").display(),
        accounts = dir.join("accounts.csv").display(),
        src = src.url(),
        dst = dst.url(),
        src_master = master(masters.0),
        dst_master = master(masters.1),
    );
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn a_shared_mailbox_of_the_directory_is_synced_with_the_master_user_and_guarded() {
    let src = Dovecot::start(Flavor::Source, &[ALICE, INFO]);
    let dst = Dovecot::start(Flavor::Exchange, &[ALICE, INFO]);
    seed(src.port, ALICE, "INBOX", 2, "a");
    seed(src.port, INFO, "INBOX", 3, "i");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // info@ is in the directory only: it has no password of its own.
    std::fs::write(
        d.join("accounts.csv"),
        format!("address,source_user,source_password,target_user,target_password\n{ALICE},{ALICE},{PASSWORD},{ALICE},{PASSWORD}\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("directory.csv"),
        format!("address,display_name,kind,aliases,members,platform\n{ALICE},Alice,user,,,old\n{INFO},Info,shared,,,old\n"),
    )
    .unwrap();
    config(d, "godwit.toml", &src, &dst, "", (true, true));
    config(d, "no-master.toml", &src, &dst, "", (true, false));
    let cfg = d.join("godwit.toml");
    let directory = d.join("directory.csv");
    let (ok, out) = both(godwit(
        &cfg,
        &[
            "directory",
            "import",
            directory.to_str().unwrap(),
            "--apply",
        ],
    ));
    assert!(ok, "{out}");
    let (ok, out) = both(godwit(
        &cfg,
        &["wave", "create", "w", "--members", INFO, ALICE],
    ));
    assert!(ok, "{out}");

    // Without a master user on the target, info@ fails naming the key, and
    // alice's copy goes on.
    let (ok, out) = both(godwit(
        &d.join("no-master.toml"),
        &["sync", "--no-progress"],
    ));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("{INFO}: 0 copied"))
            && out.contains(&format!("shared mailbox {INFO} (directory kind shared) has no password of its own: set sync.target.master_user")),
        "{out}"
    );
    assert!(out.contains(&format!("{ALICE}: 2 copied")), "{out}");
    let (_, out) = both(godwit(&cfg, &["directory", "list"]));
    assert!(
        out.lines()
            .any(|l| l.contains(INFO) && l.contains("sync.target.master_user")),
        "the failure shows where operators look: {out}"
    );
    assert_eq!(count(dst.port, INFO, "INBOX"), 0);

    // With the master user: synced and verified like any account.
    let (ok, stdout, stderr) = godwit(&cfg, &["sync", "--no-progress", "--json"]);
    assert!(ok, "{stdout}{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let info = j["sync"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == INFO)
        .unwrap_or_else(|| panic!("info@ not synced: {stdout}"));
    let copied: u64 = info["folders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["copied"].as_u64().unwrap())
        .sum();
    assert_eq!(copied, 3, "{stdout}");
    assert!(
        j["verify"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["address"] == INFO && c["clean"] == true),
        "{stdout}"
    );
    assert_eq!(count(dst.port, INFO, "INBOX"), 3);
    let (_, out) = both(godwit(&cfg, &["directory", "list"]));
    assert!(
        out.lines()
            .any(|l| l.contains(INFO) && l.contains("sync: verified clean")),
        "{out}"
    );
    let (_, out) = both(godwit(&cfg, &["wave", "show", "w"]));
    assert!(
        out.lines()
            .any(|l| l.contains(INFO) && l.contains("sync: verified clean")),
        "{out}"
    );
    let (ok, out) = both(godwit(&cfg, &["wave", "cutover", "w", "--dry-run"]));
    assert!(ok, "{out}");

    // The guard: a message lost on the target, verify finds it, cutover refuses.
    dst.doveadm(&["expunge", "-u", INFO, "mailbox", "INBOX", "uid", "2"]);
    let (ok, out) = both(godwit(&cfg, &["verify", "--mailbox", INFO]));
    assert!(!ok, "{out}");
    let (ok, out) = both(godwit(&cfg, &["wave", "cutover", "w"]));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("{INFO}: the last verify found differences")),
        "{out}"
    );
    assert!(!out.contains(&format!("{ALICE}: the last")), "{out}");
    // --final-sync covers it too: a delta and a verify for both members;
    // the copy still lacks the lost message, so info@ stays and alice moves.
    let (ok, out) = both(godwit(&cfg, &["wave", "cutover", "w", "--final-sync"]));
    assert!(ok, "{out}");
    assert!(
        out.contains("final sync: 2 member(s) synced, 1 verified clean, 1 stay where they are")
            && out.contains(&format!(
                "not cut over: {INFO}: verify: 1 folder pair(s) differ"
            )),
        "{out}"
    );
}

/// Everything a client can see on the target, read by Python's imaplib (no
/// godwit code): each folder's STATUS, UIDs with flags, and ACL.
fn imap_snapshot(port: u16, user: &str) -> String {
    let script = r#"
import imaplib, re, sys
m = imaplib.IMAP4("127.0.0.1", int(sys.argv[1]))
m.login(sys.argv[2], sys.argv[3])
typ, boxes = m.list()
out = []
for b in boxes:
    name = re.match(rb'\((.*?)\) (?:"(?:\\.|[^"])"|NIL) (.*)$', b).group(2).decode()
    q = name if name.startswith('"') else '"%s"' % name
    out.append("folder %s %s" % (name, m.status(q, "(MESSAGES UIDNEXT UIDVALIDITY)")[1]))
    m.select(q, readonly=True)
    typ, data = m.uid("FETCH", "1:*", "(FLAGS RFC822.SIZE INTERNALDATE)")
    out.extend("  %s" % d for d in data if d)
    out.append("  acl %s" % (m.getacl(q)[1],))
print("\n".join(out))
m.logout()
"#;
    python(script, &[&port.to_string(), user, PASSWORD])
}

/// The sync state's tables, read by Python's sqlite3.
fn state_snapshot(db: &Path) -> String {
    let script = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
for t in ["sync_accounts", "sync_folders", "sync_messages", "sync_skipped", "sync_events"]:
    for r in sorted(c.execute("SELECT * FROM %s" % t).fetchall(), key=repr):
        print(t, r)
"#;
    python(script, &[db.to_str().unwrap()])
}

/// Per (account, source folder, target folder): copied, bytes, flag updates,
/// deletions, created, ACL entries set.
type Plan = Vec<(String, String, String, u64, u64, u64, u64, bool, u64)>;

fn plan_of(json: &serde_json::Value) -> Plan {
    let mut out = Vec::new();
    for r in json["sync"].as_array().unwrap() {
        for f in r["folders"].as_array().unwrap() {
            if f["source"] == "" {
                continue;
            }
            let n = |k: &str| f[k].as_u64().unwrap();
            out.push((
                r["address"].as_str().unwrap().to_string(),
                f["source"].as_str().unwrap().to_string(),
                f["target"].as_str().unwrap().to_string(),
                n("copied"),
                n("bytes"),
                n("flags_updated"),
                n("deleted"),
                f["created"].as_bool().unwrap(),
                n("acls_set"),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn dry_run_changes_nothing_and_the_real_run_does_what_it_said() {
    let src = Dovecot::start_with(Flavor::Source, &[ALICE, BOB], ACL);
    let dst = Dovecot::start_with(Flavor::Exchange, &[ALICE, BOB], ACL);
    seed(src.port, ALICE, "INBOX", 3, "first");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut csv = String::from("address,source_user,source_password,target_user,target_password\n");
    for u in [ALICE, BOB] {
        csv.push_str(&format!("{u},{u},{PASSWORD},{u},{PASSWORD}\n"));
    }
    std::fs::write(d.join("accounts.csv"), csv).unwrap();
    config(d, "godwit.toml", &src, &dst, "acls = true", (false, false));
    let cfg = d.join("godwit.toml");
    let (ok, out) = both(godwit(&cfg, &["sync", "--no-progress"]));
    assert!(ok, "{out}");

    // Since that run, on the source: two new messages, a flag changed, one
    // message expunged, and a new folder with one message, shared with bob.
    seed(src.port, ALICE, "INBOX", 2, "second");
    src.doveadm(&[
        "flags",
        "add",
        "-u",
        ALICE,
        "\\Flagged",
        "mailbox",
        "INBOX",
        "uid",
        "1",
    ]);
    src.doveadm(&["expunge", "-u", ALICE, "mailbox", "INBOX", "uid", "2"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut s = imap_common::login(src.port, ALICE).await;
        imap_common::create(&mut s, "Projects").await;
        s.run_command_and_check_ok(&format!("SETACL \"Projects\" \"{BOB}\" \"lrs\""))
            .await
            .unwrap();
        s.logout().await.unwrap();
    });
    seed(src.port, ALICE, "Projects", 1, "p");

    let db = d.join("data").join("state.db");
    let before = (
        imap_snapshot(dst.port, ALICE),
        imap_snapshot(dst.port, BOB),
        state_snapshot(&db),
    );
    assert!(before.0.contains("INBOX (MESSAGES 3 "), "{}", before.0);
    let (ok, stdout, stderr) = godwit(
        &cfg,
        &[
            "sync",
            "--dry-run",
            "--propagate-deletes",
            "--no-progress",
            "--json",
        ],
    );
    assert!(ok, "{stdout}{stderr}");
    let dry: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["verify"], serde_json::json!([]));
    let after = (
        imap_snapshot(dst.port, ALICE),
        imap_snapshot(dst.port, BOB),
        state_snapshot(&db),
    );
    assert_eq!(
        before, after,
        "a dry run changed the target or the sync state"
    );
    assert!(!after.0.contains("Projects"), "{}", after.0);

    let plan = plan_of(&dry);
    let row = |s: &str| {
        plan.iter()
            .find(|r| r.0 == ALICE && r.1 == s)
            .unwrap_or_else(|| panic!("{s}: {plan:#?}"))
            .clone()
    };
    let inbox = row("INBOX");
    assert_eq!(
        (inbox.3, inbox.5, inbox.6, inbox.7, inbox.8),
        (2, 1, 1, false, 0),
        "{plan:#?}"
    );
    let projects = row("Projects");
    assert_eq!(
        (projects.3, projects.5, projects.6, projects.7, projects.8),
        (1, 0, 0, true, 1),
        "{plan:#?}"
    );
    let t = &dry["totals"];
    assert_eq!(
        (
            t["dry_run"].as_bool(),
            t["messages_copied"].as_u64(),
            t["flag_updates"].as_u64(),
            t["deleted"].as_u64(),
            t["folders_created"].as_u64(),
            t["acls_set"].as_u64()
        ),
        (Some(true), Some(3), Some(1), Some(1), Some(1), Some(1)),
        "{t:#}"
    );
    // The text form says the same, per folder.
    let (ok, out) = both(godwit(
        &cfg,
        &["sync", "--dry-run", "--propagate-deletes", "--no-progress"],
    ));
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{ALICE} (dry run): would copy 3 messages"))
            && out.contains("INBOX -> INBOX: copy 2 (")
            && out.contains("update flags on 1, delete 1")
            && out.contains("Projects -> Projects: create the folder, copy 1 (")
            && out.contains(&format!("ACL: would set {BOB} to lrs"))
            && out.contains("++++ Statistics (dry run: what a sync would do; nothing was changed)"),
        "{out}"
    );
    assert_eq!(state_snapshot(&db), before.2);

    // The real run does exactly what the dry run said.
    let (ok, stdout, stderr) = godwit(
        &cfg,
        &["sync", "--propagate-deletes", "--no-progress", "--json"],
    );
    assert!(ok, "{stdout}{stderr}");
    let real: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan_of(&real), plan, "{stdout}");
    assert_eq!(real["totals"]["messages_copied"], 3);
    assert_eq!(count(dst.port, ALICE, "INBOX"), 4);
    assert_eq!(count(dst.port, ALICE, "Projects"), 1);
    // Now nothing is left to do.
    let (ok, stdout, _) = godwit(
        &cfg,
        &[
            "sync",
            "--dry-run",
            "--propagate-deletes",
            "--no-progress",
            "--json",
        ],
    );
    assert!(ok);
    let again: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let t = &again["totals"];
    assert_eq!(
        (
            t["messages_copied"].as_u64(),
            t["flag_updates"].as_u64(),
            t["deleted"].as_u64(),
            t["folders_created"].as_u64(),
            t["acls_set"].as_u64()
        ),
        (Some(0), Some(0), Some(0), Some(0), Some(0)),
        "{t:#}"
    );
}

const APP: &str = "app@example.com";
const CLIENT_SECRET: &str = "s3cret:with/odd chars";

/// A source Dovecot whose oauth2 passdb asks `tokens` (introspection_mode = post).
fn oauth_source(tokens: &TokenServer, conf_dir: &Path) -> Dovecot {
    let conf = conf_dir.join("oauth2.conf");
    std::fs::write(&conf, tokens.dovecot_oauth2_conf()).unwrap();
    std::fs::set_permissions(
        conf_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let extra = format!(
        "auth_mechanisms = plain login xoauth2 oauthbearer\n\
         passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {}\n}}\n",
        conf.display()
    );
    Dovecot::start_with(Flavor::Exchange, &[APP], &extra)
}

/// `godwit sync --watch` over two rounds with tokens that live 2 s (the
/// rounds are 3 s apart): the second round's logins need a new token, the
/// sync copies everything without an error, and the first token is refused
/// by then, so the refresh was needed.
fn watch_with_short_lived_tokens(
    source_auth: impl Fn(&TokenServer, &Path) -> String,
) -> (TokenServer, tempfile::TempDir) {
    let tokens = TokenServer::start("godwit-app", CLIENT_SECRET, APP, 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let conf_dir = d.join("oauth");
    std::fs::create_dir(&conf_dir).unwrap();
    let src = oauth_source(&tokens, &conf_dir);
    let dst = Dovecot::start(Flavor::Source, &[APP]);
    // The source logs in with a token; the password column is unused.
    std::fs::write(
        d.join("accounts.csv"),
        format!("{APP},{APP},unused,{APP},{PASSWORD}\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("sync.toml"),
        format!(
            "data_dir = \"{data}\"\n[sync]\naccounts = \"{accounts}\"\nwatch_interval = \"3s\"\ncommand_timeout = \"20s\"\n\
             [sync.source]\nurl = \"{src}\"\n{auth}\n[sync.target]\nurl = \"{dst}\"\n",
            data = d.join("data").display(),
            accounts = d.join("accounts.csv").display(),
            src = src.url(),
            dst = dst.url(),
            auth = source_auth(&tokens, d),
        ),
    )
    .unwrap();
    // Seeded with a password login (the oauth source keeps its passwd-file passdb).
    seed(src.port, APP, "INBOX", 20, "r1-");

    let mut child = Command::new(godwit_bin())
        .args(["sync", "--watch", "--no-progress", "--config"])
        .arg(d.join("sync.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    for mut pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let rounds = |n: usize| {
        let out = out.clone();
        move || {
            let o = out.lock().unwrap().clone();
            (o.matches("++++ Statistics").count() >= n).then_some(o)
        }
    };
    wait_for("the first round", Duration::from_secs(60), rounds(1));
    seed(src.port, APP, "INBOX", 5, "r2-");
    let text = wait_for("the second round", Duration::from_secs(60), rounds(2));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = wait_for(
        "godwit sync --watch to stop on SIGTERM",
        Duration::from_secs(20),
        || child.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}: {text}");

    let stats: Vec<&str> = text.split("++++ Statistics").skip(1).collect();
    assert!(
        stats[0].contains("Messages transferred        : 20\n"),
        "{text}"
    );
    assert!(
        stats[1].contains("Messages transferred        : 5\n"),
        "{text}"
    );
    for s in &stats[..2] {
        assert!(s.contains("Errors                      : 0\n"), "{text}");
        assert!(s.contains("(0 failed, 0 not verified clean)"), "{text}");
    }
    assert_eq!(count(dst.port, APP, "INBOX"), 25);
    // More than one token was needed, and the first was dead by the end.
    assert!(
        tokens.issued() >= 2,
        "{} token(s) issued: {text}",
        tokens.issued()
    );
    assert_eq!(
        tokens.post("/introspect", "token=cc-1"),
        serde_json::json!({"active": false})
    );
    assert!(
        !text.contains("cc-1") && !text.contains("cc-2"),
        "a token was logged: {text}"
    );
    (tokens, dir)
}

#[test]
fn client_credentials_tokens_are_refreshed_during_a_watch_run() {
    let (tokens, _dir) = watch_with_short_lived_tokens(|tokens, _| {
        format!(
            "auth = \"xoauth2\"\ntoken_url = \"{}\"\nclient_id = \"godwit-app\"\n\
             client_secret = \"{CLIENT_SECRET}\"\nscope = \"https://outlook.office365.com/.default\"\n",
            tokens.token_url()
        )
    });
    // Cached until shortly before expires_in: not one grant per login. The
    // two rounds (sync and verify each) open at least 6 source connections
    // over about 4 s of 2 s tokens.
    assert!(
        tokens.issued() <= 5,
        "{} grants: the token is not cached",
        tokens.issued()
    );
}

#[test]
fn a_token_command_printing_short_lived_tokens_is_run_again() {
    let (tokens, dir) = watch_with_short_lived_tokens(|tokens, d| {
        // A helper as a vault would be: it gets the address, fetches a
        // token that lives 2 s, prints it, and notes that it ran.
        let script = d.join("token-for");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$1\" >> {runs}\nexec python3 -c 'import base64, json, sys, urllib.parse, urllib.request\n\
                 auth = base64.b64encode((urllib.parse.quote_plus(\"godwit-app\") + \":\" + urllib.parse.quote_plus(sys.argv[1], safe=\"-._*\")).encode()).decode()\n\
                 r = urllib.request.Request(\"http://127.0.0.1:{port}/token\", data=b\"grant_type=client_credentials\", headers={{\"Authorization\": \"Basic \" + auth}})\n\
                 print(json.load(urllib.request.urlopen(r))[\"access_token\"])' \"{CLIENT_SECRET}\"\n",
                runs = d.join("runs").display(),
                port = tokens.port,
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        format!(
            "auth = \"oauthbearer\"\ntoken_command = [\"{}\", \"{{address}}\"]\n",
            script.display()
        )
    });
    let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
    let lines: Vec<&str> = runs.lines().collect();
    assert!(
        lines.len() >= 2 && lines.iter().all(|l| *l == APP),
        "{runs}"
    );
    assert_eq!(tokens.issued(), lines.len() as u64);
}
