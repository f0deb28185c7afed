//! DMARC (RFC 7489): policy strength read against a migration's risk.
//!
//! Parsing is mail-auth's; the judgement is ours: during a migration the question
//! is not "is the policy strong" but "how hard will receivers punish a sender
//! that is not yet aligned".

use crate::finding::{Contract, Finding, Severity};
use crate::spf::Answer;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::dmarc::{Alignment, Dmarc, Policy};

/// RFC 7489 6.6.3: a TXT record that does not start with "v=DMARC1" is
/// discarded.
pub fn is_record(txt: &str) -> bool {
    txt.trim_start()
        .to_ascii_lowercase()
        .starts_with("v=dmarc1")
}

/// Findings for the TXT records found at `_dmarc.DOMAIN`.
pub fn analyze(domain: &str, txt: &Answer<Vec<String>>) -> Vec<Finding> {
    let c = Contract::OutboundSending;
    let subject = format!("_dmarc.{domain}");
    let records: Vec<&String> = match txt {
        Answer::Found(all) => all.iter().filter(|r| is_record(r)).collect(),
        Answer::Error(e) => {
            return vec![Finding::new(
                c,
                "dmarc.record",
                subject,
                Severity::Warn,
                format!("The DMARC record could not be fetched: {e}."),
                "Check the domain's name servers, then run the check again.",
            )];
        }
        _ => Vec::new(),
    };
    match records.as_slice() {
        [] => vec![Finding::new(
            c,
            "dmarc.record",
            subject,
            Severity::Warn,
            "No DMARC record. Nothing breaks during the migration, but you get no aggregate reports \
             telling you which senders fail authentication, and large mailbox providers expect a \
             DMARC record from bulk senders.",
            format!(
                "Publish \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}\" before the \
                 migration to see who sends as you."
            ),
        )],
        [one] => analyze_record(domain, &subject, one),
        many => vec![Finding::new(
            c,
            "dmarc.record",
            subject,
            Severity::Warn,
            format!(
                "{} DMARC records are published; RFC 7489 6.6.3 says receivers then apply no DMARC \
                 at all: {}",
                many.len(),
                many.iter()
                    .map(|r| format!("\"{r}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "Keep exactly one v=DMARC1 record.",
        )],
    }
}

/// `domain` has no record of its own and receivers use `at`'s.
pub fn inherited(domain: &str, at: &str) -> Finding {
    Finding::new(
        Contract::OutboundSending,
        "dmarc.inherited",
        format!("_dmarc.{domain}"),
        Severity::Ok,
        format!(
            "{domain} publishes no DMARC record of its own: receivers apply the one at _dmarc.{at} \
             (found by the DMARC DNS tree walk, as RFC 7489's organizational domain would be), \
             with its sp= policy where it sets one. The findings for _dmarc.{at} apply to {domain}."
        ),
        format!(
            "Nothing to do, unless {domain} should have a policy of its own: then publish _dmarc.{domain}."
        ),
    )
}

/// `pct` (RFC 7489 6.3) is not kept by mail-auth's parser (DMARCbis drops it),
/// but receivers still honour it, so it is read from the tag list here.
fn pct(record: &str) -> Option<u8> {
    record.split(';').find_map(|tag| {
        let (k, v) = tag.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("pct")).then(|| v.trim().parse().ok())?
    })
}

fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::None => "none",
        Policy::Quarantine => "quarantine",
        Policy::Reject => "reject",
        Policy::Unspecified => "unspecified",
    }
}

fn align_name(a: Alignment) -> &'static str {
    match a {
        Alignment::Relaxed => "relaxed",
        Alignment::Strict => "strict",
    }
}

fn analyze_record(domain: &str, subject: &str, text: &str) -> Vec<Finding> {
    let c = Contract::OutboundSending;
    let dmarc = match Dmarc::parse(text.as_bytes()) {
        Ok(d) => d,
        Err(e) => {
            return vec![Finding::new(
                c,
                "dmarc.syntax",
                subject,
                Severity::Warn,
                format!(
                    "The DMARC record does not parse ({e}): \"{text}\". Receivers ignore a broken \
                     record (RFC 7489 6.6.3), so the domain has no effective policy and no reports."
                ),
                "Fix the record: tags are separated by ';', p= is none, quarantine or reject, \
                 adkim/aspf are r or s.",
            )];
        }
    };
    let mut out = Vec::new();
    // RFC 7489 6.6.3: a record without a valid p= but with rua is treated as p=none.
    let p = if dmarc.p == Policy::Unspecified {
        Policy::None
    } else {
        dmarc.p
    };
    let pct = pct(text).unwrap_or(100);
    let uris = |u: &[mail_auth::dmarc::URI]| {
        if u.is_empty() {
            "none".to_string()
        } else {
            // mail-auth keeps only the address of a mailto: URI (RFC 7489 6.2).
            u.iter()
                .map(|u| format!("mailto:{}", u.uri()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let summary = format!(
        "DMARC: p={}, sp={}, pct={pct}, adkim={}, aspf={}, rua={}, ruf={}",
        policy_name(p),
        policy_name(dmarc.sp),
        align_name(dmarc.adkim),
        align_name(dmarc.aspf),
        uris(&dmarc.rua),
        uris(&dmarc.ruf)
    );
    let strict = dmarc.adkim == Alignment::Strict || dmarc.aspf == Alignment::Strict;
    let (sev, meaning, action) = match p {
        Policy::Reject if strict => (
            Severity::Warn,
            format!(
                "{summary}. DMARC is set to reject, with strict alignment. Good for security, \
                 unforgiving during migration: a message from the new platform whose DKIM d= or \
                 envelope domain is not exactly {domain} is rejected outright."
            ),
            "If you can't guarantee DKIM alignment during transition, plan a temporary policy \
             relaxation (carefully: relaxed alignment or p=quarantine with pct) or use a gateway \
             that maintains signing consistently."
                .to_string(),
        ),
        Policy::Reject => (
            Severity::Ok,
            format!(
                "{summary}. Reject with relaxed alignment: a new platform that signs DKIM for \
                 {domain} (or a subdomain) or is in SPF passes; any other is rejected."
            ),
            "Have the new platform sign with a {domain} DKIM key before it sends.".to_string(),
        ),
        Policy::Quarantine => (
            if strict { Severity::Warn } else { Severity::Ok },
            format!(
                "{summary}. Quarantine: unaligned mail from the new platform lands in spam folders, \
                 where nobody reports it.{}",
                if strict {
                    " Strict alignment makes any subdomain mismatch count."
                } else {
                    ""
                }
            ),
            "Confirm DKIM alignment of the new platform with a test message before moving senders."
                .to_string(),
        ),
        Policy::None | Policy::Unspecified => (
            Severity::Ok,
            format!(
                "{summary}. Monitoring only: receivers do not act on failures, so migration \
                 mistakes show up in reports, not as lost mail."
            ),
            String::new(),
        ),
    };
    out.push(Finding::new(
        c,
        "dmarc.policy",
        subject,
        sev,
        meaning,
        action,
    ));
    if pct < 100 && p != Policy::None {
        out.push(Finding::new(
            c,
            "dmarc.pct",
            subject,
            Severity::Ok,
            format!(
                "pct={pct}: the policy applies to {pct}% of failing mail; the rest is treated one \
                 step softer (RFC 7489 6.6.4)."
            ),
            "",
        ));
    }
    if dmarc.rua.is_empty() {
        out.push(Finding::new(
            c,
            "dmarc.rua",
            subject,
            Severity::Warn,
            "No rua= address: nobody receives aggregate reports, so authentication failures of \
             the new platform stay invisible during the migration.",
            format!("Add rua=mailto:dmarc-reports@{domain} (or a report service) now."),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(records: &[&str]) -> Vec<Finding> {
        analyze(
            "example.com",
            &Answer::Found(records.iter().map(|s| s.to_string()).collect()),
        )
    }

    fn sev(f: &[Finding], check: &str) -> Option<Severity> {
        f.iter().find(|f| f.check == check).map(|f| f.severity)
    }

    #[test]
    fn policies_are_judged_for_migration_risk() {
        let rua = "rua=mailto:d@example.com";
        let cases = [
            (
                format!("v=DMARC1; p=none; {rua}"),
                "dmarc.policy",
                Severity::Ok,
            ),
            (
                format!("v=DMARC1; p=quarantine; {rua}"),
                "dmarc.policy",
                Severity::Ok,
            ),
            (
                format!("v=DMARC1; p=quarantine; aspf=s; {rua}"),
                "dmarc.policy",
                Severity::Warn,
            ),
            (
                format!("v=DMARC1; p=reject; {rua}"),
                "dmarc.policy",
                Severity::Ok,
            ),
            (
                format!("v=DMARC1; p=reject; {rua}; ruf=mailto:f@example.com; adkim=s; aspf=s"),
                "dmarc.policy",
                Severity::Warn,
            ),
            (
                "v=DMARC1; p=reject".to_string(),
                "dmarc.rua",
                Severity::Warn,
            ),
            (
                "v=DMARC1; p=reject; adkim=x".to_string(),
                "dmarc.syntax",
                Severity::Warn,
            ),
            (
                "v=DMARC1; p=quarantine; pct=25; rua=mailto:a@b.c".to_string(),
                "dmarc.pct",
                Severity::Ok,
            ),
        ];
        for (record, check, want) in cases {
            let f = run(&[&record]);
            assert_eq!(sev(&f, check), Some(want), "{record}: {f:#?}");
        }
    }

    #[test]
    fn strict_reject_carries_the_seed_advice() {
        let f = run(&["v=DMARC1; p=reject; rua=mailto:d@example.com; adkim=s; aspf=s"]);
        let p = f.iter().find(|f| f.check == "dmarc.policy").unwrap();
        assert!(p.meaning.contains("unforgiving during migration"));
        assert!(p.meaning.contains("pct=100") && p.meaning.contains("adkim=strict"));
        assert!(p.action.contains("temporary policy relaxation"));
    }

    #[test]
    fn missing_and_duplicate_records() {
        assert_eq!(sev(&run(&[]), "dmarc.record"), Some(Severity::Warn));
        assert_eq!(
            sev(&run(&["some other txt"]), "dmarc.record"),
            Some(Severity::Warn)
        );
        assert_eq!(
            sev(
                &run(&["v=DMARC1; p=none", "v=DMARC1; p=reject"]),
                "dmarc.record"
            ),
            Some(Severity::Warn)
        );
        assert_eq!(
            sev(&analyze("example.com", &Answer::Void), "dmarc.record"),
            Some(Severity::Warn)
        );
    }

    #[test]
    fn pct_is_read() {
        assert_eq!(pct("v=DMARC1; p=reject; pct=20"), Some(20));
        assert_eq!(pct("v=DMARC1; p=reject"), None);
    }
}
