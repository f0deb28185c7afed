//! `[outbound]` and `[[dkim]]`: godwit as the organisation's one outbound
//! edge. Platforms' outbound connectors, apps and devices relay through the
//! `outbound.listen` port; mail for our own domains stays inside (the
//! inbound routing map), everything else leaves from the same IPs with the
//! same HELO, DKIM-signed with the organisation's keys.
//!
//! ```toml
//! [outbound]
//! listen = ["127.0.0.1:2526"]          # relay port (no AUTH)
//! relay_networks = ["127.0.0.1/32"]    # who may relay here without AUTH
//! route = "mx"                         # or a platform name: via its outbound_relay
//! mx_port = 25
//! resolvers = ["127.0.0.1:5353"]       # default: the system's
//! helo = "mx-gw.example.com"           # default: hostname
//! egress_ips = ["203.0.113.55"]        # what SPF must authorize (godwit check outbound)
//! tls_require = ["bank.example"]       # STARTTLS is mandatory for these domains
//! destination_idle = "10m"             # forget an idle recipient domain's flow state
//! [outbound.rate_limits]               # per recipient domain: a ramp for a cold IP
//! "gmail.com" = "100/m"
//!
//! [[dkim]]
//! domain = "example.com"
//! selector = "gw2026"
//! key = "dkim/example.com.gw2026.pem"  # RSA (2048 or more) or Ed25519, PEM
//! ```

use super::{ConfigError, de_duration, invalid, ser_duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// The route name that delivers to the recipient domain's MX hosts.
pub const ROUTE_MX: &str = "mx";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    pub listen: Vec<SocketAddr>,
    /// Clients in these networks may relay to any recipient without AUTH
    /// (Postfix's mynetworks). Everyone else must authenticate.
    pub relay_networks: Vec<ipnet::IpNet>,
    /// `mx`, or the name of a platform whose `outbound_relay` is the smarthost.
    pub route: String,
    /// The port MX hosts are contacted on (RFC 5321 4.5.4: 25; tests point it
    /// at loopback sinks).
    pub mx_port: u16,
    /// DNS servers ("ip:port") for MX, A and AAAA lookups; empty: the system's.
    pub resolvers: Vec<SocketAddr>,
    /// The EHLO name towards the internet; default: `hostname`.
    pub helo: Option<String>,
    /// The addresses outbound mail leaves from (what SPF must authorize).
    pub egress_ips: Vec<IpAddr>,
    /// Per recipient domain, a ceiling on messages per period: "100/m",
    /// "5000/h", "10/s", "20000/d".
    pub rate_limits: BTreeMap<String, String>,
    /// Recipient domains (or `.parent` for every subdomain) for which STARTTLS
    /// is mandatory: mail waits rather than leave in clear text.
    pub tls_require: Vec<String>,
    /// Simultaneous connections per recipient domain at most (the ceiling of
    /// the adaptive limit), and where it starts.
    pub max_connections_per_domain: usize,
    pub initial_connections_per_domain: usize,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// An `mx:DOMAIN` (or `smarthost:`) destination with no queued mail, a
    /// closed circuit and no attempt for this long is forgotten, so one per
    /// recipient domain ever seen does not accumulate; mail for it later
    /// starts a fresh one.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub destination_idle: Duration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            listen: Vec::new(),
            relay_networks: Vec::new(),
            route: ROUTE_MX.into(),
            mx_port: 25,
            resolvers: Vec::new(),
            helo: None,
            egress_ips: Vec::new(),
            rate_limits: BTreeMap::new(),
            tls_require: Vec::new(),
            max_connections_per_domain: 10,
            initial_connections_per_domain: 2,
            connect_timeout: Duration::from_secs(30),
            destination_idle: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    /// PEM private key: RSA (PKCS#1 or PKCS#8, 2048 bits or more) or Ed25519 (PKCS#8).
    pub key: PathBuf,
}

/// A rate limit of `count` messages per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

impl RateLimit {
    /// Messages per second, as the flow control's `max_rate` takes it.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.period.as_secs_f64()
    }
}

/// Parses "100/m" (also "/s", "/h", "/d", or a duration such as "100/10m").
pub fn parse_rate_limit(s: &str) -> Result<RateLimit, String> {
    let (n, per) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not COUNT/PERIOD, e.g. \"100/m\""))?;
    let count: u32 = n
        .trim()
        .parse()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| format!("`{n}` in `{s}` is not a positive count"))?;
    let per = per.trim();
    let period = match per {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86400),
        other => humantime::parse_duration(other)
            .map_err(|e| format!("period `{other}` in `{s}`: {e}"))?,
    };
    if period.is_zero() {
        return Err(format!("period in `{s}` must be above zero"));
    }
    Ok(RateLimit { count, period })
}

impl OutboundConfig {
    /// The rate ceiling for recipient `domain`, if one is configured.
    pub fn rate_limit_for(&self, domain: &str) -> Option<RateLimit> {
        self.rate_limits
            .iter()
            .find(|(d, _)| d.eq_ignore_ascii_case(domain))
            .and_then(|(_, v)| parse_rate_limit(v).ok())
    }

    /// Whether STARTTLS is mandatory towards recipient `domain`.
    pub fn requires_tls(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.tls_require.iter().any(|d| match d.strip_prefix('.') {
            Some(parent) => {
                domain.len() > parent.len() + 1
                    && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
                    && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
            }
            None => d.eq_ignore_ascii_case(domain),
        })
    }

    pub(crate) fn validate(&self, config: &super::Config) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid(
                "outbound.listen",
                "must list at least one address, e.g. [\"127.0.0.1:2526\"]",
            ));
        }
        for l in &self.listen {
            if config.smtp.listen.contains(l) {
                return Err(invalid(
                    "outbound.listen",
                    format!("{l} is also in smtp.listen: the relay port must be its own"),
                ));
            }
        }
        if self.route != ROUTE_MX && !config.platforms.contains_key(&self.route) {
            return Err(invalid(
                "outbound.route",
                format!("`{}` is neither `mx` nor a configured platform", self.route),
            ));
        }
        if self.route != ROUTE_MX && config.platforms[&self.route].outbound_relay.is_empty() {
            return Err(invalid(
                "outbound.route",
                format!(
                    "platform `{}` has no outbound_relay to send through",
                    self.route
                ),
            ));
        }
        if self.mx_port == 0 {
            return Err(invalid("outbound.mx_port", "must be a port number"));
        }
        if let Some(h) = &self.helo
            && (h.trim().is_empty() || h.contains(char::is_whitespace) || !h.contains('.'))
        {
            // RFC 5321 4.1.1.1: the EHLO argument is the client's FQDN.
            return Err(invalid(
                "outbound.helo",
                format!("`{h}` is not a fully-qualified host name (RFC 5321 4.1.1.1)"),
            ));
        }
        for (domain, v) in &self.rate_limits {
            parse_rate_limit(v)
                .map_err(|m| invalid(format!("outbound.rate_limits.{domain}"), m))?;
        }
        for d in &self.tls_require {
            let name = d.strip_prefix('.').unwrap_or(d);
            if name.is_empty() || d.contains(['@', ' ', '/']) {
                return Err(invalid(
                    "outbound.tls_require",
                    format!("`{d}` is not a domain name"),
                ));
            }
        }
        if self.max_connections_per_domain == 0 {
            return Err(invalid(
                "outbound.max_connections_per_domain",
                "must be at least 1",
            ));
        }
        if self.initial_connections_per_domain == 0
            || self.initial_connections_per_domain > self.max_connections_per_domain
        {
            return Err(invalid(
                "outbound.initial_connections_per_domain",
                "must be between 1 and max_connections_per_domain",
            ));
        }
        Ok(())
    }
}

/// Checks `[[dkim]]`: names, and a readable PEM key of a supported kind.
pub(crate) fn validate_dkim(keys: &[DkimConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for (n, k) in keys.iter().enumerate() {
        let key = |field: &str| format!("dkim[{n}].{field}");
        let d = k.domain.trim_end_matches('.');
        if d.is_empty() || !d.contains('.') || d.contains(['@', ' ', '/']) {
            return Err(invalid(
                key("domain"),
                format!("`{}` is not a domain name", k.domain),
            ));
        }
        // RFC 6376 3.1: a selector is one or more DNS labels.
        if k.selector.is_empty()
            || !k
                .selector
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(invalid(
                key("selector"),
                format!(
                    "`{}` is not a selector (DNS labels, RFC 6376 3.1)",
                    k.selector
                ),
            ));
        }
        if !seen.insert(d.to_ascii_lowercase()) {
            return Err(invalid(
                key("domain"),
                format!("`{d}` has two keys: one key signs per domain"),
            ));
        }
        let pem = std::fs::read_to_string(&k.key)
            .map_err(|e| invalid(key("key"), format!("{}: {e}", k.key.display())))?;
        if !(pem.contains("-----BEGIN PRIVATE KEY-----")
            || pem.contains("-----BEGIN RSA PRIVATE KEY-----"))
        {
            return Err(invalid(
                key("key"),
                format!(
                    "{}: no PEM private key (PKCS#8 `BEGIN PRIVATE KEY` or PKCS#1 `BEGIN RSA PRIVATE KEY`)",
                    k.key.display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits() {
        for (s, want) in [
            ("100/m", Some((100, 60))),
            ("10/s", Some((10, 1))),
            ("5000/h", Some((5000, 3600))),
            ("1/d", Some((1, 86400))),
            ("30/10m", Some((30, 600))),
            ("0/m", None),
            ("100", None),
            ("x/m", None),
            ("100/fortnight", None),
        ] {
            let got = parse_rate_limit(s)
                .ok()
                .map(|r| (r.count, r.period.as_secs()));
            assert_eq!(got, want, "{s}");
        }
    }

    #[test]
    fn tls_require_matches_domains_and_subdomains() {
        let o = OutboundConfig {
            tls_require: vec!["bank.example".into(), ".gov.example".into()],
            ..Default::default()
        };
        assert!(o.requires_tls("bank.example"));
        assert!(o.requires_tls("BANK.example."));
        assert!(!o.requires_tls("sub.bank.example"));
        assert!(o.requires_tls("tax.gov.example"));
        assert!(!o.requires_tls("gov.example"));
        assert!(!o.requires_tls("other.example"));
    }
}
