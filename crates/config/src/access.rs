//! `[access]`: the IMAP/POP3 front that sends each login to the platform the
//! routing map names for that user now, and the autoconfig/autodiscover
//! endpoints that point clients at it.
//!
//! ```toml
//! [access]
//! imap_listen = ["127.0.0.1:2143"]     # STARTTLS offered when smtp.tls_* or access.tls_* are set
//! imaps_listen = ["127.0.0.1:2993"]
//! pop3_listen = ["127.0.0.1:2110"]
//! pop3s_listen = ["127.0.0.1:2995"]
//! allow_plaintext_login = false        # LOGIN/USER before TLS: loopback tests only
//! disconnect_on_move = true
//! public_hostname = "mail.example.com" # what autoconfig tells clients; default: hostname
//! http_listen = ["127.0.0.1:2080"]     # autoconfig / autodiscover
//! submission_port = 587                # named in autoconfig when set
//! ```
//!
//! Each platform names its mailbox servers beside its relay:
//! `imap = "imap://host:143"` (STARTTLS when offered) or `imaps://host:993`,
//! `pop3 = "pop3://host:110"` or `pop3s://host:995`. With
//! `imap_master_user = "admin"` and `imap_master_password = "file:..."` the
//! front checks the client's password with a LOGIN there, then opens the
//! session as `user*admin` (`imap_master_separator`, Dovecot's default `*`).

use super::{ConfigError, de_duration, invalid, ser_duration};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    pub imap_listen: Vec<SocketAddr>,
    pub imaps_listen: Vec<SocketAddr>,
    pub pop3_listen: Vec<SocketAddr>,
    pub pop3s_listen: Vec<SocketAddr>,
    /// LOGIN, AUTHENTICATE PLAIN, USER/PASS before TLS. Off: the front
    /// advertises LOGINDISABLED (RFC 3501 6.2.3) and refuses clear-text
    /// passwords (RFC 2595 3.2), so only loopback tests turn it on.
    pub allow_plaintext_login: bool,
    /// Close a moved user's sessions so the client reconnects to the new platform.
    pub disconnect_on_move: bool,
    /// The name autoconfig gives clients; default: `hostname`.
    pub public_hostname: Option<String>,
    /// Autoconfig (Thunderbird) and autodiscover (Outlook POX).
    pub http_listen: Vec<SocketAddr>,
    /// The submission port autoconfig names (on public_hostname), if any.
    pub submission_port: Option<u16>,
    /// `STARTTLS` (port 587, RFC 6409) or `SSL` (port 465, RFC 8314).
    pub submission_socket: SocketType,
    /// The front's certificate; default: smtp.tls_cert / smtp.tls_key.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Before a failed login is answered (Dovecot's auth_failure_delay).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub login_failure_delay: Duration,
    /// Failed logins from one IP, or for one address, within failure_window
    /// before further attempts are refused without asking a platform.
    pub max_failures_per_ip: u32,
    pub max_failures_per_user: u32,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub failure_window: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Logged-in sessions of one address at once, over all protocols.
    pub max_sessions_per_user: usize,
    /// Inactivity before login is closed. RFC 3501 5.4 and RFC 9051 5.4 want
    /// at least 30 minutes; after login the platform's own timer applies.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Connecting and logging in to a platform's server.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub backend_timeout: Duration,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            imap_listen: Vec::new(),
            imaps_listen: Vec::new(),
            pop3_listen: Vec::new(),
            pop3s_listen: Vec::new(),
            allow_plaintext_login: false,
            disconnect_on_move: true,
            public_hostname: None,
            http_listen: Vec::new(),
            submission_port: None,
            submission_socket: SocketType::Starttls,
            tls_cert: None,
            tls_key: None,
            login_failure_delay: Duration::from_secs(2),
            max_failures_per_ip: 20,
            max_failures_per_user: 10,
            failure_window: Duration::from_secs(300),
            max_connections: 5000,
            max_connections_per_ip: 100,
            max_sessions_per_user: 20,
            idle_timeout: Duration::from_secs(30 * 60),
            backend_timeout: Duration::from_secs(30),
        }
    }
}

/// How a client secures a connection, in autoconfig's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SocketType {
    #[serde(rename = "STARTTLS")]
    Starttls,
    #[serde(rename = "SSL")]
    Ssl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailScheme {
    Imap,
    Imaps,
    Pop3,
    Pop3s,
}

impl MailScheme {
    pub fn implicit_tls(self) -> bool {
        matches!(self, MailScheme::Imaps | MailScheme::Pop3s)
    }
}

/// A platform's mailbox server: `imap://host:port` and friends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailUrl {
    pub scheme: MailScheme,
    pub host: String,
    pub port: u16,
}

impl MailUrl {
    pub fn parse(s: &str) -> Result<MailUrl, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("`{s}` must be a URL like imap://host:143"))?;
        let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "imap" => (MailScheme::Imap, 143),
            "imaps" => (MailScheme::Imaps, 993),
            "pop3" => (MailScheme::Pop3, 110),
            "pop3s" => (MailScheme::Pop3s, 995),
            other => return Err(format!("`{s}`: unknown scheme `{other}`")),
        };
        let hostport = rest.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains(['/', '@', '?']) {
            return Err(format!("`{s}` must be scheme://host[:port]"));
        }
        let (host, port) = if hostport.ends_with(']') || !hostport.contains(':') {
            (hostport.to_string(), default_port)
        } else {
            super::split_host_port(hostport)?
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(MailUrl { scheme, host, port })
    }
}

impl std::fmt::Display for MailUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            MailScheme::Imap => "imap",
            MailScheme::Imaps => "imaps",
            MailScheme::Pop3 => "pop3",
            MailScheme::Pop3s => "pop3s",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for MailUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MailUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MailUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl AccessConfig {
    pub fn validate(&self, config: &super::Config) -> Result<(), ConfigError> {
        if self.idle_timeout < Duration::from_secs(30 * 60) {
            return Err(invalid(
                "access.idle_timeout",
                "must be at least 30m (RFC 3501 5.4, RFC 9051 5.4)",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(invalid(
                "access.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        let tls = self.tls_cert.is_some() || config.smtp.tls_cert.is_some();
        let implicit = !self.imaps_listen.is_empty() || !self.pop3s_listen.is_empty();
        if implicit && !tls {
            return Err(invalid(
                "access.imaps_listen",
                "implicit TLS needs a certificate: set access.tls_cert/tls_key or smtp.tls_cert/tls_key",
            ));
        }
        if self.max_connections == 0
            || self.max_connections_per_ip == 0
            || self.max_sessions_per_user == 0
        {
            return Err(invalid(
                "access.max_connections",
                "limits must be at least 1",
            ));
        }
        if let Some(h) = &self.public_hostname
            && (h.is_empty() || h.contains(char::is_whitespace) || h.contains('/'))
        {
            return Err(invalid("access.public_hostname", "must be a host name"));
        }
        for (name, p) in &config.platforms {
            for (key, url, pop) in [("imap", &p.imap, false), ("pop3", &p.pop3, true)] {
                if let Some(u) = url
                    && matches!(u.scheme, MailScheme::Pop3 | MailScheme::Pop3s) != pop
                {
                    return Err(invalid(
                        format!("platforms.{name}.{key}"),
                        format!("must be a {key}:// or {key}s:// URL"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the front can offer TLS (its own or the SMTP certificate).
    pub fn cert(&self, config: &super::Config) -> Option<(PathBuf, PathBuf)> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => Some((config.smtp.tls_cert.clone()?, config.smtp.tls_key.clone()?)),
        }
    }

    pub fn public_hostname<'a>(&'a self, config: &'a super::Config) -> &'a str {
        self.public_hostname.as_deref().unwrap_or(&config.hostname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_urls() {
        let cases = [
            (
                "imap://127.0.0.1:1143",
                Some((MailScheme::Imap, "127.0.0.1", 1143)),
            ),
            (
                "imaps://mail.example.com",
                Some((MailScheme::Imaps, "mail.example.com", 993)),
            ),
            ("pop3://[::1]:1110", Some((MailScheme::Pop3, "::1", 1110))),
            ("pop3s://h", Some((MailScheme::Pop3s, "h", 995))),
            ("http://h", None),
            ("imap://", None),
            ("imap://u@h:1", None),
            ("127.0.0.1:143", None),
        ];
        for (s, want) in cases {
            let got = MailUrl::parse(s).ok().map(|u| (u.scheme, u.host, u.port));
            let want = want.map(|(a, b, c)| (a, b.to_string(), c));
            assert_eq!(got, want, "{s}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let base = |platform: &str, access: &str| {
            format!(
                "[smtp]\nlisten = [\"127.0.0.1:2525\"]\n[domains]\naccepted = [\"example.com\"]\n[platforms.old]\nrelay = [\"127.0.0.1:2601\"]\n{platform}\n[access]\nimap_listen = [\"127.0.0.1:2143\"]\n{access}\n"
            )
        };
        let check = |text: String| {
            crate::Config::parse(&text)
                .and_then(|c| c.validate().map(|_| c).map_err(|e| e.to_string()))
        };
        let ok = check(base(
            "imap = \"imap://127.0.0.1:1143\"\npop3 = \"pop3s://h\"",
            "",
        ))
        .unwrap();
        let a = ok.access.as_ref().unwrap();
        assert!(a.disconnect_on_move && !a.allow_plaintext_login);
        assert_eq!(a.idle_timeout, Duration::from_secs(1800));
        assert_eq!(ok.platforms["old"].pop3.as_ref().unwrap().port, 995);
        let cases = [
            (base("", "idle_timeout = \"10m\""), "access.idle_timeout"),
            (
                base("", "imaps_listen = [\"127.0.0.1:2993\"]"),
                "access.imaps_listen",
            ),
            (base("", "tls_cert = \"/x.pem\""), "access.tls_cert"),
            (
                base("", "max_sessions_per_user = 0"),
                "access.max_connections",
            ),
            (
                base("", "public_hostname = \"a b\""),
                "access.public_hostname",
            ),
            (base("imap = \"pop3://h:110\"", ""), "platforms.old.imap"),
            (base("pop3 = \"imaps://h\"", ""), "platforms.old.pop3"),
            (base("imap = \"http://h\"", ""), "unknown scheme"),
            (base("", "imap_listen_typo = 1"), "imap_listen_typo"),
        ];
        for (text, key) in cases {
            let err = check(text).unwrap_err();
            assert!(err.contains(key), "error `{err}` should name `{key}`");
        }
    }
}
