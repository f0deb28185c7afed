//! The envelope of an accepted transaction, kept whole so that DSN parameters
//! (RFC 3461) and body type reach the next hop unchanged.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    /// BODY=7BIT or 8BITMIME (RFC 6152).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default)]
    pub smtputf8: bool,
    /// RET=FULL or HDRS (RFC 3461 4.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<String>,
    /// ENVID, decoded from xtext (RFC 3461 4.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptParams {
    /// NOTIFY keywords, e.g. ["SUCCESS","FAILURE"] or ["NEVER"] (RFC 3461 4.1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
    /// ORCPT as "addr-type;address", decoded (RFC 3461 4.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse-path without angle brackets; empty for the null sender.
    pub mail_from: String,
    pub mail_params: MailParams,
    pub rcpts: Vec<(String, RcptParams)>,
    pub helo: String,
    pub esmtp: bool,
    pub client_ip: String,
    pub tls: bool,
}

/// RFC 3461 4 xtext encoding, for ORCPT and ENVID on the way out.
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn xtext() {
        assert_eq!(
            super::xtext_encode("rfc822;a+b=c@x y"),
            "rfc822;a+2Bb+3Dc@x+20y"
        );
    }
}
