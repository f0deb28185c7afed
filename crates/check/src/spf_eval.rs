//! One SPF evaluator: mail-auth's `check_host` (RFC 7208 4), run over resolver
//! caches filled from the snapshot `dns::collect_spf` took.
//!
//! The snapshot tree is what the analysis in `spf` reads (the whole include
//! tree, lookup counts, broken links, authorized sources), which mail-auth does
//! not offer. Deciding what a receiver answers for one sending IP is another
//! job, and mail-auth already does it. So the snapshot is handed to mail-auth
//! as its DNS caches: a name the snapshot answered is never asked again, and a
//! name it could not know (a sender macro's expansion, `ptr`, a lookup that
//! failed) goes to the same resolver the check uses, as a receiver's would.

use crate::spf::{Answer, SpfFetch, SpfMechanism, SpfNode, SpfResult};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    DnsError, DnssecStatus, Error, MX, MessageAuthenticator, Parameters, RecordSet, ResolverCache,
    Txt,
};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One of mail-auth's resolver caches, filled up front. What mail-auth looks
/// up itself on a miss is kept too, for the rest of this evaluation.
struct Cache<K, V>(Mutex<HashMap<K, V>>);

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Cache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().unwrap().remove(name)
    }

    fn insert(&self, key: K, value: V, _valid_until: Instant) {
        self.0.lock().unwrap().insert(key, value);
    }
}

impl<K: Hash + Eq, V> Cache<K, V> {
    fn put_new(&self, key: K, value: V) {
        self.0.lock().unwrap().entry(key).or_insert(value);
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.lock().unwrap().is_empty()
    }
}

/// The snapshot as mail-auth's five caches.
#[derive(Default)]
pub struct Snapshot {
    txt: Cache<Box<str>, Txt>,
    mx: Cache<Box<str>, RecordSet<MX>>,
    ipv4: Cache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: Cache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: Cache<IpAddr, RecordSet<Box<str>>>,
}

/// mail-auth keys its caches by the lower-case absolute name (its `ToFqdn`).
fn key(name: &str) -> Box<str> {
    let mut k = name.to_ascii_lowercase();
    if !k.ends_with('.') {
        k.push('.');
    }
    k.into()
}

fn set<T>(items: Vec<T>) -> RecordSet<T> {
    RecordSet {
        rrset: items.into(),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

impl Snapshot {
    /// Pure: every answer in the tree, as the caches hold it. The first answer
    /// for a name wins, as it would in one receiver's evaluation.
    pub fn of(tree: &SpfNode) -> Snapshot {
        let s = Snapshot::default();
        s.fill(tree);
        s
    }

    fn fill(&self, node: &SpfNode) {
        let txt = match &node.fetch {
            SpfFetch::Record(r) => match Spf::parse(r.text.as_bytes()) {
                Ok(spf) => Some(Txt::Spf(Arc::new(spf))),
                Err(e) => Some(Txt::Error(e)),
            },
            // RFC 7208 4.4 / 5.2: no record is "none" at the top and a
            // permerror for an include or redirect; mail-auth maps
            // RecordNotFound to both, by where it occurs.
            SpfFetch::NoRecord => Some(Txt::Error(Error::Dns(DnsError::RecordNotFound(
                ResponseCode::NXDomain,
            )))),
            // RFC 7208 4.5 and 4.6: several records, or one that does not
            // parse (including our stricter token check), is a permerror.
            SpfFetch::Multiple(_) | SpfFetch::Syntax { .. } => Some(Txt::Error(Error::ParseError)),
            // RFC 7208 4.4: a DNS error is a temperror.
            SpfFetch::DnsError(e) => Some(Txt::Error(Error::Dns(DnsError::Resolver(e.clone())))),
            // Not fetched here: mail-auth asks the resolver if it gets there.
            SpfFetch::NotFollowed(_) => None,
        };
        if let Some(txt) = txt {
            self.txt.put_new(key(&node.domain), txt);
        }
        let SpfFetch::Record(record) = &node.fetch else {
            return;
        };
        for term in &record.terms {
            match &term.mechanism {
                SpfMechanism::A { domain, addrs, .. } => match addrs {
                    Answer::Found(a) => self.addrs(domain, a),
                    // No address is no match (RFC 7208 5.3), as an empty answer is.
                    Answer::Void => self.addrs(domain, &[]),
                    Answer::Error(_) | Answer::NotQueried => {}
                },
                SpfMechanism::Mx { domain, hosts, .. } => match hosts {
                    Answer::Found(hosts) => {
                        // One MX record per host, in the snapshot's order; the
                        // preference was already applied when it was taken.
                        let mx = hosts
                            .iter()
                            .enumerate()
                            .map(|(i, (host, _))| MX {
                                exchanges: vec![key(host)].into(),
                                preference: i as u16,
                            })
                            .collect();
                        self.mx.put_new(key(domain), set(mx));
                        for (host, addrs) in hosts {
                            self.addrs(host, addrs);
                        }
                    }
                    Answer::Void => self.mx.put_new(key(domain), set(Vec::new())),
                    Answer::Error(_) | Answer::NotQueried => {}
                },
                SpfMechanism::Exists { domain, exists } => {
                    // RFC 7208 5.7: any A record matches. A name that does not
                    // exist cannot be cached as an address set, so mail-auth
                    // asks for it again.
                    if matches!(exists, Answer::Found(true)) {
                        self.ipv4
                            .put_new(key(domain), set(vec![Ipv4Addr::new(127, 0, 0, 2)]));
                    }
                }
                SpfMechanism::Include(child) => self.fill(child),
                SpfMechanism::All
                | SpfMechanism::Ip { .. }
                | SpfMechanism::Ptr { .. }
                | SpfMechanism::MacroDependent { .. } => {}
            }
        }
        if let Some(redirect) = &record.redirect {
            self.fill(redirect);
        }
    }

    fn addrs(&self, name: &str, addrs: &[IpAddr]) {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for a in addrs {
            match a {
                IpAddr::V4(a) => v4.push(*a),
                IpAddr::V6(a) => v6.push(*a),
            }
        }
        self.ipv4.put_new(key(name), set(v4));
        self.ipv6.put_new(key(name), set(v6));
    }
}

/// What a receiver's SPF check answers for mail from `postmaster@domain` sent
/// by `ip` (RFC 7208 4): mail-auth's evaluation over `snapshot`, falling back to
/// `auth`'s resolver for names the snapshot does not hold.
pub async fn evaluate(
    auth: &MessageAuthenticator,
    snapshot: &Snapshot,
    domain: &str,
    ip: IpAddr,
) -> SpfResult {
    let sender = format!("postmaster@{domain}");
    let params = Parameters::new(SpfParameters::verify_mail_from(
        ip,
        "godwit-check.invalid",
        "godwit-check.invalid",
        &sender,
    ))
    .with_txt_cache(&snapshot.txt)
    .with_mx_cache(&snapshot.mx)
    .with_ipv4_cache(&snapshot.ipv4)
    .with_ipv6_cache(&snapshot.ipv6)
    .with_ptr_cache(&snapshot.ptr);
    match auth.verify_spf(params).await.result() {
        mail_auth::SpfResult::Pass => SpfResult::Pass,
        mail_auth::SpfResult::Fail => SpfResult::Fail,
        mail_auth::SpfResult::SoftFail => SpfResult::SoftFail,
        mail_auth::SpfResult::Neutral => SpfResult::Neutral,
        mail_auth::SpfResult::None => SpfResult::None,
        mail_auth::SpfResult::PermError => SpfResult::PermError,
        mail_auth::SpfResult::TempError => SpfResult::TempError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spf::testing::*;
    use mail_auth::spf::Qualifier;

    /// A resolver that can answer nothing: every miss is an error, so a test
    /// sees exactly what the snapshot decides.
    fn offline() -> MessageAuthenticator {
        use mail_auth::hickory_resolver::config::{
            ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
        };
        let mut udp = ConnectionConfig::udp();
        udp.port = 9; // discard: nothing answers
        let ns = NameServerConfig::new("127.0.0.1".parse().unwrap(), true, vec![udp]);
        let mut opts = ResolverOpts::default();
        opts.timeout = std::time::Duration::from_millis(200);
        opts.attempts = 1;
        opts.cache_size = 0;
        MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts).unwrap()
    }

    async fn eval(tree: &SpfNode, sender: &str) -> SpfResult {
        evaluate(
            &offline(),
            &Snapshot::of(tree),
            &tree.domain,
            sender.parse().unwrap(),
        )
        .await
    }

    #[test]
    fn the_snapshot_fills_every_cache_it_answers_for() {
        let s = Snapshot::of(&base());
        // example.com and the include's domain; a: and the MX hosts' addresses.
        assert!(s.txt.get("example.com.").is_some());
        assert!(s.txt.get("_spf.vendor.example.").is_some());
        assert_eq!(
            s.ipv4.get("mail.example.com.").unwrap().rrset[..],
            [Ipv4Addr::new(192, 0, 2, 1)]
        );
        assert!(s.ipv6.get("mail.example.com.").unwrap().rrset.is_empty());
        assert!(s.mx.is_empty() && s.ptr.is_empty());
        // A failed lookup is left for the resolver, never cached as empty.
        let failed = node(
            "example.com",
            vec![t(Qualifier::Pass, a_failing("flaky.example.com"))],
            None,
        );
        assert!(Snapshot::of(&failed).ipv4.is_empty());
    }

    #[tokio::test]
    async fn evaluation_follows_rfc7208_order_and_include_semantics() {
        let redirected = node(
            "example.net",
            vec![],
            Some(node(
                "_spf.example.org",
                vec![
                    t(Qualifier::Pass, ip4("192.0.2.128", 25)),
                    t(Qualifier::SoftFail, SpfMechanism::All),
                ],
                None,
            )),
        );
        let missing_include = node(
            "example.com",
            vec![
                t(
                    Qualifier::Pass,
                    include(SpfNode {
                        domain: "gone.example".into(),
                        fetch: SpfFetch::NoRecord,
                    }),
                ),
                t(Qualifier::Pass, ip4("203.0.113.10", 32)),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        );
        let failing_a = node(
            "example.com",
            vec![
                t(Qualifier::Pass, a_failing("flaky.example.com")),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        );
        let mx = node(
            "example.com",
            vec![
                t(
                    Qualifier::Pass,
                    SpfMechanism::Mx {
                        domain: "example.com".into(),
                        prefix4: 32,
                        prefix6: 128,
                        hosts: Answer::Found(vec![
                            ("mx1.example.com".into(), vec![ip("192.0.2.10")]),
                            ("mx2.example.com".into(), vec![ip("2001:db8::10")]),
                        ]),
                    },
                ),
                t(Qualifier::Fail, SpfMechanism::All),
            ],
            None,
        );
        let b = base();
        let cases: Vec<(&SpfNode, &str, SpfResult)> = vec![
            (&b, "203.0.113.10", SpfResult::Pass),
            (&b, "198.51.100.77", SpfResult::Pass), // via include
            (&b, "192.0.2.1", SpfResult::Pass),     // via a:
            (&b, "192.0.2.2", SpfResult::Fail),     // include's ?all does not match
            (&b, "2001:db8::1", SpfResult::Fail),
            (&redirected, "192.0.2.200", SpfResult::Pass),
            (&redirected, "192.0.2.1", SpfResult::SoftFail),
            (&missing_include, "203.0.113.10", SpfResult::PermError),
            (&failing_a, "192.0.2.1", SpfResult::TempError),
            (&mx, "192.0.2.10", SpfResult::Pass),
            (&mx, "2001:db8::10", SpfResult::Pass),
            (&mx, "192.0.2.11", SpfResult::Fail),
        ];
        for (tree, sender, want) in cases {
            assert_eq!(
                eval(tree, sender).await,
                want,
                "{} for {sender}",
                tree.domain
            );
        }
        let none = SpfNode {
            domain: "x.example".into(),
            fetch: SpfFetch::NoRecord,
        };
        assert_eq!(eval(&none, "192.0.2.1").await, SpfResult::None);
        let broken = SpfNode {
            domain: "x.example".into(),
            fetch: SpfFetch::Multiple(vec!["v=spf1 -all".into(), "v=spf1 +all".into()]),
        };
        assert_eq!(eval(&broken, "192.0.2.1").await, SpfResult::PermError);
    }

    #[tokio::test]
    async fn the_lookup_limit_is_enforced_in_evaluation() {
        // RFC 7208 4.6.4: ten DNS-querying terms pass, the eleventh is a permerror.
        let cases = [
            (3, SpfResult::Pass),
            (10, SpfResult::Pass),
            (11, SpfResult::PermError),
        ];
        for (depth, result) in cases {
            assert_eq!(
                eval(&chain(depth), "192.0.2.99").await,
                result,
                "depth {depth}"
            );
        }
    }
}
