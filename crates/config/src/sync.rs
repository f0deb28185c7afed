//! `[sync]`: IMAP-to-IMAP mailbox sync (`godwit sync`, `godwit verify`).
//!
//! ```toml
//! [sync]
//! accounts = "accounts.csv"   # address,source_user,source_password,target_user,target_password
//! max_connections_per_server = 8
//! max_bytes_per_second = "20MB"
//! [sync.source]
//! url = "imap://old-imap.example.com:143"
//! master_user = "admin"
//! master_password = "env:GODWIT_SOURCE_MASTER_PASSWORD"
//! [sync.target]
//! url = "imaps://outlook.office365.com:993"
//! [sync.folders]               # explicit mappings override special-use and name rules
//! "Old Stuff" = "Archive/Old Stuff"
//! ```
//!
//! OAuth 2.0 (Microsoft 365, Google Workspace), per-account servers, ACLs and
//! the watch loop:
//!
//! ```toml
//! [sync]
//! accounts = "accounts.csv"   # optional extra columns: source_url,target_url
//! acls = true                 # copy folder ACLs where both servers offer ACL (RFC 4314)
//! watch_interval = "10m"      # godwit sync --watch
//! lease = "30s"               # a dead worker's accounts go to another after this
//! command_timeout = "60s"     # every command and every read of its answer
//! max_message_size = "150MB"  # one response holds at most this plus 1 MiB
//! [sync.target]
//! url = "imaps://outlook.office365.com:993"
//! auth = "xoauth2"            # "login" (default) | "plain" | "xoauth2" | "oauthbearer"
//! token_url = "https://login.example/tenant/oauth2/v2.0/token"
//! client_id = "..."
//! client_secret = "env:GODWIT_TARGET_CLIENT_SECRET"
//! scope = "https://outlook.office365.com/.default"
//! # or: token_command = ["/usr/local/bin/token-for", "{address}"]
//! ```
//!
//! A file with only these sections loads: `godwit sync` and `verify` need
//! nothing of the gateway's (`Config::require_sync`).
//!
//! Every password (in the CSV or here) may be a literal, `env:NAME` or `file:PATH`.

use super::{ConfigError, de_duration, invalid, ser_duration};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// CSV: `address,source_user,source_password,target_user,target_password`.
    pub accounts: PathBuf,
    /// Connections to one server, in total across all accounts (protects the source).
    pub max_connections_per_server: usize,
    /// Bytes per second read from the source, per server; none means unlimited.
    #[serde(
        deserialize_with = "de_opt_size",
        serialize_with = "super::ser_opt_size"
    )]
    pub max_bytes_per_second: Option<u64>,
    /// Accounts synced at the same time.
    pub parallel_accounts: usize,
    /// Folders synced at once per account, each over its own connection pair
    /// (opened only while max_connections_per_server has room).
    pub parallel_folders: usize,
    /// Messages per UID FETCH batch.
    pub fetch_batch: usize,
    /// Every command's answer, and every read of it: a server silent this
    /// long fails the connection (and the account, after max_reconnects).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub command_timeout: Duration,
    /// The largest message expected; one server response may hold this plus
    /// a margin, and a larger one (a hostile or broken server announcing a
    /// 2 GB literal) fails the connection before it is buffered.
    #[serde(
        deserialize_with = "super::de_size",
        serialize_with = "super::ser_size"
    )]
    pub max_message_size: u64,
    /// `godwit sync --watch`: a delta again this long after the last one ended.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub watch_interval: Duration,
    /// Reconnect attempts after a dropped connection before the account fails.
    pub max_reconnects: u32,
    /// How long an account lease (and a fleet connection slot) outlives its
    /// worker's last heartbeat: a worker that dies loses its accounts after
    /// this, and another resumes them (issue 17).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub lease: Duration,
    pub source: SyncServerConfig,
    pub target: SyncServerConfig,
    /// Source folder name (Unicode, source separator) → target folder name
    /// (Unicode, target separator). Overrides special-use and localized names.
    pub folders: BTreeMap<String, String>,
    /// Source folders (Unicode) not synced, with their children.
    pub exclude: Vec<String>,
    /// Copy folder ACLs where both servers advertise ACL (RFC 4314), with
    /// delegates mapped to their target users; verify then compares them.
    pub acls: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            accounts: PathBuf::from("accounts.csv"),
            max_connections_per_server: 8,
            max_bytes_per_second: None,
            parallel_accounts: 4,
            parallel_folders: 4,
            fetch_batch: 200,
            command_timeout: Duration::from_secs(300),
            // Exchange Online's largest message.
            max_message_size: 150_000_000,
            watch_interval: Duration::from_secs(600),
            max_reconnects: 5,
            lease: Duration::from_secs(30),
            source: SyncServerConfig::default(),
            target: SyncServerConfig::default(),
            folders: BTreeMap::new(),
            exclude: Vec::new(),
            acls: false,
        }
    }
}

#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncServerConfig {
    /// `imaps://host:993` (implicit TLS) or `imap://host:143` (STARTTLS when offered).
    pub url: String,
    /// Log in as `user*master` (Dovecot style) with the master's password.
    pub master_user: Option<String>,
    /// Literal, `env:NAME` or `file:PATH`.
    pub master_password: Option<String>,
    /// Accept any certificate (test servers with self-signed certificates).
    pub tls_insecure: bool,
    /// Personal namespace prefix such as `INBOX.`; detected when absent.
    pub namespace_prefix: Option<String>,
    /// "login" (default), "plain" (SASL PLAIN, RFC 4616), "xoauth2" or
    /// "oauthbearer" (RFC 7628): the last two with an OAuth 2.0 access token
    /// from `token_url` or `token_command`.
    pub auth: String,
    /// Client-credentials grant (RFC 6749 4.4) endpoint.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    /// Literal, `env:NAME` or `file:PATH`.
    pub client_secret: Option<String>,
    pub scope: Option<String>,
    /// A command printing an access token on stdout; `{address}` in any
    /// argument is replaced by the account's address.
    pub token_command: Option<Vec<String>>,
}

pub const SYNC_AUTH: [&str; 4] = ["login", "plain", "xoauth2", "oauthbearer"];

/// Debug without the master password (a literal one would otherwise be printed).
impl std::fmt::Debug for SyncServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServerConfig")
            .field("url", &self.url)
            .field("master_user", &self.master_user)
            .field(
                "master_password",
                &self.master_password.as_ref().map(|_| "(hidden)"),
            )
            .field("tls_insecure", &self.tls_insecure)
            .field("namespace_prefix", &self.namespace_prefix)
            .field("auth", &self.auth)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "(hidden)"),
            )
            .field("scope", &self.scope)
            .field("token_command", &self.token_command)
            .finish()
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    super::de_size(d).map(Some)
}

impl SyncConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, server) in [("sync.source", &self.source), ("sync.target", &self.target)] {
            let url = server.url.as_str();
            if url.is_empty() {
                return Err(super::missing(
                    key,
                    format!("[sync] needs [{key}] with url = \"imaps://host:993\""),
                ));
            }
            let Some(rest) = url
                .strip_prefix("imaps://")
                .or_else(|| url.strip_prefix("imap://"))
            else {
                return Err(invalid(
                    format!("{key}.url"),
                    "must be imap://host[:port] or imaps://host[:port]",
                ));
            };
            let host = rest.trim_end_matches('/');
            if host.is_empty() || host.contains(['/', '@', ' ']) {
                return Err(invalid(
                    format!("{key}.url"),
                    format!("`{url}` has no valid host"),
                ));
            }
            let auth = if server.auth.is_empty() {
                "login"
            } else {
                server.auth.as_str()
            };
            if !SYNC_AUTH.contains(&auth) {
                return Err(invalid(
                    format!("{key}.auth"),
                    format!("`{auth}`: expected one of {}", SYNC_AUTH.join(", ")),
                ));
            }
            let oauth = matches!(auth, "xoauth2" | "oauthbearer");
            let grant = server.token_url.is_some();
            if oauth && grant == server.token_command.is_some() {
                return Err(invalid(
                    format!("{key}.token_url"),
                    format!(
                        "auth = \"{auth}\" needs exactly one of token_url (with client_id and client_secret) or token_command"
                    ),
                ));
            }
            if !oauth && (grant || server.token_command.is_some()) {
                return Err(invalid(
                    format!("{key}.auth"),
                    "token_url and token_command need auth = \"xoauth2\" or \"oauthbearer\"",
                ));
            }
            if grant && (server.client_id.is_none() || server.client_secret.is_none()) {
                return Err(invalid(
                    format!("{key}.client_id"),
                    "token_url needs client_id and client_secret (RFC 6749 2.3.1)",
                ));
            }
            if let Some(u) = &server.token_url
                && !(u.starts_with("https://") || u.starts_with("http://"))
            {
                return Err(invalid(
                    format!("{key}.token_url"),
                    format!("`{u}` is not an http(s):// URL"),
                ));
            }
            if server.token_command.as_ref().is_some_and(Vec::is_empty) {
                return Err(invalid(
                    format!("{key}.token_command"),
                    "must name a program, e.g. [\"/usr/local/bin/token-for\", \"{address}\"]",
                ));
            }
            if server.master_user.is_some() != server.master_password.is_some() {
                return Err(invalid(
                    format!("{key}.master_password"),
                    "master_user and master_password must be set together",
                ));
            }
        }
        if self.accounts.as_os_str().is_empty() {
            return Err(invalid("sync.accounts", "must name the accounts CSV file"));
        }
        if self.max_connections_per_server == 0 {
            return Err(invalid(
                "sync.max_connections_per_server",
                "must be at least 1",
            ));
        }
        if self.parallel_accounts == 0 {
            return Err(invalid("sync.parallel_accounts", "must be at least 1"));
        }
        if self.parallel_folders == 0 {
            return Err(invalid("sync.parallel_folders", "must be at least 1"));
        }
        if self.max_message_size < 1_000_000 {
            return Err(invalid("sync.max_message_size", "must be at least 1MB"));
        }
        if self.watch_interval.is_zero() {
            return Err(invalid("sync.watch_interval", "must be above zero"));
        }
        if self.lease < Duration::from_secs(1) {
            return Err(invalid("sync.lease", "must be at least 1s"));
        }
        if self.fetch_batch == 0 {
            return Err(invalid("sync.fetch_batch", "must be at least 1"));
        }
        if self.max_bytes_per_second == Some(0) {
            return Err(invalid(
                "sync.max_bytes_per_second",
                "must be above zero (omit it for no limit)",
            ));
        }
        for (from, to) in &self.folders {
            if from.is_empty() || to.is_empty() {
                return Err(invalid(
                    format!("sync.folders.{from}"),
                    "folder names must not be empty",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const BASE: &str =
        "[domains]\naccepted=[\"example.com\"]\n[platforms.old]\nrelay=[\"127.0.0.1:2601\"]\n";

    #[test]
    fn parses_and_validates() {
        let text = format!(
            "{BASE}[sync]\naccounts=\"a.csv\"\nmax_bytes_per_second=\"20MB\"\n[sync.source]\nurl=\"imap://old:143\"\n\
             master_user=\"admin\"\nmaster_password=\"env:X\"\n[sync.target]\nurl=\"imaps://new:993\"\n\
             [sync.folders]\n\"Old\"=\"Archive/Old\"\n"
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        let s = c.sync.unwrap();
        assert_eq!(s.max_bytes_per_second, Some(20_000_000));
        assert_eq!(s.max_connections_per_server, 8);
        assert_eq!(s.folders["Old"], "Archive/Old");
        let shown = format!(
            "{:?}",
            Config::parse(&text.replace("env:X", "hunter2")).unwrap()
        );
        assert!(!shown.contains("hunter2"), "master password printed");
        let oauth = text.replace(
            "master_user=\"admin\"\nmaster_password=\"env:X\"\n",
            "auth=\"xoauth2\"\ntoken_url=\"https://login.example/t/token\"\nclient_id=\"app\"\n\
             client_secret=\"hunter2\"\nscope=\"https://outlook.office365.com/.default\"\n",
        );
        let c = Config::parse(&oauth).unwrap();
        c.validate().unwrap();
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "client secret printed"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[sync.source]\nurl=\"http://x\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.source.url",
            ),
            (
                "[sync]\nmax_connections_per_server=0\n[sync.source]\nurl=\"imap://x\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.max_connections_per_server",
            ),
            (
                "[sync.source]\nurl=\"imap://x\"\nmaster_user=\"a\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.source.master_password",
            ),
            (
                "[sync.source]\nurl=\"imap://x\"\nauth=\"kerberos\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.source.auth",
            ),
            (
                "[sync.source]\nurl=\"imap://x\"\nauth=\"xoauth2\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.source.token_url",
            ),
            (
                "[sync.source]\nurl=\"imap://x\"\nauth=\"xoauth2\"\ntoken_url=\"https://t/token\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.source.client_id",
            ),
            (
                "[sync.source]\nurl=\"imap://x\"\ntoken_command=[\"t\"]\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.source.auth",
            ),
            (
                "[sync]\nwatch_interval=\"0s\"\n[sync.source]\nurl=\"imap://x\"\n[sync.target]\nurl=\"imap://y\"\n",
                "sync.watch_interval",
            ),
        ];
        for (text, key) in cases {
            let c = Config::parse(&format!("{BASE}{text}")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        }
        assert!(Config::parse(&format!("{BASE}[sync]\nbogus=1\n")).is_err());
    }
}
