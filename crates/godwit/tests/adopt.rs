//! `godwit spool adopt` (issue 17), against real peers: two gateways on one
//! PostgreSQL and Postfix's smtp-sink. Node A accepts mail its platform
//! cannot take (nothing listens there), is SIGKILLed, and node B adopts its
//! data_dir while serving: every acknowledged message reaches the sink once
//! (counted by Message-ID), a damaged queue file is quarantined, a node that
//! still heartbeats is refused without --force, a restored copy of an
//! adopted file is refused as known, and trace shows both nodes.

mod support;

use std::path::Path;
use std::time::Duration;
use support::*;

/// A gateway on the shared store, named `node`.
fn node(db: &str, node: &str, old_port: u16, new_port: u16) -> Gateway {
    let mut g = Gateway::start(
        old_port,
        new_port,
        "",
        &format!("[store]\nurl = \"{db}\"\n"),
    );
    g.reconfigure(|c| {
        c.replacen(
            "hostname = \"gw.test\"",
            &format!("hostname = \"gw.test\"\nnode_name = \"{node}\""),
            1,
        )
    });
    g
}

fn queue_files(spool: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(spool.join("queue"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_dead_nodes_spool_is_adopted_and_delivered_once() {
    let Some(db) = scratch_database("godwit_adopt") else {
        return;
    };
    // A's platforms: ports nothing listens on, so its mail stays queued.
    let mut a = node(&db, "node-a", free_port(), free_port());
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let b = node(&db, "node-b", sink_port, sink_port);

    let ids: Vec<String> = (0..5).map(|i| format!("adopt{i}@sender.test")).collect();
    let mut c = a.client();
    c.greet();
    for id in &ids {
        let r = c.mail(
            "a@sender.test",
            &["alice@example.com"],
            &message(id, "queued on A"),
        );
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT");
    wait_for("A to defer all five", Duration::from_secs(20), || {
        let n = a.events_named("delivery.deferred").len();
        (n >= 5).then_some(())
    });
    let spool_a = a.data.join("spool");
    assert_eq!(queue_files(&spool_a).len(), 5);
    // fleet status, from B: A's spool depth and its oldest message.
    let sent_ms = godwit_store::now_ms();
    wait_for(
        "fleet status to show A's spool",
        Duration::from_secs(10),
        || {
            let (ok, out) = b.cli(&["fleet", "status", "--json"]);
            assert!(ok, "{out}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let a = v
                .as_array()?
                .iter()
                .find(|m| m["node"] == "node-a" && m["role"] == "gateway")?
                .clone();
            let oldest = a["oldest_message_ms"].as_i64()?;
            assert!(oldest <= sent_ms && oldest > sent_ms - 60_000, "{a}");
            (a["spool_depth"] == 5).then_some(())
        },
    );
    let (_, table) = b.cli(&["fleet", "status"]);
    assert!(table.contains("OLDEST"), "{table}");

    // Fleet-wide views from B's configuration: A's queue and A's trace.
    let (ok, out) = b.cli(&["queue", "list", "--json"]);
    assert!(ok, "{out}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(listed.len(), 5, "{out}");
    assert!(listed.iter().all(|m| m["node"] == "node-a"), "{out}");
    let (_, out) = b.cli(&["queue", "list"]);
    assert!(
        out.contains(&format!("<{}>  (on node-a)", ids[1])) && out.contains("in 5 Requests"),
        "{out}"
    );
    let (ok, out) = b.cli(&["trace", &ids[1]]);
    assert!(
        ok && out.contains("received from") && out.contains("deferred"),
        "{out}"
    );
    // /metrics is B's own, says so, and carries every node's queue.
    let (_, metrics) = b.admin_get("/metrics");
    assert!(
        metrics.contains("godwit_node_info{node=\"node-b\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("godwit_fleet_queue_messages{node=\"node-a\"} 5"),
        "{metrics}"
    );
    let (_, summary) = b.admin_get("/api/summary");
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(v["node"], "node-b");
    assert!(
        v["fleet"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "node-a"),
        "{summary}"
    );
    let (ok, report) = b.cli(&["report", "--since", "1h"]);
    let nodes = report
        .lines()
        .find(|l| l.starts_with("Nodes: "))
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        ok && nodes.contains("node-a") && nodes.contains("node-b"),
        "{report}"
    );

    // A runs and heartbeats: refused (its spool is its own to deliver).
    let (ok, out) = b.cli(&["spool", "adopt", a.data.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("node node-a still heartbeats"), "{out}");
    assert_eq!(queue_files(&spool_a).len(), 5, "nothing moved");

    a.kill9();
    // A restored backup of one file, for later; and a damaged file: a copy
    // with one byte of its message flipped, under a queue ID of its own.
    let files = queue_files(&spool_a);
    let backup = std::fs::read(spool_a.join("queue").join(&files[0])).unwrap();
    let mut bad = backup.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x20;
    std::fs::write(spool_a.join("queue").join("0ZZZZZZZZZBADBAD"), &bad).unwrap();
    // Its heartbeat as a live node would leave it: refused without --force.
    psql(
        &db,
        &format!(
            "UPDATE gateway_nodes SET seen_ms = {} WHERE node = 'node-a'",
            godwit_store::now_ms() + 600_000
        ),
    );
    let (ok, out) = b.cli(&["spool", "adopt", a.data.to_str().unwrap()]);
    assert!(!ok && out.contains("still heartbeats"), "{out}");
    psql(
        &db,
        &format!(
            "UPDATE gateway_nodes SET seen_ms = {} WHERE node = 'node-a'",
            godwit_store::now_ms() - 60_000
        ),
    );
    // A stopped node's queue is not listed, and queue list says so.
    let (_, out) = b.cli(&["queue", "list"]);
    assert!(out.contains("node node-a: stopped"), "{out}");

    let (ok, out) = b.cli(&["spool", "adopt", a.data.to_str().unwrap(), "--force"]);
    // Exit 1: something was quarantined.
    assert!(!ok, "{out}");
    assert!(
        out.contains("adopted 5 message(s)") && out.contains("(node-a) into node node-b"),
        "{out}"
    );
    assert!(
        out.contains("quarantined") && out.contains("checksum mismatch"),
        "{out}"
    );
    assert!(spool_a.join("corrupt").join("0ZZZZZZZZZBADBAD").exists());
    assert!(queue_files(&spool_a).is_empty(), "{out}");

    // The running gateway delivers at once (not at the retry time A had
    // chosen): each Message-ID once.
    wait_for("the sink to hold all five", Duration::from_secs(5), || {
        ids.iter()
            .all(|id| sink.count_containing(&format!("<{id}>")) >= 1)
            .then_some(())
    });
    b.wait_queue_empty(Duration::from_secs(20));
    for id in &ids {
        assert_eq!(sink.count_containing(&format!("<{id}>")), 1, "{id}");
    }
    assert_eq!(b.events_named("queue.adopted").len(), 5);
    assert!(b.events_named("queue.corrupt").iter().any(|e| {
        e["file"]
            .as_str()
            .unwrap_or("")
            .contains("0ZZZZZZZZZBADBAD")
    }));

    // trace from B: accepted on A, adopted and delivered by B.
    let t = wait_for("trace to show both nodes", Duration::from_secs(10), || {
        let (ok, out) = b.cli(&["trace", &ids[0]]);
        (ok && out.contains("[node-a]") && out.contains("delivered alice@example.com"))
            .then_some(out)
    });
    let line = |needle: &str| {
        t.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}:\n{t}"))
            .to_string()
    };
    assert!(line("received from").contains("[node-a]"), "{t}");
    assert!(
        line("adopted from the spool of node-a").contains("[node-b]"),
        "{t}"
    );
    assert!(
        line("delivered alice@example.com").contains("[node-b]"),
        "{t}"
    );

    // A restored copy of an adopted (and delivered) file: refused as known.
    std::fs::write(spool_a.join("queue").join(&files[0]), &backup).unwrap();
    let (ok, out) = b.cli(&["spool", "adopt", a.data.to_str().unwrap(), "--force"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("refused {}: queue ID already known", files[0])),
        "{out}"
    );
    assert_eq!(queue_files(&spool_a), vec![files[0].clone()]);
    assert!(queue_files(&b.data.join("spool")).is_empty());
    assert_eq!(sink.count_containing(&format!("<{}>", ids[0])), 1);
}

/// With no gateway running on the adopting node, the CLI moves the files
/// into its spool itself; the gateway delivers them when it starts. A dead
/// node's heartbeat, once stale, needs no --force.
#[test]
fn an_offline_node_adopts_and_delivers_on_start() {
    let Some(db) = scratch_database("godwit_adopt") else {
        return;
    };
    let mut a = node(&db, "node-a", free_port(), free_port());
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let mut b = node(&db, "node-b", sink_port, sink_port);
    b.kill9();
    let ids = ["offline0@sender.test", "offline1@sender.test"];
    let mut c = a.client();
    c.greet();
    for id in ids {
        let r = c.mail("a@sender.test", &["bob@example.com"], &message(id, "x"));
        assert!(r.starts_with("250"), "{r}");
    }
    c.cmd("QUIT");
    // The index gathers up to 50 ms of events per transaction and a SIGKILL
    // loses what it has not committed (the JSON-lines log keeps it). The
    // trace asked for below reads A's accepts from the index, so A is
    // killed once they are there, not before.
    wait_for("A's accepts in the index", Duration::from_secs(10), || {
        let n = psql(
            &db,
            "SELECT count(*) FROM events WHERE node = 'node-a' \
             AND name = 'message.accepted' AND message_id LIKE '%offline%'",
        );
        (n == "2").then_some(())
    });
    a.kill9();
    wait_for("A's heartbeat to go stale", Duration::from_secs(15), || {
        let age = psql(
            &db,
            &format!(
                "SELECT {} - seen_ms FROM gateway_nodes WHERE node = 'node-a'",
                godwit_store::now_ms()
            ),
        );
        (age.parse::<i64>().ok()? > 3500).then_some(())
    });
    let (ok, out) = b.cli(&["spool", "adopt", a.data.join("spool").to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("adopted 2 message(s)") && out.contains("no gateway is running"),
        "{out}"
    );
    assert_eq!(queue_files(&b.data.join("spool")).len(), 2);
    assert!(queue_files(&a.data.join("spool")).is_empty());
    b.restart();
    wait_for("delivery after B starts", Duration::from_secs(20), || {
        ids.iter()
            .all(|id| sink.count_containing(&format!("<{id}>")) >= 1)
            .then_some(())
    });
    b.wait_queue_empty(Duration::from_secs(20));
    for id in ids {
        assert_eq!(sink.count_containing(&format!("<{id}>")), 1, "{id}");
    }
    // The event index gathers up to 50 ms of events per transaction: the
    // trace is asked until the index holds the delivery.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, t) = b.cli(&["trace", ids[0]]);
        if ok && t.contains("[node-a]") && t.contains("adopted from the spool of node-a") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
