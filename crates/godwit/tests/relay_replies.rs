//! The relay client reads real servers' replies as they are: a 421 followed
//! by the server closing the connection (RFC 5321 3.8) is the platform's
//! answer, reported with its code, not a local "unparseable reply".

mod support;

use std::time::Duration;
use support::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_421_then_disconnect_during_pipelining_is_reported_as_the_421() {
    let (po, pn) = (free_port(), free_port());
    let _old = Sink::start(po, &[]);
    // smtp-sink -Q rcpt: answers the pipelined RCPT with 421 and hangs up,
    // before the DATA reply godwit also waits for.
    let _new = Sink::start(pn, &["-Q", "rcpt"]);
    let gw = Gateway::start(po, pn, "", "");
    gw.route("alice@example.com", "new");
    let mut c = gw.client();
    c.greet();
    let r = c.mail(
        "s@outside.test",
        &["alice@example.com"],
        &message("q421@test", "x"),
    );
    assert!(r.starts_with("250"), "{r}");
    let ev = gw.wait_event("delivery.deferred", T, |e| e["rcpt"] == "alice@example.com");
    let reply = ev["reply"].as_str().unwrap();
    assert!(reply.starts_with("421"), "the platform's own 421: {ev}");
    assert!(!reply.contains("Unparseable"), "{ev}");
    assert_eq!(ev["host"], format!("127.0.0.1:{pn}"), "{ev}");
    let attempt = gw.wait_event("delivery.attempt", T, |e| e["platform"] == "new");
    assert_eq!(attempt["code"], 421, "{attempt}");
    assert!(gw.events_named("delivery.failed").is_empty());
}
