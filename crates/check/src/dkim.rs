//! DKIM keys (RFC 6376 3.6.1) per selector: present, usable, strong enough.

use crate::finding::{Contract, Finding, Severity};
use crate::spf::Answer;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimError;

/// RFC 8301 3.2: verifiers MUST NOT consider signatures from RSA keys shorter
/// than 1024 bits valid; signers SHOULD use at least 2048.
pub const RSA_MIN_BITS: usize = 1024;
pub const RSA_RECOMMENDED_BITS: usize = 2048;

/// Findings for the TXT records at `SELECTOR._domainkey.DOMAIN`.
pub fn analyze(domain: &str, selector: &str, txt: &Answer<Vec<String>>) -> Vec<Finding> {
    let c = Contract::OutboundSending;
    let subject = format!("{selector}._domainkey.{domain}");
    let block = |check: &str, meaning: String, action: &str| {
        vec![Finding::new(
            c,
            check,
            subject.clone(),
            Severity::Block,
            meaning,
            action,
        )]
    };
    let records = match txt {
        Answer::Found(r) if !r.is_empty() => r,
        Answer::Error(e) => {
            return vec![Finding::new(
                c,
                "dkim.key",
                subject.clone(),
                Severity::Warn,
                format!("The DKIM key could not be fetched: {e}."),
                "Check the domain's name servers, then run the check again.",
            )];
        }
        _ => {
            return block(
                "dkim.missing",
                format!(
                    "No DKIM key is published for selector {selector}: every message signed with \
                     it fails DKIM, and under DMARC that leaves only SPF to pass."
                ),
                "Publish the key the platform gives you for this selector before it signs mail.",
            );
        }
    };
    if records.len() > 1 {
        return block(
            "dkim.key",
            format!(
                "{} TXT records at {subject}; RFC 6376 3.6.2.2 makes verification results \
                 undefined with more than one.",
                records.len()
            ),
            "Keep exactly one key record per selector.",
        );
    }
    let text = &records[0];
    match DomainKey::parse(text.as_bytes()) {
        Err(mail_auth::Error::Dkim(DkimError::RevokedPublicKey)) => block(
            "dkim.revoked",
            format!(
                "The key for selector {selector} is revoked (empty p=, RFC 6376 3.6.1): \
                 signatures with it fail."
            ),
            "Sign with a live selector, or publish a new key for this one.",
        ),
        Err(e) => block(
            "dkim.key",
            format!("The key record for selector {selector} does not parse ({e}): \"{text}\"."),
            "Republish the record exactly as the signing platform provides it.",
        ),
        Ok(key) => {
            let bits = key.p.public_key_bits();
            if bits == usize::MAX {
                // mail-auth reports no size for Ed25519 keys (RFC 8463).
                return vec![Finding::new(
                    c,
                    "dkim.key",
                    subject,
                    Severity::Ok,
                    format!(
                        "Selector {selector}: Ed25519 key (RFC 8463). Not every receiver verifies \
                         Ed25519 yet, so sign with an RSA selector too."
                    ),
                    "",
                )];
            }
            if bits == 0 {
                return block(
                    "dkim.key",
                    format!("The RSA key for selector {selector} is not a valid public key."),
                    "Republish the record exactly as the signing platform provides it.",
                );
            }
            if bits < RSA_MIN_BITS {
                return block(
                    "dkim.weak-key",
                    format!(
                        "Selector {selector}: RSA key of {bits} bits. RFC 8301 3.2 forbids \
                         verifiers to accept keys under {RSA_MIN_BITS} bits, so its signatures \
                         count as failed."
                    ),
                    "Publish a 2048-bit key and sign with it before the migration.",
                );
            }
            let note = if bits < RSA_RECOMMENDED_BITS {
                format!(
                    " This meets RFC 8301's minimum; {RSA_RECOMMENDED_BITS} bits is recommended. \
                     Rotate after the migration, not during it."
                )
            } else {
                String::new()
            };
            vec![Finding::new(
                c,
                "dkim.key",
                subject,
                Severity::Ok,
                format!("Selector {selector}: RSA key of {bits} bits.{note}"),
                "",
            )]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A 1024-bit RSA SubjectPublicKeyInfo generated with `openssl genrsa 1024`.
    const RSA1024: &str = "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCysKC5QoOXJCpM+H10aHu0EMVXKkpxXuhq74RAgszWcJd+JTJI9nOBTPqcWOglzdp5zLHt+BBbupu7R7YP3fr2hI4tgkVTPT8eyh8U6mL+C4h97GpX8XSXOTHaXV5fGwBwsEpFg2lNcxja25qYHlNM7X3I6S+Q15RN91HtjsSc2wIDAQAB";

    fn run(records: &[&str]) -> Vec<Finding> {
        analyze(
            "example.com",
            "s1",
            &Answer::Found(records.iter().map(|s| s.to_string()).collect()),
        )
    }

    #[test]
    fn keys_are_judged() {
        let cases = [
            (
                format!("v=DKIM1; k=rsa; p={RSA1024}"),
                "dkim.key",
                Severity::Ok,
                "1024 bits",
            ),
            (
                "v=DKIM1; k=rsa; p=".to_string(),
                "dkim.revoked",
                Severity::Block,
                "revoked",
            ),
            (
                "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".to_string(),
                "dkim.key",
                Severity::Ok,
                "Ed25519",
            ),
            (
                "v=DKIM1; k=rsa; p=AAAA".to_string(),
                "dkim.key",
                Severity::Block,
                "not a valid",
            ),
        ];
        for (record, check, sev, text) in cases {
            let f = run(&[&record]);
            assert_eq!(f.len(), 1, "{record}");
            assert_eq!(
                (f[0].check.as_str(), f[0].severity),
                (check, sev),
                "{record}: {f:?}"
            );
            assert!(f[0].meaning.contains(text), "{record}: {}", f[0].meaning);
        }
        let missing = analyze("example.com", "s1", &Answer::Void);
        assert_eq!(
            (missing[0].check.as_str(), missing[0].severity),
            ("dkim.missing", Severity::Block)
        );
    }
}
