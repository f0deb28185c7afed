//! `[journal]`: a copy of every accepted message for the compliance archive,
//! wrapped with its envelope as Exchange journal reports are.
//!
//! ```toml
//! [journal]
//! address = "journal@archive.example.com"   # where journal reports go
//! platform = "archive"                      # optional: default, the routing map
//! ```

use super::{ConfigError, invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// The journal mailbox: one more recipient of every accepted message.
    pub address: String,
    /// The platform journal reports are sent to; absent, the routing map
    /// (or the outbound route) decides for `address` as for any recipient.
    pub platform: Option<String>,
}

impl JournalConfig {
    pub(crate) fn validate(&self, platforms: &[&String]) -> Result<(), ConfigError> {
        let a = self.address.trim();
        let ok = a.rsplit_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && !d.is_empty() && !a.contains(char::is_whitespace)
        });
        if !ok {
            return Err(invalid(
                "journal.address",
                format!("`{}` is not an address (local@domain)", self.address),
            ));
        }
        if let Some(p) = &self.platform
            && !platforms.contains(&p)
        {
            return Err(invalid(
                "journal.platform",
                format!("`{p}` is not a configured platform"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_validation_table() {
        let archive = "archive".to_string();
        let platforms = [&archive];
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            ("journal@archive.example.com", Some("archive"), None),
            ("journal@archive.example.com", None, None),
            ("journal", None, Some("journal.address")),
            ("@archive.example.com", None, Some("journal.address")),
            ("a b@x", None, Some("journal.address")),
            ("journal@x", Some("arkive"), Some("journal.platform")),
        ];
        for (address, platform, want) in cases {
            let j = JournalConfig {
                address: address.to_string(),
                platform: platform.map(String::from),
            };
            match (j.validate(&platforms), want) {
                (Ok(()), None) => {}
                (Err(e), Some(key)) => assert!(e.to_string().contains(key), "{address}: {e}"),
                (got, want) => panic!("{address} {platform:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
