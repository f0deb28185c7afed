//! `[submission]`: the message submission listener for users and devices
//! (RFC 6409), with SMTP AUTH checked against the platform the user's route
//! names today, or against a passwd-file.
//!
//! ```toml
//! [submission]
//! listen = ["127.0.0.1:2587"]          # STARTTLS, then AUTH PLAIN/LOGIN (RFC 6409)
//! listen_tls = ["127.0.0.1:2465"]      # implicit TLS (RFC 8314)
//! auth = "platform"                    # IMAP LOGIN at the user's platform now; or "file"
//! users_file = "users"                 # auth = "file": Dovecot passwd-file lines
//! allow_plaintext_auth = false         # AUTH without TLS: only for loopback tests
//! sender_restriction = "directory"     # MAIL FROM / header From: own address or aliases; or "none"
//! auth_failure_delay = "2s"            # before a 535 (Dovecot's auth_failure_delay)
//! max_failures_per_ip = 10             # failed AUTHs within failure_window lock the IP out
//! failure_window = "10m"
//! tls_cert = "cert.pem"                # default: smtp.tls_cert / smtp.tls_key
//! tls_key = "key.pem"
//! ```

use super::{ConfigError, de_duration, invalid, ser_duration};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// STARTTLS, then AUTH (RFC 6409, port 587).
    pub listen: Vec<SocketAddr>,
    /// Implicit TLS (RFC 8314, port 465).
    pub listen_tls: Vec<SocketAddr>,
    pub auth: SubmissionAuth,
    /// For `auth = "file"`: `user:{SCHEME}hash[:...]` lines as Dovecot's
    /// passwd-file reads them ({ARGON2ID}, {BLF-CRYPT}, {SHA512-CRYPT}).
    pub users_file: Option<PathBuf>,
    /// AUTH before TLS: only for loopback tests (RFC 4954 4, RFC 8314 3).
    pub allow_plaintext_auth: bool,
    pub sender_restriction: SenderRestriction,
    /// Before a failed AUTH is answered, so guessing is slow.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub auth_failure_delay: Duration,
    /// Failed AUTHs from one IP within failure_window, after which further
    /// attempts are refused without checking the password until they age out.
    pub max_failures_per_ip: u32,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub failure_window: Duration,
    /// The listener's certificate; default: smtp.tls_cert / smtp.tls_key.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Connecting and logging in to a platform's IMAP server (auth = "platform").
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub backend_timeout: Duration,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            listen: Vec::new(),
            listen_tls: Vec::new(),
            auth: SubmissionAuth::Platform,
            users_file: None,
            allow_plaintext_auth: false,
            sender_restriction: SenderRestriction::Directory,
            auth_failure_delay: Duration::from_secs(2),
            max_failures_per_ip: 10,
            failure_window: Duration::from_secs(600),
            tls_cert: None,
            tls_key: None,
            backend_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubmissionAuth {
    /// An IMAP LOGIN at the platform the user's route names now.
    Platform,
    /// `users_file`.
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SenderRestriction {
    /// MAIL FROM and header From must be the user's address or one of its
    /// directory aliases; anything else gets 553 5.7.1.
    Directory,
    /// Any sender (a trusted relay user, e.g. an application account).
    None,
}

impl SubmissionConfig {
    pub fn validate(&self, config: &super::Config) -> Result<(), ConfigError> {
        if self.listen.is_empty() && self.listen_tls.is_empty() {
            return Err(invalid(
                "submission.listen",
                "list at least one address in submission.listen or submission.listen_tls",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                "submission.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        if self.cert(config).is_none() {
            // RFC 8314 3 and RFC 4954 4: passwords need TLS, so the listener needs a certificate.
            let key = if self.listen_tls.is_empty() {
                "submission.listen"
            } else {
                "submission.listen_tls"
            };
            if !self.listen_tls.is_empty() || !self.allow_plaintext_auth {
                return Err(invalid(
                    key,
                    "the submission listener needs a certificate: set submission.tls_cert/tls_key or smtp.tls_cert/tls_key",
                ));
            }
        }
        match (self.auth, &self.users_file) {
            (SubmissionAuth::File, None) => {
                return Err(invalid(
                    "submission.users_file",
                    "auth = \"file\" needs users_file (Dovecot passwd-file lines)",
                ));
            }
            (SubmissionAuth::Platform, Some(_)) => {
                return Err(invalid(
                    "submission.users_file",
                    "is read only with auth = \"file\"",
                ));
            }
            (SubmissionAuth::Platform, None) => {
                if !config.platforms.values().any(|p| p.imap.is_some()) {
                    return Err(invalid(
                        "submission.auth",
                        "auth = \"platform\" needs platforms.NAME.imap on at least one platform",
                    ));
                }
            }
            (SubmissionAuth::File, Some(_)) => {}
        }
        if self.max_failures_per_ip == 0 {
            return Err(invalid(
                "submission.max_failures_per_ip",
                "must be at least 1",
            ));
        }
        if self.failure_window.is_zero() {
            return Err(invalid("submission.failure_window", "must be more than 0s"));
        }
        if self.auth_failure_delay > Duration::from_secs(60) {
            return Err(invalid(
                "submission.auth_failure_delay",
                "must be at most 1m: longer holds sessions open for nothing",
            ));
        }
        Ok(())
    }

    /// The listener's certificate: its own, else the SMTP one.
    pub fn cert(&self, config: &super::Config) -> Option<(PathBuf, PathBuf)> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => Some((config.smtp.tls_cert.clone()?, config.smtp.tls_key.clone()?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(platform: &str, smtp: &str, submission: &str) -> Result<crate::Config, String> {
        let text = format!(
            "[smtp]\nlisten = [\"127.0.0.1:2525\"]\n{smtp}\n[domains]\naccepted = [\"example.com\"]\n[platforms.old]\nrelay = [\"127.0.0.1:2601\"]\n{platform}\n[submission]\n{submission}\n"
        );
        crate::Config::parse(&text).and_then(|c| c.validate().map(|_| c).map_err(|e| e.to_string()))
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let imap = "imap = \"imap://127.0.0.1:1143\"";
        let tls = "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"";
        let ok = check(imap, tls, "listen = [\"127.0.0.1:2587\"]").unwrap();
        let s = ok.submission.as_ref().unwrap();
        assert_eq!(s.auth, SubmissionAuth::Platform);
        assert_eq!(s.sender_restriction, SenderRestriction::Directory);
        assert!(!s.allow_plaintext_auth);
        assert_eq!(s.auth_failure_delay, Duration::from_secs(2));
        assert_eq!(s.cert(&ok).unwrap().0, PathBuf::from("/c.pem"));
        let plaintext = check(
            "",
            "",
            "listen = [\"127.0.0.1:2587\"]\nauth = \"file\"\nusers_file = \"/u\"\nallow_plaintext_auth = true\nsender_restriction = \"none\"",
        )
        .unwrap();
        let s = plaintext.submission.unwrap();
        assert_eq!(s.auth, SubmissionAuth::File);
        assert_eq!(s.sender_restriction, SenderRestriction::None);
        let cases = [
            (imap, tls, "", "submission.listen"),
            (
                imap,
                "",
                "listen = [\"127.0.0.1:2587\"]",
                "submission.listen",
            ),
            (
                imap,
                "",
                "listen_tls = [\"127.0.0.1:2465\"]\nallow_plaintext_auth = true",
                "submission.listen_tls",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\ntls_cert = \"/x\"",
                "submission.tls_cert",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nauth = \"file\"",
                "submission.users_file",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nusers_file = \"/u\"",
                "submission.users_file",
            ),
            ("", tls, "listen = [\"127.0.0.1:2587\"]", "submission.auth"),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nauth = \"ldap\"",
                "auth",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nsender_restriction = \"any\"",
                "sender_restriction",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nmax_failures_per_ip = 0",
                "submission.max_failures_per_ip",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nfailure_window = \"0s\"",
                "submission.failure_window",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nauth_failure_delay = \"5m\"",
                "submission.auth_failure_delay",
            ),
            (
                imap,
                tls,
                "listen = [\"127.0.0.1:2587\"]\nlisten_typo = 1",
                "listen_typo",
            ),
        ];
        for (platform, smtp, sub, key) in cases {
            let err = check(platform, smtp, sub).unwrap_err();
            assert!(
                err.contains(key),
                "{sub}: error `{err}` should name `{key}`"
            );
        }
    }
}
