//! SPF (RFC 7208): the tree of records a domain's policy pulls in, and the pure
//! analysis of that tree.
//!
//! The DNS layer (`dns::collect_spf`) fetches every record and address the
//! policy names into an `SpfNode` tree; everything here works on that snapshot,
//! so the rules are tested table-driven without a network. Records are parsed
//! with mail-auth's parser; only the walk over the parsed terms lives here.

use crate::finding::{Contract, Finding, Severity};
use mail_auth::spf::Qualifier;
use std::net::IpAddr;

/// RFC 7208 4.6.4: at most 10 mechanisms and modifiers that cause DNS queries
/// (include, a, mx, ptr, exists, redirect) per evaluation; more is a permerror.
pub const LOOKUP_LIMIT: usize = 10;
/// RFC 7208 4.6.4: more than two "void lookups" (NXDOMAIN or no answer) SHOULD
/// give a permerror; receivers such as Postfix's policyd-spf do.
pub const VOID_LOOKUP_LIMIT: usize = 2;
/// RFC 7208 4.6.4: an `mx` mechanism whose domain has more than 10 MX records is
/// a permerror.
pub const MX_HOST_LIMIT: usize = 10;

/// The answer to one DNS query the policy needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Found(T),
    /// NXDOMAIN or no records of that type: a "void lookup" (RFC 7208 4.6.4).
    Void,
    /// Timeout or SERVFAIL: receivers return temperror.
    Error(String),
    /// Not asked, because the lookup budget was spent or a loop was detected.
    NotQueried,
}

/// mail-auth's parser is lenient where receivers are not: it skips unknown
/// mechanisms and accepts out-of-range addresses and prefixes. RFC 7208 4.6.1
/// and 5.6 make those a permerror at the receiver, so the raw mechanism tokens
/// are checked here as well. Returns the first offending token.
pub fn strict_token_error(record: &str) -> Option<String> {
    for token in record.split_ascii_whitespace().skip(1) {
        let (eq, colon) = (token.find('='), token.find(':'));
        if matches!((eq, colon), (Some(e), c) if c.is_none_or(|c| e < c)) {
            continue; // a modifier (redirect=, exp=, or an unknown one, which is allowed)
        }
        let body = token.trim_start_matches(['+', '-', '~', '?']);
        let name_end = body.find([':', '/']).unwrap_or(body.len());
        let (name, rest) = body.split_at(name_end);
        let name = name.to_ascii_lowercase();
        let bad = match name.as_str() {
            "all" | "include" | "a" | "mx" | "ptr" | "exists" => false,
            "ip4" => {
                let (addr, prefix) = rest
                    .trim_start_matches(':')
                    .split_once('/')
                    .unwrap_or((rest.trim_start_matches(':'), "32"));
                addr.parse::<std::net::Ipv4Addr>().is_err()
                    || prefix.parse::<u8>().map_or(true, |p| p > 32)
            }
            "ip6" => {
                let (addr, prefix) = rest
                    .trim_start_matches(':')
                    .split_once('/')
                    .unwrap_or((rest.trim_start_matches(':'), "128"));
                addr.parse::<std::net::Ipv6Addr>().is_err()
                    || prefix.parse::<u8>().map_or(true, |p| p > 128)
            }
            _ => true,
        };
        if bad {
            return Some(format!("invalid mechanism {token} (RFC 7208 4.6.1, 5.6)"));
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfNode {
    pub domain: String,
    pub fetch: SpfFetch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpfFetch {
    Record(SpfRecord),
    /// No `v=spf1` TXT record: for the top domain that is "none"; for an include
    /// or redirect target it is a permerror (RFC 7208 5.2, 6.1).
    NoRecord,
    /// RFC 7208 4.5: more than one `v=spf1` record is a permerror.
    Multiple(Vec<String>),
    /// The record does not parse: permerror (RFC 7208 4.6).
    Syntax {
        text: String,
        error: String,
    },
    DnsError(String),
    /// Not fetched: the lookup budget ran out or the domain is already being
    /// evaluated higher up (an include loop).
    NotFollowed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfRecord {
    pub text: String,
    pub terms: Vec<SpfTerm>,
    pub redirect: Option<Box<SpfNode>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfTerm {
    pub qualifier: Qualifier,
    pub mechanism: SpfMechanism,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpfMechanism {
    All,
    Ip {
        addr: IpAddr,
        prefix: u8,
    },
    A {
        domain: String,
        prefix4: u8,
        prefix6: u8,
        addrs: Answer<Vec<IpAddr>>,
    },
    Mx {
        domain: String,
        prefix4: u8,
        prefix6: u8,
        hosts: Answer<Vec<(String, Vec<IpAddr>)>>,
    },
    Include(Box<SpfNode>),
    Exists {
        domain: String,
        exists: Answer<bool>,
    },
    Ptr {
        domain: String,
    },
    /// A mechanism whose domain uses sender-dependent macros (`%{i}`, `%{s}`, ...):
    /// it cannot be enumerated without the sender.
    MacroDependent {
        kind: &'static str,
        spec: String,
    },
}

impl SpfMechanism {
    /// RFC 7208 4.6.4: the terms that cost a DNS lookup.
    fn costs_lookup(&self) -> bool {
        !matches!(self, SpfMechanism::All | SpfMechanism::Ip { .. })
    }
}

/// RFC 7208 2.6: the results an evaluation can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    PermError,
    TempError,
}

impl SpfResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::PermError => "permerror",
            SpfResult::TempError => "temperror",
        }
    }
}

/// Counts of the whole tree, as a record checker counts them: every branch, not
/// just the path one sender takes, because some sender will take each branch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SpfCounts {
    pub lookups: usize,
    pub void_lookups: usize,
}

pub fn count(node: &SpfNode) -> SpfCounts {
    let mut c = SpfCounts::default();
    count_node(node, &mut c);
    c
}

fn count_node(node: &SpfNode, c: &mut SpfCounts) {
    let SpfFetch::Record(record) = &node.fetch else {
        return;
    };
    for term in &record.terms {
        if term.mechanism.costs_lookup() {
            c.lookups += 1;
        }
        match &term.mechanism {
            SpfMechanism::A {
                addrs: Answer::Void,
                ..
            }
            | SpfMechanism::Mx {
                hosts: Answer::Void,
                ..
            }
            | SpfMechanism::Exists {
                exists: Answer::Void,
                ..
            } => c.void_lookups += 1,
            SpfMechanism::Include(child) => {
                if child.fetch == SpfFetch::NoRecord {
                    c.void_lookups += 1;
                }
                count_node(child, c);
            }
            _ => {}
        }
    }
    if let Some(redirect) = &record.redirect {
        c.lookups += 1;
        count_node(redirect, c);
    }
}

/// Every source the policy authorizes (`+` qualified), one line each, with the
/// chain of includes that leads to it.
pub fn authorized_sources(node: &SpfNode) -> Vec<String> {
    let mut out = Vec::new();
    sources_node(node, "", &mut out);
    out
}

fn sources_node(node: &SpfNode, via: &str, out: &mut Vec<String>) {
    let SpfFetch::Record(record) = &node.fetch else {
        return;
    };
    let here = if via.is_empty() {
        node.domain.clone()
    } else {
        format!("{via} > {}", node.domain)
    };
    for term in &record.terms {
        if term.qualifier != Qualifier::Pass {
            continue;
        }
        let line = match &term.mechanism {
            SpfMechanism::All => Some("+all: every host on the internet".to_string()),
            SpfMechanism::Ip { addr, prefix } => Some(match (addr, prefix) {
                (IpAddr::V4(a), 32) => format!("ip4:{a}"),
                (IpAddr::V6(a), 128) => format!("ip6:{a}"),
                (IpAddr::V4(a), p) => format!("ip4:{a}/{p}"),
                (IpAddr::V6(a), p) => format!("ip6:{a}/{p}"),
            }),
            SpfMechanism::A { domain, addrs, .. } => Some(format!("a:{domain} = {}", show(addrs))),
            SpfMechanism::Mx { domain, hosts, .. } => Some(match hosts {
                Answer::Found(h) => format!(
                    "mx:{domain} = {}",
                    h.iter()
                        .map(|(n, a)| format!(
                            "{n} ({})",
                            a.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                _ => format!("mx:{domain} = (no MX)"),
            }),
            SpfMechanism::Exists { domain, .. } => Some(format!("exists:{domain}")),
            SpfMechanism::Ptr { domain } => Some(format!("ptr:{domain} (deprecated)")),
            SpfMechanism::MacroDependent { kind, spec } => {
                Some(format!("{kind}:{spec} (depends on the sender)"))
            }
            SpfMechanism::Include(child) => {
                sources_node(child, &here, out);
                None
            }
        };
        if let Some(line) = line {
            out.push(format!("{line}  [{here}]"));
        }
    }
    if let Some(redirect) = &record.redirect {
        sources_node(redirect, &here, out);
    }
}

fn show(addrs: &Answer<Vec<IpAddr>>) -> String {
    match addrs {
        Answer::Found(a) => a
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Answer::Void => "(no address)".into(),
        Answer::Error(e) => format!("(lookup failed: {e})"),
        Answer::NotQueried => "(not queried)".into(),
    }
}

/// Problems deeper in the tree: includes and redirects that do not resolve to a
/// single valid record.
fn broken_links(node: &SpfNode, via: &str, out: &mut Vec<(String, String, Severity)>) {
    let SpfFetch::Record(record) = &node.fetch else {
        return;
    };
    let here = if via.is_empty() {
        node.domain.clone()
    } else {
        format!("{via} > {}", node.domain)
    };
    let children = record
        .terms
        .iter()
        .filter_map(|t| match &t.mechanism {
            SpfMechanism::Include(c) => Some(("include", c.as_ref())),
            _ => None,
        })
        .chain(record.redirect.as_deref().map(|r| ("redirect", r)));
    for (kind, child) in children {
        let problem = match &child.fetch {
            SpfFetch::Record(_) => None,
            SpfFetch::NoRecord => Some((
                format!(
                    "{kind}:{} has no SPF record (reached via {here})",
                    child.domain
                ),
                Severity::Block,
            )),
            SpfFetch::Multiple(r) => Some((
                format!(
                    "{kind}:{} publishes {} SPF records (reached via {here})",
                    child.domain,
                    r.len()
                ),
                Severity::Block,
            )),
            SpfFetch::Syntax { text, error } => Some((
                format!(
                    "{kind}:{} has a record that does not parse ({error}): \"{text}\" (reached via {here})",
                    child.domain
                ),
                Severity::Block,
            )),
            SpfFetch::DnsError(e) => Some((
                format!(
                    "{kind}:{} could not be resolved: {e} (reached via {here})",
                    child.domain
                ),
                Severity::Warn,
            )),
            SpfFetch::NotFollowed(why) => Some((
                format!(
                    "{kind}:{} was not followed: {why} (reached via {here})",
                    child.domain
                ),
                Severity::Warn,
            )),
        };
        if let Some((text, sev)) = problem {
            out.push((kind.to_string(), text, sev));
        }
        broken_links(child, &here, out);
    }
}

fn has_term(node: &SpfNode, pred: &dyn Fn(&SpfTerm) -> bool) -> bool {
    let SpfFetch::Record(record) = &node.fetch else {
        return false;
    };
    record
        .terms
        .iter()
        .any(|t| pred(t) || matches!(&t.mechanism, SpfMechanism::Include(c) if has_term(c, pred)))
        || record
            .redirect
            .as_deref()
            .is_some_and(|r| has_term(r, pred))
}

/// A new sender as the operator named it, with the addresses it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSender {
    pub name: String,
    pub addrs: Answer<Vec<IpAddr>>,
    /// What a receiver's SPF check answers for each address: the one
    /// evaluator's verdicts (`spf_eval::evaluate`), taken by the driver.
    pub results: Vec<(IpAddr, SpfResult)>,
}

/// All SPF findings for one domain.
pub fn analyze(domain: &str, tree: &SpfNode, new_senders: &[NewSender]) -> Vec<Finding> {
    let c = Contract::OutboundSending;
    let mut out = Vec::new();
    let record = match &tree.fetch {
        SpfFetch::Record(r) => r,
        SpfFetch::NoRecord => {
            out.push(Finding::new(
                c,
                "spf.record",
                domain,
                Severity::Warn,
                "No SPF record (no TXT record starting with v=spf1). Receivers get SPF \"none\" and \
                 trust your mail only through DKIM; large mailbox providers filter or reject \
                 unauthenticated senders.",
                "Publish one v=spf1 record listing the old and the new platform before moving \
                 outbound mail.",
            ));
            out.extend(new_sender_findings(domain, tree, new_senders));
            return out;
        }
        SpfFetch::Multiple(records) => {
            out.push(Finding::new(
                c,
                "spf.record",
                domain,
                Severity::Block,
                format!(
                    "{} SPF records are published; RFC 7208 4.5 makes that a permerror, so every \
                     receiver treats SPF as failed: {}",
                    records.len(),
                    records
                        .iter()
                        .map(|r| format!("\"{r}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "Merge them into one v=spf1 record.",
            ));
            out.extend(new_sender_findings(domain, tree, new_senders));
            return out;
        }
        SpfFetch::Syntax { text, error } => {
            out.push(Finding::new(
                c,
                "spf.record",
                domain,
                Severity::Block,
                format!(
                    "The SPF record does not parse ({error}): \"{text}\". Receivers return permerror \
                     (RFC 7208 4.6), which DMARC counts as a failure."
                ),
                "Fix the record's syntax before changing anything else.",
            ));
            return out;
        }
        SpfFetch::DnsError(e) => {
            out.push(Finding::new(
                c,
                "spf.record",
                domain,
                Severity::Warn,
                format!("The SPF record could not be fetched: {e}. Receivers would see temperror."),
                "Check the domain's name servers, then run the check again.",
            ));
            return out;
        }
        SpfFetch::NotFollowed(why) => {
            out.push(Finding::new(
                c,
                "spf.record",
                domain,
                Severity::Warn,
                format!("The SPF record was not fetched: {why}."),
                "",
            ));
            return out;
        }
    };
    out.push(Finding::new(
        c,
        "spf.record",
        domain,
        Severity::Ok,
        format!("SPF record: \"{}\"", record.text),
        "",
    ));

    // The `all` at the end of the top record decides what unlisted senders get.
    let all = record
        .terms
        .iter()
        .find(|t| t.mechanism == SpfMechanism::All);
    match all.map(|t| &t.qualifier) {
        Some(Qualifier::Pass) => out.push(Finding::new(
            c,
            "spf.all",
            domain,
            Severity::Block,
            "The record ends in +all: every host on the internet may send as this domain, so SPF \
             proves nothing and receivers distrust it.",
            "Replace +all with -all (or ~all while the migration runs) after listing every real \
             sender.",
        )),
        Some(Qualifier::Neutral) => out.push(Finding::new(
            c,
            "spf.all",
            domain,
            Severity::Warn,
            "The record ends in ?all: unlisted senders get \"neutral\", so SPF neither protects the \
             domain nor helps DMARC.",
            "Use ~all during the migration and -all once every sender is listed.",
        )),
        Some(Qualifier::SoftFail) => out.push(Finding::new(
            c,
            "spf.all",
            domain,
            Severity::Ok,
            "The record ends in ~all: unlisted senders soft-fail. Forgiving while senders move.",
            "",
        )),
        Some(Qualifier::Fail) => out.push(Finding::new(
            c,
            "spf.all",
            domain,
            Severity::Ok,
            "The record ends in -all: unlisted senders fail. A sender you forgot to list will be \
             rejected or filtered, so list the new platform before it sends.",
            "",
        )),
        None if record.redirect.is_none() => out.push(Finding::new(
            c,
            "spf.all",
            domain,
            Severity::Warn,
            "The record has no `all` and no redirect: unlisted senders get \"neutral\" (RFC 7208 4.7).",
            "End the record with ~all or -all.",
        )),
        None => {}
    }

    let counts = count(tree);
    let (sev, meaning, action) = if counts.lookups > LOOKUP_LIMIT {
        (
            Severity::Block,
            format!(
                "The policy needs {} DNS lookups; RFC 7208 4.6.4 allows {LOOKUP_LIMIT}. Receivers \
                 stop at the limit with permerror, so senders listed after it fail SPF.",
                counts.lookups
            ),
            "Flatten includes (replace some with ip4:/ip6: ranges) or drop senders you no longer \
             use, until the count is at most 10.",
        )
    } else if counts.lookups + 1 > LOOKUP_LIMIT {
        (
            Severity::Warn,
            format!(
                "The policy needs {} of the {LOOKUP_LIMIT} DNS lookups RFC 7208 4.6.4 allows: \
                 adding the new platform's include will push it over the limit.",
                counts.lookups
            ),
            "Make room before adding the new platform: flatten an include into ip4:/ip6: ranges.",
        )
    } else {
        (
            Severity::Ok,
            format!(
                "The policy needs {} of the {LOOKUP_LIMIT} DNS lookups RFC 7208 4.6.4 allows.",
                counts.lookups
            ),
            "",
        )
    };
    out.push(Finding::new(
        c,
        "spf.lookup-limit",
        domain,
        sev,
        meaning,
        action,
    ));
    if counts.void_lookups > VOID_LOOKUP_LIMIT {
        out.push(Finding::new(
            c,
            "spf.void-lookups",
            domain,
            Severity::Block,
            format!(
                "{} lookups of the policy return nothing; RFC 7208 4.6.4 lets receivers give \
                 permerror after {VOID_LOOKUP_LIMIT}.",
                counts.void_lookups
            ),
            "Remove mechanisms that name domains without records.",
        ));
    }

    let mut broken = Vec::new();
    broken_links(tree, "", &mut broken);
    for (kind, text, sev) in broken {
        out.push(Finding::new(
            c,
            "spf.include",
            domain,
            sev,
            format!(
                "{text}. RFC 7208 5.2 and 6.1 make {} {kind} without exactly one valid record a \
                 permerror: every sender that reaches it fails SPF.",
                if kind == "include" { "an" } else { "a" }
            ),
            "Fix or remove that include (a vendor may have renamed its SPF host).",
        ));
    }

    if has_term(tree, &|t| matches!(t.mechanism, SpfMechanism::Ptr { .. })) {
        out.push(Finding::new(
            c,
            "spf.ptr",
            domain,
            Severity::Warn,
            "The policy uses ptr, which RFC 7208 5.5 says not to use: it is slow, and many \
             receivers skip it, so senders authorized only by ptr may fail.",
            "Replace ptr with ip4:/ip6: or a: for those senders.",
        ));
    }

    let sources = authorized_sources(tree);
    out.push(Finding::new(
        c,
        "spf.sources",
        domain,
        Severity::Ok,
        if sources.is_empty() {
            "SPF authorizes no source.".to_string()
        } else {
            format!(
                "SPF authorizes {} source(s):\n  {}",
                sources.len(),
                sources.join("\n  ")
            )
        },
        "Inventory what each source is: a sender you change or forget breaks silently.",
    ));
    out.extend(new_sender_findings(domain, tree, new_senders));
    out
}

fn new_sender_findings(domain: &str, tree: &SpfNode, new_senders: &[NewSender]) -> Vec<Finding> {
    let c = Contract::OutboundSending;
    let mut out = Vec::new();
    // The tree alone cannot say what these terms match: the verdict came from
    // expanding them for the sender, which the operator should know.
    let how = if has_term(tree, &|t| {
        matches!(
            t.mechanism,
            SpfMechanism::MacroDependent { .. } | SpfMechanism::Ptr { .. }
        )
    }) {
        " (decided by a full evaluation with the sender's macros expanded)"
    } else {
        ""
    };
    for sender in new_senders {
        let addrs = match &sender.addrs {
            Answer::Found(a) if !a.is_empty() => a,
            other => {
                out.push(Finding::new(
                    c,
                    "spf.new-sender",
                    format!("{domain} / {}", sender.name),
                    Severity::Warn,
                    format!(
                        "The new sender {} has no address to check against SPF ({}).",
                        sender.name,
                        match other {
                            Answer::Error(e) => e.clone(),
                            _ => "no A/AAAA record".into(),
                        }
                    ),
                    "Name the new platform's outbound IPs with --new-sender IP.",
                ));
                continue;
            }
        };
        for ip in addrs {
            // An address the driver could not evaluate is undecided, never passed.
            let result = sender
                .results
                .iter()
                .find(|(a, _)| a == ip)
                .map_or(SpfResult::TempError, |(_, r)| *r);
            let who = if sender.name == ip.to_string() {
                ip.to_string()
            } else {
                format!("{} ({ip})", sender.name)
            };
            let (sev, meaning, action) = match result {
                SpfResult::Pass => (
                    Severity::Ok,
                    format!("SPF authorizes the new sender {who}: its mail passes SPF{how}."),
                    String::new(),
                ),
                SpfResult::TempError => (
                    Severity::Warn,
                    format!(
                        "SPF for the new sender {who} could not be decided here (result {}): a \
                         DNS lookup the policy needs failed.",
                        result.as_str()
                    ),
                    "Send a test message from the new platform and read the Authentication-Results \
                     header at a receiver."
                        .to_string(),
                ),
                other => (
                    Severity::Block,
                    format!(
                        "SPF does not authorize the new sender {who}: receivers get \"{}\"{how}. \
                         You'll see silent deliverability failures once it sends.",
                        other.as_str()
                    ),
                    format!(
                        "Add the new platform to {domain}'s SPF (its include: or ip4:/ip6:) before \
                         any mail leaves through it."
                    ),
                ),
            };
            out.push(Finding::new(
                c,
                "spf.new-sender",
                format!("{domain} / {who}"),
                sev,
                meaning,
                action,
            ));
        }
    }
    out
}

/// Hand-built snapshot trees for the table tests of the analysis here and of
/// the evaluator (`spf_eval`). Each record's text is rendered from its terms,
/// so the evaluator reads the same policy the analysis does.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub fn node(domain: &str, terms: Vec<SpfTerm>, redirect: Option<SpfNode>) -> SpfNode {
        SpfNode {
            domain: domain.into(),
            fetch: SpfFetch::Record(SpfRecord {
                text: render(&terms, redirect.as_ref()),
                terms,
                redirect: redirect.map(Box::new),
            }),
        }
    }

    pub fn t(q: Qualifier, m: SpfMechanism) -> SpfTerm {
        SpfTerm {
            qualifier: q,
            mechanism: m,
        }
    }

    pub fn ip4(a: &str, p: u8) -> SpfMechanism {
        SpfMechanism::Ip {
            addr: ip(a),
            prefix: p,
        }
    }

    pub fn include(n: SpfNode) -> SpfMechanism {
        SpfMechanism::Include(Box::new(n))
    }

    pub fn a(domain: &str, addrs: &[&str]) -> SpfMechanism {
        SpfMechanism::A {
            domain: domain.into(),
            prefix4: 32,
            prefix6: 128,
            addrs: Answer::Found(addrs.iter().map(|s| ip(s)).collect()),
        }
    }

    /// An `a:` term whose lookup failed (timeout or SERVFAIL).
    pub fn a_failing(domain: &str) -> SpfMechanism {
        SpfMechanism::A {
            domain: domain.into(),
            prefix4: 32,
            prefix6: 128,
            addrs: Answer::Error("timed out".into()),
        }
    }

    pub fn vendor() -> SpfNode {
        node(
            "_spf.vendor.example",
            vec![
                t(Qualifier::Pass, ip4("198.51.100.0", 24)),
                t(Qualifier::Neutral, SpfMechanism::All),
            ],
            None,
        )
    }

    pub fn base() -> SpfNode {
        node(
            "example.com",
            vec![
                t(Qualifier::Pass, ip4("203.0.113.10", 32)),
                t(Qualifier::Pass, include(vendor())),
                t(Qualifier::Pass, a("mail.example.com", &["192.0.2.1"])),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        )
    }

    pub fn chain(depth: usize) -> SpfNode {
        // A chain of `depth` includes, the last one authorizing 192.0.2.99.
        let mut n = node(
            "leaf.example",
            vec![t(Qualifier::Pass, ip4("192.0.2.99", 32))],
            None,
        );
        for i in 0..depth.saturating_sub(1) {
            n = node(
                &format!("l{i}.example"),
                vec![t(Qualifier::Pass, include(n))],
                None,
            );
        }
        node(
            "example.com",
            vec![
                t(Qualifier::Pass, include(n)),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        )
    }

    /// The record text a term list stands for (RFC 7208 4.6.1 syntax).
    pub fn render(terms: &[SpfTerm], redirect: Option<&SpfNode>) -> String {
        let mut out = String::from("v=spf1");
        for term in terms {
            let q = match term.qualifier {
                Qualifier::Pass => "",
                Qualifier::Fail => "-",
                Qualifier::SoftFail => "~",
                Qualifier::Neutral => "?",
            };
            let m = match &term.mechanism {
                SpfMechanism::All => "all".to_string(),
                SpfMechanism::Ip { addr, prefix } => match addr {
                    IpAddr::V4(a) => format!("ip4:{a}/{prefix}"),
                    IpAddr::V6(a) => format!("ip6:{a}/{prefix}"),
                },
                SpfMechanism::A {
                    domain,
                    prefix4,
                    prefix6,
                    ..
                } => format!("a:{domain}/{prefix4}//{prefix6}"),
                SpfMechanism::Mx {
                    domain,
                    prefix4,
                    prefix6,
                    ..
                } => format!("mx:{domain}/{prefix4}//{prefix6}"),
                SpfMechanism::Include(n) => format!("include:{}", n.domain),
                SpfMechanism::Exists { domain, .. } => format!("exists:{domain}"),
                SpfMechanism::Ptr { domain } => format!("ptr:{domain}"),
                SpfMechanism::MacroDependent { spec, .. } => spec.clone(),
            };
            out.push(' ');
            out.push_str(q);
            out.push_str(&m);
        }
        if let Some(r) = redirect {
            out.push_str(" redirect=");
            out.push_str(&r.domain);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn lookup_limit_is_counted_over_the_tree() {
        // Enforcement in evaluation is the evaluator's (spf_eval's tests).
        let cases = [
            (3, Severity::Ok),
            (9, Severity::Ok),
            (10, Severity::Warn),
            (11, Severity::Block),
        ];
        for (depth, sev) in cases {
            let tree = chain(depth);
            assert_eq!(count(&tree).lookups, depth);
            let f = analyze("example.com", &tree, &[]);
            let limit = f.iter().find(|f| f.check == "spf.lookup-limit").unwrap();
            assert_eq!(limit.severity, sev, "depth {depth}: {}", limit.meaning);
        }
    }

    #[test]
    fn all_qualifiers_are_flagged() {
        let cases = [
            (Qualifier::Pass, Severity::Block),
            (Qualifier::Neutral, Severity::Warn),
            (Qualifier::SoftFail, Severity::Ok),
            (Qualifier::Fail, Severity::Ok),
        ];
        for (q, sev) in cases {
            let tree = node(
                "example.com",
                vec![
                    t(Qualifier::Pass, ip4("192.0.2.1", 32)),
                    t(q.clone(), SpfMechanism::All),
                ],
                None,
            );
            let f = analyze("example.com", &tree, &[]);
            assert_eq!(
                f.iter().find(|f| f.check == "spf.all").unwrap().severity,
                sev,
                "{q:?}"
            );
        }
        let no_all = node(
            "example.com",
            vec![t(Qualifier::Pass, ip4("192.0.2.1", 32))],
            None,
        );
        let f = analyze("example.com", &no_all, &[]);
        assert_eq!(
            f.iter().find(|f| f.check == "spf.all").unwrap().severity,
            Severity::Warn
        );
    }

    #[test]
    fn record_problems_are_findings() {
        let cases = [
            (SpfFetch::NoRecord, Severity::Warn),
            (
                SpfFetch::Multiple(vec!["v=spf1 -all".into(), "v=spf1 +all".into()]),
                Severity::Block,
            ),
            (
                SpfFetch::Syntax {
                    text: "v=spf1 ip4:300.1.1.1 -all".into(),
                    error: "Parse error".into(),
                },
                Severity::Block,
            ),
        ];
        for (fetch, sev) in cases {
            let tree = SpfNode {
                domain: "example.com".into(),
                fetch: fetch.clone(),
            };
            let f = analyze("example.com", &tree, &[]);
            assert_eq!(
                f.iter().find(|f| f.check == "spf.record").unwrap().severity,
                sev,
                "{fetch:?}"
            );
        }
    }

    #[test]
    fn void_lookups_and_ptr_are_flagged() {
        let void_a = |d: &str| {
            t(
                Qualifier::Pass,
                SpfMechanism::A {
                    domain: d.into(),
                    prefix4: 32,
                    prefix6: 128,
                    addrs: Answer::Void,
                },
            )
        };
        let cases = [(2, false), (3, true)];
        for (voids, flagged) in cases {
            let mut terms: Vec<SpfTerm> = (0..voids)
                .map(|i| void_a(&format!("gone{i}.example.com")))
                .collect();
            terms.push(t(Qualifier::Fail, SpfMechanism::All));
            let f = analyze("example.com", &node("example.com", terms, None), &[]);
            let v = f.iter().find(|f| f.check == "spf.void-lookups");
            assert_eq!(v.is_some(), flagged, "{voids} void lookups");
            if let Some(v) = v {
                assert_eq!(v.severity, Severity::Block);
            }
        }
        let tree = node(
            "example.com",
            vec![
                t(
                    Qualifier::Pass,
                    SpfMechanism::Ptr {
                        domain: "example.com".into(),
                    },
                ),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        );
        let f = analyze("example.com", &tree, &[]);
        assert_eq!(
            f.iter().find(|f| f.check == "spf.ptr").unwrap().severity,
            Severity::Warn
        );
    }

    #[test]
    fn missing_include_blocks_and_sources_are_listed() {
        let tree = node(
            "example.com",
            vec![
                t(Qualifier::Pass, include(vendor())),
                t(
                    Qualifier::Pass,
                    include(SpfNode {
                        domain: "_spf.gone.example".into(),
                        fetch: SpfFetch::NoRecord,
                    }),
                ),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        );
        let f = analyze("example.com", &tree, &[]);
        let inc = f.iter().find(|f| f.check == "spf.include").unwrap();
        assert_eq!(inc.severity, Severity::Block);
        assert!(inc.meaning.contains("_spf.gone.example"));
        let sources = authorized_sources(&base());
        assert_eq!(sources.len(), 3, "{sources:?}");
        assert!(
            sources[1].starts_with("ip4:198.51.100.0/24")
                && sources[1].contains("example.com > _spf.vendor.example")
        );
    }

    #[test]
    fn new_senders_are_judged_by_the_evaluators_verdicts() {
        let sender = |name: &str, addr: &str, result: Option<SpfResult>| NewSender {
            name: name.into(),
            addrs: Answer::Found(vec![ip(addr)]),
            results: result.map(|r| (ip(addr), r)).into_iter().collect(),
        };
        let senders = [
            sender("198.51.100.5", "198.51.100.5", Some(SpfResult::Pass)),
            sender("out.newmail.example", "192.0.2.50", Some(SpfResult::Fail)),
            NewSender {
                name: "nowhere.example".into(),
                addrs: Answer::Void,
                results: vec![],
            },
            sender("192.0.2.7", "192.0.2.7", Some(SpfResult::TempError)),
            sender("192.0.2.8", "192.0.2.8", Some(SpfResult::PermError)),
            // Not evaluated at all: never taken for a pass.
            sender("192.0.2.9", "192.0.2.9", None),
        ];
        let f = analyze("example.com", &base(), &senders);
        let ns: Vec<_> = f.iter().filter(|f| f.check == "spf.new-sender").collect();
        let sev: Vec<_> = ns.iter().map(|f| f.severity).collect();
        assert_eq!(
            sev,
            [
                Severity::Ok,
                Severity::Block,
                Severity::Warn,
                Severity::Warn,
                Severity::Block,
                Severity::Warn
            ]
        );
        assert!(ns[1].meaning.contains("silent deliverability failures"));
        assert!(ns[4].meaning.contains("permerror"));
    }

    #[test]
    fn strict_tokens() {
        let cases = [
            ("v=spf1 ip4:192.0.2.1 include:_spf.example.com ~all", None),
            (
                "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a mx/24 redirect=_spf.example.com",
                None,
            ),
            ("v=spf1 ip4:192.0.2.300 -all", Some("ip4:192.0.2.300")),
            ("v=spf1 includ:foo.example -all", Some("includ:foo.example")),
            ("v=spf1 ip4:192.0.2.1/33 -all", Some("ip4:192.0.2.1/33")),
            ("v=spf1 ip6:2001:db8::/129 -all", Some("ip6:2001:db8::/129")),
        ];
        for (record, bad) in cases {
            let got = strict_token_error(record);
            assert_eq!(got.is_some(), bad.is_some(), "{record}: {got:?}");
            if let (Some(g), Some(b)) = (got, bad) {
                assert!(g.contains(b), "{g}");
            }
        }
    }
}
