//! `godwit check`: the command-line surface the binary embeds.
//!
//! The binary adds `Check(godwit_check::cli::CheckArgs)` to its subcommands and
//! calls `godwit_check::run(config.as_ref(), &args).await`, exiting with the
//! returned code: 0 nothing blocks, 1 warnings only, 2 something blocks. An
//! `Err` means the check could not run at all (bad arguments, unreadable file).

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
#[command(about = "Preflight: DNS, SPF/DKIM/DMARC, TLS, SMTP and IMAP checks with a verdict")]
pub struct CheckArgs {
    /// What to check; without one, everything the configuration implies.
    #[command(subcommand)]
    pub target: Option<CheckTarget>,

    /// Nameserver to ask, as IP or IP:PORT; repeat to compare resolvers
    /// (disagreement means propagation). Default: the system's resolver.
    #[arg(long = "resolver", value_name = "IP[:PORT]", global = true)]
    pub resolvers: Vec<String>,

    /// A new sending platform (IP or host name) that SPF must authorize; repeatable.
    #[arg(long = "new-sender", value_name = "IP|HOST", global = true)]
    pub new_senders: Vec<String>,

    /// DKIM selector to check; repeatable.
    #[arg(long = "dkim-selector", value_name = "SELECTOR", global = true)]
    pub dkim_selectors: Vec<String>,

    /// The planned cutover window, e.g. "10m" or "1h": MX TTLs longer than it
    /// get a warning with the time to wait.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, global = true)]
    pub cutover_window: Option<Duration>,

    /// Check that the SMTP server accepts this recipient (MAIL, RCPT, RSET; sends nothing).
    #[arg(long, value_name = "ADDRESS", global = true)]
    pub rcpt: Option<String>,

    /// Send a labelled test message to --rcpt and print the server's queue ID.
    #[arg(long, requires = "rcpt", global = true)]
    pub send: bool,

    /// Envelope sender for --rcpt and --send (default: godwit-check@EHLO-NAME).
    #[arg(long, value_name = "ADDRESS", global = true)]
    pub mail_from: Option<String>,

    /// Our EHLO name (default: the configured hostname, else this machine's name).
    #[arg(long, value_name = "NAME", global = true)]
    pub ehlo: Option<String>,

    /// The name the server certificate must carry (default: the host connected to).
    #[arg(long, value_name = "NAME", global = true)]
    pub tls_name: Option<String>,

    /// Extra trusted CA certificates (PEM) for private CAs; repeatable.
    #[arg(long = "ca", value_name = "FILE", global = true)]
    pub ca_files: Vec<PathBuf>,

    /// IMAP user (default: the user in the URL). The password comes from the
    /// GODWIT_IMAP_PASSWORD environment variable or --password-file.
    #[arg(long, value_name = "USER", global = true)]
    pub user: Option<String>,

    /// File whose first line is the IMAP password.
    #[arg(long, value_name = "FILE", global = true)]
    pub password_file: Option<PathBuf>,

    /// IMAP servers to include in the configuration-driven run (until the
    /// configuration's [sync] section names them); repeatable.
    #[arg(long = "imap", value_name = "URL", global = true)]
    pub imap_urls: Vec<String>,

    /// Timeout for each network step.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s", global = true)]
    pub timeout: Duration,

    /// Print JSON for scripts instead of the grouped report.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CheckTarget {
    /// MX per resolver, TTL advice, SPF, DKIM, DMARC, MTA-STS and TLS-RPT of a domain.
    Dns { domain: String },
    /// Banner, EHLO, STARTTLS and the certificate of an SMTP server (port 25 by default).
    Smtp {
        #[arg(value_name = "HOST[:PORT]")]
        target: String,
    },
    /// Login, capabilities and folders of an IMAP server.
    Imap {
        #[arg(value_name = "imap[s]://[USER@]HOST[:PORT]")]
        url: String,
    },
    /// Outbound edge (the configuration's [outbound] and [[dkim]]): SPF for
    /// every egress IP, the published DKIM keys, HELO with forward-confirmed
    /// reverse DNS, DMARC alignment of what godwit signs.
    Outbound,
    /// Log in through the access front as ADDRESS: which platform answered,
    /// whether that is where the routing map sends it, and whether the
    /// autoconfig answers name the front. Password: --password, else [sync].
    Access {
        address: String,
        #[arg(long, env = "GODWIT_ACCESS_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}
