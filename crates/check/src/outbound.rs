//! `godwit check outbound`: will receivers trust what godwit sends? For each
//! sending domain: SPF authorizes every `outbound.egress_ips` address
//! (mail-auth's RFC 7208 evaluation), the DKIM record at
//! `selector._domainkey` carries the configured key's public half, the
//! HELO name resolves to an egress address whose PTR names it again
//! (forward-confirmed rDNS), and DMARC alignment (RFC 7489 3.1) holds for
//! the mail godwit signs. The decisions are the pure functions below; the
//! driver only asks the DNS.

use crate::dns::Dns;
use crate::finding::{Contract, Finding, Severity};
use crate::spf::{Answer, SpfResult};
use godwit_config::Config;
use std::net::IpAddr;

const C: Contract = Contract::OutboundSending;

/// The `p=` of a DKIM key record, whitespace removed (RFC 6376 3.6.1: the
/// value may be folded).
pub fn p_tag(record: &str) -> Option<String> {
    record.split(';').find_map(|t| {
        let (k, v) = t.split_once('=')?;
        (k.trim() == "p").then(|| v.chars().filter(|c| !c.is_whitespace()).collect())
    })
}

/// Whether the published record at `name` carries `configured` (base64 `p=`).
pub fn dkim_matches(name: &str, configured_p: &str, published: &Answer<Vec<String>>) -> Finding {
    match published {
        Answer::Found(records) => {
            let ps: Vec<String> = records.iter().filter_map(|r| p_tag(r)).collect();
            if ps.iter().any(|p| p == configured_p) {
                Finding::new(
                    C,
                    "outbound.dkim-key",
                    name,
                    Severity::Ok,
                    "The published DKIM key is the one godwit signs with.",
                    "",
                )
            } else {
                Finding::new(
                    C,
                    "outbound.dkim-key",
                    name,
                    Severity::Block,
                    "The published DKIM key is not the configured key's public half: every signature \
                     godwit makes fails verification.",
                    "Publish the record `godwit dkim show` prints, or configure the key that matches.",
                )
            }
        }
        Answer::Error(e) => Finding::new(
            C,
            "outbound.dkim-key",
            name,
            Severity::Block,
            format!("The DKIM record could not be fetched: {e}."),
            "Check the domain's name servers, then run the check again.",
        ),
        _ => Finding::new(
            C,
            "outbound.dkim-key",
            name,
            Severity::Block,
            "No DKIM record is published: every signature godwit makes fails verification.",
            "Publish the record `godwit dkim show` prints.",
        ),
    }
}

/// SPF's verdict for one egress address.
pub fn spf_finding(domain: &str, ip: IpAddr, result: Result<SpfResult, String>) -> Finding {
    let subject = format!("{domain} from {ip}");
    match result {
        Ok(SpfResult::Pass) => Finding::new(
            C,
            "outbound.spf",
            subject,
            Severity::Ok,
            "SPF authorizes this egress address.",
            "",
        ),
        Ok(r) => Finding::new(
            C,
            "outbound.spf",
            subject,
            Severity::Block,
            format!(
                "SPF gives `{}` for mail from this egress address: receivers may reject it or file it as spam.",
                r.as_str()
            ),
            format!(
                "Add ip4:/ip6:{ip} (or an include that covers it) to the SPF record of {domain}."
            ),
        ),
        Err(e) => Finding::new(
            C,
            "outbound.spf",
            subject,
            Severity::Block,
            format!("SPF could not be evaluated: {e}."),
            "Check the domain's name servers, then run the check again.",
        ),
    }
}

/// HELO and reverse DNS (RFC 5321 4.1.1.1 and common receiver practice):
/// the name must resolve to an egress address, and that address's PTR must
/// name the HELO again.
pub fn helo_finding(
    helo: &str,
    egress: &[IpAddr],
    forward: &Answer<Vec<IpAddr>>,
    ptr: &dyn Fn(IpAddr) -> Answer<Vec<String>>,
) -> Finding {
    let addrs = match forward {
        Answer::Found(a) => a.clone(),
        Answer::Error(e) => {
            return Finding::new(
                C,
                "outbound.helo",
                helo,
                Severity::Block,
                format!("The HELO name could not be resolved: {e}."),
                "Check the name servers, then run the check again.",
            );
        }
        _ => {
            return Finding::new(
                C,
                "outbound.helo",
                helo,
                Severity::Block,
                "The HELO name does not resolve: many receivers reject or down-rank such mail.",
                "Publish an A/AAAA record for the HELO name pointing at the egress address.",
            );
        }
    };
    let candidates: Vec<IpAddr> = if egress.is_empty() {
        addrs.clone()
    } else {
        addrs
            .iter()
            .copied()
            .filter(|a| egress.contains(a))
            .collect()
    };
    if candidates.is_empty() {
        return Finding::new(
            C,
            "outbound.helo",
            helo,
            Severity::Block,
            format!(
                "The HELO name resolves to {addrs:?}, none of which is an egress address ({egress:?})."
            ),
            "Point the HELO name at the egress IPs, or set outbound.helo to the name they carry.",
        );
    }
    let want = helo.trim_end_matches('.').to_ascii_lowercase();
    for ip in &candidates {
        if let Answer::Found(names) = ptr(*ip)
            && names
                .iter()
                .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(&want))
        {
            return Finding::new(
                C,
                "outbound.helo",
                helo,
                Severity::Ok,
                format!("The HELO name resolves to {ip}, whose PTR names it again."),
                "",
            );
        }
    }
    Finding::new(
        C,
        "outbound.helo",
        helo,
        Severity::Block,
        format!(
            "No PTR of {candidates:?} names {helo}: HELO and reverse DNS disagree (common mistake 3)."
        ),
        "Ask the owner of the egress IPs to set their PTR to the HELO name.",
    )
}

/// DMARC alignment (RFC 7489 3.1.1) of mail from `from_domain` signed with
/// `d=signing_domain`, under the policy record `dmarc` (None: no record).
pub fn alignment_finding(from_domain: &str, signing: Option<&str>, dmarc: Option<&str>) -> Finding {
    let subject = format!("From: *@{from_domain}");
    let Some(d) = signing else {
        return Finding::new(
            C,
            "outbound.dmarc-alignment",
            subject,
            Severity::Block,
            "No [[dkim]] key covers this domain: godwit sends its mail unsigned, so DMARC rests on SPF alone.",
            format!(
                "godwit dkim keygen --domain {from_domain} --selector SELECTOR --out FILE, publish, configure."
            ),
        );
    };
    let strict = dmarc.is_some_and(|r| {
        r.split(';')
            .any(|t| t.trim().eq_ignore_ascii_case("adkim=s"))
    });
    let aligned = from_domain.eq_ignore_ascii_case(d)
        || (!strict
            && from_domain
                .to_ascii_lowercase()
                .ends_with(&format!(".{}", d.to_ascii_lowercase())));
    match (aligned, dmarc) {
        (true, Some(_)) => Finding::new(
            C,
            "outbound.dmarc-alignment",
            subject,
            Severity::Ok,
            format!("Signed with d={d}: DKIM aligns under the published DMARC policy."),
            "",
        ),
        (true, None) => Finding::new(
            C,
            "outbound.dmarc-alignment",
            subject,
            Severity::Warn,
            format!("Signed with d={d} (aligned), but no DMARC record is published."),
            format!("Publish _dmarc.{from_domain} (start with p=none and rua= reports)."),
        ),
        (false, _) => Finding::new(
            C,
            "outbound.dmarc-alignment",
            subject,
            Severity::Block,
            format!("Signed with d={d}, which does not align with {from_domain} under adkim=s."),
            format!("Add a [[dkim]] key for {from_domain} itself, or relax adkim."),
        ),
    }
}

/// Runs the outbound checks for the configuration.
pub async fn check(config: &Config, resolvers: &[String]) -> anyhow::Result<Vec<Finding>> {
    let Some(o) = &config.outbound else {
        anyhow::bail!("`check outbound` needs an [outbound] section in the configuration");
    };
    let dns = match resolvers.first() {
        Some(r) => Dns::nameserver(r)?,
        None => match o.resolvers.first() {
            Some(r) => Dns::nameserver(&r.to_string())?,
            None => Dns::system()?,
        },
    };
    let keys = godwit_outbound::DkimKeys::load(&config.dkim)?;
    let mut out = Vec::new();
    // The domains godwit sends as: ours, and those it signs for.
    let mut domains: Vec<String> = config
        .domains
        .accepted
        .iter()
        .filter(|d| !d.starts_with('.'))
        .cloned()
        .collect();
    for k in keys.keys() {
        if !domains.contains(&k.domain) {
            domains.push(k.domain.clone());
        }
    }
    if o.egress_ips.is_empty() {
        out.push(Finding::new(
            C,
            "outbound.spf",
            "outbound.egress_ips",
            Severity::Block,
            "outbound.egress_ips is empty: there is nothing to check SPF against.",
            "List the addresses godwit's mail leaves from in outbound.egress_ips.",
        ));
    }
    for domain in &domains {
        for ip in &o.egress_ips {
            out.push(spf_finding(domain, *ip, dns.verify_spf(domain, *ip).await));
        }
    }
    for k in keys.keys() {
        let p = godwit_outbound::dkim::txt_record(k.algorithm, &k.public_key);
        let p = p_tag(&p).unwrap_or_default();
        out.push(dkim_matches(
            &k.dns_name(),
            &p,
            &dns.txt(&k.dns_name()).await,
        ));
    }
    let helo = o.helo.clone().unwrap_or_else(|| config.hostname.clone());
    let forward = dns.addrs(&helo).await;
    let mut ptrs = std::collections::HashMap::new();
    if let Answer::Found(addrs) = &forward {
        for ip in addrs {
            ptrs.insert(*ip, dns.ptr(*ip).await);
        }
    }
    out.push(helo_finding(&helo, &o.egress_ips, &forward, &|ip| {
        ptrs.get(&ip).cloned().unwrap_or(Answer::Void)
    }));
    for domain in &domains {
        let signing = keys.key_for(domain).map(|k| k.domain.clone());
        let dmarc = match dns.txt(&format!("_dmarc.{domain}")).await {
            Answer::Found(r) => r.into_iter().find(|t| crate::dmarc::is_record(t)),
            _ => None,
        };
        out.push(alignment_finding(
            domain,
            signing.as_deref(),
            dmarc.as_deref(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dkim_record_match() {
        let rec = |s: &str| Answer::Found(vec![s.to_string()]);
        let f = dkim_matches("s._domainkey.x", "ABC", &rec("v=DKIM1; k=rsa; p=AB C"));
        assert_eq!(f.severity, Severity::Ok);
        let f = dkim_matches("s._domainkey.x", "ABC", &rec("v=DKIM1; k=rsa; p=XYZ"));
        assert_eq!(f.severity, Severity::Block);
        let f = dkim_matches("s._domainkey.x", "ABC", &Answer::Void);
        assert_eq!(f.severity, Severity::Block);
    }

    #[test]
    fn helo_needs_forward_and_reverse_agreement() {
        let egress: Vec<IpAddr> = vec!["203.0.113.55".parse().unwrap()];
        let fwd = Answer::Found(egress.clone());
        let good = |_| Answer::Found(vec!["mx-gw.example.com.".to_string()]);
        let bad = |_| Answer::Found(vec!["other.example.net.".to_string()]);
        assert_eq!(
            helo_finding("mx-gw.example.com", &egress, &fwd, &good).severity,
            Severity::Ok
        );
        assert_eq!(
            helo_finding("mx-gw.example.com", &egress, &fwd, &bad).severity,
            Severity::Block
        );
        let elsewhere = Answer::Found(vec!["198.51.100.1".parse().unwrap()]);
        assert_eq!(
            helo_finding("mx-gw.example.com", &egress, &elsewhere, &good).severity,
            Severity::Block
        );
        assert_eq!(
            helo_finding("mx-gw.example.com", &egress, &Answer::Void, &good).severity,
            Severity::Block
        );
    }

    #[test]
    fn alignment_table() {
        for (from, d, dmarc, want) in [
            (
                "example.com",
                Some("example.com"),
                Some("v=DMARC1; p=reject"),
                Severity::Ok,
            ),
            (
                "mail.example.com",
                Some("example.com"),
                Some("v=DMARC1; p=reject"),
                Severity::Ok,
            ),
            (
                "mail.example.com",
                Some("example.com"),
                Some("v=DMARC1; p=reject; adkim=s"),
                Severity::Block,
            ),
            ("example.com", Some("example.com"), None, Severity::Warn),
            (
                "example.org",
                None,
                Some("v=DMARC1; p=none"),
                Severity::Block,
            ),
        ] {
            assert_eq!(
                alignment_finding(from, d, dmarc).severity,
                want,
                "{from} {d:?} {dmarc:?}"
            );
        }
    }
}
