//! `godwit doctor`: the seed's fast-diagnosis playbook as a pure decision.
//! The five questions are asked in order; the first contract found broken
//! stops the walk ("your job is to identify which contract is broken
//! first"), with the evidence used and the playbook's decision for it. The
//! driver (crates/godwit/src/doctor.rs) gathers [`Facts`] from the store,
//! the spool and the fleet's node rows; nothing here does I/O.

use serde::Serialize;
use std::collections::BTreeMap;

/// A delivery to (or decision for) the diagnosed address.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AddressMessage {
    pub queue_id: String,
    pub message_id: Option<String>,
    /// The route the gateway applied at its last decision for the address.
    pub routed_to: String,
    /// The routing version that decision was made under.
    pub routing_version: i64,
    /// Platforms that answered 250 for it.
    pub delivered_to: Vec<String>,
    /// Still queued for the address.
    pub queued: bool,
}

/// Our own listener's answer to `--send-test`, and what became of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SendTest {
    /// The reply to the end of DATA at our listener (or the failure).
    pub reply: String,
    pub queue_id: Option<String>,
    /// The platform that answered 250, and its queue ID.
    pub delivered_to: Option<String>,
    pub remote_queue_id: Option<String>,
    /// The last deferral's reply, if it did not get through in time.
    pub deferred: Option<String>,
}

/// One signed sample of our outbound mail, verified as a receiver would:
/// DKIM against the published key, SPF for an egress IP, then DMARC.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuthSample {
    /// The From domain of the sample.
    pub domain: String,
    /// The egress IP SPF was evaluated for.
    pub ip: String,
    pub dkim: String,
    pub spf: String,
    pub dmarc: String,
    /// The DMARC policy receivers apply (none, quarantine, reject).
    pub policy: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Destination {
    /// "closed", "open" or "half-open" (from the gateway's node row).
    pub circuit: String,
    pub limit: u64,
    pub max: u64,
}

/// Everything the five questions read, over the `--since` window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Facts {
    pub window: String,
    // 1. inbound
    pub accepted: u64,
    /// (stage, reply code) -> refusals at our edge.
    pub refused: BTreeMap<(String, String), u64>,
    pub queue_messages: usize,
    pub queue_oldest_s: u64,
    pub send_test: Option<SendTest>,
    // 2. routing
    pub address: Option<String>,
    /// `route explain`'s answer: route, why, version.
    pub route_now: Option<(String, String, i64)>,
    /// The platforms the route names now (`both` is every platform).
    pub route_platforms: Vec<String>,
    pub messages: Vec<AddressMessage>,
    /// `message.loop` events for the address (or all, without one).
    pub loops: Vec<String>,
    // 3. destination
    /// (platform, code) -> temporary failures (421, 450, 451, 452, 4.x.x).
    pub temp_failures: BTreeMap<(String, String), u64>,
    /// A sample reply per (platform, code).
    pub temp_samples: BTreeMap<(String, String), String>,
    pub delivered: BTreeMap<String, u64>,
    pub destinations: BTreeMap<String, Destination>,
    /// platform -> mean seconds accept/queue/connect/transmit.
    pub delays: BTreeMap<String, [f64; 4]>,
    // 4. outbound
    pub outbound_configured: bool,
    pub outbound_bounces: BTreeMap<(String, String), u64>,
    /// Signed samples verified as receivers do (mail-auth against DNS).
    pub outbound_auth: Vec<AuthSample>,
    // 5. clients
    pub access_configured: bool,
    /// (platform or "-", reason) -> failed logins.
    pub login_failures: BTreeMap<(String, String), u64>,
    pub logins_ok: u64,
    pub autoconfig: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Broken,
    NotConfigured,
    /// Not asked: an earlier question found the broken contract.
    NotReached,
}

/// One question's answer: its status, the evidence, the decision if broken.
type Answer = (Status, Vec<String>, Option<String>);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub question: u8,
    pub title: &'static str,
    pub status: Status,
    pub evidence: Vec<String>,
    /// The playbook's decision when broken.
    pub decision: Option<String>,
}

pub const QUESTIONS: [&str; 5] = [
    "Is inbound mail accepted?",
    "Is routing correct for the recipient?",
    "Is the destination throttling or failing?",
    "Is outbound deliverability tanking?",
    "Are clients failing rather than mailflow?",
];

/// A burst worth acting on: at least this many temporary failures at one
/// platform, and more than this share of its outcomes.
const BURST_MIN: u64 = 3;
const BURST_SHARE: f64 = 0.2;
/// Edge refusals that count as "inbound broken": at least this many, and
/// more refused than accepted (a few relay-denied probes are normal).
const REFUSAL_MIN: u64 = 5;
/// Failed client logins that point at identity/config, not mailflow.
const LOGIN_FAIL_MIN: u64 = 3;

/// Whether a reply code is a throttle or temporary failure the playbook
/// names: 421, 450, 451, 452 and any 4.x.x (RFC 3463; 4.7.x rate limits).
pub fn is_temporary(code: &str) -> bool {
    code.starts_with('4')
}

fn inbound(f: &Facts) -> Answer {
    let mut ev = vec![format!(
        "{} message(s) accepted (250) in the last {}",
        f.accepted, f.window
    )];
    let refused: u64 = f.refused.values().sum();
    for ((stage, code), n) in &f.refused {
        ev.push(format!("refused at {stage}: {n} x {code}"));
    }
    ev.push(format!(
        "queue: {} message(s), oldest {}s",
        f.queue_messages, f.queue_oldest_s
    ));
    let mut broken = refused >= REFUSAL_MIN && refused > f.accepted;
    if let Some(t) = &f.send_test {
        match &t.queue_id {
            Some(q) => ev.push(format!(
                "send-test: accepted by our listener as {q}: {}",
                t.reply
            )),
            None => {
                ev.push(format!(
                    "send-test: our listener did not accept it: {}",
                    t.reply
                ));
                broken = true;
            }
        }
    }
    let decision = broken.then(|| {
        "the edge is refusing mail: fix the refusing stage first, and keep the old MX accepting \
         (do not decommission it) until our edge answers 250 again"
            .to_string()
    });
    (
        if broken { Status::Broken } else { Status::Ok },
        ev,
        decision,
    )
}

fn routing(f: &Facts) -> Answer {
    let mut ev = Vec::new();
    let mut broken = false;
    for l in &f.loops {
        ev.push(format!("loop: {l}"));
        broken = true;
    }
    let Some(addr) = &f.address else {
        ev.push("no ADDRESS given: routing not checked for a recipient".into());
        return (
            if broken { Status::Broken } else { Status::Ok },
            ev,
            broken.then(loop_decision),
        );
    };
    let Some((route, why, version)) = &f.route_now else {
        return (Status::Ok, ev, None);
    };
    ev.push(format!(
        "route explain {addr}: {route} ({why}; routing version {version})"
    ));
    for m in &f.messages {
        let went = if m.delivered_to.is_empty() {
            if m.queued {
                format!("queued, routed to {}", m.routed_to)
            } else {
                format!("routed to {}", m.routed_to)
            }
        } else {
            format!("delivered to {}", m.delivered_to.join(", "))
        };
        let platforms: Vec<&String> = if m.delivered_to.is_empty() {
            vec![&m.routed_to]
        } else {
            m.delivered_to.iter().collect()
        };
        let elsewhere = route != "hold"
            && platforms
                .iter()
                .any(|p| !f.route_platforms.iter().any(|r| r == *p));
        // Mail routed under the version in force now must have gone where
        // that version says; under an older version it legitimately went
        // elsewhere, unless it is still queued and has not followed.
        let stale = elsewhere && (m.routing_version >= *version || m.queued);
        ev.push(format!(
            "{} ({}): {went} under routing version {}{}",
            m.queue_id,
            m.message_id.as_deref().unwrap_or("no Message-ID"),
            m.routing_version,
            if stale {
                "  <-- not where the route says now"
            } else {
                ""
            }
        ));
        broken |= stale;
    }
    if f.messages.is_empty() {
        ev.push(format!("no message to {addr} in the last {}", f.window));
    }
    let decision = broken.then(|| {
        if f.loops.is_empty() {
            format!(
                "routing for {addr} is inconsistent (the gateway delivers where the map no longer says): \
                 pause the wave; `godwit queue requeue --rcpt {addr}` after the map is right; do not bounce"
            )
        } else {
            loop_decision()
        }
    });
    (
        if broken { Status::Broken } else { Status::Ok },
        ev,
        decision,
    )
}

fn loop_decision() -> String {
    "a routing loop: the held copies stay held (never bounced); fix the route on the platform \
     that sends the mail back, then `godwit queue release`"
        .into()
}

fn destination(f: &Facts) -> Answer {
    let mut ev = Vec::new();
    let mut broken: Vec<String> = Vec::new();
    for (p, d) in &f.destinations {
        ev.push(format!(
            "{p}: circuit {}, adaptive limit {}/{}",
            d.circuit, d.limit, d.max
        ));
        if d.circuit == "open" {
            broken.push(format!("{p} (circuit open)"));
        }
    }
    let mut per_platform: BTreeMap<&str, u64> = BTreeMap::new();
    for ((p, _), n) in &f.temp_failures {
        *per_platform.entry(p).or_default() += n;
    }
    for ((p, code), n) in &f.temp_failures {
        let sample = f
            .temp_samples
            .get(&(p.clone(), code.clone()))
            .map(|s| format!(" (e.g. {s})"))
            .unwrap_or_default();
        ev.push(format!("{p}: {n} x {code}{sample}"));
    }
    for (p, n) in &per_platform {
        let ok = f.delivered.get(*p).copied().unwrap_or(0);
        ev.push(format!(
            "{p}: {n} temporary failure(s) against {ok} delivered"
        ));
        if *n >= BURST_MIN && *n as f64 > BURST_SHARE * (*n + ok) as f64 {
            let codes: Vec<&str> = f
                .temp_failures
                .keys()
                .filter(|(q, _)| q == p)
                .map(|(_, c)| c.as_str())
                .collect();
            broken.push(format!("{p} ({})", codes.join(", ")));
        }
    }
    for (p, d) in &f.delays {
        ev.push(format!(
            "{p}: mean delays accept/queue/connect/transmit = {:.2}/{:.2}/{:.2}/{:.2} s",
            d[0], d[1], d[2], d[3]
        ));
    }
    if let Some(t) = &f.send_test
        && t.queue_id.is_some()
    {
        match (&t.delivered_to, &t.deferred) {
            (Some(p), _) => ev.push(format!(
                "send-test: {} delivered to {p}, their queue ID {}",
                t.queue_id.as_deref().unwrap_or("?"),
                t.remote_queue_id.as_deref().unwrap_or("(not given)")
            )),
            (None, Some(r)) => {
                ev.push(format!("send-test: not delivered; last deferral: {r}"));
                broken.push(format!("send-test deferred: {r}"));
            }
            (None, None) => ev.push("send-test: not delivered yet".into()),
        }
    }
    if broken.is_empty() {
        return (Status::Ok, ev, None);
    }
    let decision = format!(
        "destination throttling or failing at {}: reduce concurrency to it and pause the next wave; \
         do not bounce: the mail stays queued and is retried",
        broken.join("; ")
    );
    (Status::Broken, ev, Some(decision))
}

fn outbound(f: &Facts) -> Answer {
    if !f.outbound_configured {
        return (
            Status::NotConfigured,
            vec!["not configured (no [outbound] section)".into()],
            None,
        );
    }
    let mut ev = Vec::new();
    let total: u64 = f.outbound_bounces.values().sum();
    for ((domain, code), n) in &f.outbound_bounces {
        ev.push(format!("bounced by {domain}: {n} x {code}"));
    }
    if total == 0 {
        ev.push(format!("no outbound bounce in the last {}", f.window));
    }
    let mut misaligned = Vec::new();
    for a in &f.outbound_auth {
        ev.push(format!(
            "sample From *@{} via {}: dkim={} spf={} dmarc={} (p={})",
            a.domain, a.ip, a.dkim, a.spf, a.dmarc, a.policy
        ));
        // DMARC passes when SPF or DKIM passes aligned (RFC 7489 4.2); a
        // receiver applies p= to anything else.
        if a.dmarc != "pass" {
            misaligned.push(format!("{} via {}", a.domain, a.ip));
        }
    }
    let bouncing = total >= BURST_MIN;
    let broken = bouncing || !misaligned.is_empty();
    let decision = match (bouncing, misaligned.is_empty()) {
        (false, true) => None,
        (true, _) => Some(
            "outbound mail is being refused: check SPF/DKIM alignment of the new senders and ramp \
             volume rather than blasting from cold IPs"
                .to_string(),
        ),
        (false, false) => Some(format!(
            "receivers do not see aligned authentication for {}: fix the DKIM key/DNS or SPF \
             before sending more; mail from it is refused or spam-foldered under DMARC",
            misaligned.join(", ")
        )),
    };
    (
        if broken { Status::Broken } else { Status::Ok },
        ev,
        decision,
    )
}

fn clients(f: &Facts) -> Answer {
    if !f.access_configured {
        return (
            Status::NotConfigured,
            vec!["not configured (no [access] section)".into()],
            None,
        );
    }
    let mut ev = vec![format!(
        "{} successful login(s) in the last {}",
        f.logins_ok, f.window
    )];
    let failed: u64 = f.login_failures.values().sum();
    for ((p, why), n) in &f.login_failures {
        ev.push(format!("login failures at {p}: {n} x {why}"));
    }
    if let Some(a) = &f.autoconfig {
        ev.push(format!("autoconfig: {a}"));
    }
    let broken = failed >= LOGIN_FAIL_MIN && failed > f.logins_ok;
    (
        if broken { Status::Broken } else { Status::Ok },
        ev,
        broken.then(|| {
            "clients are failing, not mailflow: the problem is identity or client configuration \
             (auth, autodiscover), not SMTP; test with webmail to isolate the client"
                .to_string()
        }),
    )
}

/// The five findings in order; after the first broken one the rest are
/// `NotReached`.
pub fn diagnose(f: &Facts) -> Vec<Finding> {
    let steps: [fn(&Facts) -> Answer; 5] = [inbound, routing, destination, outbound, clients];
    let mut out = Vec::new();
    let mut stopped = false;
    for (i, step) in steps.iter().enumerate() {
        let (status, evidence, decision) = if stopped {
            (Status::NotReached, Vec::new(), None)
        } else {
            step(f)
        };
        stopped |= status == Status::Broken;
        out.push(Finding {
            question: i as u8 + 1,
            title: QUESTIONS[i],
            status,
            evidence,
            decision,
        });
    }
    out
}

/// The number of the first broken question, or 0.
pub fn exit_code(findings: &[Finding]) -> i32 {
    findings
        .iter()
        .find(|f| f.status == Status::Broken)
        .map_or(0, |f| f.question as i32)
}

pub fn render(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        let mark = match f.status {
            Status::Ok => "ok",
            Status::Broken => "BROKEN",
            Status::NotConfigured => "not configured",
            Status::NotReached => "not reached",
        };
        s.push_str(&format!("{}. {} [{mark}]\n", f.question, f.title));
        for e in &f.evidence {
            s.push_str(&format!("   {e}\n"));
        }
        if let Some(d) = &f.decision {
            s.push_str(&format!("   DECISION: {d}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Facts {
        Facts {
            window: "1h".into(),
            accepted: 20,
            delivered: [("old".to_string(), 20)].into(),
            destinations: [(
                "old".to_string(),
                Destination {
                    circuit: "closed".into(),
                    limit: 8,
                    max: 20,
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    fn sample(dkim: &str, spf: &str, dmarc: &str) -> AuthSample {
        AuthSample {
            domain: "example.com".into(),
            ip: "203.0.113.55".into(),
            dkim: dkim.into(),
            spf: spf.into(),
            dmarc: dmarc.into(),
            policy: "reject".into(),
        }
    }

    fn with(f: impl FnOnce(&mut Facts)) -> Facts {
        let mut x = healthy();
        f(&mut x);
        x
    }

    fn msg(routed: &str, version: i64, delivered: &[&str], queued: bool) -> AddressMessage {
        AddressMessage {
            queue_id: "Q1".into(),
            message_id: Some("<m@x>".into()),
            routed_to: routed.into(),
            routing_version: version,
            delivered_to: delivered.iter().map(|s| s.to_string()).collect(),
            queued,
        }
    }

    fn routed(route: &str, version: i64, m: AddressMessage) -> Facts {
        with(|f| {
            f.address = Some("a@example.com".into());
            f.route_now = Some((route.into(), "address entry".into(), version));
            f.route_platforms = match route {
                "both" => vec!["old".into(), "new".into()],
                "hold" => vec![],
                p => vec![p.into()],
            };
            f.messages = vec![m];
        })
    }

    #[test]
    fn first_broken_contract_decides_the_exit_code() {
        let throttled = |f: &mut Facts| {
            f.temp_failures.insert(("new".into(), "421".into()), 5);
        };
        let cases: Vec<(&str, Facts, i32)> = vec![
            ("healthy", healthy(), 0),
            (
                "edge refusing more than accepting",
                with(|f| {
                    f.accepted = 1;
                    f.refused.insert(("rcpt".into(), "5.7.1".into()), 9);
                }),
                1,
            ),
            (
                "a few relay-denied probes are normal",
                with(|f| {
                    f.refused.insert(("rcpt".into(), "5.7.1".into()), 9);
                }),
                0,
            ),
            (
                "send-test refused at our listener",
                with(|f| {
                    f.send_test = Some(SendTest {
                        reply: "451 4.3.0 spool full".into(),
                        ..Default::default()
                    })
                }),
                1,
            ),
            (
                "delivered where the current version says",
                routed("new", 3, msg("new", 3, &["new"], false)),
                0,
            ),
            (
                "delivered to old under the version in force, map says new",
                routed("new", 3, msg("old", 3, &["old"], false)),
                2,
            ),
            (
                "delivered to old before version 4 moved it",
                routed("new", 4, msg("old", 3, &["old"], false)),
                0,
            ),
            (
                "still queued for old after the move",
                routed("new", 4, msg("old", 3, &[], true)),
                2,
            ),
            (
                "dual delivery reaches both",
                routed("both", 2, msg("both", 2, &["old", "new"], false)),
                0,
            ),
            (
                "a loop",
                with(|f| f.loops = vec!["gw1 Q1 -> gw2 Q2 -> gw1 Q3".into()]),
                2,
            ),
            ("421 burst at new", with(throttled), 3),
            (
                "one deferral among many deliveries is no burst",
                with(|f| {
                    f.temp_failures.insert(("old".into(), "451".into()), 3);
                    f.delivered.insert("old".into(), 100);
                }),
                0,
            ),
            (
                "open circuit",
                with(|f| {
                    f.destinations.get_mut("old").unwrap().circuit = "open".into();
                }),
                3,
            ),
            (
                "routing broken before a burst: question 2 wins",
                {
                    let mut f = routed("new", 3, msg("old", 3, &["old"], false));
                    throttled(&mut f);
                    f
                },
                2,
            ),
            (
                "client logins failing",
                with(|f| {
                    f.access_configured = true;
                    f.login_failures
                        .insert(("new".into(), "authentication failed".into()), 4);
                }),
                5,
            ),
            (
                "outbound not configured is not broken",
                with(|f| f.outbound_configured = false),
                0,
            ),
            (
                "an outbound 5xx burst from one domain",
                with(|f| {
                    f.outbound_configured = true;
                    f.outbound_bounces
                        .insert(("refusing.test".into(), "550 5.1.1".into()), 3);
                }),
                4,
            ),
            (
                "two outbound bounces are no burst",
                with(|f| {
                    f.outbound_configured = true;
                    f.outbound_bounces
                        .insert(("refusing.test".into(), "550".into()), 2);
                }),
                0,
            ),
            (
                "signed samples pass DMARC",
                with(|f| {
                    f.outbound_configured = true;
                    f.outbound_auth = vec![sample("pass", "pass", "pass")];
                }),
                0,
            ),
            (
                "DKIM fails and SPF does not pass: DMARC fails as receivers see it",
                with(|f| {
                    f.outbound_configured = true;
                    f.outbound_auth =
                        vec![sample("fail (bad signature)", "fail", "fail (not aligned)")];
                }),
                4,
            ),
            (
                "outbound broken but clients too: question 4 comes first",
                with(|f| {
                    f.outbound_configured = true;
                    f.outbound_auth = vec![sample("none", "softfail", "fail (not aligned)")];
                    f.access_configured = true;
                    f.login_failures
                        .insert(("new".into(), "authentication failed".into()), 4);
                }),
                4,
            ),
        ];
        for (name, facts, want) in cases {
            let found = diagnose(&facts);
            assert_eq!(exit_code(&found), want, "{name}:\n{}", render(&found));
            if want > 0 {
                let b = &found[want as usize - 1];
                assert!(b.decision.is_some(), "{name}: a decision");
                assert!(
                    found[want as usize..]
                        .iter()
                        .all(|f| f.status == Status::NotReached),
                    "{name}: the walk stops at the first broken contract"
                );
            }
        }
    }

    #[test]
    fn outbound_evidence_names_domain_code_and_alignment() {
        let mut f = healthy();
        f.outbound_configured = true;
        f.outbound_bounces
            .insert(("refusing.test".into(), "550 5.1.1".into()), 4);
        f.outbound_auth = vec![sample("pass", "pass", "pass")];
        let text = render(&diagnose(&f));
        assert!(
            text.contains("bounced by refusing.test: 4 x 550 5.1.1"),
            "{text}"
        );
        assert!(
            text.contains("sample From *@example.com via 203.0.113.55: dkim=pass spf=pass dmarc=pass (p=reject)"),
            "{text}"
        );
    }

    #[test]
    fn evidence_names_platform_code_and_decision() {
        let mut f = healthy();
        f.temp_failures.insert(("new".into(), "421".into()), 5);
        f.temp_samples.insert(
            ("new".into(), "421".into()),
            "421 4.4.2 Error: too many connections".into(),
        );
        let found = diagnose(&f);
        let text = render(&found);
        assert!(text.contains("new: 5 x 421 (e.g. 421 4.4.2"), "{text}");
        assert!(text.contains("reduce concurrency"), "{text}");
        assert!(text.contains("pause the next wave"), "{text}");
        assert!(text.contains("do not bounce"), "{text}");
        assert_eq!(found[3].status, Status::NotReached);
        // Without an outbound path or an access front, those say so.
        let ok = diagnose(&healthy());
        assert_eq!(ok[3].status, Status::NotConfigured);
        assert_eq!(ok[4].status, Status::NotConfigured);
        assert!(render(&ok).contains("not configured"));
    }
}
