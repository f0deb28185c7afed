//! Sync work claimed by a fleet (issue 17), against real peers: two Dovecots
//! and PostgreSQL. Three `godwit sync --worker` processes share 30 accounts;
//! one is SIGKILLed mid-run and the others take its accounts over when its
//! leases expire. Every account ends up on the target exactly once (compared
//! message by message), and the source never sees more connections than
//! `max_connections_per_server` summed over the fleet (sampled with
//! `doveadm who`). On SQLite, two plain `godwit sync` runs over the same
//! accounts take the account lock: one waits while the other copies. Three
//! gateways on one PostgreSQL apply a routing change pushed by NOTIFY.

#[path = "../../imap/tests/common/mod.rs"]
mod imap_common;
mod support;

use imap_common::{Dovecot, Flavor, PASSWORD};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::*;

const CAP: usize = 3;

fn users(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("f{i:02}@example.com")).collect()
}

/// Fills each source mailbox with `per` messages of ~`size` bytes, each with
/// its own Message-ID.
fn fill(src: &Dovecot, users: &[String], per: usize, size: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for u in users {
            let mut s = imap_common::login(src.port, u).await;
            for i in 0..per {
                let body = imap_common::message(
                    Some(&format!("<{i}.{u}>")),
                    &format!("message {i}"),
                    &"x".repeat(size),
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
}

fn write_config(dir: &Path, store: &str, src: &Dovecot, dst: &Dovecot, users: &[String]) {
    let mut csv = String::from("address,source_user,source_password,target_user,target_password\n");
    for u in users {
        csv.push_str(&format!("{u},{u},{PASSWORD},{u},{PASSWORD}\n"));
    }
    std::fs::write(dir.join("accounts.csv"), csv).unwrap();
    let store = if store.is_empty() {
        String::new()
    } else {
        format!("[store]\nurl = \"{store}\"\n")
    };
    std::fs::write(
        dir.join("godwit.toml"),
        format!(
            r#"hostname = "fleet.test"
data_dir = "{data}"
{store}[sync]
accounts = "{accounts}"
command_timeout = "20s"
max_connections_per_server = {CAP}
max_bytes_per_second = "300kB"
lease = "2s"
[sync.source]
url = "{src}"
[sync.target]
url = "{dst}"
"#,
            data = dir.join("data").display(),
            accounts = dir.join("accounts.csv").display(),
            src = src.url(),
            dst = dst.url(),
        ),
    )
    .unwrap();
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(godwit_bin())
        .args(args)
        .arg("--config")
        .arg(dir.join("godwit.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Samples `doveadm who` on `d` until stopped; the most IMAP sessions seen.
fn sample_sessions(d: &Dovecot, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    let conf = d.conf.clone();
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(Ordering::SeqCst) {
            let out = Command::new("doveadm")
                .arg("-c")
                .arg(&conf)
                .args(["who", "-1"])
                .output()
                .unwrap();
            // One line per connection: "user proto pid ip", after a header.
            let n = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.split_whitespace().nth(1) == Some("imap"))
                .count();
            peak = peak.max(n);
            std::thread::sleep(Duration::from_millis(50));
        }
        peak
    })
}

/// Every source message is on the target once: the INBOXes hold the same
/// messages (by digest, so by Message-ID too), none twice.
fn assert_same(src: &Dovecot, dst: &Dovecot, users: &[String]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for u in users {
            let mut s = imap_common::login(src.port, u).await;
            let mut t = imap_common::login(dst.port, u).await;
            let (a, b) = (
                imap_common::dump(&mut s).await,
                imap_common::dump(&mut t).await,
            );
            let digests = |m: &std::collections::BTreeMap<String, Vec<imap_common::Held>>| {
                m.get("INBOX")
                    .map(|v| v.iter().map(|h| h.sha256.clone()).collect::<Vec<_>>())
                    .unwrap_or_default()
            };
            assert!(!digests(&a).is_empty());
            assert_eq!(
                digests(&a),
                digests(&b),
                "{u}: target INBOX differs from the source (duplicates or missing)"
            );
        }
    });
}

#[test]
fn three_workers_share_thirty_accounts_and_survive_a_sigkill() {
    let Some(db) = scratch_database("godwit_fleet") else {
        return;
    };
    let users = users(30);
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let src = Dovecot::start(Flavor::Source, &names);
    let dst = Dovecot::start(Flavor::Exchange, &names);
    fill(&src, &users, 10, 20_000);
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &db, &src, &dst, &users);

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_sessions(&src, stop.clone());
    let args = ["sync", "--worker", "--max-accounts", "4", "--no-progress"];
    let mut victim = spawn(dir.path(), &args);
    let others = [spawn(dir.path(), &args), spawn(dir.path(), &args)];
    let victim_holder = format!("fleet.test:{}:%", victim.id());

    // SIGKILL the first worker while it holds accounts and others are done.
    let held = wait_for("the first worker mid-run", Duration::from_secs(60), || {
        let count = |sql: &str| -> usize {
            try_psql(&db, sql)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let done = count("SELECT COUNT(*) FROM sync_queue WHERE state = 'done'");
        let held = count(&format!(
            "SELECT COUNT(*) FROM sync_queue WHERE state = 'pending' AND holder LIKE '{victim_holder}'"
        ));
        (done >= 3 && held >= 1).then_some(held)
    });
    victim.kill().unwrap();
    victim.wait().unwrap();

    for w in others {
        let (ok, out) = output(w);
        assert!(ok, "a surviving worker failed:\n{out}");
        if out.contains("took over") {
            eprintln!("takeover seen in a worker's log");
        }
    }
    stop.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();

    // Every account done; the only second claims are the victim's.
    assert_eq!(
        psql(&db, "SELECT COUNT(*) FROM sync_queue WHERE state = 'done'"),
        "30"
    );
    let claims: usize = psql(&db, "SELECT SUM(claims) FROM sync_queue")
        .parse()
        .unwrap();
    assert!(
        claims >= 30 && claims <= 30 + held,
        "{claims} claims for 30 accounts, {held} taken over"
    );
    let taken_over: usize = psql(&db, "SELECT COUNT(*) FROM sync_queue WHERE claims > 1")
        .parse()
        .unwrap();
    assert!(taken_over >= 1, "the victim's accounts were taken over");
    assert_same(&src, &dst, &users);
    eprintln!("peak source sessions: {peak} (cap {CAP})");
    assert!(
        peak <= CAP,
        "the source saw {peak} sessions at once, cap {CAP}"
    );
    assert!(peak >= 1, "the sampler saw no session at all");
}

/// On SQLite, two plain runs over the same accounts: never the same mailbox
/// at once (the second waits for the first's account lock), no duplicates.
#[test]
fn two_plain_syncs_on_sqlite_take_the_account_lock() {
    let users = users(4);
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let src = Dovecot::start(Flavor::Source, &names);
    let dst = Dovecot::start(Flavor::Exchange, &names);
    fill(&src, &users, 8, 20_000);
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "", &src, &dst, &users);
    let a = spawn(dir.path(), &["sync", "--no-progress"]);
    let b = spawn(dir.path(), &["sync", "--no-progress"]);
    let (ok_a, out_a) = output(a);
    let (ok_b, out_b) = output(b);
    assert!(ok_a && ok_b, "{out_a}\n{out_b}");
    assert!(
        format!("{out_a}{out_b}").contains("is being synced by another process: waiting for it"),
        "{out_a}\n{out_b}"
    );
    assert_same(&src, &dst, &users);
}

/// Three gateways on one PostgreSQL: a `route set` reaches all three within
/// a second through LISTEN/NOTIFY (their `route.changed` event says
/// `via: listen`), and mail through each node goes where the route says.
#[test]
fn three_gateways_apply_a_route_change_by_listen() {
    let Some(db) = scratch_database("godwit_fleet") else {
        return;
    };
    let (old_port, new_port) = (free_port(), free_port());
    let old = Sink::start(old_port, &[]);
    let new = Sink::start(new_port, &[]);
    let store = format!("[store]\nurl = \"{db}\"\n");
    let nodes: Vec<Gateway> = (1..=3)
        .map(|i| {
            let mut g = Gateway::start(old_port, new_port, "", &store);
            // One node name each: the heartbeat rows are per node.
            g.reconfigure(|c| {
                c.replace(
                    "hostname = \"gw.test\"",
                    &format!("hostname = \"gw{i}.test\""),
                )
            });
            g
        })
        .collect();
    wait_for("three live gateways", Duration::from_secs(10), || {
        let n = try_psql(
            &db,
            "SELECT COUNT(DISTINCT node) FROM gateway_nodes WHERE node IN ('gw1.test', 'gw2.test', 'gw3.test')",
        )
        .ok()?;
        (n == "3").then_some(())
    });
    // Each node's first start, as gw.test, beat once before it was killed
    // and renamed: that row is of no running gateway.
    psql(&db, "DELETE FROM gateway_nodes WHERE node = 'gw.test'");

    let (ok, out) = nodes[0].cli(&["route", "set", "alice@example.com", "new", "--no-wait"]);
    assert!(ok, "{out}");
    let version: i64 = out
        .rsplit("version ")
        .next()
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap();
    let start = std::time::Instant::now();
    for g in &nodes {
        let e = g.wait_event("route.changed", Duration::from_secs(1), |e| {
            e["version"].as_i64() >= Some(version)
        });
        assert_eq!(e["via"], "listen", "{e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    for (i, g) in nodes.iter().enumerate() {
        let mut c = g.client();
        c.greet();
        c.cmd("EHLO client.test");
        let id = format!("via-node-{i}@test");
        let r = c.mail(
            "a@sender.test",
            &["alice@example.com"],
            &message(&id, "hello"),
        );
        assert!(r.starts_with("250"), "{r}");
        wait_for("delivery to new", Duration::from_secs(20), || {
            (new.count_containing(&id) == 1).then_some(())
        });
        assert_eq!(old.count_containing(&id), 0);
    }

    // `fleet status` lists the three, each at the new routing version.
    let (ok, out) = nodes[2].cli(&["fleet", "status", "--json"]);
    assert!(ok, "{out}");
    let members: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut gateways: Vec<String> = members
        .iter()
        .filter(|m| m["role"] == "gateway" && m["live"] == true)
        .inspect(|m| assert!(m["routing_version"].as_i64() >= Some(version), "{m}"))
        .map(|m| m["node"].as_str().unwrap().to_string())
        .collect();
    gateways.sort();
    assert_eq!(gateways, ["gw1.test", "gw2.test", "gw3.test"], "{out}");
    let (ok, table) = nodes[0].cli(&["fleet", "status"]);
    assert!(
        ok && table.contains("gw2.test") && table.contains("gateway"),
        "{table}"
    );
}

/// A private PostgreSQL cluster this test may stop and start (the shared one
/// serves the other tests).
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    const BIN: &'static str = "/usr/lib/postgresql/15/bin";

    fn as_postgres(cmd: &str) {
        let out = Command::new("su")
            .args(["postgres", "-c", cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> PrivatePostgres {
        let dir = tempfile::Builder::new()
            .prefix("godwit-pg-")
            .tempdir()
            .unwrap();
        Command::new("chown")
            .args(["postgres", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        Self::as_postgres(&format!(
            "{}/initdb -D {}/data -A trust -U godwit >/dev/null",
            Self::BIN,
            dir.path().display()
        ));
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
        };
        pg.up();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://godwit@127.0.0.1:{}/postgres", self.port)
    }

    fn up(&self) {
        Self::as_postgres(&format!(
            "{bin}/pg_ctl -D {d}/data -l {d}/log -w -o '-p {p} -k {d} -c listen_addresses=127.0.0.1' start >/dev/null",
            bin = Self::BIN,
            d = self.dir.path().display(),
            p = self.port
        ));
    }

    fn down(&self) {
        Self::as_postgres(&format!(
            "{}/pg_ctl -D {}/data -m fast -w stop >/dev/null",
            Self::BIN,
            self.dir.path().display()
        ));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("su")
            .args([
                "postgres",
                "-c",
                &format!(
                    "{}/pg_ctl -D {}/data -m immediate stop",
                    Self::BIN,
                    self.dir.path().display()
                ),
            ])
            .output();
    }
}

/// PostgreSQL stopped under load: the gateway keeps accepting and delivering
/// by the routing it last applied, says so (`store.state`, `godwit_store_up
/// 0`), control commands fail with a clear error, and it catches up when the
/// store is back.
#[test]
fn store_down_mail_flows_by_the_last_routing_and_catches_up() {
    if godwit_store::test_postgres_url("GODWIT_TEST_POSTGRES_URL").is_none() {
        return;
    }
    let pg = PrivatePostgres::start();
    let (old_port, new_port) = (free_port(), free_port());
    let old = Sink::start(old_port, &[]);
    let new = Sink::start(new_port, &[]);
    let g = Gateway::start(
        old_port,
        new_port,
        "",
        &format!("[store]\nurl = \"{}\"\n", pg.url()),
    );
    g.route("alice@example.com", "new");
    g.wait_event("store.state", Duration::from_secs(10), |e| e["up"] == true);

    pg.down();
    let mut ids = Vec::new();
    for i in 0..20 {
        let mut c = g.client();
        c.greet();
        c.cmd("EHLO client.test");
        let id = format!("store-down-{i}@test");
        let r = c.mail("a@sender.test", &["alice@example.com"], &message(&id, "x"));
        assert!(r.starts_with("250"), "refused while the store is down: {r}");
        ids.push(id);
    }
    // Within seconds: the heartbeat does not wait out the pool's timeout.
    let e = g.wait_event("store.state", Duration::from_secs(15), |e| e["up"] == false);
    assert!(!e["error"].as_str().unwrap_or_default().is_empty(), "{e}");
    let (_, metrics) = g.admin_get("/metrics");
    assert!(metrics.contains("godwit_store_up 0"), "{metrics}");
    let (ok, out) = g.cli(&["route", "set", "bob@example.com", "new"]);
    assert!(
        !ok && out.contains("state store"),
        "a control command without the store: {out}"
    );
    for id in &ids {
        wait_for(
            "delivery by the last routing",
            Duration::from_secs(30),
            || (new.count_containing(id) == 1).then_some(()),
        );
        assert_eq!(old.count_containing(id), 0);
    }

    pg.up();
    g.wait_event("store.state", Duration::from_secs(60), |e| e["up"] == true);
    let (_, metrics) = g.admin_get("/metrics");
    assert!(metrics.contains("godwit_store_up 1"), "{metrics}");
    // Caught up: a change made now reaches the gateway (by LISTEN once its
    // listener has reconnected, by polling before).
    let (ok, out) = g.cli(&["route", "set", "alice@example.com", "old"]);
    assert!(ok, "{out}");
    let t0 = std::time::Instant::now();
    let e = g.wait_event("route.changed", Duration::from_secs(15), |e| {
        e["command"].as_str().is_some_and(|c| c.contains("old")) || e["version"].as_i64() >= Some(2)
    });
    eprintln!(
        "after the store came back: applied in {:?} via {}",
        t0.elapsed(),
        e["via"]
    );
    let mut c = g.client();
    c.greet();
    c.cmd("EHLO client.test");
    let r = c.mail(
        "a@sender.test",
        &["alice@example.com"],
        &message("after@test", "x"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for(
        "delivery by the new routing",
        Duration::from_secs(30),
        || (old.count_containing("after@test") == 1).then_some(()),
    );
}
