//! The verdict model: every probe and analyzer returns `Finding`s, and the report
//! groups them by the migration contract they threaten.
//!
//! A finding reads like the seed's "Meaning / Decision" pairs: `meaning` says what
//! the observation means for the migration, `action` says what to do about it.

use serde::Serialize;
use std::fmt;

/// The contracts of a mail migration (the seed's list) that preflight can observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Contract {
    /// The internet knows where to deliver (MX) and trusts the path (TLS, MTA-STS).
    InboundDelivery,
    /// Receivers trust what we send (SPF, DKIM, DMARC).
    OutboundSending,
    /// Clients and the sync engine can reach the mailboxes (IMAP).
    MailboxAccess,
}

impl Contract {
    pub fn title(self) -> &'static str {
        match self {
            Contract::InboundDelivery => "Inbound delivery",
            Contract::OutboundSending => "Outbound sending",
            Contract::MailboxAccess => "Mailbox access",
        }
    }
}

/// Ordered so that the worst severity of a set is its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Ok,
    Warn,
    Block,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad(), not write_str(), so that width and alignment apply.
        f.pad(match self {
            Severity::Ok => "OK",
            Severity::Warn => "WARN",
            Severity::Block => "BLOCK",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub contract: Contract,
    /// A stable identifier for scripts and tests, such as `spf.lookup-limit`.
    pub check: String,
    /// What was checked: a domain, `host:port`, a selector, an IMAP URL.
    pub subject: String,
    pub severity: Severity,
    /// What the observation means for the migration.
    pub meaning: String,
    /// What to do next; empty when nothing needs doing.
    pub action: String,
}

impl Finding {
    pub fn new(
        contract: Contract,
        check: &str,
        subject: impl Into<String>,
        severity: Severity,
        meaning: impl Into<String>,
        action: impl Into<String>,
    ) -> Self {
        Finding {
            contract,
            check: check.to_string(),
            subject: subject.into(),
            severity,
            meaning: meaning.into(),
            action: action.into(),
        }
    }
}

/// All findings of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn extend(&mut self, findings: impl IntoIterator<Item = Finding>) {
        self.findings.extend(findings);
    }

    pub fn worst(&self) -> Severity {
        self.findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok)
    }

    /// 0 when nothing blocks and nothing warns, 1 for warnings only, 2 when
    /// something blocks: the contract scripts rely on.
    pub fn exit_code(&self) -> i32 {
        match self.worst() {
            Severity::Ok => 0,
            Severity::Warn => 1,
            Severity::Block => 2,
        }
    }

    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// Human output: grouped by contract, each finding with its meaning and the
    /// action, then a one-line summary table per contract.
    pub fn render_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for contract in [
            Contract::InboundDelivery,
            Contract::OutboundSending,
            Contract::MailboxAccess,
        ] {
            let group: Vec<&Finding> = self
                .findings
                .iter()
                .filter(|f| f.contract == contract)
                .collect();
            if group.is_empty() {
                continue;
            }
            let _ = writeln!(out, "== {} ==", contract.title());
            for f in group {
                let _ = writeln!(out, "[{:<5}] {} ({})", f.severity, f.check, f.subject);
                for (i, line) in f.meaning.lines().enumerate() {
                    let label = if i == 0 { "Meaning: " } else { "         " };
                    let _ = writeln!(out, "        {label}{line}");
                }
                if !f.action.is_empty() {
                    let _ = writeln!(out, "        Decision: {}", f.action);
                }
            }
            out.push('\n');
        }
        out.push_str(&self.render_summary());
        out
    }

    pub fn render_summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<18} {:>4} {:>5} {:>6}",
            "contract", "OK", "WARN", "BLOCK"
        );
        for contract in [
            Contract::InboundDelivery,
            Contract::OutboundSending,
            Contract::MailboxAccess,
        ] {
            let n = |s| {
                self.findings
                    .iter()
                    .filter(|f| f.contract == contract && f.severity == s)
                    .count()
            };
            if n(Severity::Ok) + n(Severity::Warn) + n(Severity::Block) == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{:<18} {:>4} {:>5} {:>6}",
                contract.title(),
                n(Severity::Ok),
                n(Severity::Warn),
                n(Severity::Block)
            );
        }
        for (sev, label) in [(Severity::Block, "blocking"), (Severity::Warn, "warnings")] {
            let items: Vec<String> = self
                .findings
                .iter()
                .filter(|f| f.severity == sev)
                .map(|f| format!("{} ({})", f.check, f.subject))
                .collect();
            if !items.is_empty() {
                let _ = writeln!(out, "{label}:");
                for item in items {
                    let _ = writeln!(out, "  - {item}");
                }
            }
        }
        let verdict = match self.worst() {
            Severity::Ok => "nothing blocks the cutover",
            Severity::Warn => "warnings only: read them before the cutover",
            Severity::Block => "something blocks the cutover: fix the BLOCK findings first",
        };
        let _ = writeln!(out, "verdict: {verdict} (exit {})", self.exit_code());
        out
    }

    pub fn render_json(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            verdict: Severity,
            exit_code: i32,
            findings: &'a [Finding],
        }
        serde_json::to_string_pretty(&Out {
            verdict: self.worst(),
            exit_code: self.exit_code(),
            findings: &self.findings,
        })
        .expect("findings serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(sev: Severity) -> Finding {
        Finding::new(Contract::InboundDelivery, "x", "s", sev, "m", "")
    }

    #[test]
    fn exit_code_follows_the_worst_finding() {
        let cases = [
            (vec![], 0),
            (vec![Severity::Ok], 0),
            (vec![Severity::Ok, Severity::Warn], 1),
            (vec![Severity::Warn, Severity::Block, Severity::Ok], 2),
        ];
        for (sevs, code) in cases {
            let mut r = Report::default();
            r.extend(sevs.iter().map(|s| f(*s)));
            assert_eq!(r.exit_code(), code, "{sevs:?}");
        }
    }

    #[test]
    fn text_output_groups_by_contract_and_json_parses() {
        let mut r = Report::default();
        r.extend([
            Finding::new(
                Contract::OutboundSending,
                "spf.all",
                "example.com",
                Severity::Warn,
                "m1",
                "a1",
            ),
            Finding::new(
                Contract::InboundDelivery,
                "mx",
                "example.com",
                Severity::Ok,
                "m2",
                "",
            ),
        ]);
        let text = r.render_text();
        let inbound = text.find("== Inbound delivery ==").unwrap();
        let outbound = text.find("== Outbound sending ==").unwrap();
        assert!(inbound < outbound);
        assert!(text.contains("Decision: a1"));
        let v: serde_json::Value = serde_json::from_str(&r.render_json()).unwrap();
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["findings"][0]["severity"], "WARN");
        assert_eq!(v["findings"][0]["contract"], "outbound_sending");
    }
}
