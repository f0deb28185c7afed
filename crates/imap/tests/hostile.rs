//! A hostile IMAP source (tests/hostile/imap_server.py, a deliberately broken
//! fake) against a real Dovecot target: malformed FETCH replies, a 2 GB
//! literal announcement, garbage after a 10 MiB literal, BYE in mid-FETCH and
//! a server that stops answering each end the account cleanly and quickly,
//! with a short, printable error, and nothing half-copied on the target.

mod common;

use common::*;
use godwit_imap::conn::{RESPONSE_MARGIN, Server};
use godwit_imap::engine::{Endpoints, SyncOptions, sync_account};
use godwit_imap::verify::verify_account;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

const USER: &str = "erin@example.com";

struct Hostile {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Hostile {
    fn start(mode: &str) -> Hostile {
        let dir = tempfile::tempdir().unwrap();
        let portfile = dir.path().join("port");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hostile/imap_server.py");
        let child = Command::new("python3")
            .args([script, mode, portfile.to_str().unwrap()])
            .spawn()
            .expect("python3 runs the hostile IMAP server");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&portfile) {
                break p.trim().parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "the hostile server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Hostile {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn endpoints(source_port: u16, target: &Dovecot, max_message_size: u64) -> Endpoints {
    let mut source = Server::from_url(&format!("imap://127.0.0.1:{source_port}")).unwrap();
    source.command_timeout = Duration::from_secs(2);
    source.max_response = max_message_size + RESPONSE_MARGIN;
    let mut tgt = Server::from_url(&target.url()).unwrap();
    tgt.command_timeout = Duration::from_secs(2);
    Endpoints {
        source,
        target: tgt,
        overrides: Default::default(),
        exclude: vec![],
        acls: false,
        acl_users: Default::default(),
    }
}

fn assert_short_and_printable(mode: &str, e: &str) {
    assert!(
        e.len() < 600,
        "{mode}: error of {} bytes: {}",
        e.len(),
        &e[..600]
    );
    assert!(
        e.chars().all(|c| !c.is_control()),
        "{mode}: control characters in {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_source_ends_the_account_cleanly_and_quickly() {
    let target = Dovecot::start(Flavor::Exchange, &[USER]);
    // (mode, the account's error names it, limit, max_message_size). The
    // limits catch a hang or a retry loop (a missing timeout never ends; a
    // loop that ignores max_reconnects takes many command_timeouts), not a
    // speed: each is several times what a quiet machine takes, because a
    // loaded CI machine runs a debug build's parser slowly (bye_mid_fetch
    // once took over 3 s there).
    let cases = [
        (
            "malformed",
            "cannot parse the server's response",
            12,
            5_000_000,
        ),
        ("huge_literal", "literal of 2147483648 bytes", 12, 5_000_000),
        // 10 MiB twice (a try and a reconnect) through a debug build's parser.
        (
            "garbage_after",
            "cannot parse the server's response",
            30,
            20_000_000,
        ),
        ("garbage_after", "literal of 10485760 bytes", 12, 5_000_000),
        ("bye_mid_fetch", "connection lost", 12, 5_000_000),
        // command_timeout is 2 s: one try and one reconnect, 4 s; a missing
        // timeout never ends, a loop ignoring max_reconnects passes 20 s.
        ("silent_examine", "sent nothing for 2s", 20, 5_000_000),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (mode, expect, limit, max)) in cases.into_iter().enumerate() {
        let server = Hostile::start(mode);
        let ep = endpoints(server.port, &target, max);
        let store = store(&dir.path().join(i.to_string()).tap_mkdir()).await;
        let opts = SyncOptions {
            max_reconnects: 1,
            ..Default::default()
        };
        let started = Instant::now();
        let report = sync_account(
            &store,
            &ep,
            USER,
            &login_of(USER),
            &login_of(USER),
            &opts,
            Arc::new(Default::default()),
        )
        .await;
        let took = started.elapsed();
        let error = report
            .error
            .clone()
            .unwrap_or_else(|| panic!("{mode}: the account did not fail: {report:#?}"));
        assert!(
            took < Duration::from_secs(limit),
            "{mode}: took {took:?} (limit {limit} s): {error}"
        );
        assert!(
            error.to_lowercase().contains(&expect.to_lowercase()),
            "{mode}: `{error}` should say `{expect}`"
        );
        eprintln!("{mode}: {error} ({took:?})");
        assert_short_and_printable(mode, &error);
        // What the store keeps for the operator is as short.
        let st = godwit_imap::state::account_status(&store, USER)
            .await
            .unwrap()
            .unwrap();
        assert_short_and_printable(mode, st.last_error.as_deref().unwrap_or(""));
    }
    // Nothing half-copied reached the target.
    let mut t = login(target.port, USER).await;
    assert_eq!(count(&mut t, "INBOX").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_against_a_source_that_stops_answering_ends() {
    let target = Dovecot::start(Flavor::Exchange, &[USER]);
    let server = Hostile::start("silent_header");
    let ep = endpoints(server.port, &target, 5_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let started = Instant::now();
    let check = verify_account(&store, &ep, USER, &login_of(USER), &login_of(USER)).await;
    let took = started.elapsed();
    // A hang, not a speed: the 2 s timeout ends it (see above).
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(!check.clean);
    let error = check.error.expect("verify reports the silence");
    assert!(error.contains("sent nothing for 2s"), "{error}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
