//! Where mail for a recipient domain goes: the MX hosts in preference order,
//! else the domain's own address (RFC 5321 5.1), or nowhere (null MX,
//! RFC 7505). `plan_mx` decides from the DNS answer; `MxResolver` asks
//! hickory and turns each host into addresses to connect to.

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// What the DNS said about a domain's MX records.
#[derive(Debug, Clone, PartialEq)]
pub enum MxAnswer {
    /// (preference, exchange) as published.
    Records(Vec<(u16, String)>),
    /// The name exists but has no MX records.
    NoRecords,
    /// The domain does not exist (NXDOMAIN).
    NxDomain,
    /// No answer (timeout, SERVFAIL): try again later.
    Error(String),
}

/// What to do with mail for the domain.
#[derive(Debug, Clone, PartialEq)]
pub enum MxPlan {
    /// Hosts to try, in order. Without MX records this is the domain
    /// itself (the "implicit MX", RFC 5321 5.1).
    Hosts(Vec<String>),
    /// RFC 7505: the domain accepts no mail. Fail at once, 556 5.1.10.
    NullMx,
    /// The domain does not exist: fail at once, 550 5.1.2 (RFC 3463).
    NoSuchDomain,
    /// Could not tell now: defer, 451 4.4.3.
    TryLater(String),
}

/// RFC 5321 5.1 and RFC 7505 3: lowest preference first; a lone "." is a
/// null MX; without MX records the domain's own A/AAAA is the target.
/// Hosts of equal preference are tried in the order of `shuffle_key` (a
/// per-attempt random number), spreading load as 5.1 asks.
pub fn plan_mx(domain: &str, answer: &MxAnswer, shuffle_key: u64) -> MxPlan {
    match answer {
        MxAnswer::NxDomain => MxPlan::NoSuchDomain,
        MxAnswer::Error(e) => MxPlan::TryLater(e.clone()),
        MxAnswer::NoRecords => MxPlan::Hosts(vec![domain.trim_end_matches('.').to_string()]),
        MxAnswer::Records(records) => {
            let norm = |h: &str| h.trim_end_matches('.').to_ascii_lowercase();
            // RFC 7505 3: "." with preference 0 as the only record. A "."
            // beside real hosts is a misconfiguration: use the real ones.
            let real: Vec<(u16, String)> = records
                .iter()
                .map(|(p, h)| (*p, norm(h)))
                .filter(|(_, h)| !h.is_empty())
                .collect();
            if real.is_empty() {
                return if records.is_empty() {
                    MxPlan::Hosts(vec![norm(domain)])
                } else {
                    MxPlan::NullMx
                };
            }
            let mut keyed: Vec<(u16, u64, String)> = real
                .into_iter()
                .map(|(p, h)| (p, mix(shuffle_key, &h), h))
                .collect();
            keyed.sort();
            keyed.dedup_by(|a, b| a.2 == b.2);
            MxPlan::Hosts(keyed.into_iter().map(|(_, _, h)| h).collect())
        }
    }
}

fn mix(key: u64, s: &str) -> u64 {
    // FNV-1a over the name, seeded: a cheap stable shuffle within a preference.
    let mut h = 0xcbf29ce484222325u64 ^ key;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// One address to connect to, and the host name it was found under (for
/// TLS SNI and the `relay=host[ip]:port` evidence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxTarget {
    pub host: String,
    pub addr: SocketAddr,
}

impl MxTarget {
    /// Postfix's relay= form: `mx1.example.net[192.0.2.1]:25`.
    pub fn label(&self) -> String {
        format!("{}[{}]:{}", self.host, self.addr.ip(), self.addr.port())
    }
}

/// The outcome of resolving a domain to connection targets.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    Targets(Vec<MxTarget>),
    NullMx,
    NoSuchDomain,
    TryLater(String),
}

/// At most this many addresses are tried per attempt (Postfix's
/// smtp_mx_address_limit is 5; a few more for dual-stack hosts).
const MAX_TARGETS: usize = 10;

/// DNS for delivery: the configured resolvers (`outbound.resolvers`) or the
/// system's.
#[derive(Clone)]
pub struct MxResolver {
    resolver: TokioResolver,
    port: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("outbound.resolvers: {0}")]
pub struct ResolverError(String);

impl MxResolver {
    pub fn new(resolvers: &[SocketAddr], port: u16) -> Result<MxResolver, ResolverError> {
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(5);
        opts.attempts = 2;
        opts.edns0 = true;
        opts.try_tcp_on_error = true;
        // Recipient domains are absolute names: never append a search domain.
        opts.ndots = 0;
        let resolver = if resolvers.is_empty() {
            let mut b = TokioResolver::builder_tokio()
                .map_err(|e| ResolverError(format!("system resolver (/etc/resolv.conf): {e}")))?;
            *b.options_mut() = opts;
            b.build().map_err(|e| ResolverError(e.to_string()))?
        } else {
            let servers = resolvers
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
            .with_options(opts)
            .build()
            .map_err(|e| ResolverError(e.to_string()))?
        };
        Ok(MxResolver { resolver, port })
    }

    fn fqdn(name: &str) -> Option<Name> {
        let n = format!("{}.", name.trim_end_matches('.'));
        Name::from_ascii(&n).ok()
    }

    pub async fn mx(&self, domain: &str) -> MxAnswer {
        let Some(name) = Self::fqdn(domain) else {
            return MxAnswer::NxDomain;
        };
        match self.resolver.mx_lookup(name).await {
            Ok(lookup) => {
                let records: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    MxAnswer::NoRecords
                } else {
                    MxAnswer::Records(records)
                }
            }
            Err(e) if e.is_nx_domain() => MxAnswer::NxDomain,
            Err(e) if e.is_no_records_found() => MxAnswer::NoRecords,
            Err(e) => MxAnswer::Error(e.to_string()),
        }
    }

    /// A and AAAA of `host`, IPv4 first (most receivers' reputation data is
    /// about IPv4 senders). Empty when the host has no address.
    pub async fn addrs(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        let Some(name) = Self::fqdn(host) else {
            return Ok(Vec::new());
        };
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name),
        );
        let mut out = Vec::new();
        let mut err = None;
        for r in [v4, v6] {
            match r {
                Ok(l) => out.extend(l.answers().iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                Err(e) => err = Some(e.to_string()),
            }
        }
        match (out.is_empty(), err) {
            (true, Some(e)) => Err(e),
            _ => Ok(out),
        }
    }

    /// Resolves `domain` to the addresses to try, in order.
    pub async fn resolve(&self, domain: &str) -> Resolved {
        let answer = self.mx(domain).await;
        let hosts = match plan_mx(domain, &answer, rand::random()) {
            MxPlan::Hosts(h) => h,
            MxPlan::NullMx => return Resolved::NullMx,
            MxPlan::NoSuchDomain => return Resolved::NoSuchDomain,
            MxPlan::TryLater(e) => return Resolved::TryLater(e),
        };
        let mut targets = Vec::new();
        let mut last_err = None;
        for host in hosts {
            match self.addrs(&host).await {
                Ok(ips) => targets.extend(ips.into_iter().map(|ip| MxTarget {
                    host: host.clone(),
                    addr: SocketAddr::new(ip, self.port),
                })),
                Err(e) => last_err = Some(format!("{host}: {e}")),
            }
            if targets.len() >= MAX_TARGETS {
                break;
            }
        }
        targets.truncate(MAX_TARGETS);
        if targets.is_empty() {
            // RFC 5321 5.1: an MX host without an address is skipped; with
            // none left the mail waits (the DNS may be mid-change).
            return Resolved::TryLater(
                last_err.unwrap_or_else(|| format!("no address for the mail hosts of {domain}")),
            );
        }
        Resolved::Targets(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(r: &[(u16, &str)]) -> MxAnswer {
        MxAnswer::Records(r.iter().map(|(p, h)| (*p, h.to_string())).collect())
    }

    #[test]
    fn plan_table() {
        let hosts = |h: &[&str]| MxPlan::Hosts(h.iter().map(|s| s.to_string()).collect());
        for (answer, want) in [
            (
                recs(&[(20, "mx2.example.net."), (10, "MX1.example.net.")]),
                hosts(&["mx1.example.net", "mx2.example.net"]),
            ),
            // RFC 5321 5.1: no MX, the domain's own address.
            (MxAnswer::NoRecords, hosts(&["example.net"])),
            // RFC 7505: "." alone.
            (recs(&[(0, ".")]), MxPlan::NullMx),
            // "." beside a real host: the real one.
            (
                recs(&[(0, "."), (10, "mx.example.net")]),
                hosts(&["mx.example.net"]),
            ),
            (MxAnswer::NxDomain, MxPlan::NoSuchDomain),
            (
                MxAnswer::Error("timeout".into()),
                MxPlan::TryLater("timeout".into()),
            ),
            (
                recs(&[(10, "a.example.net"), (10, "a.example.net.")]),
                hosts(&["a.example.net"]),
            ),
        ] {
            assert_eq!(plan_mx("example.net.", &answer, 7), want, "{answer:?}");
        }
    }

    #[test]
    fn equal_preferences_are_shuffled_but_never_before_a_lower_one() {
        let answer = recs(&[
            (10, "a.x"),
            (10, "b.x"),
            (10, "c.x"),
            (5, "first.x"),
            (50, "last.x"),
        ]);
        let mut seconds = std::collections::BTreeSet::new();
        for key in 0..64 {
            let MxPlan::Hosts(h) = plan_mx("x", &answer, key) else {
                panic!()
            };
            assert_eq!(h[0], "first.x");
            assert_eq!(h[4], "last.x");
            seconds.insert(h[1].clone());
        }
        assert_eq!(
            seconds.len(),
            3,
            "every equal-preference host comes first sometimes"
        );
    }
}
