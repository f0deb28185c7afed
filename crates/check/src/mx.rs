//! MX as each resolver sees it: propagation (the seed's Task 16) and TTL advice
//! against the planned cutover window (Tasks 1 and 2).

use crate::finding::{Contract, Finding, Severity};
use crate::spf::Answer;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxSet {
    /// The TTL of the answer as this resolver returned it. A caching resolver
    /// returns what is left of it, so the largest value seen is the best estimate.
    pub ttl: u32,
    /// (preference, exchange) sorted, exchange lower-cased without the final dot.
    pub hosts: Vec<(u16, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverView {
    /// `IP:port`, or "system" for the machine's resolv.conf.
    pub resolver: String,
    pub answer: Answer<MxSet>,
}

fn show(hosts: &[(u16, String)]) -> String {
    hosts
        .iter()
        .map(|(p, h)| format!("{p} {h}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn human(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

pub fn analyze(
    domain: &str,
    views: &[ResolverView],
    cutover_window: Option<Duration>,
) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let mut out = Vec::new();
    let mut sets: Vec<&MxSet> = Vec::new();
    for v in views {
        let subject = format!("{domain} @ {}", v.resolver);
        match &v.answer {
            Answer::Found(set) if set.hosts.len() == 1 && set.hosts[0].1.is_empty() => {
                out.push(Finding::new(
                    c,
                    "mx.null",
                    subject,
                    Severity::Block,
                    "The domain publishes a null MX (\"0 .\", RFC 7505): it declares that it \
                     accepts no mail, and senders bounce immediately.",
                    "Publish the gateway's MX instead of the null MX before the cutover.",
                ));
                sets.push(set);
            }
            Answer::Found(set) => {
                out.push(Finding::new(
                    c,
                    "mx.records",
                    subject,
                    Severity::Ok,
                    format!("MX {} (TTL {}s).", show(&set.hosts), set.ttl),
                    "",
                ));
                sets.push(set);
            }
            Answer::Void | Answer::NotQueried => out.push(Finding::new(
                c,
                "mx.missing",
                subject,
                Severity::Block,
                "This resolver returns no MX record: senders fall back to the domain's A record \
                 (RFC 5321 5.1) or bounce, so inbound mail has no defined destination.",
                "Publish MX records pointing at the gateway (or the current platform) first.",
            )),
            Answer::Error(e) => out.push(Finding::new(
                c,
                "mx.resolver-error",
                subject,
                Severity::Warn,
                format!("The MX query failed at this resolver: {e}."),
                "Check that the resolver is reachable, then run the check again.",
            )),
        }
    }
    let mut distinct: Vec<&Vec<(u16, String)>> = Vec::new();
    for s in &sets {
        if !distinct.contains(&&s.hosts) {
            distinct.push(&s.hosts);
        }
    }
    if distinct.len() > 1 {
        let detail = views
            .iter()
            .filter_map(|v| match &v.answer {
                Answer::Found(s) => Some(format!("{}: {}", v.resolver, show(&s.hosts))),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push(Finding::new(
            c,
            "mx.propagation",
            domain,
            Severity::Warn,
            format!(
                "Different resolvers see different MX: propagation is under way ({detail}). This \
                 is normal after a change, and why \"flip MX at 9pm\" is not a plan."
            ),
            "Maintain dual acceptance and forwarding: keep every MX listed above accepting mail. \
             Do not assume a single resolver's view represents the internet.",
        ));
    } else if sets.len() > 1 {
        out.push(Finding::new(
            c,
            "mx.propagation",
            domain,
            Severity::Ok,
            format!("All {} resolvers agree on the MX.", sets.len()),
            "",
        ));
    }
    if let Some(max_ttl) = sets.iter().map(|s| s.ttl).max() {
        let ttl = u64::from(max_ttl);
        match cutover_window {
            Some(window) if ttl > window.as_secs() => out.push(Finding::new(
                c,
                "mx.ttl",
                domain,
                Severity::Warn,
                format!(
                    "The MX TTL is {ttl}s ({}), longer than the planned cutover window of {}: \
                     resolvers may keep the old MX for {} after the change, and some senders cache \
                     longer anyway.",
                    human(ttl),
                    human(window.as_secs()),
                    human(ttl)
                ),
                format!(
                    "Lower the MX TTL to at most {}s now, then wait at least {} (the old TTL; \
                     preferably 24-48 hours) before changing MX.",
                    window.as_secs(),
                    human(ttl)
                ),
            )),
            Some(window) => out.push(Finding::new(
                c,
                "mx.ttl",
                domain,
                Severity::Ok,
                format!(
                    "The MX TTL is {ttl}s, within the cutover window of {}. The TTL is advisory, \
                     not a promise.",
                    human(window.as_secs())
                ),
                "Keep the old hosts accepting mail during propagation.",
            )),
            None => out.push(Finding::new(
                c,
                "mx.ttl",
                domain,
                Severity::Ok,
                format!(
                    "The MX TTL is {ttl}s ({}). That TTL is advisory, not a promise.",
                    human(ttl)
                ),
                "If you plan to change MX, lower the TTL days ahead (give --cutover-window for \
                 advice) and keep the old hosts accepting mail during propagation.",
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(r: &str, ttl: u32, hosts: &[(u16, &str)]) -> ResolverView {
        ResolverView {
            resolver: r.into(),
            answer: Answer::Found(MxSet {
                ttl,
                hosts: hosts.iter().map(|(p, h)| (*p, h.to_string())).collect(),
            }),
        }
    }

    fn find<'a>(f: &'a [Finding], check: &str) -> Vec<&'a Finding> {
        f.iter().filter(|f| f.check == check).collect()
    }

    #[test]
    fn propagation_and_ttl() {
        let gw = [(10, "mx-gw.example.com")];
        let old = [
            (10, "mx1.oldmail.example.com"),
            (20, "mx2.oldmail.example.com"),
        ];
        let h = 3600;
        let cases: Vec<(Vec<ResolverView>, Option<u64>, &str, Severity)> = vec![
            (
                vec![view("a", 300, &gw), view("b", 300, &gw)],
                None,
                "mx.propagation",
                Severity::Ok,
            ),
            (
                vec![view("a", 300, &gw), view("b", 300, &old)],
                None,
                "mx.propagation",
                Severity::Warn,
            ),
            (vec![view("a", h, &gw)], Some(600), "mx.ttl", Severity::Warn),
            (vec![view("a", 300, &gw)], Some(600), "mx.ttl", Severity::Ok),
            (vec![view("a", h, &gw)], None, "mx.ttl", Severity::Ok),
            (
                vec![ResolverView {
                    resolver: "a".into(),
                    answer: Answer::Void,
                }],
                None,
                "mx.missing",
                Severity::Block,
            ),
            (
                vec![view("a", 300, &[(0, "")])],
                None,
                "mx.null",
                Severity::Block,
            ),
            (
                vec![ResolverView {
                    resolver: "a".into(),
                    answer: Answer::Error("timeout".into()),
                }],
                None,
                "mx.resolver-error",
                Severity::Warn,
            ),
        ];
        for (views, window, check, sev) in cases {
            let f = analyze("example.com", &views, window.map(Duration::from_secs));
            let got = find(&f, check);
            assert_eq!(got.len(), 1, "{check}: {f:#?}");
            assert_eq!(got[0].severity, sev, "{check}: {}", got[0].meaning);
        }
        let f = analyze(
            "example.com",
            &[view("a", h, &gw)],
            Some(Duration::from_secs(600)),
        );
        let ttl = find(&f, "mx.ttl")[0];
        assert!(
            ttl.meaning.contains("3600s") && ttl.action.contains("wait at least 1h"),
            "{ttl:?}"
        );
    }
}
