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

/// A record that could not be queried is not known to be absent: never OK.
fn could_not_check(check: &str, subject: String, e: &str) -> Vec<Finding> {
    vec![Finding::new(
        Contract::InboundDelivery,
        check,
        subject,
        Severity::Warn,
        format!(
            "Could not check: the query failed ({e}), so whether a record is published is unknown."
        ),
        "Check the domain's name servers (or --resolver), then run the check again.",
    )]
}

pub fn analyze_mta_sts(domain: &str, txt: &Answer<Vec<String>>) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let subject = format!("_mta-sts.{domain}");
    if let Answer::Error(e) = txt {
        return could_not_check("mta-sts.record", subject, e);
    }
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
            Ok(sts) => Finding::new(
                c,
                "mta-sts.record",
                subject,
                Severity::Ok,
                format!(
                    "MTA-STS is published (id={}). The policy at \
                     https://mta-sts.{domain}/.well-known/mta-sts.txt lists the MX hosts senders \
                     may deliver to (RFC 8461 3.2).",
                    sts.id
                ),
                "",
            ),
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

/// An MTA-STS policy file (RFC 8461 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsPolicy {
    pub mode: String,
    pub mx: Vec<String>,
    pub max_age: u64,
}

/// RFC 8461 3.2: "key: value" lines; `version: STSv1`, `mode`, `max_age` and at
/// least one `mx` (unless mode is none) are required. No crate in our pins
/// parses the policy file, and its grammar is these few lines.
pub fn parse_sts_policy(text: &str) -> Result<StsPolicy, String> {
    let mut version = None;
    let mut mode = None;
    let mut max_age = None;
    let mut mx = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "version" => version = Some(v.to_string()),
            "mode" => mode = Some(v.to_string()),
            "max_age" => {
                max_age = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("max_age {v:?} is not a number"))?,
                )
            }
            "mx" => mx.push(v.to_ascii_lowercase()),
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("missing \"version: STSv1\"".into());
    }
    let mode = mode.ok_or("missing mode")?;
    if !["enforce", "testing", "none"].contains(&mode.as_str()) {
        return Err(format!("unknown mode {mode:?}"));
    }
    let max_age = max_age.ok_or("missing max_age")?;
    if mx.is_empty() && mode != "none" {
        return Err("no mx lines".into());
    }
    Ok(StsPolicy { mode, mx, max_age })
}

/// The fetched policy against the MX hosts published now (RFC 8461 4.1: an MX
/// host must match an `mx` pattern, `*.` standing for one left-most label).
pub fn analyze_sts_policy(
    domain: &str,
    fetched: &Result<String, String>,
    mx_hosts: &[String],
) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let subject = format!("mta-sts.{domain}");
    let policy = match fetched
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|t| parse_sts_policy(t))
    {
        Ok(p) => p,
        Err(e) => {
            return vec![Finding::new(
                c,
                "mta-sts.policy",
                subject,
                Severity::Warn,
                format!(
                    "The MTA-STS record is published but the policy cannot be used: {e}. Senders \
                     that cached an earlier policy keep applying it until max_age runs out."
                ),
                format!(
                    "Serve a valid policy at https://mta-sts.{domain}/.well-known/mta-sts.txt."
                ),
            )];
        }
    };
    let uncovered: Vec<&String> = mx_hosts
        .iter()
        .filter(|h| !policy.mx.iter().any(|p| crate::cert::name_matches(p, h)))
        .collect();
    let summary = format!(
        "MTA-STS policy: mode {}, mx {}, max_age {}s ({}).",
        policy.mode,
        policy.mx.join(", "),
        policy.max_age,
        humantime::format_duration(std::time::Duration::from_secs(policy.max_age))
    );
    let f = match policy.mode.as_str() {
        "enforce" if !uncovered.is_empty() => Finding::new(
            c,
            "mta-sts.policy",
            subject,
            Severity::Block,
            format!(
                "{summary} The published MX {} not covered by the policy: senders that enforce \
                 MTA-STS refuse to deliver there.",
                uncovered
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if uncovered.len() == 1 { " is" } else { " are" }
            ),
            "Add the MX hosts to the policy's mx: lines, change the id in the _mta-sts record \
             (RFC 8461 3.1), and only then let traffic move.",
        ),
        "enforce" => Finding::new(
            c,
            "mta-sts.policy",
            subject,
            Severity::Warn,
            format!(
                "{summary} Enforcing: senders cache this list for max_age, so a new MX host that is \
                 not in it is refused until their cache expires."
            ),
            "Before the MX changes, add the new MX hosts to the policy, change the record's id, \
             and wait out max_age.",
        ),
        _ => Finding::new(
            c,
            "mta-sts.policy",
            subject,
            Severity::Ok,
            format!(
                "{summary} Not enforcing: senders report failures (TLS-RPT) but still deliver."
            ),
            "",
        ),
    };
    vec![f]
}

pub fn analyze_tls_rpt(domain: &str, txt: &Answer<Vec<String>>) -> Vec<Finding> {
    let c = Contract::InboundDelivery;
    let subject = format!("_smtp._tls.{domain}");
    if let Answer::Error(e) = txt {
        return could_not_check("tls-rpt.record", subject, e);
    }
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

    #[test]
    fn a_failed_query_is_never_ok() {
        let failed: Answer<Vec<String>> = Answer::Error("timed out".into());
        for f in analyze_mta_sts("example.com", &failed)
            .into_iter()
            .chain(analyze_tls_rpt("example.com", &failed))
        {
            assert_eq!(f.severity, Severity::Warn, "{f:?}");
            assert!(f.meaning.starts_with("Could not check"), "{f:?}");
        }
    }

    fn txt(r: &[&str]) -> Answer<Vec<String>> {
        Answer::Found(r.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn mta_sts_and_tls_rpt_records() {
        let f = analyze_mta_sts("example.com", &txt(&["v=STSv1; id=20261128"]));
        assert_eq!(f[0].severity, Severity::Ok);
        assert!(f[0].meaning.contains("id=20261128"));
        let f = analyze_mta_sts("example.com", &Answer::Void);
        assert!(f[0].meaning.starts_with("No MTA-STS"));
        let f = analyze_mta_sts("example.com", &txt(&["v=STSv1; id=1", "v=STSv1; id=2"]));
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

    #[test]
    fn sts_policies() {
        let ok = |t: &str| Ok::<String, String>(t.to_string());
        let mx = vec!["mx-gw.example.com".to_string()];
        let cases = [
            (
                ok("version: STSv1\nmode: enforce\nmx: mx1.oldmail.example.com\nmax_age: 604800\n"),
                Severity::Block,
            ),
            (
                ok("version: STSv1\r\nmode: enforce\r\nmx: *.example.com\r\nmax_age: 86400\r\n"),
                Severity::Warn,
            ),
            (
                ok("version: STSv1\nmode: testing\nmx: mx1.oldmail.example.com\nmax_age: 86400\n"),
                Severity::Ok,
            ),
            (
                ok("version: STSv1\nmode: enforce\nmax_age: 86400\n"),
                Severity::Warn,
            ),
            (
                ok("mode: enforce\nmx: *.example.com\nmax_age: 86400\n"),
                Severity::Warn,
            ),
            (Err("HTTP 404".to_string()), Severity::Warn),
        ];
        for (fetched, sev) in cases.clone() {
            let f = analyze_sts_policy("example.com", &fetched, &mx);
            assert_eq!(f[0].severity, sev, "{fetched:?}: {}", f[0].meaning);
        }
        let f = analyze_sts_policy("example.com", &cases[0].0, &mx);
        assert!(
            f[0].meaning.contains("mx-gw.example.com is not covered"),
            "{}",
            f[0].meaning
        );
    }
}
