//! `godwit doctor`: gathers the facts the five questions read (events in
//! the state store, the spool, the gateways' node rows, `route explain`)
//! and hands them to the pure decision in `godwit_evidence::doctor`.

use anyhow::{Context, Result};
use godwit_config::Config;
use godwit_events::{Event, Record};
use godwit_evidence::doctor::{self, AddressMessage, Destination, Facts, SendTest};
use godwit_evidence::metrics::{DelaySums, code_of};
use godwit_store::{Row, Store};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// The recipient to check routing (and send the test message) for.
    pub address: Option<String>,
    /// The window the evidence is read from ("1h", "30m", or RFC 3339).
    #[arg(long, default_value = "1h")]
    pub since: String,
    /// Send a test message through the gateway's own listener and trace it
    /// to its platform's 250 (both queue IDs).
    #[arg(long)]
    pub send_test: bool,
    /// How long --send-test waits for the platform's 250.
    #[arg(long, default_value = "30s")]
    pub wait: String,
    #[arg(long)]
    pub json: bool,
}

/// The reply code a throttle is known by: the basic code (421, 451) with
/// its enhanced code when there is one ("421 4.4.2").
fn basic_code(reply: &str) -> String {
    let first = reply.split_whitespace().next().unwrap_or("");
    let enhanced = code_of(reply);
    if first.len() == 3 && first.chars().all(|c| c.is_ascii_digit()) {
        if enhanced != first && enhanced != "none" {
            format!("{first} {enhanced}")
        } else {
            first.to_string()
        }
    } else {
        enhanced
    }
}

pub async fn run(config: Config, args: DoctorArgs) -> Result<i32> {
    let since_ms = crate::cli::parse_when(&args.since, "--since")?;
    let wait =
        godwit_config::parse_duration(&args.wait).map_err(|e| anyhow::anyhow!("--wait: {e}"))?;
    let store = crate::cli::open_store(&config).await?;
    let mut facts = Facts {
        window: args.since.clone(),
        address: args.address.clone(),
        outbound_configured: config.outbound.is_some(),
        access_configured: config.access.is_some(),
        ..Default::default()
    };
    if args.send_test {
        let to = args.address.clone().unwrap_or_else(|| {
            format!(
                "postmaster@{}",
                config
                    .domains
                    .accepted
                    .first()
                    .map(String::as_str)
                    .unwrap_or("localhost")
            )
        });
        facts.send_test = Some(send_test(&config, &store, &to, wait).await);
    }
    let rows =
        godwit_store::sqlx::query("SELECT body FROM events WHERE ts_ms >= $1 ORDER BY ts_ms")
            .bind(since_ms)
            .fetch_all(&store.pool)
            .await
            .context("reading events from the state store")?;
    let records: Vec<Record> = rows
        .into_iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .filter_map(|b| serde_json::from_str(&b).ok())
        .collect();
    let mut sums: BTreeMap<String, DelaySums> = BTreeMap::new();
    for r in &records {
        match &r.event {
            Event::MessageAccepted { .. } => facts.accepted += 1,
            Event::MessageRefused { stage, reply, .. } => {
                *facts
                    .refused
                    .entry((stage.clone(), code_of(reply)))
                    .or_default() += 1
            }
            Event::Delivered {
                platform, delays, ..
            } => {
                *facts.delivered.entry(platform.clone()).or_default() += 1;
                sums.entry(platform.clone()).or_default().add(delays);
            }
            Event::Deferred {
                platform,
                reply,
                delays,
                ..
            } => {
                sums.entry(platform.clone()).or_default().add(delays);
                let code = basic_code(reply);
                if doctor::is_temporary(&code) {
                    let key = (platform.clone(), code);
                    *facts.temp_failures.entry(key.clone()).or_default() += 1;
                    facts.temp_samples.insert(key, reply.clone());
                }
            }
            Event::Failed {
                platform,
                delays,
                rcpt,
                reply,
                ..
            } => {
                sums.entry(platform.clone()).or_default().add(delays);
                // A bounce from the internet: by the remote domain (the
                // recipient's, also behind a smarthost) and its code.
                if godwit_relay::outbound::is_outbound(platform) {
                    let domain = rcpt
                        .rsplit_once('@')
                        .map_or(rcpt.as_str(), |(_, d)| d)
                        .to_ascii_lowercase();
                    *facts
                        .outbound_bounces
                        .entry((domain, basic_code(reply)))
                        .or_default() += 1;
                }
            }
            ev @ Event::MessageLoop { .. } => {
                facts
                    .loops
                    .extend(crate::route::loop_line(ev, args.address.as_deref()));
            }
            Event::AccessLogin {
                platform, reason, ..
            } => match reason {
                None => facts.logins_ok += 1,
                Some(why) => {
                    *facts
                        .login_failures
                        .entry((platform.clone().unwrap_or_else(|| "-".into()), why.clone()))
                        .or_default() += 1
                }
            },
            _ => {}
        }
    }
    facts.delays = sums.into_iter().map(|(p, d)| (p, d.means())).collect();
    let now = godwit_spool::now_ms();
    for m in godwit_spool::list(&config.spool_dir()) {
        facts.queue_messages += 1;
        facts.queue_oldest_s = facts
            .queue_oldest_s
            .max(((now - m.header.arrival_ms) / 1000).max(0) as u64);
    }
    for n in crate::fleet::live_nodes(&store).await? {
        if let Some(map) = n.destinations.as_object() {
            for (p, d) in map {
                let e = facts.destinations.entry(p.clone()).or_insert(Destination {
                    circuit: String::new(),
                    limit: 0,
                    max: 0,
                });
                // On a fleet, the worst node's view: one open circuit is enough.
                let circuit = d["circuit"].as_str().unwrap_or("?").to_string();
                if e.circuit.is_empty() || circuit == "open" {
                    e.circuit = circuit;
                }
                e.limit = e.limit.max(d["limit"].as_u64().unwrap_or(0));
                e.max = e.max.max(d["max"].as_u64().unwrap_or(0));
            }
        }
    }
    if let Some(addr) = &args.address {
        let addr = addr.to_ascii_lowercase();
        let e = godwit_route::history::explain(&store, &config, &addr).await?;
        let d = &e.decision;
        facts.route_platforms = match d.route.as_str() {
            godwit_config::ROUTE_BOTH => config.platforms.keys().cloned().collect(),
            godwit_config::ROUTE_HOLD => Vec::new(),
            p => vec![p.to_string()],
        };
        facts.route_now = Some((d.route.clone(), d.why.to_string(), d.version));
        let traces = godwit_evidence::trace::find(
            &store,
            &godwit_evidence::trace::Query {
                rcpt: Some(addr.clone()),
                since_ms: Some(since_ms),
                ..Default::default()
            },
        )
        .await?;
        // The last ten messages to the address.
        for t in traces.iter().rev().take(10).rev() {
            let mut m = AddressMessage {
                queue_id: t.queue_id.clone(),
                message_id: t.message_id.clone(),
                queued: t.verdict == "queued" || t.verdict == "partial",
                ..Default::default()
            };
            for r in &t.events {
                match &r.event {
                    Event::Routed {
                        rcpt,
                        route,
                        routing_version,
                        queue_id,
                        ..
                    } if rcpt.eq_ignore_ascii_case(&addr) && *queue_id == t.queue_id => {
                        m.routed_to = route.clone();
                        m.routing_version = *routing_version;
                    }
                    Event::Delivered {
                        rcpt,
                        platform,
                        queue_id,
                        ..
                    } if rcpt.eq_ignore_ascii_case(&addr) && *queue_id == t.queue_id => {
                        m.delivered_to.push(platform.clone())
                    }
                    _ => {}
                }
            }
            if !m.routed_to.is_empty() {
                facts.messages.push(m);
            }
        }
        if let Some(access) = &config.access {
            let ep = godwit_access::autoconfig::Endpoints::from_config(&config, access);
            let ports = |v: &[godwit_access::autoconfig::Endpoint]| {
                v.iter()
                    .map(|e| format!("{}:{} ({:?})", ep.hostname, e.port, e.socket))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            facts.autoconfig = Some(match ep.domain_of(&addr) {
                Some(dom) => format!(
                    "for {dom}: IMAP {}; SMTP {}",
                    ports(&ep.imap),
                    ports(&ep.smtp)
                ),
                None => format!("{addr}'s domain is not served by the access front's autoconfig"),
            });
        }
    }
    if config.outbound.is_some() {
        facts.outbound_auth = outbound_samples(&config).await;
    }
    let found = doctor::diagnose(&facts);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "exit_code": doctor::exit_code(&found),
                "findings": found,
                "facts": {
                    "send_test": facts.send_test,
                    "route_now": facts.route_now,
                    "messages": facts.messages,
                },
            }))?
        );
    } else {
        print!("{}", doctor::render(&found));
    }
    Ok(doctor::exit_code(&found))
}

/// Question 4's alignment check: for each domain godwit signs for, a sample
/// message signed exactly as the relay signs outbound mail, then verified
/// as a receiver would (mail-auth: DKIM against the published key, SPF for
/// each egress IP, DMARC), with `outbound.resolvers`.
async fn outbound_samples(config: &Config) -> Vec<doctor::AuthSample> {
    let Some(o) = &config.outbound else {
        return Vec::new();
    };
    let dns = match o.resolvers.first() {
        Some(r) => godwit_check::dns::Dns::nameserver(&r.to_string()),
        None => godwit_check::dns::Dns::system(),
    };
    let keys = godwit_outbound::DkimKeys::load(&config.dkim);
    let (dns, keys) = match (dns, keys) {
        (Ok(d), Ok(k)) => (d, k),
        (Err(e), _) => return vec![failed_sample("-", &format!("resolver: {e}"))],
        (_, Err(e)) => return vec![failed_sample("-", &format!("[[dkim]]: {e}"))],
    };
    let helo = o.helo.clone().unwrap_or_else(|| config.hostname.clone());
    let ips: Vec<std::net::IpAddr> = if o.egress_ips.is_empty() {
        // Nothing to check SPF against: DMARC then rests on DKIM alone.
        vec![std::net::IpAddr::from([0, 0, 0, 0])]
    } else {
        o.egress_ips.clone()
    };
    let mut out = Vec::new();
    for k in keys.keys() {
        let from = format!("postmaster@{}", k.domain);
        let message = format!(
            "From: <{from}>\r\nTo: <doctor@{host}>\r\nSubject: godwit doctor alignment sample\r\n\
             Date: {date}\r\nMessage-ID: <doctor.{now}@{host}>\r\nMIME-Version: 1.0\r\n\r\n\
             A sample signed as outbound mail is.\r\n",
            host = config.hostname,
            date = httpdate_now(),
            now = godwit_spool::now_ms(),
        );
        let signed = match keys.sign(message.as_bytes()) {
            Ok(Some(s)) => format!("{}{message}", s.header),
            Ok(None) => message.clone(),
            Err(e) => {
                out.push(failed_sample(&k.domain, &format!("signing: {e}")));
                continue;
            }
        };
        for ip in &ips {
            let mut a = doctor::AuthSample {
                domain: k.domain.clone(),
                ip: ip.to_string(),
                ..Default::default()
            };
            match dns
                .verify_message(signed.as_bytes(), *ip, &helo, &from)
                .await
            {
                Ok((dkim, spf, dmarc, policy)) => {
                    (a.dkim, a.spf, a.dmarc, a.policy) = (dkim, spf, dmarc, policy);
                }
                Err(e) => {
                    a.dmarc = format!("not verified ({e})");
                }
            }
            out.push(a);
        }
    }
    out
}

fn failed_sample(domain: &str, why: &str) -> doctor::AuthSample {
    doctor::AuthSample {
        domain: domain.into(),
        ip: "-".into(),
        dmarc: format!("not verified ({why})"),
        ..Default::default()
    }
}

/// The Date header value now (RFC 5322 3.3).
fn httpdate_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default()
}

/// A test message through our own listener, then its trace until the
/// platform's 250 (or `wait` passes).
async fn send_test(config: &Config, store: &Store, to: &str, wait: Duration) -> SendTest {
    let Some(listen) = config.smtp.listen.first().cloned() else {
        return SendTest {
            reply: "no smtp.listen address to send to".into(),
            ..Default::default()
        };
    };
    let mid = format!(
        "<doctor.{}.{}@{}>",
        godwit_spool::now_ms(),
        std::process::id(),
        config.hostname
    );
    let from = format!("doctor@{}", config.hostname);
    let body = format!(
        "Message-ID: {mid}\r\nFrom: <{from}>\r\nTo: <{to}>\r\nSubject: godwit doctor --send-test\r\n\r\nA test message from godwit doctor; it may be deleted.\r\n"
    );
    let (host_to, helo) = (to.to_string(), config.hostname.clone());
    let sent =
        tokio::task::spawn_blocking(move || smtp_send(&listen, &helo, &from, &host_to, &body))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
    let reply = match sent {
        Ok(r) => r,
        Err(e) => {
            return SendTest {
                reply: e,
                ..Default::default()
            };
        }
    };
    if !reply.starts_with("250") {
        return SendTest {
            reply,
            ..Default::default()
        };
    }
    let queue_id = reply.rsplit(' ').next().map(str::to_string);
    let mut t = SendTest {
        reply,
        queue_id: queue_id.clone(),
        ..Default::default()
    };
    let start = std::time::Instant::now();
    let mut first_deferral: Option<std::time::Instant> = None;
    while start.elapsed() < wait {
        let traces = godwit_evidence::trace::find(
            store,
            &godwit_evidence::trace::Query {
                key: queue_id.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_default();
        for tr in &traces {
            for r in &tr.events {
                match &r.event {
                    Event::Delivered {
                        platform,
                        remote_queue_id,
                        queue_id: q,
                        ..
                    } if Some(q) == queue_id.as_ref() => {
                        t.delivered_to = Some(platform.clone());
                        t.remote_queue_id = remote_queue_id.clone();
                    }
                    Event::Deferred {
                        reply, queue_id: q, ..
                    } if Some(q) == queue_id.as_ref() => {
                        t.deferred = Some(reply.clone());
                        first_deferral.get_or_insert_with(std::time::Instant::now);
                    }
                    _ => {}
                }
            }
        }
        if t.delivered_to.is_some() {
            t.deferred = None;
            break;
        }
        // A deferral gets one backoff's grace, then the answer is "deferred".
        if first_deferral.is_some_and(|at| at.elapsed() > Duration::from_secs(5)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t
}

/// One plain SMTP transaction (RFC 5321 3.3); returns the reply to the end
/// of DATA.
fn smtp_send(
    addr: &std::net::SocketAddr,
    helo: &str,
    from: &str,
    to: &str,
    body: &str,
) -> Result<String, String> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(10))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let reply = |r: &mut BufReader<std::net::TcpStream>| -> Result<String, String> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_err(|e| format!("{addr}: {e}"))? == 0 {
                return Err(format!("{addr} closed the connection"));
            }
            // The last line of a multi-line reply has a space after the code.
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return Ok(line.trim_end().to_string());
            }
        }
    };
    let g = reply(&mut r)?;
    if !g.starts_with("220") {
        return Ok(g);
    }
    for (cmd, want) in [
        (format!("EHLO {helo}\r\n"), "250"),
        (format!("MAIL FROM:<{from}>\r\n"), "250"),
        (format!("RCPT TO:<{to}>\r\n"), "250"),
        ("DATA\r\n".to_string(), "354"),
    ] {
        w.write_all(cmd.as_bytes()).map_err(|e| e.to_string())?;
        let rep = reply(&mut r)?;
        if !rep.starts_with(want) {
            return Ok(rep);
        }
    }
    w.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
    w.write_all(b".\r\n").map_err(|e| e.to_string())?;
    let end = reply(&mut r)?;
    let _ = w.write_all(b"QUIT\r\n");
    Ok(end)
}
