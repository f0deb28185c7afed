//! Everyday operation against the real binary: SIGHUP reloads, SIGTERM
//! drains, paths follow the configuration file.

mod support;

use std::time::Duration;
use support::*;

fn deliver(g: &Gateway, to: &str, id: &str) {
    let mut c = g.client();
    c.greet();
    let r = c.mail("a@sender.test", &[to], &message(id, "hello"));
    assert!(r.starts_with("250"), "{r}");
    c.cmd("QUIT");
}

#[test]
fn sighup_applies_a_valid_file_and_keeps_the_old_one_when_the_new_is_bad() {
    let old = Sink::start(free_port(), &[]);
    let new = Sink::start(free_port(), &[]);
    let mut g = Gateway::start(old.port, new.port, "", "");
    deliver(&g, "alice@example.com", "before@test");
    wait_for("delivery to old", Duration::from_secs(10), || {
        (old.count_containing("before@test") == 1).then_some(())
    });

    let good = std::fs::read_to_string(&g.config_path).unwrap();
    let changed = good
        .replace("max_backoff = \"2s\"", "max_backoff = \"3s\"")
        .replace("hostname = \"gw.test\"", "hostname = \"gw2.test\"")
        + "[routing]\ndefault = \"new\"\n[log]\nlevel = \"debug\"\n";
    std::fs::write(&g.config_path, &changed).unwrap();
    g.signal("HUP");
    let ev = g.wait_event("gateway.reloaded", Duration::from_secs(10), |_| true);
    let applied: Vec<_> = ev["applied"].as_array().unwrap().iter().collect();
    assert!(applied.contains(&&"routing.default".into()), "{ev}");
    assert!(applied.contains(&&"log.level".into()), "{ev}");
    assert!(applied.contains(&&"queue.max_backoff".into()), "{ev}");
    assert_eq!(
        ev["restart_needed"],
        serde_json::json!(["hostname"]),
        "{ev}"
    );
    deliver(&g, "bob@example.com", "after@test");
    wait_for(
        "delivery to new after reload",
        Duration::from_secs(10),
        || (new.count_containing("after@test") == 1).then_some(()),
    );
    assert!(g.exited().is_none(), "SIGHUP must not stop the gateway");

    // A bad file is refused as a whole; the running configuration stays.
    std::fs::write(
        &g.config_path,
        changed.replace("default = \"new\"", "default = \"mars\""),
    )
    .unwrap();
    g.signal("HUP");
    let ev = g.wait_event("gateway.reload_failed", Duration::from_secs(10), |_| true);
    assert!(
        ev["error"].as_str().unwrap().contains("routing.default"),
        "{ev}"
    );
    deliver(&g, "carol@example.com", "kept@test");
    wait_for(
        "delivery to new with the kept file",
        Duration::from_secs(10),
        || (new.count_containing("kept@test") == 1).then_some(()),
    );
    assert!(g.exited().is_none());
    assert_eq!(old.count_containing("kept@test"), 0);
    // stderr is a file here: the warnings are there, in plain text.
    let log = std::fs::read_to_string(g.data.with_extension("log")).unwrap();
    assert!(log.contains("hostname changed"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
}

#[test]
fn sigterm_finishes_data_closes_idle_sessions_and_keeps_the_queue() {
    // Platforms nobody listens on: accepted mail stays queued.
    let mut g = Gateway::start(free_port(), free_port(), "", "");
    deliver(&g, "alice@example.com", "queued@test");

    let mut in_data = g.client();
    in_data.greet();
    assert!(in_data.cmd("MAIL FROM:<a@sender.test>").starts_with("250"));
    assert!(in_data.cmd("RCPT TO:<bob@example.com>").starts_with("250"));
    assert!(in_data.cmd("DATA").starts_with("354"));
    in_data.send(message("indata@test", "first half\r\n").as_bytes());
    let mut idle = g.client();
    idle.greet();

    g.signal("TERM");
    let ev = g.wait_event("gateway.draining", Duration::from_secs(10), |_| true);
    assert_eq!(ev["reason"], "SIGTERM");
    assert!(idle.reply().starts_with("421 4.3.2"), "idle session");
    wait_for("the listener to close", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", g.port))
            .is_err()
            .then_some(())
    });
    // The message in DATA is finished and accepted, then the session closes.
    in_data.send(b"second half\r\n.\r\n");
    let r = in_data.reply();
    assert!(r.starts_with("250"), "end of DATA while draining: {r}");
    assert!(in_data.reply().starts_with("421"));
    let status = wait_for("the gateway to exit", Duration::from_secs(20), || {
        g.exited()
    });
    assert!(status.success(), "{status:?}");
    let stopped = g.wait_event("gateway.stopped", Duration::from_secs(5), |_| true);
    assert_eq!(stopped["reason"], "SIGTERM");
    assert_eq!(stopped["sessions_cut"], 0);

    let (ok, out) = g.cli(&["queue", "list"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("queued@test") && out.contains("indata@test"),
        "{out}"
    );
}

#[test]
fn relative_paths_follow_the_configuration_file_and_reads_never_create_data() {
    let mut g = Gateway::start(free_port(), free_port(), "", "");
    deliver(&g, "alice@example.com", "rel@test");
    g.kill9();
    let folder = g.config_path.parent().unwrap().to_path_buf();
    let text = std::fs::read_to_string(&g.config_path).unwrap();
    let abs = format!("data_dir = \"{}\"", g.data.display());
    let relative = folder.join("relative.toml");
    std::fs::write(&relative, text.replace(&abs, "data_dir = \"data\"")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |config: &std::path::Path| {
        std::process::Command::new(godwit_bin())
            .current_dir(elsewhere.path())
            .args(["queue", "list", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = run(&relative);
    let text_out = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text_out.contains("rel@test"), "{text_out}");

    let missing = folder.join("missing.toml");
    std::fs::write(&missing, text.replace(&abs, "data_dir = \"nodata\"")).unwrap();
    let out = run(&missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("does not exist") && err.contains("nodata"),
        "{err}"
    );
    assert!(!folder.join("nodata").exists());
    assert!(!elsewhere.path().join("nodata").exists());
}

#[test]
fn route_set_returns_once_every_running_gateway_routes_the_new_way() {
    let old = Sink::start(free_port(), &[]);
    let new = Sink::start(free_port(), &[]);
    let g = Gateway::start(old.port, new.port, "", "");
    wait_for(
        "the gateway's first heartbeat",
        Duration::from_secs(10),
        || g.cli(&["queue", "destinations"]).0.then_some(()),
    );
    // Pasted as one block: the next message must already go the new way.
    let (ok, out) = g.cli(&[
        "route",
        "set",
        "alice@example.com",
        "new",
        "--actor",
        "lead",
    ]);
    assert!(ok, "{out}");
    deliver(&g, "alice@example.com", "next@test");
    wait_for("delivery to new", Duration::from_secs(10), || {
        (new.count_containing("next@test") == 1).then_some(())
    });
    assert_eq!(old.count_containing("next@test"), 0);
    // The gateway's route.changed names who changed it and how.
    let ev = g.wait_event("route.changed", Duration::from_secs(5), |e| {
        e["actor"] == "lead"
    });
    assert_eq!(ev["command"], "route set alice@example.com new", "{ev}");

    // A live gateway that never applies it is named, and the exit is 1.
    let db = g.data.join("state.db");
    let far = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let ok = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "INSERT INTO gateway_nodes (node, started_ms, seen_ms, queue_len, destinations, routing_version) VALUES ('stuck-gw', 0, {far}, 0, '{{}}', 0)"
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let (ok, out) = g.cli(&[
        "route",
        "set",
        "bob@example.com",
        "new",
        "--wait-timeout",
        "1s",
    ]);
    assert!(
        !ok && out.contains("stuck-gw") && !out.contains("gw.test,"),
        "{out}"
    );
    let (ok, out) = g.cli(&["route", "set", "carol@example.com", "new", "--no-wait"]);
    assert!(ok, "{out}");
}

#[test]
fn check_dns_with_a_silent_resolver_honours_the_timeout_and_claims_nothing() {
    // A resolver that never answers: a UDP socket nobody reads.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = silent.local_addr().unwrap().to_string();
    let start = std::time::Instant::now();
    let out = std::process::Command::new(godwit_bin())
        .args([
            "check",
            "dns",
            "example.com",
            "--resolver",
            &resolver,
            "--timeout",
            "2s",
        ])
        .output()
        .unwrap();
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert!(!text.contains("[OK]"), "{text}");
    assert!(text.to_lowercase().contains("could not check"), "{text}");
    assert_ne!(out.status.code(), Some(0), "{text}");
}

#[test]
fn queue_selectors_are_validated_and_take_several_ids_or_stdin() {
    let g = Gateway::start(free_port(), free_port(), "", "");
    let mut ids = Vec::new();
    for i in 0..2 {
        let mut c = g.client();
        c.greet();
        let r = c.mail(
            "a@sender.test",
            &["alice@example.com"],
            &message(&format!("sel{i}@test"), "x"),
        );
        ids.push(r.rsplit(' ').next().unwrap().to_string());
        c.cmd("QUIT");
    }
    for (args, bad) in [
        (vec!["queue", "list", "--older-than", "2x"], "2x"),
        (vec!["queue", "list", "--state", "bogus"], "bogus"),
        (vec!["queue", "list", "--platform", "nosuch"], "nosuch"),
        (vec!["queue", "hold", "NOSUCHID"], "NOSUCHID"),
    ] {
        let (ok, out) = g.cli(&args);
        assert!(!ok && out.contains(bad), "{args:?}: {out}");
    }
    let (ok, out) = g.cli(&["queue", "delete", "--rcpt", "nobody@example.com", "--yes"]);
    assert!(!ok && out.contains("nothing"), "{out}");

    let (ok, out) = g.cli(&["queue", "hold", &ids[0], &ids[1]]);
    assert!(ok && out.matches("1 affected").count() == 2, "{out}");
    let (_, list) = g.cli(&["queue", "list", "--state", "held"]);
    assert!(list.contains(&ids[0]) && list.contains(&ids[1]), "{list}");

    // IDs on stdin, as `postsuper -H -`.
    let mut child = std::process::Command::new(godwit_bin())
        .args(["queue", "release", "-", "--config"])
        .arg(&g.config_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{}\n{}", ids[0], ids[1]).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.matches("1 affected").count() == 2,
        "{text}"
    );
    let (_, list) = g.cli(&["queue", "list", "--state", "held"]);
    assert!(!list.contains(&ids[0]), "{list}");
}

#[test]
fn queue_list_show_and_shape_answer_like_mailq_postcat_and_qshape() {
    let g = Gateway::start(free_port(), free_port(), "", "");
    let (ok, out) = g.cli(&["queue", "list"]);
    assert!(ok && out.contains("Mail queue is empty"), "{out}");
    let mut id = String::new();
    for (i, to) in ["alice@example.com", "bob@example.org"].iter().enumerate() {
        let mut c = g.client();
        c.greet();
        let r = c.mail(
            "a@sender.test",
            &[to],
            &message(&format!("shape{i}@test"), "the body"),
        );
        id = r.rsplit(' ').next().unwrap().to_string();
        c.cmd("QUIT");
    }
    wait_for("both deferred", Duration::from_secs(10), || {
        (g.events_named("delivery.deferred").len() >= 2).then_some(())
    });
    let out = wait_for("next retry in the list", Duration::from_secs(10), || {
        let (_, out) = g.cli(&["queue", "list"]);
        out.contains("next retry in").then_some(out)
    });
    assert!(out.starts_with("-Queue ID-"), "{out}");
    assert!(
        out.trim_end().ends_with("-- 1 Kbytes in 2 Requests."),
        "{out}"
    );

    let (ok, js) = g.cli(&["queue", "show", &id, "--json"]);
    assert!(ok, "{js}");
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["queue_id"], id.as_str());
    assert_eq!(v["recipients"][0]["address"], "bob@example.org");
    assert!(
        v["recipients"][0]["next_retry"]
            .as_str()
            .unwrap()
            .ends_with('Z'),
        "{v}"
    );
    assert!(v["recipients"][0]["last_reply"].is_string(), "{v}");
    let (ok, out) = g.cli(&["queue", "show", &id, "--body"]);
    assert!(
        ok && out.contains("*** MESSAGE CONTENTS") && out.contains("the body"),
        "{out}"
    );
    assert!(out.contains("next retry: "), "{out}");

    let (ok, out) = g.cli(&["queue", "shape"]);
    assert!(ok, "{out}");
    let total = out
        .lines()
        .find(|l| l.trim_start().starts_with("TOTAL"))
        .unwrap();
    assert_eq!(total.split_whitespace().nth(1), Some("2"), "{out}");
    assert!(
        out.contains("example.org") && out.contains("1280+"),
        "{out}"
    );
    let (ok, out) = g.cli(&["queue", "shape", "--by", "platform", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"][1]["key"], "old", "{v}");
    assert_eq!(v["rows"][1]["counts"][0], 2, "{v}");
}

#[test]
fn config_show_prints_the_effective_configuration_with_secrets_masked() {
    let mut g = Gateway::start(free_port(), free_port(), "", "");
    g.kill9();
    let cfg = std::fs::read_to_string(&g.config_path).unwrap();
    std::fs::write(
        &g.config_path,
        cfg.replace("[admin]\n", "[admin]\ntoken = \"s3cret-token\"\n"),
    )
    .unwrap();
    let (ok, out) = g.cli(&["config", "show", "--non-default"]);
    assert!(ok, "{out}");
    assert!(
        !out.contains("s3cret-token") && out.contains("token = \"********\""),
        "{out}"
    );
    assert!(
        out.contains("hostname = \"gw.test\"") && !out.contains("max_recipients"),
        "{out}"
    );
    let (ok, all) = g.cli(&["config", "show"]);
    assert!(
        ok && all.contains("max_recipients = 1000") && !all.contains("s3cret"),
        "{all}"
    );
}

#[test]
fn json_on_route_history_and_wave_and_an_inverted_report_window_is_refused() {
    let g = Gateway::start(free_port(), free_port(), "", "");
    let (ok, out) = g.cli(&["route", "set", "alice@example.com", "new", "--no-wait"]);
    assert!(ok, "{out}");
    let js = |args: &[&str]| -> serde_json::Value {
        let (ok, out) = g.cli(args);
        assert!(ok, "{args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    // One address syntax for every command (RFC 5321 4.1.2, 4.5.3.1).
    let (ok, out) = g.cli(&["route", "set", "alice@@example.com", "new"]);
    assert!(!ok && out.contains("one @"), "{out}");
    let long = format!("{}@example.com", "a".repeat(300));
    let (ok, out) = g.cli(&["route", "set", &long, "new"]);
    assert!(!ok && out.contains("64"), "{out}");
    let v = js(&["route", "show", "<Alice@example.com>", "--json"]);
    assert_eq!(v["address"], "alice@example.com");
    let v = js(&["route", "show", "alice@example.com", "--json"]);
    assert_eq!(
        (v["route"].as_str(), v["routing_version"].as_i64()),
        (Some("new"), Some(1))
    );
    let v = js(&["route", "explain", "alice@example.com", "--json"]);
    assert_eq!(v["override"]["route"], "new", "{v}");
    assert_eq!(
        v["route_set_by"]["command"],
        "route set alice@example.com new"
    );
    // No-op changes record nothing: the history never shows `new -> new`.
    let (ok, out) = g.cli(&["route", "set", "alice@example.com", "new", "--no-wait"]);
    assert!(
        ok && out.contains("nothing changed, no version recorded"),
        "{out}"
    );
    let (ok, out) = g.cli(&["route", "unset", "bob@example.com", "--no-wait"]);
    assert!(
        ok && out.contains("nothing changed, no version recorded"),
        "{out}"
    );
    let v = js(&["history", "--json"]);
    assert_eq!(v[0]["version"], 1);
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "{v}");
    let v = js(&["history", "show", "1", "--json"]);
    assert_eq!(v["routes"][0]["after"], "new", "{v}");
    let v = js(&["wave", "list", "--json"]);
    assert_eq!(v, serde_json::json!([]));
    // `directory import --json`: the whole difference, then the outcome.
    let dir = g.config_path.with_file_name("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\ndora@example.com,Dora,user,d@example.com,,old\nerin@example.com,Erin,user,,,old\n",
    )
    .unwrap();
    let path = dir.to_str().unwrap();
    let v = js(&["directory", "import", path, "--json"]);
    assert_eq!(
        (
            v["objects"].as_u64(),
            v["applied"].as_bool(),
            v["dry_run"].as_bool()
        ),
        (Some(2), Some(false), Some(true)),
        "{v}"
    );
    assert_eq!(
        v["added"],
        serde_json::json!(["dora@example.com", "erin@example.com"])
    );
    let v = js(&["directory", "import", path, "--apply", "--json"]);
    assert_eq!(v["applied"], true, "{v}");
    assert_eq!(v["version"], 2, "{v}");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\ndora@example.com,Dora D,user,d@example.com,,old\n",
    )
    .unwrap();
    let v = js(&["directory", "import", path, "--json"]);
    assert_eq!(v["removed"], serde_json::json!(["erin@example.com"]), "{v}");
    assert_eq!(v["changed"][0]["address"], "dora@example.com", "{v}");

    let (ok, out) = g.cli(&["report", "--since", "1h", "--until", "2h"]);
    assert!(!ok && out.contains("not before"), "{out}");
}

#[test]
fn wave_cutover_dry_run_prints_the_plan_and_why_members_are_blocked() {
    let g = Gateway::start(free_port(), free_port(), "", "");
    let dir = g.config_path.with_file_name("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\ndora@example.com,Dora,user,,,old\nerin@example.com,Erin,user,,,old\n",
    )
    .unwrap();
    assert!(
        g.cli(&["directory", "import", dir.to_str().unwrap(), "--apply"])
            .0
    );
    assert!(
        g.cli(&["directory", "state", "ready", "dora@example.com"])
            .0
    );
    let (ok, out) = g.cli(&[
        "wave",
        "create",
        "w1",
        "--members",
        "dora@example.com",
        "erin@example.com",
    ]);
    assert!(ok, "{out}");
    let out = std::process::Command::new(godwit_bin())
        .args(["wave", "cutover", "w1", "--dry-run", "--config"])
        .arg(&g.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("dora@example.com: old -> new"), "{text}");
    assert!(
        text.contains("erin@example.com blocked:") && text.contains("state is pending"),
        "{text}"
    );
    assert!(
        text.contains("dry run: 1 address(es) would be moved"),
        "{text}"
    );
    // Nothing changed.
    let (_, show) = g.cli(&["route", "show", "dora@example.com"]);
    assert!(show.contains(": old "), "{show}");
}

#[test]
fn route_rollback_dry_run_lists_the_directory_changes_it_would_undo() {
    let g = Gateway::start(free_port(), free_port(), "", "");
    let dir = g.config_path.with_file_name("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\ndora@example.com,Dora,user,,,old\n",
    )
    .unwrap();
    assert!(
        g.cli(&["directory", "import", dir.to_str().unwrap(), "--apply"])
            .0
    );
    let (ok, out) = g.cli(&["directory", "state", "ready", "dora@example.com"]);
    assert!(ok, "{out}");
    let (ok, out) = g.cli(&["route", "rollback", "--to", "1", "--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("state dora@example.com: ready -> pending"),
        "{out}"
    );
    assert!(out.contains("dry run"), "{out}");
}
