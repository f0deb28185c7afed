//! The IMAP probe: login, the capabilities that decide how fast and how safely
//! the sync can run, the folder count and the special-use folders.

use crate::finding::{Contract, Finding, Severity};
use anyhow::Context;
use async_imap::types::NameAttribute;
use futures::TryStreamExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

/// A parsed `imap://[user@]host[:port]` or `imaps://[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapUrl {
    pub tls: bool,
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

impl ImapUrl {
    pub fn parse(url: &str) -> anyhow::Result<ImapUrl> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("imaps://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("imap://") {
            (false, r)
        } else {
            anyhow::bail!(
                "{url}: expected imap://[user@]host[:port] or imaps://[user@]host[:port]"
            );
        };
        let rest = rest.trim_end_matches('/');
        let (user, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u.replace("%40", "@")), h),
            None => (None, rest),
        };
        let default_port = if tls { 993 } else { 143 };
        let (host, port) = crate::smtp::split_target(hostport);
        let port = if hostport.ends_with(&format!(":{port}")) {
            port
        } else {
            default_port
        };
        anyhow::ensure!(!host.is_empty(), "{url}: no host");
        Ok(ImapUrl {
            tls,
            user,
            host,
            port,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ImapCheck {
    pub url: ImapUrl,
    pub user: String,
    pub password: String,
    pub ca_files: Vec<PathBuf>,
    pub timeout: Duration,
}

/// What the probe saw, for the pure analysis below.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImapFacts {
    pub capabilities: Vec<String>,
    /// (folder name, special-use attribute such as "\\Sent")
    pub special_use: Vec<(String, String)>,
    pub folders: usize,
    pub delimiter: Option<String>,
}

/// The extensions the sync engine uses, why each matters, and how bad its
/// absence is.
const EXTENSIONS: &[(&str, Severity, &str)] = &[
    (
        "UIDPLUS",
        Severity::Warn,
        "without UIDPLUS (RFC 4315) APPEND returns no UID, so the sync must search for each \
         copied message by Message-ID to record where it went: slower, and ambiguous for duplicates",
    ),
    (
        "CONDSTORE",
        Severity::Warn,
        "without CONDSTORE (RFC 7162) every delta pass re-fetches the flags of every message \
         instead of only those changed since the last MODSEQ",
    ),
    (
        "QRESYNC",
        Severity::Warn,
        "without QRESYNC (RFC 7162) expunges are found by listing all UIDs on every pass",
    ),
    (
        "SPECIAL-USE",
        Severity::Warn,
        "without SPECIAL-USE (RFC 6154) Sent, Trash, Drafts and Junk are matched by name only, \
         which is how \"Sent is empty\" incidents start",
    ),
    (
        "LITERAL+",
        Severity::Ok,
        "without LITERAL+ (RFC 7888) each APPEND waits one round trip for the server's continuation",
    ),
    (
        "MOVE",
        Severity::Ok,
        "without MOVE (RFC 6851) a move is COPY, STORE \\Deleted and EXPUNGE",
    ),
    (
        "COMPRESS=DEFLATE",
        Severity::Ok,
        "without COMPRESS=DEFLATE (RFC 4978) bulk copies use the full bandwidth",
    ),
];

pub fn analyze(subject: &str, facts: &ImapFacts) -> Vec<Finding> {
    let c = Contract::MailboxAccess;
    let has = |cap: &str| {
        facts
            .capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(cap))
    };
    let mut out = Vec::new();
    let present: Vec<&str> = EXTENSIONS.iter().map(|e| e.0).filter(|e| has(e)).collect();
    out.push(Finding::new(
        c,
        "imap.capabilities",
        subject,
        Severity::Ok,
        format!(
            "Capabilities: {}. Sync extensions present: {}.",
            facts.capabilities.join(" "),
            if present.is_empty() {
                "none".to_string()
            } else {
                present.join(", ")
            }
        ),
        "",
    ));
    for (cap, sev, why) in EXTENSIONS {
        if !has(cap) {
            let check = format!("imap.{}", cap.to_ascii_lowercase().replace("=deflate", ""));
            out.push(Finding::new(
                c,
                &check,
                subject,
                *sev,
                format!("No {cap}: {why}."),
                if *sev == Severity::Warn {
                    "Plan for a slower sync (lower concurrency, longer delta windows), or enable the \
                     extension on the server."
                } else {
                    ""
                },
            ));
        }
    }
    out.push(Finding::new(
        c,
        "imap.folders",
        subject,
        Severity::Ok,
        format!(
            "{} folders{}.",
            facts.folders,
            facts
                .delimiter
                .as_ref()
                .map(|d| format!(", hierarchy separator {d:?}"))
                .unwrap_or_default()
        ),
        "",
    ));
    let found: Vec<&str> = facts.special_use.iter().map(|(_, a)| a.as_str()).collect();
    let missing: Vec<&str> = ["\\Sent", "\\Drafts", "\\Trash", "\\Junk"]
        .into_iter()
        .filter(|a| !found.contains(a))
        .collect();
    let list = if facts.special_use.is_empty() {
        "none".to_string()
    } else {
        facts
            .special_use
            .iter()
            .map(|(n, a)| format!("{a} = {n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push(if missing.is_empty() {
        Finding::new(
            c,
            "imap.special-use-folders",
            subject,
            Severity::Ok,
            format!("Special-use folders: {list}."),
            "",
        )
    } else {
        Finding::new(
            c,
            "imap.special-use-folders",
            subject,
            Severity::Warn,
            format!(
                "Special-use folders: {list}; no folder is marked {}. Users' sent or deleted mail \
                 may land in a folder their new client does not treat as such.",
                missing.join(", ")
            ),
            "Map these folders explicitly in the sync configuration before the first pass.",
        )
    });
    out
}

/// Runs the probe. Connection and login problems are findings; errors are for
/// unusable arguments.
pub async fn check(opts: &ImapCheck) -> anyhow::Result<Vec<Finding>> {
    let url = &opts.url;
    let subject = format!(
        "{}://{}@{}:{}",
        if url.tls { "imaps" } else { "imap" },
        opts.user,
        url.host,
        url.port
    );
    let c = Contract::MailboxAccess;
    let mut out = Vec::new();
    let tcp = match tokio::time::timeout(
        opts.timeout,
        TcpStream::connect((url.host.as_str(), url.port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            out.push(Finding::new(
                c,
                "imap.connect",
                subject,
                Severity::Block,
                format!("Cannot connect: {e}."),
                "Check the host, the port and firewalls.",
            ));
            return Ok(out);
        }
        Err(_) => {
            out.push(Finding::new(
                c,
                "imap.connect",
                subject,
                Severity::Block,
                "No TCP connection in time.",
                "Check routing and firewalls.",
            ));
            return Ok(out);
        }
    };
    let result = if url.tls {
        let roots = crate::smtp::root_store(&opts.ca_files)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .with_context(|| format!("{} is not a valid TLS server name", url.host))?;
        match tokio::time::timeout(
            opts.timeout,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(tls)) => probe(tls, opts, &subject).await,
            Ok(Err(e)) => {
                out.push(Finding::new(
                    c,
                    "imap.tls",
                    subject,
                    Severity::Block,
                    format!(
                        "The TLS handshake failed: {e}. Clients and the sync refuse this server."
                    ),
                    "Fix the certificate (or pass the private CA with --ca).",
                ));
                return Ok(out);
            }
            Err(_) => Err(anyhow::anyhow!("the TLS handshake timed out")),
        }
    } else {
        if !tcp
            .peer_addr()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(false)
        {
            out.push(Finding::new(
                c,
                "imap.tls",
                subject.clone(),
                Severity::Warn,
                "imap:// sends the password in clear text across the network.",
                "Use imaps:// (port 993) for anything beyond a lab.",
            ));
        }
        probe(tcp, opts, &subject).await
    };
    match result {
        Ok(findings) => out.extend(findings),
        Err(e) => out.push(Finding::new(
            c,
            "imap.session",
            subject,
            Severity::Block,
            format!("The IMAP session failed: {e:#}."),
            "Check the server's log for this session.",
        )),
    }
    Ok(out)
}

async fn probe<S>(stream: S, opts: &ImapCheck, subject: &str) -> anyhow::Result<Vec<Finding>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + std::fmt::Debug,
{
    let c = Contract::MailboxAccess;
    let t = opts.timeout;
    let mut client = async_imap::Client::new(stream);
    let greeting = tokio::time::timeout(t, client.read_response())
        .await
        .context("waiting for the greeting")??;
    anyhow::ensure!(
        greeting.is_some(),
        "the server closed the connection before its greeting"
    );
    let mut session = match tokio::time::timeout(t, client.login(&opts.user, &opts.password))
        .await
        .context("login timed out")?
    {
        Ok(s) => s,
        Err((e, _)) => {
            return Ok(vec![Finding::new(
                c,
                "imap.login",
                subject,
                Severity::Block,
                format!("Login as {} failed: {e}.", opts.user),
                "Check the user name and password (or the master-user syntax, user*admin, if \
                 the sync uses one).",
            )]);
        }
    };
    let mut out = vec![Finding::new(
        c,
        "imap.login",
        subject,
        Severity::Ok,
        format!("Logged in as {}.", opts.user),
        "",
    )];
    // Capabilities after login: servers advertise more once authenticated (RFC 3501 7.2.1).
    let caps = tokio::time::timeout(t, session.capabilities())
        .await
        .context("CAPABILITY timed out")??;
    let mut facts = ImapFacts {
        capabilities: caps
            .iter()
            .map(|c| match c {
                async_imap::types::Capability::Imap4rev1 => "IMAP4rev1".to_string(),
                async_imap::types::Capability::Auth(a) => format!("AUTH={a}"),
                async_imap::types::Capability::Atom(a) => a.to_string(),
            })
            .collect(),
        ..Default::default()
    };
    facts.capabilities.sort();
    {
        let names: Vec<async_imap::types::Name> = tokio::time::timeout(t, async {
            session.list(Some(""), Some("*")).await?.try_collect().await
        })
        .await
        .context("LIST timed out")?
        .context("LIST \"\" *")?;
        facts.folders = names.len();
        facts.delimiter = names.iter().find_map(|n| n.delimiter().map(str::to_string));
        for n in &names {
            for a in n.attributes() {
                let attr = match a {
                    NameAttribute::All => "\\All",
                    NameAttribute::Archive => "\\Archive",
                    NameAttribute::Drafts => "\\Drafts",
                    NameAttribute::Flagged => "\\Flagged",
                    NameAttribute::Junk => "\\Junk",
                    NameAttribute::Sent => "\\Sent",
                    NameAttribute::Trash => "\\Trash",
                    _ => continue,
                };
                facts
                    .special_use
                    .push((n.name().to_string(), attr.to_string()));
            }
        }
    }
    let _ = tokio::time::timeout(t, session.logout()).await;
    out.extend(analyze(subject, &facts));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ImapUrl::parse("imaps://mail.example.com").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.user),
            (true, "mail.example.com", 993, None)
        );
        let u = ImapUrl::parse("imap://alice%40example.com@127.0.0.1:1143/").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 1143));
        assert_eq!(u.user.as_deref(), Some("alice@example.com"));
        assert!(ImapUrl::parse("http://x").is_err());
    }

    #[test]
    fn missing_extensions_and_folders_are_findings() {
        let full = ImapFacts {
            capabilities: [
                "IMAP4rev1",
                "UIDPLUS",
                "CONDSTORE",
                "QRESYNC",
                "SPECIAL-USE",
                "LITERAL+",
                "MOVE",
                "COMPRESS=DEFLATE",
            ]
            .map(String::from)
            .to_vec(),
            special_use: [
                ("Sent", "\\Sent"),
                ("Drafts", "\\Drafts"),
                ("Trash", "\\Trash"),
                ("Junk", "\\Junk"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .to_vec(),
            folders: 5,
            delimiter: Some(".".into()),
        };
        let f = analyze("imap://x", &full);
        assert!(f.iter().all(|f| f.severity == Severity::Ok), "{f:#?}");
        let bare = ImapFacts {
            capabilities: vec!["IMAP4rev1".into()],
            folders: 1,
            ..Default::default()
        };
        let f = analyze("imap://x", &bare);
        for (check, sev) in [
            ("imap.uidplus", Severity::Warn),
            ("imap.condstore", Severity::Warn),
            ("imap.qresync", Severity::Warn),
            ("imap.special-use", Severity::Warn),
            ("imap.literal+", Severity::Ok),
            ("imap.move", Severity::Ok),
            ("imap.compress", Severity::Ok),
            ("imap.special-use-folders", Severity::Warn),
        ] {
            let got = f
                .iter()
                .find(|f| f.check == check)
                .unwrap_or_else(|| panic!("{check}: {f:#?}"));
            assert_eq!(got.severity, sev, "{check}");
        }
    }
}
