//! `godwit directory probe`: identity proof before a move (Phase 3:
//! "provision mail-enabled users in destination with correct primary/alias
//! addresses"; common mistake 5: aliases missing after the move). The
//! target platform is asked over SMTP about every address and alias: MAIL
//! FROM:<>, RCPT TO per address, RSET, never DATA (RFC 5321 3.3, 4.1.1.5),
//! over one connection, so the platform's concurrency limit is never
//! approached.

use anyhow::{Context, Result};
use godwit_config::Config;
use godwit_store::Store;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

/// RCPTs per transaction before an RSET: well under RFC 5321 4.5.3.1.8's 100.
const BATCH: usize = 50;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Refused {
    /// The mailbox the address belongs to.
    pub mailbox: String,
    pub address: String,
    pub reply: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ProbeReport {
    pub platform: String,
    pub host: String,
    pub probed: usize,
    pub refused: Vec<Refused>,
}

/// Every mailbox (of `wave`, or the whole directory) with its addresses.
pub async fn addresses(
    config: &Config,
    store: &Store,
    wave: Option<&str>,
) -> Result<BTreeMap<String, Vec<String>>> {
    let filter = godwit_route::history::DirectoryFilter {
        wave: wave.map(str::to_string),
        ..Default::default()
    };
    let rows =
        godwit_route::history::directory(store, &filter, config.directory.max_verify_age).await?;
    // One query for every alias, not an `explain` per mailbox: a 10,000
    // mailbox wave's cutover spent 22 s in 150,000 queries here.
    let mut aliases = godwit_route::history::aliases(store).await?;
    let mut out = BTreeMap::new();
    for r in rows {
        let mut all = vec![r.address.clone()];
        all.extend(
            aliases
                .remove(&godwit_route::normalize_address(&r.address))
                .unwrap_or_default(),
        );
        out.insert(r.address, all);
    }
    Ok(out)
}

/// Probes `mailboxes` at `platform`; a reply that is not 2xx is a refusal.
pub async fn probe(
    config: &Config,
    platform: &str,
    mailboxes: BTreeMap<String, Vec<String>>,
) -> Result<ProbeReport> {
    let p = config
        .platforms
        .get(platform)
        .with_context(|| format!("no platform `{platform}` in the configuration"))?;
    let host = p
        .relay
        .first()
        .with_context(|| format!("platforms.{platform}.relay is empty"))?
        .clone();
    let helo = config.hostname.clone();
    let timeout = p.command_timeout.min(Duration::from_secs(60));
    let (h, name) = (host.clone(), platform.to_string());
    tokio::task::spawn_blocking(move || run(&name, &h, &helo, timeout, mailboxes)).await?
}

fn run(
    platform: &str,
    host: &str,
    helo: &str,
    timeout: Duration,
    mailboxes: BTreeMap<String, Vec<String>>,
) -> Result<ProbeReport> {
    let s = std::net::TcpStream::connect(host)
        .with_context(|| format!("probe: connect to {platform} at {host}"))?;
    s.set_read_timeout(Some(timeout))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let reply = |r: &mut BufReader<std::net::TcpStream>| -> Result<String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)
                .with_context(|| format!("probe: reading from {host}"))?
                == 0
            {
                anyhow::bail!("probe: {platform} at {host} closed the connection");
            }
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return Ok(line.trim_end().to_string());
            }
        }
    };
    let cmd = |w: &mut std::net::TcpStream, r: &mut BufReader<_>, c: &str| -> Result<String> {
        w.write_all(format!("{c}\r\n").as_bytes())?;
        reply(r)
    };
    let g = reply(&mut r)?;
    anyhow::ensure!(
        g.starts_with("220"),
        "probe: {platform} at {host} greeted {g}"
    );
    let e = cmd(&mut w, &mut r, &format!("EHLO {helo}"))?;
    anyhow::ensure!(
        e.starts_with("250"),
        "probe: {platform} at {host} answered EHLO with {e}"
    );
    let mut report = ProbeReport {
        platform: platform.to_string(),
        host: host.to_string(),
        ..Default::default()
    };
    let all: Vec<(String, String)> = mailboxes
        .into_iter()
        .flat_map(|(m, addrs)| addrs.into_iter().map(move |a| (m.clone(), a)))
        .collect();
    for batch in all.chunks(BATCH) {
        // The null sender: a probe must never cause a bounce (RFC 5321 4.5.5).
        let m = cmd(&mut w, &mut r, "MAIL FROM:<>")?;
        anyhow::ensure!(
            m.starts_with("250"),
            "probe: {platform} refused MAIL FROM:<>: {m}"
        );
        for (mailbox, address) in batch {
            let rep = cmd(&mut w, &mut r, &format!("RCPT TO:<{address}>"))?;
            report.probed += 1;
            if !rep.starts_with('2') {
                report.refused.push(Refused {
                    mailbox: mailbox.clone(),
                    address: address.clone(),
                    reply: rep,
                });
            }
        }
        cmd(&mut w, &mut r, "RSET")?;
    }
    let _ = cmd(&mut w, &mut r, "QUIT");
    Ok(report)
}

pub fn print(r: &ProbeReport) {
    println!(
        "probed {} address(es) at {} ({}): {} refused",
        r.probed,
        r.platform,
        r.host,
        r.refused.len()
    );
    for x in &r.refused {
        println!(
            "  REFUSED {} (mailbox {}): {}",
            x.address, x.mailbox, x.reply
        );
    }
}
