//! The gateway against real peers: Postfix's smtp-sink as the old and new
//! platforms, the real godwit binary, real sockets.

mod support;

use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(20);

#[test]
fn routes_each_recipient_and_applies_route_changes_to_queued_mail() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let mut new = Sink::start(pn, &[]);
    let gw = Gateway::start(po, pn, "", "");
    gw.route("alice@example.com", "new");
    let (ok, out) = gw.cli(&["route", "show", "alice@example.com"]);
    assert!(
        ok && out.contains("new") && out.contains("address entry"),
        "{out}"
    );
    let (_, out) = gw.cli(&["route", "show", "bob@example.com"]);
    assert!(
        out.contains("old") && out.contains("global default"),
        "{out}"
    );

    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "s@sender.test",
        &["alice@example.com", "bob@example.com"],
        &message("m1@test", "body one\r\n..dot line"),
    );
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    let qid = r.rsplit(' ').next().unwrap().to_string();
    wait_for("alice at new", T, || {
        (new.count_containing("m1@test") == 1).then_some(())
    });
    wait_for("bob at old", T, || {
        (old.count_containing("m1@test") == 1).then_some(())
    });
    let at_new = new
        .messages()
        .into_iter()
        .find(|m| m.contains("m1@test"))
        .unwrap();
    assert!(
        at_new.contains("X-Rcpt-Args: <alice@example.com>") && !at_new.contains("bob@"),
        "{at_new}"
    );
    assert!(
        at_new.contains("body one\r\n.dot line") || at_new.contains("body one\n.dot line"),
        "dot-stuffing round trip: {at_new}"
    );
    assert!(at_new.contains(&format!("X-Godwit-Trace: {qid}")));
    assert!(at_new.contains("by gw.test (godwit) with ESMTP id"));

    // New platform down: alice's next message queues; a route change made
    // while it waits moves it to old within a second or two.
    new.stop();
    let r = c.mail(
        "s@sender.test",
        &["alice@example.com"],
        &message("m2@test", "second"),
    );
    assert!(r.starts_with("250"), "{r}");
    wait_for("a deferral", T, || {
        (!gw.events_named("delivery.deferred").is_empty()).then_some(())
    });
    gw.route("alice@example.com", "old");
    wait_for(
        "queued message re-routed to old",
        Duration::from_secs(3),
        || (old.count_containing("m2@test") == 1).then_some(()),
    );
    let routed: Vec<_> = gw
        .events_named("delivery.routed")
        .into_iter()
        .filter(|e| e["message_id"] == "<m2@test>")
        .collect();
    assert!(
        routed.iter().any(|e| e["route"] == "new") && routed.iter().any(|e| e["route"] == "old"),
        "{routed:?}"
    );
    assert!(gw.events_named("delivery.failed").is_empty());
}

#[test]
fn never_an_open_relay() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "", "");
    let mut c = gw.client();
    c.greet();
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for rcpt in [
        "victim@elsewhere.test",
        "x@example.com.evil.test",
        "a@sub.example.com",
        "\"a@example.com\"@evil.test",
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with("554 5.7.1"), "{rcpt}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("554 5.5.1"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(old.messages().is_empty());
    assert_eq!(
        gw.events_named("message.refused")
            .iter()
            .filter(|e| e["stage"] == "rcpt")
            .count(),
        4
    );
}

#[test]
fn limits_each_with_its_code() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(
        po,
        pn,
        "max_message_size = \"2KB\"\nmax_recipients = 100\ncommand_timeout = \"1s\"\nmax_connections_per_ip = 3\nmax_command_line = 600",
        "",
    );
    let mut c = gw.client();
    let ehlo = c.greet();
    assert!(ehlo.contains("250"), "{ehlo}");
    // Declared size.
    assert!(
        c.cmd("MAIL FROM:<a@b.test> SIZE=5000")
            .starts_with("552 5.3.4")
    );
    // Streamed size: refused after the terminator, nothing delivered.
    let big = message("big@test", &"x".repeat(5000));
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<u@example.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(big.as_bytes());
    c.send(b"\r\n.\r\n");
    assert!(c.reply().starts_with("552 5.3.4"));
    // Recipients.
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    for i in 0..100 {
        assert!(
            c.cmd(&format!("RCPT TO:<u{i}@example.com>"))
                .starts_with("250")
        );
    }
    assert!(c.cmd("RCPT TO:<u101@example.com>").starts_with("452 4.5.3"));
    assert!(c.cmd("RSET").starts_with("250"));
    // Command line length.
    assert!(
        c.cmd(&format!("NOOP {}", "a".repeat(700)))
            .starts_with("500 5.5.6")
    );
    assert!(
        c.cmd("NOOP").starts_with("250"),
        "session survives a long line"
    );
    // Connections per IP: 3 allowed, the 4th refused with 421.
    let mut others: Vec<_> = (0..2).map(|_| gw.client()).collect();
    for o in &mut others {
        assert!(o.reply().starts_with("220"));
    }
    let mut fourth = gw.client();
    assert!(fourth.reply().starts_with("421 4.7.0"));
    // Command timeout: the reply comes by itself.
    assert!(c.reply().starts_with("421 4.4.2"));
    assert!(old.messages().is_empty());
}

#[test]
fn early_talkers_are_refused() {
    let (po, pn) = (free_port(), free_port());
    let _old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "greeting_delay = \"2s\"", "");
    let mut c = gw.client();
    c.send(b"EHLO impatient\r\n");
    let r = c.reply();
    assert!(r.starts_with("554 5.5.1"), "{r}");
    let mut polite = gw.client();
    assert!(polite.reply().starts_with("220"));
}

/// SMTP smuggling: each ending is followed by a smuggled transaction. None may
/// yield a second message at a sink; under `reject` the message is refused.
const SMUGGLING: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n.\n",
    b"\r.\n",
    b"\n.\r",
    b"\r\n\x00.\r\n",
];

fn smuggle(policy: &str) {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, &format!("bare_newline = \"{policy}\""), "");
    for (i, ending) in SMUGGLING.iter().enumerate() {
        let mut c = gw.client();
        c.greet();
        assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<victim@example.com>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let mut payload = message(&format!("outer{i}@test"), "outer").into_bytes();
        payload.extend_from_slice(ending);
        payload.extend_from_slice(format!("MAIL FROM:<evil@b.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nMessage-ID: <smuggled{i}@test>\r\n\r\nsmuggled\r\n.\r\n").as_bytes());
        c.send(&payload);
        let r = c.reply();
        match policy {
            "reject" => assert!(
                r.starts_with("550 5.5.2") || r.starts_with("550 5.6.0"),
                "{ending:?}: {r}"
            ),
            _ => assert!(r.starts_with("250"), "{ending:?}: {r}"),
        }
        // The smuggled commands were content: the next reply is to QUIT.
        assert!(c.cmd("QUIT").starts_with("221"), "{ending:?}");
    }
    if policy == "normalize" {
        wait_for("all outer messages", T, || {
            (old.messages().len() == SMUGGLING.len()).then_some(())
        });
    } else {
        std::thread::sleep(Duration::from_millis(800));
    }
    let msgs = old.messages();
    // Never a second message: the sink's own transaction count equals ours.
    assert!(
        msgs.iter()
            .all(|m| !m.contains("X-Mail-Args: <evil@b.test>")),
        "a smuggled transaction reached the sink"
    );
    assert_eq!(
        msgs.len(),
        if policy == "reject" {
            0
        } else {
            SMUGGLING.len()
        }
    );
}

#[test]
fn smuggling_rejected() {
    smuggle("reject");
}

#[test]
fn smuggling_normalized() {
    smuggle("normalize");
}

#[test]
fn mail_loops_are_refused_at_data() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "", "");
    let mut c = gw.client();
    c.greet();
    let hops: String = (0..51)
        .map(|i| format!("Received: from hop{i} by hop{i}; Sat, 28 Nov 2026 10:00:00 +0000\r\n"))
        .collect();
    let r = c.mail(
        "a@b.test",
        &["u@example.com"],
        &format!("{hops}{}", message("loop@test", "x")),
    );
    assert!(r.starts_with("554 5.4.6"), "{r}");
    let hops: String = (0..50)
        .map(|i| format!("Received: from hop{i}\r\n"))
        .collect();
    let r = c.mail(
        "a@b.test",
        &["u@example.com"],
        &format!("{hops}{}", message("fifty@test", "x")),
    );
    assert!(r.starts_with("250"), "50 hops plus ours is still fine: {r}");
    wait_for("delivery", T, || {
        (old.count_containing("fifty@test") == 1).then_some(())
    });
}

#[test]
fn throttled_platform_defers_then_delivers_once() {
    let (po, pn) = (free_port(), free_port());
    // The platform answers 4xx to every RCPT: mail must wait, not bounce.
    let mut old = Sink::start(po, &["-r", "rcpt"]);
    let gw = Gateway::start(po, pn, "", "");
    let mut c = gw.client();
    c.greet();
    assert!(
        c.mail("a@b.test", &["u@example.com"], &message("defer@test", "x"))
            .starts_with("250")
    );
    wait_for("two deferrals", T, || {
        (gw.events_named("delivery.deferred").len() >= 2).then_some(())
    });
    let d = &gw.events_named("delivery.deferred")[0];
    assert!(d["reply"].as_str().unwrap().starts_with('4'), "{d}");
    let (_, q) = gw.cli(&["queue", "list"]);
    assert!(q.contains("Deferred") && q.contains("in 1 Request."), "{q}");
    old.stop();
    let old = Sink::start(po, &[]);
    wait_for("delivery after recovery", T, || {
        (old.count_containing("defer@test") == 1).then_some(())
    });
    gw.wait_queue_empty(T);
    assert_eq!(old.count_containing("defer@test"), 1, "exactly once");
    assert!(gw.events_named("delivery.failed").is_empty(), "no bounce");
    let (_, q) = gw.cli(&["queue", "list"]);
    assert!(q.contains("Mail queue is empty"), "{q}");
}

#[test]
fn hard_refusal_fails_without_soft_bounce_and_defers_with_it() {
    for soft in [false, true] {
        let (po, pn) = (free_port(), free_port());
        let old = Sink::start(po, &["-f", "rcpt"]);
        let gw = Gateway::start(po, pn, "", &format!("soft_bounce = {soft}"));
        let mut c = gw.client();
        c.greet();
        assert!(
            c.mail("a@b.test", &["u@example.com"], &message("hard@test", "x"))
                .starts_with("250")
        );
        if soft {
            wait_for("deferral", T, || {
                (!gw.events_named("delivery.deferred").is_empty()).then_some(())
            });
            assert!(gw.events_named("delivery.failed").is_empty());
        } else {
            let f = wait_for("failure", T, || {
                gw.events_named("delivery.failed").into_iter().next()
            });
            assert!(f["reply"].as_str().unwrap().starts_with('5'), "{f}");
        }
        drop(old);
    }
}

#[test]
fn dsn_parameters_reach_the_platform() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "", "");
    let mut c = gw.client();
    c.greet();
    assert!(
        c.cmd("MAIL FROM:<a@b.test> RET=HDRS ENVID=env+2Bid BODY=8BITMIME")
            .starts_with("250")
    );
    assert!(
        c.cmd("RCPT TO:<u@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+2Bx@example.com")
            .starts_with("250")
    );
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(message("dsn@test", "caf\u{e9}").as_bytes());
    c.send(b"\r\n.\r\n");
    assert!(c.reply().starts_with("250"));
    let m = wait_for("delivery", T, || {
        old.messages().into_iter().find(|m| m.contains("dsn@test"))
    });
    assert!(
        m.contains("RET=HDRS") && m.contains("ENVID=env+2Bid") && m.contains("BODY=8BITMIME"),
        "{m}"
    );
    assert!(
        m.contains("NOTIFY=SUCCESS,FAILURE") && m.contains("ORCPT=rfc822;u+2Bx@example.com"),
        "{m}"
    );
}

#[test]
fn hold_route_keeps_mail_until_the_route_changes() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(po, pn, "", "");
    gw.route("carol@example.com", "hold");
    let mut c = gw.client();
    c.greet();
    assert!(
        c.mail(
            "a@b.test",
            &["carol@example.com"],
            &message("held@test", "x")
        )
        .starts_with("250")
    );
    wait_for("held event", T, || {
        (!gw.events_named("delivery.held").is_empty()).then_some(())
    });
    let qid = gw.events_named("delivery.held")[0]["queue_id"]
        .as_str()
        .unwrap()
        .to_string();
    gw.wait_held(&qid, T);
    assert_eq!(old.count_containing("held@test"), 0);
    gw.route("carol@example.com", "old");
    wait_for("release by route change", Duration::from_secs(3), || {
        (old.count_containing("held@test") == 1).then_some(())
    });
}

#[test]
fn cli_errors_name_the_problem() {
    let gw = Gateway::start(free_port(), free_port(), "", "");
    let (ok, out) = gw.cli(&["route", "set", "alice@example.com", "mars"]);
    assert!(
        !ok && out.contains("`mars` is not a platform") && out.contains("old"),
        "{out}"
    );
    let (ok, out) = gw.cli(&["route", "set", "alice@elsewhere.test", "new"]);
    assert!(!ok && out.contains("not in an accepted domain"), "{out}");
    let bad = gw.config_path.with_file_name("bad.toml");
    std::fs::write(
        &bad,
        "[smtp]\nlisten = [\"127.0.0.1:1\"]\nmax_message_size = \"huge\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(godwit_bin())
        .args(["serve", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("max_message_size"),
        "{err}"
    );
}

/// `smtp.max_data_memory` bounds the DATA content all sessions hold at once:
/// the session that would go over reads its DATA to the end and gets
/// 452 4.3.1 (try later), the others are untouched, and the memory is
/// there again once they finish. The messages stay below the size past
/// which a session writes its DATA to disk as it arrives (512 KB), so each
/// holds its whole content.
#[test]
fn data_memory_is_bounded_across_sessions() {
    let (po, pn) = (free_port(), free_port());
    let old = Sink::start(po, &[]);
    let gw = Gateway::start(
        po,
        pn,
        "max_message_size = \"450KB\"\nmax_data_memory = \"600KB\"",
        "",
    );
    let open = |id: &str| {
        let mut c = gw.client();
        c.greet();
        assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<u@example.com>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(message(id, "").as_bytes());
        // 400 KB of content, no end yet: the session holds it.
        for _ in 0..400 {
            c.send(&[b'x'; 1022]);
            c.send(b"\r\n");
        }
        std::thread::sleep(Duration::from_millis(300));
        c
    };
    let mut a = open("mem-a@test");
    let mut b = open("mem-b@test");
    b.send(b".\r\n");
    let r = b.reply();
    assert!(r.starts_with("452 4.3.1"), "{r}");
    // The session goes on, and so does the one that holds the memory.
    assert!(b.cmd("NOOP").starts_with("250"));
    a.send(b".\r\n");
    let r = a.reply();
    assert!(r.starts_with("250"), "{r}");
    // Released: a third large message fits again.
    let mut c = open("mem-c@test");
    c.send(b".\r\n");
    let r = c.reply();
    assert!(r.starts_with("250"), "{r}");
    wait_for(
        "delivery of the two accepted",
        Duration::from_secs(20),
        || {
            (old.count_containing("mem-a@test") == 1 && old.count_containing("mem-c@test") == 1)
                .then_some(())
        },
    );
    assert_eq!(old.count_containing("mem-b@test"), 0);
    let refused = gw.events_named("message.refused");
    assert!(
        refused
            .iter()
            .any(|e| e["reply"].as_str().unwrap_or("").starts_with("452 4.3.1")),
        "{refused:?}"
    );
}
