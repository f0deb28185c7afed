//! MTA-STS (RFC 8461) and TLS-RPT (RFC 8460) DNS records.
//!
//! MTA-STS matters to a migration because an enforcing policy names the MX
//! hosts senders may use: change MX without updating the policy and enforcing
//! senders refuse to deliver to the new hosts.

use crate::finding::{Contract, Finding, Severity};
use crate::spf::Answer;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::mta_sts::{MtaSts, ReportUri, TlsRpt};

fn prefixed<'a>(txt: &'a Answer<Vec<String>>, prefix: &str) -> Vec<&'a String> {
    match txt {
        Answer::Found(r) => r
            .iter()
            .filter(|r| r.trim_start().to_ascii_lowercase().starts_with(prefix))
            .collect(),
        _ => Vec::new(),
    }
}

/// `mode` is the policy mode when the policy file was fetched, else None.
pub fn analyze_mta_sts(
    domain: &str,
    txt: &Answer<Vec<String>>,
    mode: Option<&str>,
) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let subject = format!("_mta-sts.{domain}");
    let records = prefixed(txt, "v=stsv1");
    let f = match records.as_slice() {
        [] => Finding::new(
            c,
            "mta-sts.record",
            subject,
            Severity::Ok,
            "No MTA-STS record: senders use opportunistic TLS, and no published policy pins the \
             MX hosts.",
            "",
        ),
        [one] => match MtaSts::parse(one.as_bytes()) {
            Ok(sts) => {
                let mode_text = match mode {
                    Some(m) => format!("policy mode {m}"),
                    None => "policy mode not fetched".to_string(),
                };
                let enforce = mode.is_some_and(|m| m.eq_ignore_ascii_case("enforce"));
                Finding::new(
                    c,
                    "mta-sts.record",
                    subject,
                    if enforce {
                        Severity::Warn
                    } else {
                        Severity::Ok
                    },
                    format!(
                        "MTA-STS is published (id={}, {mode_text}). The policy at \
                         https://mta-sts.{domain}/.well-known/mta-sts.txt lists the MX hosts senders \
                         may deliver to (RFC 8461 3.2); senders cache it for max_age.",
                        sts.id
                    ),
                    "Before the MX changes, add the new MX hosts to the policy's mx: lines and \
                     change the id in this record (RFC 8461 3.1), then wait out max_age; otherwise \
                     enforcing senders refuse the new MX.",
                )
            }
            Err(e) => Finding::new(
                c,
                "mta-sts.record",
                subject,
                Severity::Warn,
                format!("The MTA-STS record does not parse ({e}): \"{one}\"."),
                "Publish \"v=STSv1; id=<new id>\".",
            ),
        },
        many => Finding::new(
            c,
            "mta-sts.record",
            subject,
            Severity::Warn,
            format!(
                "{} MTA-STS records are published; RFC 8461 3.1 says senders then assume there \
                 is no policy.",
                many.len()
            ),
            "Keep exactly one v=STSv1 record.",
        ),
    };
    vec![f]
}

pub fn analyze_tls_rpt(domain: &str, txt: &Answer<Vec<String>>) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let subject = format!("_smtp._tls.{domain}");
    let records = prefixed(txt, "v=tlsrptv1");
    let f = match records.as_slice() {
        [] => Finding::new(
            c,
            "tls-rpt.record",
            subject,
            Severity::Ok,
            "No TLS-RPT record: senders do not report TLS failures to you, so a bad certificate on \
             the new MX shows up only as missing mail.",
            format!("Consider \"v=TLSRPTv1; rua=mailto:tls-reports@{domain}\" for the migration."),
        ),
        [one] => match TlsRpt::parse(one.as_bytes()) {
            Ok(rpt) => Finding::new(
                c,
                "tls-rpt.record",
                subject,
                Severity::Ok,
                format!(
                    "TLS-RPT reports go to {} (RFC 8460): TLS failures at the new MX will be \
                     reported there.",
                    rpt.rua
                        .iter()
                        .map(|u| match u {
                            ReportUri::Mail(m) => format!("mailto:{m}"),
                            ReportUri::Http(h) => h.clone(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "",
            ),
            Err(e) => Finding::new(
                c,
                "tls-rpt.record",
                subject,
                Severity::Warn,
                format!("The TLS-RPT record does not parse ({e}): \"{one}\"."),
                "Publish \"v=TLSRPTv1; rua=mailto:...\".",
            ),
        },
        many => Finding::new(
            c,
            "tls-rpt.record",
            subject,
            Severity::Warn,
            format!(
                "{} TLS-RPT records are published; RFC 8460 3 says to ignore them all.",
                many.len()
            ),
            "Keep exactly one v=TLSRPTv1 record.",
        ),
    };
    vec![f]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(r: &[&str]) -> Answer<Vec<String>> {
        Answer::Found(r.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn mta_sts_and_tls_rpt_records() {
        let f = analyze_mta_sts(
            "example.com",
            &txt(&["v=STSv1; id=20261128"]),
            Some("enforce"),
        );
        assert_eq!(f[0].severity, Severity::Warn);
        assert!(f[0].meaning.contains("id=20261128") && f[0].meaning.contains("enforce"));
        let f = analyze_mta_sts("example.com", &txt(&["v=STSv1; id=1"]), Some("testing"));
        assert_eq!(f[0].severity, Severity::Ok);
        let f = analyze_mta_sts("example.com", &Answer::Void, None);
        assert!(f[0].meaning.starts_with("No MTA-STS"));
        let f = analyze_mta_sts(
            "example.com",
            &txt(&["v=STSv1; id=1", "v=STSv1; id=2"]),
            None,
        );
        assert_eq!(f[0].severity, Severity::Warn);

        let f = analyze_tls_rpt(
            "example.com",
            &txt(&["v=TLSRPTv1; rua=mailto:tls@example.com"]),
        );
        assert_eq!(f[0].severity, Severity::Ok);
        assert!(
            f[0].meaning.contains("mailto:tls@example.com"),
            "{}",
            f[0].meaning
        );
        let f = analyze_tls_rpt("example.com", &txt(&["v=TLSRPTv1; rua=nonsense"]));
        assert_eq!(f[0].severity, Severity::Warn, "{f:?}");
    }
}
