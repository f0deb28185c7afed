//! The DNS probe: hickory queries that fill the analyzers' inputs, and the
//! `check dns DOMAIN` run.
//!
//! One resolver per nameserver, so disagreement between them is visible, and no
//! cache, so an audit always asks the network (DEPENDENCIES.md).

use crate::finding::Finding;
use crate::mx::{MxSet, ResolverView};
use crate::spf::{Answer, NewSender, SpfFetch, SpfMechanism, SpfNode, SpfRecord, SpfTerm};
use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::spf::{Macro, Mechanism, Spf};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// One nameserver, or the system's configuration.
#[derive(Clone)]
pub struct Dns {
    pub label: String,
    resolver: TokioResolver,
}

fn opts() -> ResolverOpts {
    let mut o = ResolverOpts::default();
    // An audit must see what the network says now, not what we saw a second ago.
    o.cache_size = 0;
    o.timeout = Duration::from_secs(3);
    o.attempts = 2;
    // DKIM keys of 2048 bits do not fit in 512 bytes: ask for EDNS0 and fall back to TCP.
    o.edns0 = true;
    o.try_tcp_on_error = true;
    // Names are always absolute here: never append a search domain.
    o.ndots = 0;
    o
}

impl Dns {
    /// A resolver that asks exactly one nameserver, given as `IP` or `IP:PORT`
    /// (port 53 by default; `[v6]:port` for IPv6 with a port).
    pub fn nameserver(spec: &str) -> anyhow::Result<Dns> {
        let addr: SocketAddr = spec
            .parse()
            .or_else(|_| spec.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .with_context(|| format!("--resolver {spec}: expected IP or IP:PORT"))?;
        let mut udp = ConnectionConfig::udp();
        udp.port = addr.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = addr.port();
        let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
        let config = ResolverConfig::from_name_servers(vec![ns]);
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts())
            .build()
            .with_context(|| format!("building a resolver for {spec}"))?;
        Ok(Dns {
            label: addr.to_string(),
            resolver,
        })
    }

    /// The machine's resolvers from /etc/resolv.conf.
    pub fn system() -> anyhow::Result<Dns> {
        let mut builder = TokioResolver::builder_tokio()
            .context("reading the system resolver configuration (/etc/resolv.conf)")?;
        *builder.options_mut() = opts();
        let resolver = builder.build().context("building the system resolver")?;
        Ok(Dns {
            label: "system".into(),
            resolver,
        })
    }

    /// What a receiver's SPF check answers for mail from `postmaster@domain`
    /// sent by `ip`: the one evaluator (`spf_eval`, mail-auth's RFC 7208
    /// check_host), over `snapshot` when the policy was already taken, and over
    /// this resolver for every name the snapshot does not hold.
    pub async fn spf(
        &self,
        domain: &str,
        ip: IpAddr,
        snapshot: &crate::spf_eval::Snapshot,
    ) -> crate::spf::SpfResult {
        // The same resolver (and nameservers) as every other query here.
        let auth = mail_auth::MessageAuthenticator(self.resolver.clone());
        crate::spf_eval::evaluate(&auth, snapshot, domain, ip).await
    }

    /// As `spf`, asking the network for everything.
    pub async fn verify_spf(
        &self,
        domain: &str,
        ip: IpAddr,
    ) -> Result<crate::spf::SpfResult, String> {
        Ok(self
            .spf(domain, ip, &crate::spf_eval::Snapshot::default())
            .await)
    }

    fn fqdn(name: &str) -> Result<Name, String> {
        let name = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        Name::from_ascii(&name).map_err(|e| format!("invalid name {name}: {e}"))
    }

    fn classify<T>(e: NetError) -> Answer<T> {
        if e.is_no_records_found() || e.is_nx_domain() {
            Answer::Void
        } else {
            Answer::Error(e.to_string())
        }
    }

    /// TXT records at `name`, each record's character-strings concatenated
    /// (RFC 7208 3.3, RFC 6376 3.6.2.2).
    pub async fn txt(&self, name: &str) -> Answer<Vec<String>> {
        let name = match Self::fqdn(name) {
            Ok(n) => n,
            Err(e) => return Answer::Error(e),
        };
        match self.resolver.txt_lookup(name).await {
            Ok(lookup) => {
                let records: Vec<String> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s).into_owned())
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    Answer::Void
                } else {
                    Answer::Found(records)
                }
            }
            Err(e) => Self::classify(e),
        }
    }

    pub async fn mx(&self, name: &str) -> Answer<MxSet> {
        let name = match Self::fqdn(name) {
            Ok(n) => n,
            Err(e) => return Answer::Error(e),
        };
        match self.resolver.mx_lookup(name).await {
            Ok(lookup) => {
                let mut ttl = 0;
                let mut hosts: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => {
                            ttl = ttl.max(r.ttl);
                            let host = mx.exchange.to_ascii().to_ascii_lowercase();
                            Some((mx.preference, host.trim_end_matches('.').to_string()))
                        }
                        _ => None,
                    })
                    .collect();
                hosts.sort();
                if hosts.is_empty() {
                    Answer::Void
                } else {
                    Answer::Found(MxSet { ttl, hosts })
                }
            }
            Err(e) => Self::classify(e),
        }
    }

    /// A and AAAA addresses of `name`; void only when both are empty.
    pub async fn addrs(&self, name: &str) -> Answer<Vec<IpAddr>> {
        let name = match Self::fqdn(name) {
            Ok(n) => n,
            Err(e) => return Answer::Error(e),
        };
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name)
        );
        let mut addrs = Vec::new();
        let mut error = None;
        for result in [v4, v6] {
            match result {
                Ok(lookup) => addrs.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e) if e.is_no_records_found() || e.is_nx_domain() => {}
                Err(e) => error = Some(e.to_string()),
            }
        }
        match (addrs.is_empty(), error) {
            (false, _) => Answer::Found(addrs),
            (true, Some(e)) => Answer::Error(e),
            (true, None) => Answer::Void,
        }
    }

    /// PTR names of `ip` (reverse DNS), for forward-confirmed rDNS checks.
    pub async fn ptr(&self, ip: IpAddr) -> Answer<Vec<String>> {
        match self.resolver.reverse_lookup(ip).await {
            Ok(l) => {
                let names: Vec<String> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::PTR(p) => Some(p.0.to_ascii()),
                        _ => None,
                    })
                    .collect();
                if names.is_empty() {
                    Answer::Void
                } else {
                    Answer::Found(names)
                }
            }
            Err(e) => Self::classify(e),
        }
    }

    /// RFC 7208 5.7: `exists` asks for an A record whatever the sender's IP family.
    pub async fn exists(&self, name: &str) -> Answer<bool> {
        let name = match Self::fqdn(name) {
            Ok(n) => n,
            Err(e) => return Answer::Error(e),
        };
        match self.resolver.ipv4_lookup(name).await {
            Ok(l) => Answer::Found(!l.answers().is_empty()),
            Err(e) => Self::classify(e),
        }
    }
}

/// How many records and addresses one SPF walk may fetch. Far above the RFC's
/// 10 lookups, so an over-limit policy is still measured, but bounded so a
/// hostile include chain cannot keep us busy.
const SPF_FETCH_BUDGET: usize = 60;

/// A macro-free domain spec, or None when the spec depends on the sender
/// (RFC 7208 7: %{i}, %{s}, ... are only known at evaluation time).
fn literal_domain(m: &Macro, current: &str) -> Option<String> {
    match m {
        Macro::None => Some(current.to_string()),
        Macro::Literal(bytes) => Some(
            String::from_utf8_lossy(bytes)
                .trim_end_matches('.')
                .to_ascii_lowercase(),
        ),
        _ => None,
    }
}

fn prefix_of_v4(mask: u32) -> u8 {
    mask.leading_ones() as u8
}

fn prefix_of_v6(mask: u128) -> u8 {
    mask.leading_ones() as u8
}

/// Fetches the SPF policy of `domain` and everything it references.
pub async fn collect_spf(dns: &Dns, domain: &str) -> SpfNode {
    let mut budget = SPF_FETCH_BUDGET;
    let mut path = Vec::new();
    collect_node(dns, &domain.to_ascii_lowercase(), &mut budget, &mut path).await
}

fn spend(budget: &mut usize) -> bool {
    if *budget == 0 {
        false
    } else {
        *budget -= 1;
        true
    }
}

async fn collect_node(
    dns: &Dns,
    domain: &str,
    budget: &mut usize,
    path: &mut Vec<String>,
) -> SpfNode {
    let node = |fetch| SpfNode {
        domain: domain.to_string(),
        fetch,
    };
    if path.iter().any(|d| d == domain) {
        return node(SpfFetch::NotFollowed(format!(
            "include loop back to {domain}"
        )));
    }
    if !spend(budget) {
        return node(SpfFetch::NotFollowed(
            "lookup budget of this check spent".into(),
        ));
    }
    let records: Vec<String> = match dns.txt(domain).await {
        Answer::Found(all) => all
            .into_iter()
            // RFC 7208 4.5: exactly "v=spf1" followed by a space or the end.
            .filter(|r| {
                let l = r.to_ascii_lowercase();
                l == "v=spf1" || l.starts_with("v=spf1 ")
            })
            .collect(),
        Answer::Void | Answer::NotQueried => Vec::new(),
        Answer::Error(e) => return node(SpfFetch::DnsError(e)),
    };
    let text = match records.len() {
        0 => return node(SpfFetch::NoRecord),
        1 => records.into_iter().next().unwrap(),
        _ => return node(SpfFetch::Multiple(records)),
    };
    let spf = match Spf::parse(text.as_bytes()) {
        Ok(s) => s,
        Err(e) => {
            return node(SpfFetch::Syntax {
                text,
                error: e.to_string(),
            });
        }
    };
    if let Some(error) = crate::spf::strict_token_error(&text) {
        return node(SpfFetch::Syntax { text, error });
    }
    // The raw mechanism tokens, in the order mail-auth produced directives, to
    // show macro specs as the operator wrote them.
    let tokens: Vec<&str> = text
        .split_ascii_whitespace()
        .skip(1)
        .filter(|t| {
            let eq = t.find('=');
            let colon = t.find(':');
            !matches!((eq, colon), (Some(e), c) if c.is_none_or(|c| e < c))
        })
        .collect();
    path.push(domain.to_string());
    let mut terms = Vec::new();
    for (i, d) in spf.directives.iter().enumerate() {
        let token = tokens.get(i).copied().unwrap_or("?").to_string();
        let macro_dependent = |kind| SpfMechanism::MacroDependent {
            kind,
            spec: token.clone(),
        };
        let mechanism = match &d.mechanism {
            Mechanism::All => SpfMechanism::All,
            Mechanism::Ip4 { addr, mask } => SpfMechanism::Ip {
                addr: IpAddr::V4(*addr),
                prefix: prefix_of_v4(*mask),
            },
            Mechanism::Ip6 { addr, mask } => SpfMechanism::Ip {
                addr: IpAddr::V6(*addr),
                prefix: prefix_of_v6(*mask),
            },
            Mechanism::A {
                macro_string,
                ip4_mask,
                ip6_mask,
            } => match literal_domain(macro_string, domain) {
                Some(target) => {
                    let addrs = if spend(budget) {
                        dns.addrs(&target).await
                    } else {
                        Answer::NotQueried
                    };
                    SpfMechanism::A {
                        domain: target,
                        prefix4: prefix_of_v4(*ip4_mask),
                        prefix6: prefix_of_v6(*ip6_mask),
                        addrs,
                    }
                }
                None => macro_dependent("a"),
            },
            Mechanism::Mx {
                macro_string,
                ip4_mask,
                ip6_mask,
            } => {
                match literal_domain(macro_string, domain) {
                    Some(target) => {
                        let hosts = if spend(budget) {
                            match dns.mx(&target).await {
                                Answer::Found(set) => {
                                    let mut hosts = Vec::new();
                                    // RFC 7208 4.6.4: only the first 10 MX hosts are looked up.
                                    for (_, host) in
                                        set.hosts.iter().take(crate::spf::MX_HOST_LIMIT + 1)
                                    {
                                        let a = if spend(budget) {
                                            match dns.addrs(host).await {
                                                Answer::Found(a) => a,
                                                _ => Vec::new(),
                                            }
                                        } else {
                                            Vec::new()
                                        };
                                        hosts.push((host.clone(), a));
                                    }
                                    Answer::Found(hosts)
                                }
                                Answer::Void => Answer::Void,
                                Answer::Error(e) => Answer::Error(e),
                                Answer::NotQueried => Answer::NotQueried,
                            }
                        } else {
                            Answer::NotQueried
                        };
                        SpfMechanism::Mx {
                            domain: target,
                            prefix4: prefix_of_v4(*ip4_mask),
                            prefix6: prefix_of_v6(*ip6_mask),
                            hosts,
                        }
                    }
                    None => macro_dependent("mx"),
                }
            }
            Mechanism::Include { macro_string } => match literal_domain(macro_string, domain) {
                Some(target) => SpfMechanism::Include(Box::new(
                    Box::pin(collect_node(dns, &target, budget, path)).await,
                )),
                None => macro_dependent("include"),
            },
            Mechanism::Exists { macro_string } => match literal_domain(macro_string, domain) {
                Some(target) => {
                    let exists = if spend(budget) {
                        dns.exists(&target).await
                    } else {
                        Answer::NotQueried
                    };
                    SpfMechanism::Exists {
                        domain: target,
                        exists,
                    }
                }
                None => macro_dependent("exists"),
            },
            Mechanism::Ptr { macro_string } => SpfMechanism::Ptr {
                domain: literal_domain(macro_string, domain).unwrap_or_else(|| token.clone()),
            },
        };
        terms.push(SpfTerm {
            qualifier: d.qualifier.clone(),
            mechanism,
        });
    }
    let redirect = match &spf.redirect {
        Some(m) => match literal_domain(m, domain) {
            Some(target) => Some(Box::new(
                Box::pin(collect_node(dns, &target, budget, path)).await,
            )),
            None => Some(Box::new(SpfNode {
                domain: "(macro)".into(),
                fetch: SpfFetch::NotFollowed("redirect= depends on the sender".into()),
            })),
        },
        None => None,
    };
    path.pop();
    node(SpfFetch::Record(SpfRecord {
        text,
        terms,
        redirect,
    }))
}

/// What `check dns` needs besides the domain.
#[derive(Debug, Clone, Default)]
pub struct DnsCheck {
    /// Nameservers as `IP[:PORT]`; empty means the system's resolver.
    pub resolvers: Vec<String>,
    /// New sending platforms, as IP addresses or host names.
    pub new_senders: Vec<String>,
    pub dkim_selectors: Vec<String>,
    pub cutover_window: Option<Duration>,
    /// Extra trusted roots for the MTA-STS policy host (private CAs in labs).
    pub ca_files: Vec<std::path::PathBuf>,
    /// The HTTPS port of the MTA-STS policy host; 0 means 443 (RFC 8461 3.3).
    /// Only tests change it.
    pub mta_sts_port: u16,
    /// The whole domain's checks end by then (`--timeout`); what was not
    /// answered is "could not check", never OK.
    pub timeout: Option<Duration>,
}

/// Runs every DNS check for one domain.
fn has_dmarc(a: &Answer<Vec<String>>) -> bool {
    matches!(a, Answer::Found(r) if r.iter().any(|r| crate::dmarc::is_record(r)))
}

/// The DMARC record receivers apply to `domain`, and the domain it was found
/// at: its own, or else the nearest ancestor's by the DNS tree walk of
/// DMARCbis (draft-ietf-dmarc-dmarcbis 4.10), which replaces RFC 7489's
/// public-suffix lookup of the organizational domain. Past 8 labels the walk
/// jumps to the rightmost 7. A lookup error at the domain itself is reported
/// as such, not walked past.
async fn dmarc_record(dns: &Dns, domain: &str) -> (String, Answer<Vec<String>>) {
    let own = dns.txt(&format!("_dmarc.{domain}")).await;
    if has_dmarc(&own) || matches!(own, Answer::Error(_)) {
        return (domain.to_string(), own);
    }
    let labels: Vec<&str> = domain.split('.').filter(|l| !l.is_empty()).collect();
    let first = if labels.len() > 8 {
        labels.len() - 7
    } else {
        1
    };
    for i in first..labels.len() {
        let target = labels[i..].join(".");
        let a = dns.txt(&format!("_dmarc.{target}")).await;
        if has_dmarc(&a) {
            return (target, a);
        }
    }
    (domain.to_string(), own)
}

pub async fn check_domain(domain: &str, opts: &DnsCheck) -> anyhow::Result<Vec<Finding>> {
    let Some(limit) = opts.timeout else {
        return check_domain_unbounded(domain, opts).await;
    };
    match tokio::time::timeout(limit, check_domain_unbounded(domain, opts)).await {
        Ok(r) => r,
        Err(_) => Ok(vec![Finding::new(
            crate::finding::Contract::InboundDelivery,
            "dns.timeout",
            domain.trim_end_matches('.').to_ascii_lowercase(),
            crate::finding::Severity::Warn,
            format!(
                "Could not check: the DNS checks did not finish within {} (--timeout), so \
                 nothing about this domain's MX, SPF, DKIM, DMARC, MTA-STS or TLS-RPT records \
                 is known.",
                humantime::format_duration(limit)
            ),
            "Check that the resolver answers (--resolver IP), or raise --timeout.",
        )]),
    }
}

async fn check_domain_unbounded(domain: &str, opts: &DnsCheck) -> anyhow::Result<Vec<Finding>> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let resolvers = if opts.resolvers.is_empty() {
        vec![Dns::system()?]
    } else {
        opts.resolvers
            .iter()
            .map(|r| Dns::nameserver(r))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    // MX from every resolver, concurrently: the point is to compare them.
    let views: Vec<ResolverView> = futures::future::join_all(resolvers.iter().map(|r| {
        let domain = domain.clone();
        async move {
            ResolverView {
                resolver: r.label.clone(),
                answer: r.mx(&domain).await,
            }
        }
    }))
    .await;
    let mut out = crate::mx::analyze(&domain, &views, opts.cutover_window);

    // The policy records are read through the first resolver that answered the
    // MX query, so one unreachable resolver does not turn every record into an error.
    let first_ok = views
        .iter()
        .position(|v| !matches!(v.answer, Answer::Error(_)))
        .unwrap_or(0);
    let dns = &resolvers[first_ok];
    let spf_tree = collect_spf(dns, &domain).await;
    let snapshot = crate::spf_eval::Snapshot::of(&spf_tree);
    let mut senders = Vec::new();
    for s in &opts.new_senders {
        let addrs = match s.parse::<IpAddr>() {
            Ok(ip) => Answer::Found(vec![ip]),
            Err(_) => dns.addrs(s).await,
        };
        let mut results = Vec::new();
        if let Answer::Found(ips) = &addrs {
            for ip in ips {
                results.push((*ip, dns.spf(&domain, *ip, &snapshot).await));
            }
        }
        senders.push(NewSender {
            name: s.clone(),
            addrs,
            results,
        });
    }
    out.extend(crate::spf::analyze(&domain, &spf_tree, &senders));
    for selector in &opts.dkim_selectors {
        let txt = dns.txt(&format!("{selector}._domainkey.{domain}")).await;
        out.extend(crate::dkim::analyze(&domain, selector, &txt));
    }
    let (at, dmarc) = dmarc_record(dns, &domain).await;
    if at != domain {
        out.push(crate::dmarc::inherited(&domain, &at));
    }
    out.extend(crate::dmarc::analyze(&at, &dmarc));
    let sts = dns.txt(&format!("_mta-sts.{domain}")).await;
    out.extend(crate::policy::analyze_mta_sts(&domain, &sts));
    let has_sts = matches!(&sts, Answer::Found(r) if r.iter().any(|r| r.to_ascii_lowercase().starts_with("v=stsv1")));
    if has_sts {
        let port = if opts.mta_sts_port == 0 {
            443
        } else {
            opts.mta_sts_port
        };
        let fetched = fetch_sts_policy(dns, &domain, port, &opts.ca_files).await;
        let mx_hosts: Vec<String> = match &views[first_ok].answer {
            Answer::Found(set) => set.hosts.iter().map(|(_, h)| h.clone()).collect(),
            _ => Vec::new(),
        };
        out.extend(crate::policy::analyze_sts_policy(
            &domain, &fetched, &mx_hosts,
        ));
    }
    out.extend(crate::policy::analyze_tls_rpt(
        &domain,
        &dns.txt(&format!("_smtp._tls.{domain}")).await,
    ));
    Ok(out)
}

/// Fetches `https://mta-sts.DOMAIN/.well-known/mta-sts.txt` (RFC 8461 3.3): a
/// valid certificate for the policy host is required and redirects are not
/// followed. HTTP/1.0, so the body is never chunked.
pub async fn fetch_sts_policy(
    dns: &Dns,
    domain: &str,
    port: u16,
    ca_files: &[std::path::PathBuf],
) -> Result<String, String> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = format!("mta-sts.{domain}");
    let addr = match dns.addrs(&host).await {
        Answer::Found(a) => a[0],
        Answer::Error(e) => return Err(format!("{host} does not resolve: {e}")),
        _ => return Err(format!("{host} has no address")),
    };
    let roots = crate::smtp::root_store(ca_files).map_err(|e| format!("{e:#}"))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((addr, port))
            .await
            .map_err(|e| format!("cannot connect to {host} ({addr}:{port}): {e}"))?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                format!("TLS to {host} failed (RFC 8461 3.3 needs a valid certificate): {e}")
            })?;
        let request = format!(
            "GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\nUser-Agent: godwit-check\r\n\r\n"
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        // RFC 8461 3.3: senders may cap the policy at 64 KiB.
        let read = (&mut tls)
            .take(64 * 1024 + 4096)
            .read_to_end(&mut body)
            .await;
        // Servers often close TLS without close_notify; what arrived is enough.
        if body.is_empty() {
            return Err(format!("no response from {host}: {read:?}"));
        }
        let text = String::from_utf8_lossy(&body).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or("malformed HTTP response")?;
        let status = head.lines().next().unwrap_or("");
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(format!(
                "{host} answered {status:?} (redirects are not followed, RFC 8461 3.3)"
            ));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(15), fetch)
        .await
        .map_err(|_| format!("fetching the policy from {host} timed out"))?
}
