//! Guarded waves against real peers: a soak that rolls a wave back by
//! itself when its platform starts failing.

mod support;

use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(30);

fn setup_wave(gw: &Gateway) {
    let dir = gw.data.parent().unwrap().join("directory.csv");
    std::fs::write(
        &dir,
        "address,display_name,kind,aliases,members,platform\nalice@example.com,Alice,user,al@example.org,,old\nbob@example.com,Bob,user,,,old\n",
    )
    .unwrap();
    for args in [
        vec!["directory", "import", dir.to_str().unwrap(), "--apply"],
        vec!["directory", "state", "ready", "alice@example.com"],
        vec!["wave", "create", "pilot", "--members", "alice@example.com"],
    ] {
        let (ok, out) = gw.cli(&args);
        assert!(ok, "{args:?}: {out}");
    }
}

fn send(gw: &Gateway, to: &str, id: &str) {
    let mut c = gw.client();
    c.greet();
    let r = c.mail("s@outside.test", &[to], &message(id, "x"));
    assert!(r.starts_with("250"), "{r}");
}

#[test]
fn soak_rolls_the_wave_back_by_itself_when_new_starts_failing() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let mut new = Sink::start(pn, &[]);
    let mut gw = Gateway::start(po, pn, "", "");
    setup_wave(&gw);
    // A typo in the thresholds is an error before anything moves.
    let (ok, out) = gw.cli(&[
        "wave",
        "cutover",
        "pilot",
        "--soak",
        "1h",
        "--rollback-if",
        "defer_rat>5%",
    ]);
    assert!(!ok && out.contains("unknown metric `defer_rat`"), "{out}");
    let (_, shown) = gw.cli(&["route", "show", "alice@example.com"]);
    assert!(shown.contains(": old ("), "{shown}");

    let (ok, out) = gw.cli(&[
        "wave",
        "cutover",
        "pilot",
        "--soak",
        "1h",
        "--rollback-if",
        "defer_rate>20%,bounces>0",
    ]);
    assert!(ok && out.contains("soaking for 1h"), "{out}");
    // The soak is in the store: it survives a restart of the gateway.
    gw.kill9();
    gw.restart();
    let (_, shown) = wait_for("the cutover applied", T, || {
        let (ok, out) = gw.cli(&["route", "show", "alice@example.com"]);
        out.contains(": new (").then_some((ok, out))
    });
    assert!(shown.contains("new"));
    // N = 2 messages get through; then new answers 4xx at RCPT.
    for i in 0..2 {
        send(&gw, "alice@example.com", &format!("soak-ok{i}@test"));
    }
    wait_for("two at new", T, || {
        (new.count_containing("soak-ok").eq(&2)).then_some(())
    });
    let (ok, watch) = gw.cli(&["wave", "watch", "pilot"]);
    assert!(ok && watch.contains("wave pilot: soaking"), "{watch}");
    new.stop();
    let _failing = Sink::start(pn, &["-r", "rcpt"]);
    for i in 0..3 {
        send(&gw, "al@example.org", &format!("soak-late{i}@test"));
    }
    let ev = gw.wait_event("wave.rolled_back", T, |e| e["wave"] == "pilot");
    let breaches = ev["breaches"].to_string();
    assert!(breaches.contains("defer_rate="), "{ev}");
    assert!(ev["measurements"]["delivered"].as_u64() >= Some(2), "{ev}");
    assert!(ev["measurements"]["deferred"].as_u64() >= Some(1), "{ev}");
    // Mail queued for the member goes to old; nothing bounced.
    wait_for("the deferred mail at old", T, || {
        (old.count_containing("soak-late") == 3).then_some(())
    });
    gw.wait_queue_empty(T);
    assert!(gw.events_named("delivery.failed").is_empty());
    assert!(gw.events_named("dsn.queued").is_empty());
    // The history shows the automatic rollback with its evidence.
    let (ok, hist) = gw.cli(&["history"]);
    assert!(
        ok && hist.contains("wave rollback pilot (automatic: soak breach defer_rate="),
        "{hist}"
    );
    let (ok, watch) = gw.cli(&["wave", "watch", "pilot"]);
    assert!(
        ok && watch.contains("rolled-back") && watch.contains("BREACH:"),
        "{watch}"
    );
    // The same for the dashboard and scripts.
    let (status, body) = gw.admin_get("/api/soaks");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["soaks"][0]["wave"], "pilot", "{v}");
    assert_eq!(v["soaks"][0]["status"], "rolled-back", "{v}");
    assert!(
        v["soaks"][0]["breach"]
            .as_str()
            .unwrap()
            .contains("defer_rate="),
        "{v}"
    );
}

#[test]
fn cutover_pauses_while_the_queue_is_old_unless_forced() {
    let (po, pn) = (free_port(), free_port());
    let _old = Sink::start(po, &[]);
    // new is down: mail for bob waits in the queue.
    let gw = Gateway::start(po, pn, "", "wave_pause_age = \"1s\"");
    setup_wave(&gw);
    gw.route("bob@example.com", "new");
    send(&gw, "bob@example.com", "stuck@test");
    // Its second deferral comes after a backoff of at least 1 s: by then
    // the queue is older than wave_pause_age.
    gw.wait_event("delivery.deferred", T, |e| {
        e["attempts"].as_u64() >= Some(2)
    });
    let (ok, out) = gw.cli(&["wave", "cutover", "pilot"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("wave pilot not cut over") && out.contains("queue.wave_pause_age = 1s"),
        "{out}"
    );
    let (_, shown) = gw.cli(&["route", "show", "alice@example.com"]);
    assert!(
        shown.contains(": old ("),
        "paused means nothing moved: {shown}"
    );
    let (ok, out) = gw.cli(&["wave", "cutover", "pilot", "--force"]);
    assert!(ok, "{out}");
    let (_, hist) = gw.cli(&["history"]);
    assert!(
        hist.contains(
            "wave cutover pilot --force (overriding the pause: the oldest queued message is"
        ),
        "{hist}"
    );
}

#[test]
fn probe_names_the_alias_the_target_lacks_and_cutover_holds_its_member_back() {
    // new is a godwit whose directory lacks alice's alias al@example.org
    // and refuses unknown recipients at RCPT (550 5.1.1).
    let sink_port = free_port();
    let _sink = Sink::start(sink_port, &[]);
    let new = Gateway::start(
        sink_port,
        sink_port,
        "",
        "[directory]\nunknown_recipient = \"reject\"\n",
    );
    let target_dir = new.data.parent().unwrap().join("directory.csv");
    std::fs::write(
        &target_dir,
        "address,display_name,kind,aliases,members,platform\nalice@example.com,Alice,user,,,old\nbob@example.com,Bob,user,,,old\n",
    )
    .unwrap();
    let (ok, out) = new.cli(&[
        "directory",
        "import",
        target_dir.to_str().unwrap(),
        "--apply",
    ]);
    assert!(ok, "{out}");
    // new refuses al@example.org only once it runs on that directory: wait
    // for it to apply the import's version (the probe saw "0 refused" when
    // it came first).
    let version: i64 = out
        .split("applied as version ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {out}"));
    new.wait_event("route.changed", Duration::from_secs(10), |e| {
        e["version"].as_i64() >= Some(version)
    });
    let old_port = free_port();
    let _old = Sink::start(old_port, &[]);
    let gw = Gateway::start(old_port, new.port, "", "");
    setup_wave(&gw);
    for args in [
        vec!["directory", "state", "ready", "bob@example.com"],
        vec!["wave", "add", "pilot", "--members", "bob@example.com"],
    ] {
        let (ok, out) = gw.cli(&args);
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, out) = gw.cli(&["directory", "probe", "--platform", "new", "--wave", "pilot"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("probed 3 address(es) at new")
            && out.contains("REFUSED al@example.org (mailbox alice@example.com): 550"),
        "{out}"
    );
    assert!(
        !out.contains("REFUSED alice@") && !out.contains("REFUSED bob@"),
        "{out}"
    );
    let (_, js) = gw.cli(&["directory", "probe", "--wave", "pilot", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(v["refused"][0]["address"], "al@example.org", "{v}");

    // The cutover moves bob and holds alice back, naming the address.
    let (ok, out) = gw.cli(&["wave", "cutover", "pilot"]);
    assert!(!ok, "exit 1 when a member is held back: {out}");
    assert!(
        out.contains("held back")
            && out.contains("alice@example.com")
            && out.contains("al@example.org"),
        "{out}"
    );
    let (_, a) = gw.cli(&["route", "show", "alice@example.com"]);
    let (_, b) = gw.cli(&["route", "show", "bob@example.com"]);
    assert!(a.contains(": old (") && b.contains(": new ("), "{a}\n{b}");
    let (_, hist) = gw.cli(&["history"]);
    assert!(
        hist.contains("probe held back: al@example.org (550"),
        "{hist}"
    );
    // --force moves alice anyway, and the history says what it overrode.
    let (ok, out) = gw.cli(&["wave", "cutover", "pilot", "--force"]);
    assert!(ok, "{out}");
    let (_, a) = gw.cli(&["route", "show", "alice@example.com"]);
    assert!(a.contains(": new ("), "{a}");
    let (_, hist) = gw.cli(&["history"]);
    assert!(
        hist.contains("--force (probe refused: al@example.org"),
        "{hist}"
    );
}
