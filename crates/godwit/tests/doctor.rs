//! `godwit doctor` against real peers: the exit code is the number of the
//! first broken question of the playbook, with its evidence and decision.

mod support;

use std::process::Command;
use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn doctor_names_a_throttling_platform_and_exits_3() {
    let (po, pn) = (free_port(), free_port());
    let _old = Sink::start(po, &[]);
    // The new platform greets with 421 and hangs up: a throttle ("too many
    // connections"). At RCPT it would be lost in our pipelined reading.
    let _new = Sink::start(pn, &["-Q", "connect"]);
    let gw = Gateway::start(po, pn, "", "");
    gw.route("alice@example.com", "new");
    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "s@outside.test",
        &["alice@example.com"],
        &message("throttled@test", "x"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for("three 421 deferrals", T, || {
        (gw.events_named("delivery.deferred")
            .iter()
            .filter(|e| e["reply"].as_str().is_some_and(|r| r.starts_with("421")))
            .count()
            >= 3)
            .then_some(())
    });
    let (code, out) = wait_for("doctor to see the burst", T, || {
        let (code, out) = gw.cli_code(&["doctor"]);
        (code == 3).then_some((code, out))
    });
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("1. Is inbound mail accepted? [ok]"), "{out}");
    assert!(
        out.contains("3. Is the destination throttling or failing? [BROKEN]"),
        "{out}"
    );
    assert!(out.contains("new: ") && out.contains(" x 421"), "{out}");
    assert!(
        out.contains("reduce concurrency") && out.contains("pause the next wave"),
        "{out}"
    );
    assert!(out.contains("4. Is outbound deliverability tanking? [not reached]"));
    // The same as JSON, for scripts.
    let (code, js) = gw.cli_code(&["doctor", "--json"]);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["findings"][2]["status"], "broken");
}

#[test]
fn doctor_finds_mail_that_did_not_go_where_the_route_says_and_exits_2() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let _new = Sink::start(pn, &[]);
    let gw = Gateway::start(po, pn, "", "");
    gw.route("alice@example.com", "old");
    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "s@outside.test",
        &["alice@example.com"],
        &message("misrouted@test", "x"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for("delivery to old", T, || {
        (old.count_containing("misrouted@test") == 1).then_some(())
    });
    wait_for("the delivery indexed", T, || {
        let (_, out) = gw.cli(&["trace", "misrouted@test"]);
        out.contains("verdict: delivered").then_some(())
    });
    // Before the change, routing is consistent.
    let (code, out) = gw.cli_code(&["doctor", "alice@example.com"]);
    assert_eq!(code, 0, "{out}");
    // The map changed by hand in the store, without a new version: the
    // gateway never hears of it, and its mail does not follow.
    // `.timeout`: wait for the gateway's own writers (the event indexer)
    // instead of failing with SQLITE_BUSY on a loaded machine.
    let ok = Command::new("sqlite3")
        .args(["-cmd", ".timeout 20000"])
        .arg(gw.data.join("state.db"))
        .arg("UPDATE route_entries SET route = 'new' WHERE address = 'alice@example.com'")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (code, out) = gw.cli_code(&["doctor", "alice@example.com"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("route explain alice@example.com: new"),
        "{out}"
    );
    assert!(
        out.contains("delivered to old under routing version 1  <-- not where the route says now"),
        "{out}"
    );
    assert!(out.contains("pause the wave"), "{out}");
    assert!(out.contains("3. Is the destination throttling or failing? [not reached]"));
}

#[test]
fn doctor_healthy_run_traces_its_test_message_end_to_end() {
    // old is itself a godwit gateway, which answers "queued as ID".
    let sink_port = free_port();
    let sink = Sink::start(sink_port, &[]);
    let downstream = Gateway::start(sink_port, sink_port, "", "");
    let gw = Gateway::start(downstream.port, free_port(), "", "");
    gw.route("alice@example.com", "old");
    let (code, out) = gw.cli_code(&["doctor", "alice@example.com", "--send-test"]);
    assert_eq!(code, 0, "{out}");
    let ours = wait_for("our accept", T, || {
        gw.events_named("message.accepted").into_iter().next()
    })["queue_id"]
        .as_str()
        .unwrap()
        .to_string();
    let theirs = wait_for("downstream accept", T, || {
        downstream
            .events_named("message.accepted")
            .into_iter()
            .next()
    })["queue_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        out.contains(&format!("send-test: accepted by our listener as {ours}")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "send-test: {ours} delivered to old, their queue ID {theirs}"
        )),
        "{out}"
    );
    for q in 1..=3 {
        assert!(
            out.contains(&format!("{q}. ")) && !out.contains("BROKEN"),
            "{out}"
        );
    }
    assert!(out.contains("4. Is outbound deliverability tanking? [not configured]"));
    assert!(out.contains("5. Are clients failing rather than mailflow? [not configured]"));
    wait_for("the test message at the sink", T, || {
        (sink.count_containing("godwit doctor --send-test") == 1).then_some(())
    });
}

#[test]
fn two_gateways_routing_to_each_other_hold_the_loop_without_a_dsn() {
    // a's `old` is b, and b's `old` is a: alice goes round.
    let hops = "max_trace_hops = 2";
    let placeholder = free_port();
    let mut a = Gateway::start(placeholder, free_port(), hops, "");
    let mut b = Gateway::start(a.port, free_port(), hops, "");
    b.reconfigure(|c| c.replace("hostname = \"gw.test\"", "hostname = \"gw2.test\""));
    let b_port = b.port;
    a.reconfigure(|c| {
        c.replace(
            &format!("relay = [\"127.0.0.1:{placeholder}\"]"),
            &format!("relay = [\"127.0.0.1:{b_port}\"]"),
        )
    });
    let mut c = a.client();
    c.greet();
    let r = c.mail(
        "s@outside.test",
        &["alice@example.com"],
        &message("loop@test", "x"),
    );
    assert!(r.starts_with("250"), "{r}");
    // a (0 trace headers) -> b (1) -> a (2) -> b (3 > 2): held at b.
    let ev = b.wait_event("message.loop", T, |_| true);
    let held = ev["queue_id"].as_str().unwrap().to_string();
    assert_eq!(ev["trace_hops"].as_array().unwrap().len(), 3, "{ev}");
    assert_eq!(ev["max_trace_hops"], 2);
    let path: Vec<&str> = ev["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // The cycle: both gateways, twice each, with every queue ID seen.
    assert_eq!(path.len(), 4, "{ev}");
    assert!(path[0].starts_with("gw.test ") && path[1].starts_with("gw2.test "));
    assert!(path[2].starts_with("gw.test ") && path[3] == format!("gw2.test {held}"));
    b.wait_held(&held, T);
    // Held is a final state for this test: nothing leaves b, no DSN anywhere.
    let (ok, shown) = b.cli(&["queue", "show", &held]);
    assert!(ok && shown.contains("mail loop"), "{shown}");
    for g in [&a, &b] {
        assert!(g.events_named("dsn.queued").is_empty());
        assert!(g.events_named("delivery.failed").is_empty());
    }
    assert!(
        b.events_named("delivery.attempt")
            .iter()
            .all(|e| e["queue_id"] != held.as_str())
    );
    // route explain and doctor show it.
    let (_, explain) = wait_for("the loop indexed", T, || {
        let (ok, out) = b.cli(&["route", "explain", "alice@example.com"]);
        out.contains("LOOP:").then_some((ok, out))
    });
    assert!(
        explain.contains(&format!(
            "{held} held (3 X-Godwit-Trace headers > smtp.max_trace_hops 2)"
        )),
        "{explain}"
    );
    let (code, out) = b.cli_code(&["doctor", "alice@example.com"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("loop: ") && out.contains("never bounced"),
        "{out}"
    );
}
