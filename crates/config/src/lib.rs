//! godwit's one configuration file.
//!
//! Every key has its default here, in one place, and `Config::validate` names the
//! key when a value is wrong. Unknown keys are errors, so a typo never silently
//! falls back to a default. Durations are human-readable ("5m", "1h 30m", "5d");
//! sizes are "50MB" (decimal: 1 MB = 1,000,000 bytes) or "50MiB" (binary).

mod access;
mod journal;
mod outbound;
mod submission;
mod sync;
pub use access::*;
pub use journal::*;
pub use outbound::*;
pub use submission::*;
pub use sync::*;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The reason is in the message and not a `source`: printed with its
    /// chain (`{:#}`), it would otherwise show twice.
    #[error("cannot read configuration file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// A section the command needs is absent (a sync-only file for the
    /// gateway, a gateway-only file for `godwit sync`).
    #[error("configuration section [{section}] is missing: {message}")]
    Missing { section: String, message: String },
}

fn missing(section: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Missing {
        section: section.into(),
        message: message.into(),
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole file. See `examples/godwit.toml` for a commented copy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Used in the banner, in Received headers and for loop detection.
    pub hostname: String,
    /// This node's name in a fleet sharing one `[store]`: heartbeats, the
    /// `node` of every event, `fleet status`, sync leases and `spool adopt`.
    /// Default: `hostname` (itself the machine's host name by default). Two
    /// nodes on one store must not share it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Spool and embedded state live here.
    pub data_dir: PathBuf,
    pub smtp: SmtpConfig,
    pub domains: DomainsConfig,
    pub platforms: BTreeMap<String, PlatformConfig>,
    pub routing: RoutingConfig,
    pub queue: QueueConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub events: EventsConfig,
    pub sync: Option<SyncConfig>,
    pub directory: DirectoryConfig,
    /// The IMAP/POP3 front and autoconfig; off when absent.
    pub access: Option<AccessConfig>,
    /// The relay port and delivery to the internet; off when absent.
    pub outbound: Option<OutboundConfig>,
    /// DKIM keys, one per signing domain.
    pub dkim: Vec<DkimConfig>,
    /// The SMTP submission listener with AUTH; off when absent.
    pub submission: Option<SubmissionConfig>,
    /// A journal report of every accepted message; off when absent.
    pub journal: Option<JournalConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: default_hostname(),
            node_name: None,
            data_dir: PathBuf::from("./godwit-data"),
            smtp: SmtpConfig::default(),
            domains: DomainsConfig::default(),
            platforms: BTreeMap::new(),
            routing: RoutingConfig::default(),
            queue: QueueConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            events: EventsConfig::default(),
            sync: None,
            directory: DirectoryConfig::default(),
            access: None,
            outbound: None,
            dkim: Vec::new(),
            submission: None,
            journal: None,
        }
    }
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareNewline {
    /// Refuse the whole message (550 5.5.2), as Postfix 3.9 `smtpd_forbid_bare_newline = yes`.
    Reject,
    /// Accept it, but rewrite each bare CR or LF as CRLF and strip NUL, so the
    /// next hop never sees anything it could read as the end of DATA.
    Normalize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_message_size: u64,
    /// Message content all sessions may hold in memory at once while they
    /// receive DATA. Past it, the DATA that would go over is read to its end
    /// and answered 452 4.3.1 (try again later), so a flood of large
    /// messages cannot exhaust memory. At least max_message_size.
    #[serde(deserialize_with = "de_size", serialize_with = "ser_size")]
    pub max_data_memory: u64,
    /// RFC 5321 4.5.3.1.8 requires at least 100; more than this gets 452 4.5.3.
    pub max_recipients: usize,
    /// RFC 5321 4.5.3.1.4 sets 512 octets; extensions (SIZE, DSN) legitimately
    /// lengthen MAIL and RCPT, so the default follows Postfix's 2048.
    pub max_command_line: usize,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub command_timeout: Duration,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Wait this long before the greeting; a client that talks first is an
    /// early talker and is refused (554 5.5.1). "0s" disables the wait.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub greeting_delay: Duration,
    /// Commands that fail in one session before it is closed (421 4.7.0).
    pub max_errors: usize,
    pub bare_newline: BareNewline,
    /// More Received headers than this is a mail loop (RFC 5321 6.3): 554 5.4.6.
    pub max_received_headers: usize,
    /// A message arriving with more `X-Godwit-Trace` headers than this (it
    /// has passed through godwit that often) is a routing loop: held, never
    /// bounced or relayed again, with a `message.loop` event.
    pub max_trace_hops: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["0.0.0.0:25".parse().unwrap()],
            max_message_size: 50_000_000,
            max_data_memory: 1_000_000_000,
            max_recipients: 1000,
            max_command_line: 2048,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            max_connections: 1000,
            max_connections_per_ip: 100,
            greeting_delay: Duration::ZERO,
            max_errors: 20,
            bare_newline: BareNewline::Reject,
            max_received_headers: 50,
            max_trace_hops: 3,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainsConfig {
    /// Mail is accepted only for these domains (and never relayed elsewhere).
    pub accepted: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, without requiring a valid certificate
    /// (Postfix's `may`): encryption against passive listening, with the
    /// verification result recorded in the delivery event. Clear text when
    /// not offered.
    #[default]
    Opportunistic,
    /// STARTTLS with a certificate that verifies against `tls_ca` (or the
    /// public roots) for the relay host's name (Postfix's `verify`/`secure`).
    Verify,
    /// Defer rather than send in clear text; the certificate is verified
    /// unless `tls_insecure`.
    Require,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformConfig {
    /// "host:port" entries, tried in order.
    pub relay: Vec<String>,
    pub tls: TlsPolicy,
    /// Accept any certificate (test platforms with self-signed certificates).
    pub tls_insecure: bool,
    /// PEM file of the CA certificates that `verify` and `require` trust for
    /// this platform (an on-premises platform with an internal CA); default:
    /// the public webpki roots.
    pub tls_ca: Option<PathBuf>,
    /// Simultaneous connections to this platform at most: the ceiling of the
    /// adaptive concurrency limit.
    pub max_connections: usize,
    /// Where the adaptive limit starts: low, growing while deliveries succeed.
    pub initial_connections: usize,
    /// Messages per second to this platform at most (0 = unlimited).
    pub max_rate: f64,
    /// Consecutive connection failures or throttling replies that open the
    /// circuit breaker: the platform is marked down and mail for it waits.
    pub breaker_failures: u32,
    /// How long the platform stays down before one probe delivery is tried;
    /// doubles on each failed probe, up to 16 times this.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub breaker_cooldown: Duration,
    /// Messages delivered over one connection before it is closed.
    pub max_messages_per_connection: usize,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub command_timeout: Duration,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub data_timeout: Duration,
    /// Its IMAP server, for the access front: `imap://` (STARTTLS when
    /// offered) or `imaps://`.
    pub imap: Option<MailUrl>,
    /// Its POP3 server: `pop3://` (STLS when offered) or `pop3s://`.
    pub pop3: Option<MailUrl>,
    /// The platform's smarthost for outbound mail ("host:port", tried in
    /// order), when `outbound.route` or a sender's outbound route names it.
    pub outbound_relay: Vec<String>,
    /// SMTP AUTH (RFC 4954) towards outbound_relay.
    pub outbound_user: Option<String>,
    /// Literal, `env:NAME` or `file:PATH`; or outbound_password_file.
    pub outbound_password: Option<SecretRef>,
    pub outbound_password_file: Option<PathBuf>,
    pub outbound_tls: TlsPolicy,
    /// The access front opens IMAP sessions here as this master user
    /// (Dovecot's `user*master`, `auth_master_user_separator`), after it has
    /// checked the client's own password with a LOGIN at this platform. The
    /// platform's logs then show the front's sessions as master logins.
    pub imap_master_user: Option<String>,
    /// Literal, `env:NAME` or `file:PATH`; required with imap_master_user.
    pub imap_master_password: Option<SecretRef>,
    /// Between the user and the master user's name.
    pub imap_master_separator: String,
}

/// A password reference in the configuration: a literal, `env:NAME` or
/// `file:PATH`, resolved by [`secret`] when used. Debug never prints a literal.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct SecretRef(pub String);

impl std::fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.starts_with("env:") || self.0.starts_with("file:") {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("\"(hidden)\"")
        }
    }
}

impl SecretRef {
    /// The secret's value; `context` (the key) names it in the error.
    pub fn resolve(&self, context: &str) -> Result<String, String> {
        secret(&self.0, context)
    }
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            relay: Vec::new(),
            tls: TlsPolicy::default(),
            tls_insecure: false,
            tls_ca: None,
            max_connections: 20,
            initial_connections: 4,
            max_rate: 0.0,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            max_messages_per_connection: 100,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            imap: None,
            pop3: None,
            outbound_relay: Vec::new(),
            outbound_user: None,
            outbound_password: None,
            outbound_password_file: None,
            outbound_tls: TlsPolicy::Require,
            imap_master_user: None,
            imap_master_password: None,
            imap_master_separator: "*".into(),
        }
    }
}

/// The platform names a route may carry besides the configured platforms.
pub const ROUTE_HOLD: &str = "hold";
pub const ROUTE_BOTH: &str = "both";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Route for recipients of accepted domains that no entry names.
    pub default: String,
    /// Per-domain defaults, overriding `default`.
    pub domains: BTreeMap<String, String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            default: "old".into(),
            domains: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub max_lifetime: Duration,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub min_backoff: Duration,
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub max_backoff: Duration,
    /// Turn every 5xx from a platform into a deferral (Postfix `soft_bounce`).
    /// On by default: during a cutover a delay is survivable and a bounce is not.
    pub soft_bounce: bool,
    /// How often the scheduler looks for due deliveries and routing changes.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub scan_interval: Duration,
    /// Send a delay warning (RFC 3464, action=delayed) once a recipient has
    /// waited this long; off when absent, as in Postfix.
    #[serde(
        default,
        deserialize_with = "de_opt_duration",
        serialize_with = "ser_opt_duration"
    )]
    pub delay_warning: Option<Duration>,
    /// The platform that carries DSNs to senders (it acts as the smarthost for
    /// mail leaving the organisation). Default: `routing.default` when it is a
    /// platform, else the first platform by name.
    pub dsn_platform: Option<String>,
    /// Attempts that may wait for a connection slot per platform (KumoMTA's
    /// `max_ready`). Past it, a due message stays parked in the scheduled
    /// queue and costs no task and no memory for its body until a slot frees.
    pub max_ready: usize,
    /// `wave cutover` refuses while the oldest queued message is older than
    /// this (or a platform's circuit is open): "if queue growth correlates
    /// with a wave cutover, pause migrations". `--force` overrides.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub wave_pause_age: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_lifetime: Duration::from_secs(5 * 86400),
            min_backoff: Duration::from_secs(300),
            max_backoff: Duration::from_secs(3600),
            soft_bounce: true,
            scan_interval: Duration::from_millis(250),
            delay_warning: None,
            dsn_platform: None,
            max_ready: 1000,
            wave_pause_age: Duration::from_secs(30 * 60),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "sqlite://PATH" or "postgres://..."; empty means `data_dir/state.db`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter for stderr, e.g. "info" or "godwit=debug".
    pub level: String,
    /// stderr format: "text" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// What happens to a recipient in an accepted domain that the imported
/// directory does not know. Applies only once a directory has been imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRecipient {
    /// Refuse at RCPT with 550 5.1.1, as Postfix's `relay_recipient_maps`.
    Reject,
    /// Accept and route by the domain or global default (no directory check).
    #[default]
    Default,
    /// Accept and keep in the queue (route `hold`) until someone decides.
    Hold,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectoryConfig {
    /// Policy for unknown recipients: "reject", "default" or "hold".
    /// Default "default", so importing a directory never starts refusing mail
    /// until the administrator asks for it.
    pub unknown_recipient: UnknownRecipient,
    /// The platform mailboxes move to at cutover. Unset means `new`; a
    /// cutover then fails with an error naming this key if no platform is
    /// called `new`.
    pub target_platform: Option<String>,
    /// Expand groups (distribution lists) in the gateway, as Postfix's
    /// virtual_alias_maps does, so each member is routed where that member
    /// is now. Default false: a group's own route decides which platform
    /// expands it.
    pub expand_groups: bool,
    /// Most addresses one recipient may expand to (nested groups included),
    /// as Postfix's virtual_alias_expansion_limit. A larger group is not
    /// expanded: it goes to its own route, whose platform expands it.
    pub expansion_limit: usize,
    /// `wave cutover` admits a synced mailbox only if its last clean verify
    /// is at most this old (and came after its last sync run).
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub max_verify_age: Duration,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            unknown_recipient: UnknownRecipient::Default,
            target_platform: None,
            expand_groups: false,
            expansion_limit: 1000,
            max_verify_age: Duration::from_secs(86400),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Metrics, dashboard and its API. Loopback unless a token is set.
    pub listen: Option<SocketAddr>,
    /// Required as `Authorization: Bearer TOKEN` (or `?token=`) when set.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some("127.0.0.1:8025".parse().unwrap()),
            token: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events (the index and the JSON-lines files) older than this are pruned.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub retention: Duration,
    /// Also write Postfix-style log lines here (for pflogsumm and grep habits).
    pub postfix_log: Option<PathBuf>,
    /// Records the event readers (log writer, index) may fall behind before
    /// new mail and new attempts wait for them, up to 1 s each: Postfix's
    /// in_flow_delay, so a fill's memory stays bounded. About 1 KB each.
    pub max_lag: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            retention: Duration::from_secs(90 * 86400),
            postfix_log: None,
            max_lag: 30_000,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.normalize();
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate()?;
        Ok(config)
    }

    /// Parses without validating; the error text names the offending key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn normalize(&mut self) {
        for d in &mut self.domains.accepted {
            *d = d.trim().trim_end_matches('.').to_ascii_lowercase();
        }
        self.routing.domains = std::mem::take(&mut self.routing.domains)
            .into_iter()
            .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v))
            .collect();
    }

    /// Relative paths in the file are relative to the file's folder, as in
    /// Postfix's main.cf, so `godwit queue list --config ../godwit.toml`
    /// reads the same queue wherever it runs from.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                let rel = p.strip_prefix(".").unwrap_or(p).to_path_buf();
                *p = base.join(rel);
            }
        };
        fix(&mut self.data_dir);
        for p in [&mut self.smtp.tls_cert, &mut self.smtp.tls_key] {
            if let Some(p) = p.as_mut() {
                fix(p);
            }
        }
        if let Some(p) = self.events.postfix_log.as_mut() {
            fix(p);
        }
        for k in &mut self.dkim {
            fix(&mut k.key);
        }
        for p in self.platforms.values_mut() {
            if let Some(f) = p.outbound_password_file.as_mut() {
                fix(f);
            }
        }
        if let Some(s) = self.submission.as_mut() {
            for p in [&mut s.users_file, &mut s.tls_cert, &mut s.tls_key] {
                if let Some(p) = p.as_mut() {
                    fix(p);
                }
            }
        }
        if let Some(sync) = self.sync.as_mut() {
            fix(&mut sync.accounts);
        }
        if let Some(url) = &self.store.url
            && let Some(rest) = url.strip_prefix("sqlite://")
            && !rest.starts_with('/')
            && !rest.starts_with(":memory:")
        {
            let rest = rest.strip_prefix("./").unwrap_or(rest);
            self.store.url = Some(format!("sqlite://{}", base.join(rest).display()));
        }
    }

    /// Whether `route` names a configured platform or a built-in route.
    pub fn is_route_name(&self, route: &str) -> bool {
        route == ROUTE_HOLD || route == ROUTE_BOTH || self.platforms.contains_key(route)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hostname.trim().is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err(invalid("hostname", "must be a host name without spaces"));
        }
        if let Some(n) = &self.node_name
            && (n.trim().is_empty() || n.contains(char::is_whitespace))
        {
            return Err(invalid(
                "node_name",
                "must be a name without spaces (or leave it out to use hostname)",
            ));
        }
        if self.smtp.listen.is_empty() {
            return Err(invalid("smtp.listen", "must list at least one address"));
        }
        if self.smtp.max_message_size < 1024 {
            return Err(invalid("smtp.max_message_size", "must be at least 1KB"));
        }
        // 0 would hold every message that ever passed through godwit once
        // (gateway -> new platform -> gateway is ordinary coexistence).
        if self.smtp.max_trace_hops == 0
            || self.smtp.max_trace_hops > self.smtp.max_received_headers
        {
            return Err(invalid(
                "smtp.max_trace_hops",
                "must be at least 1 and at most smtp.max_received_headers",
            ));
        }
        if self.smtp.max_recipients < 100 {
            // RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients.
            return Err(invalid(
                "smtp.max_recipients",
                "must be at least 100 (RFC 5321 4.5.3.1.8)",
            ));
        }
        if self.smtp.max_data_memory < self.smtp.max_message_size {
            return Err(invalid(
                "smtp.max_data_memory",
                "must be at least smtp.max_message_size, or no message of the maximum size could be received",
            ));
        }
        if self.directory.expansion_limit == 0 {
            return Err(invalid(
                "directory.expansion_limit",
                "must be at least 1 (a group over the limit is left to its platform)",
            ));
        }
        if self.smtp.max_command_line < 512 {
            return Err(invalid(
                "smtp.max_command_line",
                "must be at least 512 (RFC 5321 4.5.3.1.4)",
            ));
        }
        if self.smtp.max_connections == 0 || self.smtp.max_connections_per_ip == 0 {
            return Err(invalid("smtp.max_connections", "limits must be at least 1"));
        }
        if self.smtp.tls_cert.is_some() != self.smtp.tls_key.is_some() {
            return Err(invalid(
                "smtp.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        for d in &self.domains.accepted {
            let name = d.strip_prefix('.').unwrap_or(d);
            if name.is_empty() || name.starts_with('.') || d.contains(['@', ' ', '/']) {
                return Err(invalid(
                    "domains.accepted",
                    format!("`{d}` is not a domain name"),
                ));
            }
        }
        for (name, p) in &self.platforms {
            let key = format!("platforms.{name}.relay");
            if name == ROUTE_HOLD || name == ROUTE_BOTH {
                return Err(invalid(
                    format!("platforms.{name}"),
                    "`hold` and `both` are reserved route names",
                ));
            }
            if p.relay.is_empty() {
                return Err(invalid(key, "must list at least one host:port"));
            }
            for r in &p.relay {
                let (host, port) = split_host_port(r).map_err(|m| invalid(&key, m))?;
                if let Some(l) = self.own_listener(&host, port) {
                    // Every message would come straight back: a mail loop that
                    // only the Received count (RFC 5321 6.3) would end.
                    return Err(invalid(
                        &key,
                        format!(
                            "`{r}` is godwit's own listener ({l}): mail would loop back to this gateway"
                        ),
                    ));
                }
            }
            if p.tls == TlsPolicy::Verify && p.tls_insecure {
                return Err(invalid(
                    format!("platforms.{name}.tls_insecure"),
                    "contradicts tls = \"verify\": verify requires a valid certificate",
                ));
            }
            if let Some(ca) = &p.tls_ca {
                let pem = std::fs::read_to_string(ca).map_err(|e| {
                    invalid(
                        format!("platforms.{name}.tls_ca"),
                        format!("{}: {e}", ca.display()),
                    )
                })?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(invalid(
                        format!("platforms.{name}.tls_ca"),
                        format!("{}: no PEM certificate in the file", ca.display()),
                    ));
                }
            }
            if p.max_connections == 0 {
                return Err(invalid(
                    format!("platforms.{name}.max_connections"),
                    "must be at least 1",
                ));
            }
            if p.initial_connections == 0 || p.initial_connections > p.max_connections {
                return Err(invalid(
                    format!("platforms.{name}.initial_connections"),
                    "must be between 1 and max_connections",
                ));
            }
            if p.max_rate < 0.0 || !p.max_rate.is_finite() {
                return Err(invalid(
                    format!("platforms.{name}.max_rate"),
                    "must be 0 (unlimited) or a positive number",
                ));
            }
            if p.breaker_failures == 0 {
                return Err(invalid(
                    format!("platforms.{name}.breaker_failures"),
                    "must be at least 1",
                ));
            }
            for r in &p.outbound_relay {
                let key = format!("platforms.{name}.outbound_relay");
                let (host, port) = split_host_port(r).map_err(|m| invalid(&key, m))?;
                if self.own_listener(&host, port).is_some() {
                    return Err(invalid(
                        &key,
                        format!("`{r}` is godwit's own listener: mail would loop"),
                    ));
                }
            }
            if p.outbound_password.is_some() && p.outbound_password_file.is_some() {
                return Err(invalid(
                    format!("platforms.{name}.outbound_password_file"),
                    "set outbound_password or outbound_password_file, not both",
                ));
            }
            if (p.outbound_password.is_some() || p.outbound_password_file.is_some())
                != p.outbound_user.is_some()
            {
                return Err(invalid(
                    format!("platforms.{name}.outbound_user"),
                    "outbound_user and a password (outbound_password or outbound_password_file) go together",
                ));
            }
            if let Some(f) = &p.outbound_password_file
                && let Err(e) = std::fs::metadata(f)
            {
                return Err(invalid(
                    format!("platforms.{name}.outbound_password_file"),
                    format!("{}: {e}", f.display()),
                ));
            }
            if p.max_messages_per_connection == 0 {
                return Err(invalid(
                    format!("platforms.{name}.max_messages_per_connection"),
                    "must be at least 1",
                ));
            }
            if p.imap_master_user.is_some() != p.imap_master_password.is_some() {
                return Err(invalid(
                    format!("platforms.{name}.imap_master_password"),
                    "imap_master_user and imap_master_password must be set together",
                ));
            }
            if p.imap_master_user.is_some() && p.imap.is_none() {
                return Err(invalid(
                    format!("platforms.{name}.imap_master_user"),
                    format!("needs platforms.{name}.imap, the server the master user logs in to"),
                ));
            }
            if p.imap_master_separator.is_empty() {
                return Err(invalid(
                    format!("platforms.{name}.imap_master_separator"),
                    "must not be empty (Dovecot's default is \"*\")",
                ));
            }
        }
        if self.queue.min_backoff.is_zero() || self.queue.min_backoff > self.queue.max_backoff {
            return Err(invalid(
                "queue.min_backoff",
                "must be above zero and not above queue.max_backoff",
            ));
        }
        if self.queue.max_lifetime < self.queue.min_backoff {
            return Err(invalid(
                "queue.max_lifetime",
                "must be at least queue.min_backoff",
            ));
        }
        if let Some(j) = &self.journal {
            j.validate(&self.platforms.keys().collect::<Vec<_>>())?;
        }
        if let Some(p) = &self.queue.dsn_platform
            && !self.platforms.contains_key(p)
        {
            return Err(invalid(
                "queue.dsn_platform",
                format!("`{p}` is not a configured platform"),
            ));
        }
        if let Some(t) = &self.directory.target_platform
            && !self.platforms.contains_key(t)
        {
            return Err(invalid(
                "directory.target_platform",
                format!("`{t}` is not a configured platform; name the platform mailboxes move to"),
            ));
        }
        if let Some(addr) = self.admin.listen
            && !addr.ip().is_loopback()
            && self.admin.token.as_deref().is_none_or(str::is_empty)
        {
            // Admin interfaces listen on loopback or require a token.
            return Err(invalid(
                "admin.token",
                format!("admin.listen {addr} is not loopback: set admin.token"),
            ));
        }
        if self.events.retention < Duration::from_secs(3600) {
            return Err(invalid("events.retention", "must be at least 1h"));
        }
        if self.events.max_lag < 100 {
            return Err(invalid("events.max_lag", "must be at least 100 records"));
        }
        check_log_level(&self.log.level).map_err(|m| invalid("log.level", m))?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be `text` or `json`"));
        }
        if let Some(sync) = &self.sync {
            sync.validate()?;
        }
        if let Some(access) = &self.access {
            access.validate(self)?;
        }
        if let Some(outbound) = &self.outbound {
            outbound.validate(self)?;
        }
        validate_dkim(&self.dkim)?;
        if let Some(submission) = &self.submission {
            submission.validate(self)?;
        }
        Ok(())
    }

    /// What the gateway commands (`serve`, `route`, `directory`, `wave`)
    /// need: accepted domains, platforms and a routing default that names
    /// one. A sync-only file loads, and fails here naming the section.
    pub fn require_gateway(&self) -> Result<(), ConfigError> {
        if self.domains.accepted.is_empty() {
            return Err(missing(
                "domains",
                "the gateway needs `domains.accepted` with at least one domain",
            ));
        }
        if self.platforms.is_empty() {
            return Err(missing(
                "platforms",
                "the gateway needs at least one platform, e.g. [platforms.old] with relay = [\"host:25\"]",
            ));
        }
        if !self.is_route_name(&self.routing.default) {
            return Err(invalid(
                "routing.default",
                format!(
                    "`{}` is neither a configured platform nor `hold`/`both`",
                    self.routing.default
                ),
            ));
        }
        if self.routing.default == ROUTE_BOTH && self.platforms.len() != 2 {
            return Err(invalid(
                "routing.default",
                "`both` needs exactly two platforms",
            ));
        }
        for (domain, route) in &self.routing.domains {
            if !self.is_route_name(route) {
                return Err(invalid(
                    format!("routing.domains.{domain}"),
                    format!("`{route}` is not a platform"),
                ));
            }
        }
        Ok(())
    }

    /// What `godwit sync` and `godwit verify` need: [sync] with [sync.source]
    /// and [sync.target]. A gateway-only file loads, and fails here.
    pub fn require_sync(&self) -> Result<&SyncConfig, ConfigError> {
        let sync = self.sync.as_ref().ok_or_else(|| {
            missing(
                "sync",
                "godwit sync and verify need [sync], [sync.source] and [sync.target]",
            )
        })?;
        for (section, server) in [("sync.source", &sync.source), ("sync.target", &sync.target)] {
            if server.url.is_empty() {
                return Err(missing(
                    section,
                    format!("set {section}.url = \"imaps://host:993\""),
                ));
            }
        }
        Ok(sync)
    }

    /// The platform DSNs go through.
    pub fn dsn_platform(&self) -> String {
        match &self.queue.dsn_platform {
            Some(p) => p.clone(),
            None if self.platforms.contains_key(&self.routing.default) => {
                self.routing.default.clone()
            }
            None => self.platforms.keys().next().cloned().unwrap_or_default(),
        }
    }

    /// The platform a cutover routes to: `directory.target_platform`, else `new`.
    pub fn target_platform(&self) -> Option<&str> {
        match &self.directory.target_platform {
            Some(t) => Some(t),
            None => self.platforms.contains_key("new").then_some("new"),
        }
    }

    /// Whether mail for `domain` is ours: an `accepted` entry names it, or
    /// an entry `.parent` names a domain it is under (Postfix's
    /// `parent_domain_matches_subdomains` style: `.example.com` means every
    /// subdomain of example.com, not example.com itself).
    pub fn is_accepted_domain(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        self.domains
            .accepted
            .iter()
            .any(|d| match d.strip_prefix('.') {
                Some(parent) => {
                    domain.len() > parent.len() + 1
                        && domain.as_bytes()[domain.len() - parent.len() - 1] == b'.'
                        && domain[domain.len() - parent.len()..].eq_ignore_ascii_case(parent)
                }
                None => d.eq_ignore_ascii_case(domain),
            })
    }

    /// This node's name in the fleet: `node_name`, or `hostname` when unset.
    pub fn node_name(&self) -> &str {
        self.node_name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or(&self.hostname)
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    pub fn events_dir(&self) -> PathBuf {
        self.data_dir.join("events")
    }

    pub fn store_url(&self) -> String {
        match &self.store.url {
            Some(u) if !u.is_empty() => u.clone(),
            _ => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("state.db").display()
            ),
        }
    }
}

/// `log.level`: a level, or comma-separated `target=level` directives as
/// RUST_LOG takes them. A word that is neither would silently log nothing.
pub fn check_log_level(spec: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if spec.trim().is_empty() {
        return Err("must be a level: trace, debug, info, warn, error or off".into());
    }
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match d.rsplit_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, d),
        };
        let target_ok = target.is_none_or(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_:-".contains(c))
        });
        let level_ok = LEVELS.contains(&level.to_ascii_lowercase().as_str());
        // A bare word is a target to tracing ("godwit" = all levels for it);
        // here it must be a level, the mistake being far likelier.
        if !target_ok || !level_ok {
            return Err(format!(
                "`{d}` is not a level (trace, debug, info, warn, error, off) or TARGET=LEVEL"
            ));
        }
    }
    Ok(())
}

/// What a SIGHUP does with a reloaded file: the keys applied live, the keys
/// that need a restart, and the configuration to run with from now on.
#[derive(Debug, Clone)]
pub struct ReloadPlan {
    /// Changed keys that take effect now (as named in the file).
    pub applied: Vec<String>,
    /// Changed keys that take effect only after a restart.
    pub restart_needed: Vec<String>,
    /// The new file, except that every key in `restart_needed` keeps its
    /// running value: nothing restart-only is half applied (a new hostname
    /// in HELO but not in the banner), and the next reload names it again.
    pub effective: Config,
}

/// Whether two values differ: by their serialized form (which shows a
/// secret's value, unlike Debug) or by Debug (which keeps a duration's
/// sub-second part, unlike the serialized "1h 30m").
fn changed<T: std::fmt::Debug + Serialize>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
        || serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

/// The fields of a section that differ, as `prefix.field`, by name.
fn changed_fields<T: std::fmt::Debug + Serialize>(prefix: &str, a: &T, b: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(x)), Ok(serde_json::Value::Object(y))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return if changed(a, b) {
            vec![prefix.to_string()]
        } else {
            Vec::new()
        };
    };
    let mut keys: Vec<String> = x
        .keys()
        .chain(y.keys().filter(|k| !x.contains_key(*k)))
        .filter(|k| x.get(*k) != y.get(*k))
        .map(|k| format!("{prefix}.{k}"))
        .collect();
    if keys.is_empty() && changed(a, b) {
        keys.push(prefix.to_string());
    }
    keys.dedup();
    keys
}

/// A platform's keys that only the IMAP/POP3 front reads, and it reads them
/// when it starts.
const PLATFORM_ACCESS_KEYS: [&str; 5] = [
    "imap",
    "pop3",
    "imap_master_user",
    "imap_master_password",
    "imap_master_separator",
];

/// Which keys changed between the running configuration and a reloaded one,
/// and which of them a running gateway can apply. Pure: the driver (serve's
/// SIGHUP handler) applies `effective`. Live: SMTP limits, timeouts and
/// certificate, accepted domains, platforms (relay hosts, TLS, limits, and
/// adding or removing one: new deliveries use the new settings), routing
/// defaults, queue settings, log level, directory policy, outbound delivery
/// and DKIM keys. Restart: anything that binds a socket, opens the store or
/// the spool, or is read once at start.
pub fn reload_plan(old: &Config, new: &Config) -> ReloadPlan {
    let mut eff = new.clone();
    let mut applied: Vec<String> = Vec::new();
    let mut restart: Vec<String> = Vec::new();
    macro_rules! live {
        ($key:expr, $($f:ident).+) => {
            if changed(&old.$($f).+, &new.$($f).+) {
                applied.push($key.to_string());
            }
        };
    }
    macro_rules! needs_restart {
        ($key:expr, $($f:ident).+) => {
            if changed(&old.$($f).+, &new.$($f).+) {
                restart.push($key.to_string());
                eff.$($f).+ = old.$($f).+.clone();
            }
        };
    }
    needs_restart!("hostname", hostname);
    needs_restart!("node_name", node_name);
    needs_restart!("data_dir", data_dir);
    needs_restart!("smtp.listen", smtp.listen);
    // Everything else in [smtp] is read per session (smtpd's reload).
    let mut smtp_old = old.smtp.clone();
    smtp_old.listen = new.smtp.listen.clone();
    applied.extend(changed_fields("smtp", &smtp_old, &new.smtp));
    live!("domains.accepted", domains);
    for name in old.platforms.keys().chain(
        new.platforms
            .keys()
            .filter(|k| !old.platforms.contains_key(*k)),
    ) {
        let key = format!("platforms.{name}");
        match (old.platforms.get(name), new.platforms.get(name)) {
            (Some(o), Some(n)) => {
                for k in changed_fields(&key, o, n) {
                    let field = k.rsplit('.').next().unwrap_or_default();
                    if PLATFORM_ACCESS_KEYS.contains(&field) && old.access.is_some() {
                        let e = eff.platforms.get_mut(name).expect("in new");
                        e.imap = o.imap.clone();
                        e.pop3 = o.pop3.clone();
                        e.imap_master_user = o.imap_master_user.clone();
                        e.imap_master_password = o.imap_master_password.clone();
                        e.imap_master_separator = o.imap_master_separator.clone();
                        restart.push(k);
                    } else {
                        applied.push(k);
                    }
                }
            }
            // Added or removed: the delivery engine follows; a route naming
            // a removed platform defers its mail (4.3.5), never bounces it.
            _ => applied.push(key),
        }
    }
    live!("routing.default", routing.default);
    live!("routing.domains", routing.domains);
    applied.extend(changed_fields("queue", &old.queue, &new.queue));
    needs_restart!("store.url", store);
    live!("log.level", log.level);
    needs_restart!("log.format", log.format);
    needs_restart!("admin", admin);
    needs_restart!("events", events);
    live!("directory.unknown_recipient", directory.unknown_recipient);
    live!("directory.expansion_limit", directory.expansion_limit);
    needs_restart!("directory.expand_groups", directory.expand_groups);
    // Read by the CLI commands, each time they run.
    live!("directory.target_platform", directory.target_platform);
    live!("directory.max_verify_age", directory.max_verify_age);
    live!("sync", sync);
    match (&old.outbound, &new.outbound) {
        (Some(o), Some(n)) => {
            // The relay port is bound at start; the rest is read per
            // session and per delivery.
            if changed(&o.listen, &n.listen) {
                restart.push("outbound.listen".into());
                eff.outbound.as_mut().expect("in new").listen = o.listen.clone();
            }
            let mut o2 = o.clone();
            o2.listen = n.listen.clone();
            applied.extend(changed_fields("outbound", &o2, n));
        }
        _ => needs_restart!("outbound", outbound),
    }
    live!("dkim", dkim);
    needs_restart!("submission", submission);
    needs_restart!("access", access);
    // The accept path reads the journal settings it started with.
    needs_restart!("journal", journal);
    ReloadPlan {
        applied,
        restart_needed: restart,
        effective: eff,
    }
}

/// "host:port" with a numeric port; IPv6 literals as "[::1]:25".
impl Config {
    /// The smtp.listen address that `host:port` names, if it is this
    /// gateway itself: the same port on a listen address, on loopback for a
    /// wildcard listener, or at our own hostname.
    fn own_listener(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let ip: Option<std::net::IpAddr> = match host.parse() {
            Ok(ip) => Some(ip),
            Err(_) if host.eq_ignore_ascii_case("localhost") => Some([127, 0, 0, 1].into()),
            Err(_) => None,
        };
        let own_name = host.eq_ignore_ascii_case(self.hostname.trim_end_matches('.'));
        let outbound = self.outbound.iter().flat_map(|o| o.listen.iter());
        self.smtp.listen.iter().chain(outbound).copied().find(|l| {
            l.port() == port
                && (own_name
                    || ip.is_some_and(|ip| {
                        ip == l.ip() || (l.ip().is_unspecified() && ip.is_loopback())
                    }))
        })
    }
}

/// Resolves a password reference: a literal, `env:NAME` or `file:PATH` (the
/// file's content without its trailing newline). The one resolver for every
/// secret in the configuration and the accounts file; the error names the
/// variable or file (and `context`, the key), never the value.
pub fn secret(value: &str, context: &str) -> Result<String, String> {
    if let Some(var) = value.strip_prefix("env:") {
        std::env::var(var).map_err(|_| format!("{context}: environment variable {var} is not set"))
    } else if let Some(path) = value.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|e| format!("{context}: cannot read password file {path}: {e}"))
    } else {
        Ok(value.to_string())
    }
}

pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` must be host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(format!("`{s}` must be host:port"));
    }
    Ok((host.to_string(), port))
}

pub fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

pub fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// "50MB" when the size is a whole number of decimal units, else bytes.
pub fn ser_size<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    for (unit, k) in [("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1000)] {
        if *n >= k && n.is_multiple_of(k) {
            return s.serialize_str(&format!("{}{unit}", n / k));
        }
    }
    s.serialize_u64(*n)
}

pub fn ser_opt_size<S: Serializer>(n: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => ser_size(n, s),
        None => s.serialize_none(),
    }
}

/// The effective configuration as TOML, secrets masked (`postconf`, or
/// `postconf -n` with `non_default`: only what differs from the defaults).
/// `env:NAME` and `file:PATH` references are shown: they are not secrets.
pub fn show(config: &Config, non_default: bool) -> Result<String, String> {
    let mut v = toml::Value::try_from(config).map_err(|e| e.to_string())?;
    mask(&mut v, "");
    if non_default {
        let mut d = toml::Value::try_from(Config::default()).map_err(|e| e.to_string())?;
        mask(&mut d, "");
        let platform =
            toml::Value::try_from(PlatformConfig::default()).map_err(|e| e.to_string())?;
        let sync = toml::Value::try_from(SyncConfig::default()).map_err(|e| e.to_string())?;
        if let Some(t) = v.get("platforms").and_then(|p| p.as_table()) {
            let defaults: toml::Table = t.keys().map(|k| (k.clone(), platform.clone())).collect();
            d.as_table_mut()
                .unwrap()
                .insert("platforms".into(), defaults.into());
        }
        d.as_table_mut().unwrap().insert("sync".into(), sync);
        v = diff(&v, &d).unwrap_or_else(|| toml::Table::new().into());
    }
    toml::to_string(&v).map_err(|e| e.to_string())
}

/// What of `v` differs from `default`; None when nothing does.
fn diff(v: &toml::Value, default: &toml::Value) -> Option<toml::Value> {
    match (v, default) {
        (toml::Value::Table(t), toml::Value::Table(d)) => {
            let out: toml::Table = t
                .iter()
                .filter_map(|(k, x)| match d.get(k) {
                    Some(dx) => diff(x, dx).map(|x| (k.clone(), x)),
                    None => Some((k.clone(), x.clone())),
                })
                .collect();
            (!out.is_empty()).then(|| out.into())
        }
        _ if v == default => None,
        _ => Some(v.clone()),
    }
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("token") || k.contains("secret")
}

fn mask(v: &mut toml::Value, key: &str) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t.iter_mut() {
                mask(x, k);
            }
        }
        toml::Value::String(s)
            if is_secret_key(key)
                && !s.is_empty()
                && !s.starts_with("env:")
                && !s.starts_with("file:") =>
        {
            *s = "********".into();
        }
        // A password inside a URL: scheme://user:PASSWORD@host/...
        toml::Value::String(s) if key == "url" => {
            if let Some((scheme, rest)) = s.split_once("://")
                && let Some((userinfo, host)) = rest.split_once('@')
                && let Some((user, _)) = userinfo.split_once(':')
            {
                *s = format!("{scheme}://{user}:********@{host}");
            }
        }
        _ => {}
    }
}

pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like \"30s\", \"5m\" or \"5d\": {e}"))
}

/// A duration as people write it in the file: "90d", "1h 30m", "4m 10s".
/// At most two units, so a long wait stays readable.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            format!("{}ms", d.as_millis())
        };
    }
    let mut parts = Vec::new();
    for (unit, n) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= n && parts.len() < 2 {
            parts.push(format!("{}{unit}", secs / n));
            secs %= n;
        } else if !parts.is_empty() {
            break;
        }
    }
    parts.join(" ")
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{s}` is not a size like \"50MB\" or \"10MiB\": {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
hostname = "mx-gw.example.com"
data_dir = "/tmp/x"
[smtp]
listen = ["127.0.0.1:2525"]
max_message_size = "10MB"
[domains]
accepted = ["Example.COM."]
[platforms.old]
relay = ["127.0.0.1:2601"]
[platforms.new]
relay = ["[::1]:2602", "127.0.0.1:2603"]
[routing]
default = "old"
[queue]
max_lifetime = "5d"
min_backoff = "1s"
max_backoff = "1h"
"#;

    #[test]
    fn node_name_defaults_to_hostname() {
        for (extra, want) in [
            ("", Some("mx-gw.example.com")),
            ("node_name = \"mx1\"\n", Some("mx1")),
            ("node_name = \"mx 1\"\n", None),
            ("node_name = \" \"\n", None),
        ] {
            let text = format!("{extra}{GOOD}");
            let got = Config::parse(&text).and_then(|c| {
                c.validate().map_err(|e| e.to_string())?;
                Ok(c.node_name().to_string())
            });
            match want {
                Some(w) => assert_eq!(got.as_deref(), Ok(w), "{extra}"),
                None => assert!(got.unwrap_err().contains("node_name"), "{extra}"),
            }
        }
    }

    #[test]
    fn events_max_lag_defaults_and_is_validated() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.events.max_lag, 30_000);
        for (v, ok) in [("100", true), ("5000", true), ("99", false), ("0", false)] {
            let c = Config::parse(&format!("{GOOD}[events]\nmax_lag = {v}\n")).unwrap();
            match c.validate() {
                Ok(()) => assert!(ok, "{v} passed"),
                Err(e) => assert!(!ok && e.to_string().contains("events.max_lag"), "{v}: {e}"),
            }
        }
    }

    /// Loads as `godwit serve` does: the file, then the gateway's sections.
    fn load(text: &str) -> Result<Config, ConfigError> {
        let c = load_file(text)?;
        c.require_gateway()?;
        Ok(c)
    }

    fn load_file(text: &str) -> Result<Config, ConfigError> {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        Config::load(f.path())
    }

    /// `[outbound]`, `[[dkim]]` and the platforms' outbound keys: each bad
    /// value is refused naming its key.
    #[test]
    fn outbound_keys_are_validated_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("k.pem");
        std::fs::write(
            &pem,
            "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let good = format!(
            "{GOOD}[outbound]\nlisten = [\"127.0.0.1:2526\"]\nrelay_networks = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n\
             mx_port = 2525\nresolvers = [\"127.0.0.1:5353\"]\nhelo = \"mx-gw.example.com\"\n\
             egress_ips = [\"203.0.113.55\"]\ntls_require = [\"bank.example\"]\n\
             [outbound.rate_limits]\n\"gmail.com\" = \"100/m\"\n\
             [[dkim]]\ndomain = \"example.com\"\nselector = \"gw2026\"\nkey = \"{}\"\n",
            pem.display()
        );
        let c = load(&good).unwrap();
        let o = c.outbound.as_ref().unwrap();
        assert_eq!(o.route, "mx");
        assert!(o.relay_networks[1].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(o.rate_limit_for("GMAIL.com").unwrap().count, 100);
        assert_eq!(c.dkim[0].selector, "gw2026");
        for (from, to, key) in [
            (
                "relay_networks = [\"127.0.0.1/32\", \"10.0.0.0/8\"]",
                "relay_networks = [\"10.0.0.0/33\"]",
                "relay_networks",
            ),
            ("route = \"x\"\n", "", ""),
            (
                "\"100/m\"",
                "\"100/fortnight\"",
                "outbound.rate_limits.gmail.com",
            ),
            (
                "helo = \"mx-gw.example.com\"",
                "helo = \"localhost\"",
                "outbound.helo",
            ),
            (
                "listen = [\"127.0.0.1:2526\"]",
                "listen = [\"127.0.0.1:2525\"]",
                "outbound.listen",
            ),
            (
                "selector = \"gw2026\"",
                "selector = \"gw_2026\"",
                "dkim[0].selector",
            ),
            (
                "tls_require = [\"bank.example\"]",
                "tls_require = [\"a b\"]",
                "outbound.tls_require",
            ),
            (
                "mx_port = 2525",
                "mx_port = 2525\nroute = \"nope\"",
                "outbound.route",
            ),
            (
                "mx_port = 2525",
                "mx_port = 2525\nroute = \"new\"",
                "outbound.route",
            ),
            (
                "[platforms.new]",
                "[platforms.new]\noutbound_user = \"u\"",
                "platforms.new.outbound_user",
            ),
            (
                "[platforms.new]",
                "[platforms.new]\noutbound_relay = [\"127.0.0.1:2526\"]",
                "platforms.new.outbound_relay",
            ),
        ] {
            if key.is_empty() {
                continue;
            }
            let text = good.replacen(from, to, 1);
            assert_ne!(text, good, "{from}");
            let e = load(&text).unwrap_err().to_string();
            assert!(e.contains(key), "{to}: {e}");
        }
        let bad_key = good.replace(&pem.display().to_string(), "/nonexistent.pem");
        assert!(
            load(&bad_key)
                .unwrap_err()
                .to_string()
                .contains("dkim[0].key")
        );
    }

    const SYNC_ONLY: &str = "[sync]\naccounts = \"a.csv\"\n[sync.source]\nurl = \"imap://old:143\"\n\
                             [sync.target]\nurl = \"imaps://new:993\"\n";

    /// Teams run the pre-seed long before the gateway: each kind of file
    /// loads, and the command that needs the other kind names what is missing.
    #[test]
    fn sync_only_and_gateway_only_files_both_load() {
        let c = load_file(SYNC_ONLY).unwrap();
        assert_eq!(c.require_sync().unwrap().source.url, "imap://old:143");
        let err = c.require_gateway().unwrap_err().to_string();
        assert!(err.contains("[domains] is missing"), "{err}");
        let only_domains = format!("[domains]\naccepted = [\"example.com\"]\n{SYNC_ONLY}");
        let err = load_file(&only_domains)
            .unwrap()
            .require_gateway()
            .unwrap_err()
            .to_string();
        assert!(err.contains("[platforms] is missing"), "{err}");

        let c = load_file(GOOD).unwrap();
        c.require_gateway().unwrap();
        let err = c.require_sync().unwrap_err().to_string();
        assert!(err.contains("[sync] is missing"), "{err}");

        let no_target = "[sync]\n[sync.source]\nurl = \"imap://old:143\"\n";
        let err = load_file(no_target).unwrap_err().to_string();
        assert!(err.contains("[sync.target] is missing"), "{err}");
        // Keys present are still checked, whatever the command.
        let err = load_file(&SYNC_ONLY.replace("imap://old:143", "http://old"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sync.source.url"), "{err}");
    }

    #[test]
    fn parses_the_documented_shape() {
        let mut c = load(GOOD).unwrap();
        assert_eq!(c.smtp.max_message_size, 10_000_000);
        assert_eq!(c.queue.max_lifetime, Duration::from_secs(5 * 86400));
        assert!(c.is_accepted_domain("example.com"));
        assert!(c.is_accepted_domain("EXAMPLE.com."));
        assert!(!c.is_accepted_domain("evil.com"));
        assert!(!c.is_accepted_domain("sub.example.com"));
        c.domains.accepted.push(".example.net".into());
        assert!(c.is_accepted_domain("a.example.net"));
        assert!(c.is_accepted_domain("B.A.Example.NET."));
        assert!(
            !c.is_accepted_domain("example.net"),
            "the parent itself needs its own entry"
        );
        assert!(!c.is_accepted_domain("badexample.net"));
        assert!(!c.is_accepted_domain("net"));
        assert_eq!(
            split_host_port("[::1]:2602").unwrap(),
            ("::1".to_string(), 2602)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                GOOD.replace("default = \"old\"", "default = \"mars\""),
                "routing.default",
            ),
            (GOOD.replace("\"10MB\"", "\"ten\""), "max_message_size"),
            (
                GOOD.replace("min_backoff = \"1s\"", "min_backoff = \"2h\""),
                "queue.min_backoff",
            ),
            (
                GOOD.replace("\"127.0.0.1:2601\"", "\"nohost\""),
                "platforms.old.relay",
            ),
            (
                GOOD.replace("accepted = [\"Example.COM.\"]", "accepted = []"),
                "[domains]",
            ),
            (
                format!("{GOOD}[directory]\nmax_verify_age = \"soon\"\n"),
                "max_verify_age",
            ),
            (
                GOOD.replace("[smtp]", "[smtp]\nlisten_typo = 1"),
                "listen_typo",
            ),
            (
                format!("{GOOD}[directory]\nunknown_recipient = \"bounce\"\n"),
                "unknown_recipient",
            ),
            (
                GOOD.replace(
                    "max_message_size = \"10MB\"",
                    "max_message_size = \"10MB\"\nmax_data_memory = \"5MB\"",
                ),
                "smtp.max_data_memory",
            ),
            (
                GOOD.replace("[smtp]", "[smtp]\nmax_trace_hops = 0"),
                "smtp.max_trace_hops",
            ),
            (
                GOOD.replace("[smtp]", "[smtp]\nmax_trace_hops = 60"),
                "smtp.max_trace_hops",
            ),
            (
                format!("{GOOD}[directory]\nexpansion_limit = 0\n"),
                "directory.expansion_limit",
            ),
            (
                format!("{GOOD}[directory]\ntarget_platform = \"mars\"\n"),
                "directory.target_platform",
            ),
        ];
        for (text, key) in cases {
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains(key), "error `{err}` should name `{key}`");
        }
    }

    #[test]
    fn a_platform_relaying_to_godwit_itself_is_refused() {
        for own in ["127.0.0.1:2525", "localhost:2525", "mx-gw.example.com:2525"] {
            let err = load(&GOOD.replace("\"127.0.0.1:2601\"", &format!("\"{own}\"")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("platforms.old.relay") && err.contains("loop back to this gateway"),
                "{own}: {err}"
            );
        }
        // The same port elsewhere is another host; a wildcard listener is
        // reached through loopback.
        assert!(load(&GOOD.replace("\"127.0.0.1:2601\"", "\"10.0.0.9:2525\"")).is_ok());
        let wildcard = GOOD.replace("\"127.0.0.1:2525\"", "\"0.0.0.0:2525\"");
        assert!(load(&wildcard.replace("\"127.0.0.1:2601\"", "\"127.0.0.1:2525\"")).is_err());
    }

    #[test]
    fn relative_paths_follow_the_file_not_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("godwit.toml");
        let text = GOOD.replace("data_dir = \"/tmp/x\"", "data_dir = \"./data\"")
            + "[events]\npostfix_log = \"logs/maillog\"\n";
        std::fs::write(&path, text).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.events.postfix_log, Some(dir.path().join("logs/maillog")));
        assert!(
            c.store_url()
                .contains(&dir.path().join("data/state.db").display().to_string())
        );
        // Absolute paths stay.
        assert_eq!(load(GOOD).unwrap().data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn show_masks_secrets_and_lists_what_differs() {
        let text = format!(
            "{GOOD}[admin]\nlisten = \"127.0.0.1:8025\"\ntoken = \"s3cret\"\n[store]\nurl = \"postgres://godwit:hunter2@db/godwit\"\n"
        );
        let c = load(&text).unwrap();
        let all = show(&c, false).unwrap();
        assert!(!all.contains("s3cret") && !all.contains("hunter2"), "{all}");
        assert!(
            all.contains("postgres://godwit:********@db/godwit"),
            "{all}"
        );
        assert!(all.contains("max_lifetime = \"5d\""), "{all}");
        assert!(all.contains("command_timeout = \"5m\""), "{all}");
        // The output is a configuration godwit reads back.
        assert!(Config::parse(&all).is_ok(), "{all}");
        let n = show(&c, true).unwrap();
        assert!(n.contains("max_message_size = \"10MB\""), "{n}");
        assert!(n.contains("token = \"********\""), "{n}");
        assert!(!n.contains("command_timeout"), "defaults listed: {n}");
        assert!(
            !n.contains("breaker_failures"),
            "platform defaults listed: {n}"
        );
        assert!(n.contains("relay = [\"127.0.0.1:2601\"]"), "{n}");
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "WARN",
            "godwit=debug,info",
            "godwit_relay=trace",
            "off",
        ] {
            assert!(check_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["loud", "", "godwit=loud", "=info", "in fo"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
        let err = load(&format!("{GOOD}[log]\nlevel = \"loud\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("log.level") && err.contains("loud"), "{err}");
    }

    #[test]
    fn reload_plan_names_live_and_restart_keys() {
        let old = load(GOOD).unwrap();
        let with_access = {
            let mut c = old.clone();
            c.access = Some(Default::default());
            c
        };
        /// (what, the running file, the edit, applied, restart needed)
        type Row<'a> = (
            &'a str,
            &'a Config,
            fn(&mut Config),
            &'a [&'a str],
            &'a [&'a str],
        );
        let table: &[Row] = &[
            ("nothing", &old, |_| {}, &[], &[]),
            (
                "smtp limits live, listen restart",
                &old,
                |c| {
                    c.smtp.max_message_size = 20_000_000;
                    c.smtp.listen = vec!["127.0.0.1:2526".parse().unwrap()];
                },
                &["smtp.max_message_size"],
                &["smtp.listen"],
            ),
            (
                "a platform's relay, limit and TLS",
                &old,
                |c| {
                    let p = c.platforms.get_mut("old").unwrap();
                    p.relay = vec!["127.0.0.1:2699".into()];
                    p.tls = TlsPolicy::Require;
                    p.max_connections = 3;
                },
                &[
                    "platforms.old.max_connections",
                    "platforms.old.relay",
                    "platforms.old.tls",
                ],
                &[],
            ),
            (
                "adding and removing platforms",
                &old,
                |c| {
                    c.platforms.remove("new");
                    let third = c.platforms["old"].clone();
                    c.platforms.insert("third".into(), third);
                },
                &["platforms.new", "platforms.third"],
                &[],
            ),
            (
                "a platform's IMAP server with the access front: restart",
                &with_access,
                |c| {
                    c.platforms.get_mut("old").unwrap().imap =
                        Some(crate::MailUrl::parse("imap://127.0.0.1:1143").unwrap());
                    c.platforms.get_mut("old").unwrap().max_rate = 5.0;
                },
                &["platforms.old.max_rate"],
                &["platforms.old.imap"],
            ),
            (
                "routing, queue, log level live; log format, store restart",
                &old,
                |c| {
                    c.routing.default = "new".into();
                    c.queue.max_backoff = Duration::from_secs(60);
                    c.queue.scan_interval = Duration::from_millis(100);
                    c.log.level = "debug".into();
                    c.log.format = "json".into();
                    c.store.url = Some("postgres://db/godwit".into());
                },
                &[
                    "routing.default",
                    "queue.max_backoff",
                    "queue.scan_interval",
                    "log.level",
                ],
                &["store.url", "log.format"],
            ),
            (
                "hostname, data_dir, admin, submission, access: restart",
                &old,
                |c| {
                    c.hostname = "other.example.com".into();
                    c.data_dir = "/tmp/y".into();
                    c.admin.listen = None;
                    c.access = Some(Default::default());
                },
                &[],
                &["hostname", "data_dir", "admin", "access"],
            ),
        ];
        for (what, base, edit, live, restart) in table {
            let mut new = (*base).clone();
            edit(&mut new);
            let plan = reload_plan(base, &new);
            assert_eq!(plan.applied, *live, "{what}: applied");
            assert_eq!(plan.restart_needed, *restart, "{what}: restart");
            // Nothing restart-only is applied: diffing the effective
            // configuration against the running one shows only live keys.
            let again = reload_plan(base, &plan.effective);
            assert_eq!(again.applied, *live, "{what}: effective");
            assert!(again.restart_needed.is_empty(), "{what}: {again:?}");
        }
        // A secret's change is seen although Debug masks it.
        let mut new = old.clone();
        new.platforms.get_mut("old").unwrap().outbound_password = Some(SecretRef("a".into()));
        let mut newer = new.clone();
        newer.platforms.get_mut("old").unwrap().outbound_password = Some(SecretRef("b".into()));
        assert_eq!(
            reload_plan(&new, &newer).applied,
            ["platforms.old.outbound_password"]
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("50MB").unwrap(), 50_000_000);
        assert_eq!(parse_size("1MiB").unwrap(), 1_048_576);
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("soon").is_err());
        for (secs, text) in [
            (7_776_000, "90d"),
            (5400, "1h 30m"),
            (250, "4m 10s"),
            (3601, "1h"),
            (0, "0s"),
            (45, "45s"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), text);
        }
    }
}
