//! SIGHUP applies what a running gateway can change (platforms, their TLS
//! and limits, the log level) and names what needs a restart (the listen
//! address), against real smtp-sinks as the platforms.

mod support;

use std::time::Duration;
use support::*;

fn deliver(port: u16, to: &str, id: &str) {
    let mut c = Client::connect(port);
    c.greet();
    let r = c.mail("a@sender.test", &[to], &message(id, "hello"));
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT");
}

fn reload(g: &Gateway, n: usize, edit: impl FnOnce(String) -> String) -> serde_json::Value {
    let text = std::fs::read_to_string(&g.config_path).unwrap();
    std::fs::write(&g.config_path, edit(text)).unwrap();
    g.signal("HUP");
    wait_for("the reload event", Duration::from_secs(10), || {
        if let Some(f) = g.events_named("gateway.reload_failed").first() {
            panic!("reload refused: {f}");
        }
        g.events_named("gateway.reloaded").into_iter().nth(n)
    })
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sighup_moves_a_platform_to_new_hosts_tls_and_limits_and_names_what_needs_a_restart() {
    let a = Sink::start(free_port(), &[]);
    let b = Sink::start(free_port(), &[]);
    let mut g = Gateway::start(
        free_port(),
        a.port,
        "",
        "[routing]\ndefault = \"new\"\n[log]\nlevel = \"warn\"\n",
    );
    // The file's log.level decides, not the harness's RUST_LOG.
    g.env.push(("RUST_LOG".into(), String::new()));
    g.kill9();
    g.restart();
    let log_path = g.data.with_extension("log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    deliver(g.port, "alice@example.com", "before@test");
    wait_for("delivery to A", Duration::from_secs(10), || {
        (a.count_containing("before@test") == 1).then_some(())
    });
    assert!(!log().contains("before@test"), "warn level logs no events");

    // Platform `new` now relays to B, requires TLS (which smtp-sink does not
    // offer) and allows 3 connections; the log level goes to info; and the
    // listen address changes, which needs a restart.
    let (old_relay, new_relay) = (
        format!("relay = [\"127.0.0.1:{}\"]", a.port),
        format!("relay = [\"127.0.0.1:{}\"]", b.port),
    );
    let other_port = free_port();
    let listen = format!("listen = [\"127.0.0.1:{}\"]", g.port);
    let ev = reload(&g, 0, |t| {
        t.replace(
            &old_relay,
            &format!(
                "{new_relay}\ntls = \"require\"\nmax_connections = 3\ninitial_connections = 2"
            ),
        )
        .replace("level = \"warn\"", "level = \"info\"")
        .replace(&listen, &format!("listen = [\"127.0.0.1:{other_port}\"]"))
    });
    let applied = strings(&ev["applied"]);
    for key in [
        "platforms.new.relay",
        "platforms.new.tls",
        "platforms.new.max_connections",
        "log.level",
    ] {
        assert!(
            applied.contains(&key.to_string()),
            "{key} not applied: {ev}"
        );
    }
    assert_eq!(strings(&ev["restart_needed"]), ["smtp.listen"], "{ev}");
    assert!(g.exited().is_none(), "SIGHUP must not stop the gateway");

    // Still on the old address (a listen change is not applied live).
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", other_port)).is_err(),
        "smtp.listen applied without a restart"
    );
    deliver(g.port, "bob@example.com", "tls@test");
    // The new TLS setting: B does not offer STARTTLS, so the mail waits.
    let deferred = g.wait_event("delivery.deferred", Duration::from_secs(10), |e| {
        e["message_id"]
            .as_str()
            .is_some_and(|m| m.contains("tls@test"))
    });
    let reply = deferred["reply"].to_string();
    assert!(reply.contains("STARTTLS"), "{deferred}");
    assert!(
        deferred
            .to_string()
            .contains(&format!("127.0.0.1:{}", b.port)),
        "the attempt went to B: {deferred}"
    );
    // The new limit, as the running gateway reports it.
    wait_for("max_connections 3 on new", Duration::from_secs(10), || {
        let (ok, out) = g.cli(&["queue", "destinations", "--json"]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.lines().next()?).ok()?;
        (v["destinations"]["new"]["max"] == 3).then_some(())
    });
    // The new level: events are logged at info.
    wait_for("info events in the log", Duration::from_secs(10), || {
        log().contains("tls@test").then_some(())
    });

    // TLS back to the default for B: the waiting message goes out at its
    // next retry, to B. The listen change is still pending, and named again.
    let ev = reload(&g, 1, |t| t.replace("tls = \"require\"\n", ""));
    assert_eq!(strings(&ev["applied"]), ["platforms.new.tls"], "{ev}");
    assert_eq!(strings(&ev["restart_needed"]), ["smtp.listen"], "{ev}");
    wait_for("delivery to B", Duration::from_secs(15), || {
        (b.count_containing("tls@test") == 1).then_some(())
    });
    deliver(g.port, "carol@example.com", "after@test");
    wait_for("the next message at B", Duration::from_secs(10), || {
        (b.count_containing("after@test") == 1).then_some(())
    });
    g.wait_queue_empty(Duration::from_secs(10));
    assert_eq!(a.count_containing("tls@test"), 0);
    assert_eq!(a.count_containing("after@test"), 0);
}

#[test]
fn sighup_adds_and_removes_platforms_and_a_bad_dkim_key_keeps_the_running_file() {
    let a = Sink::start(free_port(), &[]);
    let c = Sink::start(free_port(), &[]);
    let g = Gateway::start(a.port, free_port(), "", "");
    // Routed to `new` while it exists; the reload then removes `new`.
    g.route("erin@example.com", "new");
    // A third platform, routed to by domain; platform `new` removed.
    let third = format!(
        "[platforms.third]\nrelay = [\"127.0.0.1:{}\"]\n[routing.domains]\n\"example.org\" = \"third\"\n",
        c.port
    );
    let new_section = std::fs::read_to_string(&g.config_path).unwrap();
    let start = new_section.find("[platforms.new]").unwrap();
    let end = start + new_section[start..].find("[admin]").unwrap();
    let removed = new_section[start..end].to_string();
    let ev = reload(&g, 0, |t| t.replace(&removed, "") + &third);
    let applied = strings(&ev["applied"]);
    assert!(applied.contains(&"platforms.new".to_string()), "{ev}");
    assert!(applied.contains(&"platforms.third".to_string()), "{ev}");
    assert!(applied.contains(&"routing.domains".to_string()), "{ev}");
    deliver(g.port, "dave@example.org", "third@test");
    wait_for(
        "delivery to the added platform",
        Duration::from_secs(10),
        || (c.count_containing("third@test") == 1).then_some(()),
    );
    // A route to the removed platform defers (4.3.5), never bounces.
    deliver(g.port, "erin@example.com", "gone@test");
    let ev = g.wait_event("delivery.deferred", Duration::from_secs(10), |e| {
        e["message_id"]
            .as_str()
            .is_some_and(|m| m.contains("gone@test"))
    });
    assert!(ev["reply"].to_string().contains("4.3.5"), "{ev}");

    // A DKIM key that does not load refuses the whole reload.
    let ev_text = std::fs::read_to_string(&g.config_path).unwrap();
    std::fs::write(
        &g.config_path,
        ev_text.clone()
            + "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    g.signal("HUP");
    let failed = g.wait_event("gateway.reload_failed", Duration::from_secs(10), |_| true);
    assert!(
        failed["error"].to_string().contains("/nonexistent/key.pem"),
        "{failed}"
    );
    deliver(g.port, "frank@example.org", "kept@test");
    wait_for(
        "delivery with the kept file",
        Duration::from_secs(10),
        || (c.count_containing("kept@test") == 1).then_some(()),
    );
}

/// Issue 19: a missing file is reported once, and "run with --config FILE"
/// only when no --config was given.
#[test]
fn configuration_errors_name_the_file_once_and_hint_only_without_config() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(godwit_bin())
            .current_dir(dir.path())
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = dir.path().join("nosuch.toml");
    let err = run(&["queue", "list", "--config", missing.to_str().unwrap()]);
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert!(!err.contains("run with --config"), "{err}");
    let err = run(&["queue", "list"]);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert!(err.contains("run with --config FILE"), "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[smtp]\nbogus = 1\n").unwrap();
    let err = run(&["queue", "list", "--config", bad.to_str().unwrap()]);
    assert!(err.contains("bogus") && err.contains("line 2"), "{err}");
    assert!(!err.contains("run with --config"), "{err}");
}
