//! The certificate an SMTP server presents after STARTTLS, judged for the
//! cutover (the seed's Task 5): expired or mismatched is blocking, expiring
//! within 30 days is a warning, untrusted or self-signed is blocking unless the
//! operator vouched for the CA with `--ca`.

use crate::finding::{Contract, Finding, Severity};
use std::net::IpAddr;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const EXPIRY_WARN_DAYS: i64 = 30;

/// What the chain looked like to a verifier that ignores time and name (those
/// are judged here, with better messages), so only the issuer path is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    /// The chain does not lead to a trusted root (webpki's reason).
    Untrusted(String),
}

#[derive(Debug, Clone)]
pub struct CertObservation {
    /// The name the client expects the certificate to carry: the host it
    /// connected to (or `--tls-name`).
    pub expected_name: String,
    /// DER certificates as the server sent them, leaf first.
    pub chain: Vec<Vec<u8>>,
    pub trust: Trust,
    /// Whether extra roots were given with `--ca`.
    pub extra_roots: bool,
    /// Seconds since the Unix epoch.
    pub now: i64,
}

/// The facts about a leaf certificate that the findings quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub subject: String,
    pub issuer: String,
    pub dns_names: Vec<String>,
    pub ip_addrs: Vec<IpAddr>,
    pub not_before: i64,
    pub not_after: i64,
    pub self_issued: bool,
}

pub fn facts(der: &[u8]) -> Result<CertFacts, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let mut dns_names = Vec::new();
    let mut ip_addrs = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns_names.push(n.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ip_addrs.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())),
                    16 => ip_addrs.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap())),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertFacts {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        dns_names,
        ip_addrs,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        self_issued: cert.subject().as_raw() == cert.issuer().as_raw(),
    })
}

/// RFC 6125 6.4: a DNS-ID matches case-insensitively; a wildcard stands for
/// exactly one whole left-most label.
pub fn name_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(rest) => match host.split_once('.') {
            Some((label, host_rest)) => {
                !label.is_empty() && host_rest == rest && rest.contains('.')
            }
            None => false,
        },
        None => pattern == host,
    }
}

fn day(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .map(|t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()))
        .unwrap_or_else(|_| ts.to_string())
}

pub fn analyze(subject: &str, obs: &CertObservation) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let Some(leaf) = obs.chain.first() else {
        return vec![Finding::new(
            c,
            "tls.certificate",
            subject,
            Severity::Block,
            "The server completed TLS without presenting a certificate.",
            "Configure a certificate for this host.",
        )];
    };
    let f = match facts(leaf) {
        Ok(f) => f,
        Err(e) => {
            return vec![Finding::new(
                c,
                "tls.certificate",
                subject,
                Severity::Block,
                format!("The server's certificate cannot be read: {e}."),
                "Install a valid certificate.",
            )];
        }
    };
    // Whole days, rounded towards zero either way: "1 day ago", not "2".
    let days_left = (f.not_after - obs.now) / 86_400;
    let validity = if obs.now > f.not_after {
        format!("expired {} days ago", (obs.now - f.not_after) / 86_400)
    } else {
        format!("{days_left} days left")
    };
    let mut names: Vec<String> = f.dns_names.clone();
    names.extend(f.ip_addrs.iter().map(|i| i.to_string()));
    let mut out = vec![Finding::new(
        c,
        "tls.certificate",
        subject,
        Severity::Ok,
        format!(
            "subject={}; SANs={}; issuer={}; valid {} to {} ({validity}); chain of {}.",
            f.subject,
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            },
            f.issuer,
            day(f.not_before),
            day(f.not_after),
            obs.chain.len()
        ),
        "",
    )];

    let expiry = if obs.now > f.not_after {
        Finding::new(
            c,
            "tls.expiry",
            subject,
            Severity::Block,
            format!(
                "The certificate expired on {} ({validity}). Senders that verify certificates \
                 (MTA-STS enforce, DANE, most gateways) will not deliver; the rest see a TLS \
                 failure that looks like random delivery problems.",
                day(f.not_after)
            ),
            "Renew the certificate before the cutover.",
        )
    } else if obs.now < f.not_before {
        Finding::new(
            c,
            "tls.expiry",
            subject,
            Severity::Block,
            format!("The certificate is not valid before {}.", day(f.not_before)),
            "Check the server's clock and the certificate's dates.",
        )
    } else if days_left < EXPIRY_WARN_DAYS {
        Finding::new(
            c,
            "tls.expiry",
            subject,
            Severity::Warn,
            format!(
                "The certificate expires on {} ({days_left} days left), likely inside the \
                 migration window.",
                day(f.not_after)
            ),
            "Renew it before the cutover, not during it.",
        )
    } else {
        Finding::new(
            c,
            "tls.expiry",
            subject,
            Severity::Ok,
            format!(
                "The certificate is valid until {} ({days_left} days left).",
                day(f.not_after)
            ),
            "",
        )
    };
    out.push(expiry);

    let expected = obs.expected_name.trim_end_matches('.');
    let matched = match expected.parse::<IpAddr>() {
        Ok(ip) => f.ip_addrs.contains(&ip),
        Err(_) => f.dns_names.iter().any(|n| name_matches(n, expected)),
    };
    out.push(if matched {
        Finding::new(
            c,
            "tls.name",
            subject,
            Severity::Ok,
            format!("The certificate names {expected}."),
            "",
        )
    } else {
        Finding::new(
            c,
            "tls.name",
            subject,
            Severity::Block,
            format!(
                "The certificate does not name {expected} (it names {}). Verifying senders refuse \
                 it (RFC 6125; subject CN is not consulted when SANs exist).",
                if names.is_empty() {
                    "nothing in its SANs".to_string()
                } else {
                    names.join(", ")
                }
            ),
            format!("Install a certificate whose subjectAltName includes {expected}."),
        )
    });

    out.push(match &obs.trust {
        Trust::Trusted => Finding::new(
            c,
            "tls.trust",
            subject,
            Severity::Ok,
            format!(
                "The chain verifies against {}.",
                if obs.extra_roots {
                    "the system roots and the --ca file"
                } else {
                    "the system roots"
                }
            ),
            "",
        ),
        Trust::Untrusted(reason) if f.self_issued && obs.chain.len() == 1 => Finding::new(
            c,
            "tls.trust",
            subject,
            Severity::Block,
            format!(
                "The certificate is self-signed ({}): verifying senders and gateways refuse it \
                 ({reason}).",
                f.subject
            ),
            "Install a certificate from a public CA, or pass the private CA with --ca FILE if the \
             only clients are yours.",
        ),
        Trust::Untrusted(reason) => Finding::new(
            c,
            "tls.trust",
            subject,
            Severity::Block,
            format!(
                "The chain does not verify against the trusted roots: {reason} (issuer {}).",
                f.issuer
            ),
            "Serve the full chain (leaf and intermediates), or pass the private CA with --ca FILE.",
        ),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_follow_rfc6125() {
        let cases = [
            ("mx.example.com", "mx.example.com", true),
            ("MX.Example.com", "mx.example.COM.", true),
            ("*.example.com", "mx.example.com", true),
            ("*.example.com", "a.mx.example.com", false),
            ("*.example.com", "example.com", false),
            ("*.com", "example.com", false),
            ("mx.example.com", "mx2.example.com", false),
        ];
        for (p, h, want) in cases {
            assert_eq!(name_matches(p, h), want, "{p} vs {h}");
        }
    }

    fn cert(names: &[&str], not_before: i64, not_after: i64) -> Vec<u8> {
        let mut p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.not_before = time::OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn expiry_name_and_trust() {
        let now = 1_800_000_000;
        let day = 86_400;
        let obs = |der: Vec<u8>, name: &str, trust: Trust| CertObservation {
            expected_name: name.into(),
            chain: vec![der],
            trust,
            extra_roots: false,
            now,
        };
        let cases = [
            (
                obs(
                    cert(&["mx.example.com"], now - day, now + 90 * day),
                    "mx.example.com",
                    Trust::Trusted,
                ),
                "tls.expiry",
                Severity::Ok,
            ),
            (
                obs(
                    cert(&["mx.example.com"], now - day, now + 10 * day),
                    "mx.example.com",
                    Trust::Trusted,
                ),
                "tls.expiry",
                Severity::Warn,
            ),
            (
                obs(
                    cert(&["mx.example.com"], now - 90 * day, now - day),
                    "mx.example.com",
                    Trust::Trusted,
                ),
                "tls.expiry",
                Severity::Block,
            ),
            (
                obs(
                    cert(&["mx.example.com"], now + day, now + 90 * day),
                    "mx.example.com",
                    Trust::Trusted,
                ),
                "tls.expiry",
                Severity::Block,
            ),
            (
                obs(
                    cert(&["*.example.com"], now - day, now + 90 * day),
                    "mx.example.com",
                    Trust::Trusted,
                ),
                "tls.name",
                Severity::Ok,
            ),
            (
                obs(
                    cert(&["other.example.net"], now - day, now + 90 * day),
                    "mx.example.com",
                    Trust::Trusted,
                ),
                "tls.name",
                Severity::Block,
            ),
            (
                obs(
                    cert(&["127.0.0.1"], now - day, now + 90 * day),
                    "127.0.0.1",
                    Trust::Trusted,
                ),
                "tls.name",
                Severity::Ok,
            ),
            (
                obs(
                    cert(&["mx.example.com"], now - day, now + 90 * day),
                    "mx.example.com",
                    Trust::Untrusted("UnknownIssuer".into()),
                ),
                "tls.trust",
                Severity::Block,
            ),
        ];
        for (o, check, sev) in cases {
            let f = analyze("mx:25", &o);
            let got = f.iter().find(|f| f.check == check).unwrap();
            assert_eq!(got.severity, sev, "{check}: {}", got.meaning);
        }
        let f = analyze(
            "mx:25",
            &obs(
                cert(&["mx.example.com"], now - day, now + 10 * day),
                "mx.example.com",
                Trust::Untrusted("UnknownIssuer".into()),
            ),
        );
        let info = f.iter().find(|f| f.check == "tls.certificate").unwrap();
        assert!(
            info.meaning.contains("SANs=mx.example.com") && info.meaning.contains("10 days left"),
            "{}",
            info.meaning
        );
        assert!(
            f.iter()
                .find(|f| f.check == "tls.trust")
                .unwrap()
                .meaning
                .contains("self-signed")
        );
    }
}
