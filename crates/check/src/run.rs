//! Turns `CheckArgs` (and the configuration, when there is one) into probes,
//! and the probes' findings into one report.

use crate::cli::{CheckArgs, CheckTarget};
use crate::dns::DnsCheck;
use crate::finding::{Contract, Finding, Report, Severity};
use crate::imap::{ImapCheck, ImapUrl};
use crate::smtp::SmtpCheck;
use anyhow::Context;
use godwit_config::Config;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fn dns_opts(args: &CheckArgs) -> DnsCheck {
    DnsCheck {
        resolvers: args.resolvers.clone(),
        new_senders: args.new_senders.clone(),
        dkim_selectors: args.dkim_selectors.clone(),
        cutover_window: args.cutover_window,
        ca_files: args.ca_files.clone(),
        mta_sts_port: 0,
        timeout: Some(args.timeout),
    }
}

fn machine_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn smtp_opts(args: &CheckArgs, config: Option<&Config>, target: &str) -> SmtpCheck {
    let ehlo = args
        .ehlo
        .clone()
        .or_else(|| config.map(|c| c.hostname.clone()))
        .unwrap_or_else(machine_name);
    let mut o = SmtpCheck::new(target);
    o.mail_from = args
        .mail_from
        .clone()
        .unwrap_or_else(|| format!("godwit-check@{ehlo}"));
    o.ehlo = ehlo;
    o.tls_name = args.tls_name.clone();
    o.ca_files = args.ca_files.clone();
    o.rcpt = args.rcpt.clone();
    o.send = args.send;
    o.timeout = args.timeout;
    o
}

/// The IMAP password: GODWIT_IMAP_PASSWORD, else the first line of --password-file.
/// Never a command-line argument, which every user on the machine can read.
fn imap_password(args: &CheckArgs) -> anyhow::Result<String> {
    if let Some(file) = &args.password_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--password-file {}: cannot read", file.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    std::env::var("GODWIT_IMAP_PASSWORD")
        .context("no IMAP password: set GODWIT_IMAP_PASSWORD or pass --password-file FILE")
}

fn imap_opts(args: &CheckArgs, url: &str) -> anyhow::Result<ImapCheck> {
    let url = ImapUrl::parse(url)?;
    let user = args
        .user
        .clone()
        .or_else(|| url.user.clone())
        .with_context(|| "no IMAP user: pass --user or put it in the URL (imap://user@host)")?;
    Ok(ImapCheck {
        url,
        user,
        password: imap_password(args)?,
        ca_files: args.ca_files.clone(),
        timeout: args.timeout,
    })
}

/// IMAP endpoints the configuration implies: the `[sync]` source and target,
/// logged in as the first account of `sync.accounts`, then any `--imap URL`.
fn imap_targets(config: &Config, args: &CheckArgs) -> anyhow::Result<Vec<ImapCheck>> {
    let mut out = Vec::new();
    if let Some(sync) = &config.sync {
        let accounts = godwit_imap::accounts::load(&sync.accounts).context("sync.accounts")?;
        if let Some(first) = accounts.first() {
            for (server, login) in [(&sync.source, &first.source), (&sync.target, &first.target)] {
                out.push(ImapCheck {
                    url: ImapUrl::parse(&server.url)?,
                    user: login.user.clone(),
                    password: login.password.clone(),
                    ca_files: args.ca_files.clone(),
                    timeout: args.timeout,
                });
            }
        }
    }
    for u in &args.imap_urls {
        out.push(imap_opts(args, u)?);
    }
    Ok(out)
}

/// Where the gateway's own listener can be reached from this machine.
fn listener_target(addr: &SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// Runs the checks and returns the report, printing nothing.
pub async fn collect(config: Option<&Config>, args: &CheckArgs) -> anyhow::Result<Report> {
    let mut report = Report::default();
    match (&args.target, config) {
        (Some(CheckTarget::Dns { domain }), _) => {
            report.extend(crate::dns::check_domain(domain, &dns_opts(args)).await?);
        }
        (Some(CheckTarget::Smtp { target }), _) => {
            report.extend(crate::smtp::check(&smtp_opts(args, config, target)).await?);
        }
        (Some(CheckTarget::Imap { url }), _) => {
            report.extend(crate::imap::check(&imap_opts(args, url)?).await?);
        }
        (Some(CheckTarget::Outbound), Some(config)) => {
            report.extend(crate::outbound::check(config, &args.resolvers).await?);
        }
        (Some(CheckTarget::Outbound), None) => {
            anyhow::bail!("`check outbound` reads the configuration: pass --config FILE")
        }
        (Some(CheckTarget::Access { .. }), _) => {
            anyhow::bail!("`check access` is run by the godwit binary (it needs the state store)")
        }
        (None, Some(config)) => {
            report.extend(collect_config(config, args).await?);
        }
        (None, None) => anyhow::bail!(
            "nothing to check: give a configuration file, or one of `check dns DOMAIN`, \
             `check smtp HOST[:PORT]`, `check imap URL`"
        ),
    }
    Ok(report)
}

async fn collect_config(config: &Config, args: &CheckArgs) -> anyhow::Result<Vec<Finding>> {
    let mut out = Vec::new();
    if config.domains.accepted.is_empty() {
        out.push(Finding::new(
            Contract::InboundDelivery,
            "config.domains",
            "domains.accepted",
            Severity::Warn,
            "The configuration accepts no domain, so there is no DNS to check.",
            "List the migrating domains in domains.accepted.",
        ));
    }
    for domain in &config.domains.accepted {
        out.extend(crate::dns::check_domain(domain, &dns_opts(args)).await?);
    }
    // Every platform the gateway relays to must take mail over TLS from it.
    for (name, platform) in &config.platforms {
        for relay in &platform.relay {
            let mut o = smtp_opts(args, Some(config), relay);
            // Acceptance and test messages are for explicit `check smtp` runs.
            o.rcpt = None;
            o.send = false;
            let mut findings = crate::smtp::check(&o).await?;
            for f in &mut findings {
                f.subject = format!("{} (platform {name})", f.subject);
                // platforms.NAME.tls = "require": without STARTTLS the gateway
                // defers every message for this platform instead of delivering it.
                if platform.tls == godwit_config::TlsPolicy::Require
                    && f.check == "smtp.starttls"
                    && f.severity == Severity::Warn
                {
                    f.severity = Severity::Block;
                    f.meaning.push_str(&format!(
                        " platforms.{name}.tls = \"require\": the gateway will defer all mail \
                         for this platform."
                    ));
                }
                // The operator already chose to accept this platform's
                // certificate (platforms.NAME.tls_insecure): inform, don't block.
                if platform.tls_insecure
                    && f.check.starts_with("tls.")
                    && f.severity == Severity::Block
                {
                    f.severity = Severity::Warn;
                    f.meaning.push_str(
                        " (tls_insecure = true for this platform: the gateway accepts it anyway)",
                    );
                }
            }
            out.extend(findings);
        }
    }
    for listen in &config.smtp.listen {
        let target = listener_target(listen);
        let mut o = smtp_opts(args, Some(config), &target);
        o.rcpt = None;
        o.send = false;
        // Senders reach the gateway by its MX name, which is the configured hostname.
        o.tls_name = Some(
            args.tls_name
                .clone()
                .unwrap_or_else(|| config.hostname.clone()),
        );
        let mut findings = crate::smtp::check(&o).await?;
        for f in &mut findings {
            f.subject = format!("{} (gateway listener)", f.subject);
        }
        out.extend(findings);
    }
    for imap in imap_targets(config, args)? {
        out.extend(crate::imap::check(&imap).await?);
    }
    Ok(out)
}

/// `godwit check`: runs, prints the report (grouped text, or JSON with
/// `--json`) and returns the exit code: 0 nothing blocks, 1 warnings only,
/// 2 something blocks.
pub async fn run(config: Option<&Config>, args: &CheckArgs) -> anyhow::Result<i32> {
    let report = collect(config, args).await?;
    if args.json {
        println!("{}", report.render_json());
    } else {
        print!("{}", report.render_text());
    }
    Ok(report.exit_code())
}
