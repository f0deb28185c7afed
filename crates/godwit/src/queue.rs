//! `godwit queue`: list, show and shape the queue, and the operator's
//! commands on it (hold, release, flush, requeue, delete). A running gateway
//! applies those itself (through the store); with none running, they change
//! the spool here.

use crate::fleet;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use godwit_config::Config;
use godwit_events::{Event, EventLog};
use godwit_spool::{RcptStatus, Spool};
use std::time::Duration;

#[derive(Subcommand)]
pub(crate) enum QueueCommand {
    /// Messages in the queue with each recipient's state.
    List {
        /// One JSON object per message per line (like `postqueue -j`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// One message: envelope, headers, each recipient's state, last reply
    /// and next retry.
    Show {
        queue_id: String,
        /// The same as one JSON object.
        #[arg(long)]
        json: bool,
        /// Also print the whole message as queued (what `postcat -b` shows).
        #[arg(long)]
        body: bool,
    },
    /// Message age buckets by platform and recipient domain, like Postfix's
    /// `qshape`: where the queue is growing, and since when.
    Shape {
        /// Rows by recipient domain (default) or by platform.
        #[arg(long, default_value = "domain", value_parser = ["domain", "platform"])]
        by: String,
        #[arg(long)]
        json: bool,
    },
    /// Keep matching recipients queued, undelivered, until released.
    Hold(Target),
    /// Release held recipients (operator holds and route holds).
    Release(Target),
    /// Retry matching recipients now.
    Flush(Target),
    /// Decide the route again and retry now.
    Requeue(Target),
    /// Delete matching messages from the queue (asks for confirmation).
    Delete {
        #[command(flatten)]
        target: Target,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Each platform's delivery state on every running gateway: adaptive
    /// concurrency limit, in flight, circuit breaker, recent reply codes.
    Destinations {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Clone, Default)]
pub(crate) struct Filter {
    /// Only recipients routed to this platform.
    #[arg(long)]
    platform: Option<String>,
    /// Only this recipient address.
    #[arg(long)]
    rcpt: Option<String>,
    /// Only messages older than this ("30m", "2h").
    #[arg(long)]
    older_than: Option<String>,
    /// Only recipients in this state (pending, deferred, held).
    #[arg(long)]
    state: Option<String>,
}

#[derive(clap::Args, Clone)]
pub(crate) struct Target {
    /// Queue IDs; `-` reads them from stdin, one per line or separated by
    /// spaces (as `postsuper -d -`).
    #[arg(value_name = "QUEUE_ID")]
    queue_ids: Vec<String>,
    /// The one queue ID an operation is sent with (filled per ID).
    #[arg(skip)]
    queue_id: Option<String>,
    #[command(flatten)]
    filter: Filter,
    /// Every message in the queue.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    actor: Option<String>,
}

impl Filter {
    /// The part of a queue selector `--platform`, `--rcpt` and `--older-than` make.
    fn selector(&self) -> Result<godwit_relay::Selector> {
        let older_than_s = match &self.older_than {
            Some(d) => Some(
                godwit_config::parse_duration(d)
                    .map_err(|e| anyhow::anyhow!("--older-than: {e}"))?
                    .as_secs(),
            ),
            None => None,
        };
        Ok(godwit_relay::Selector {
            platform: self.platform.clone(),
            rcpt: self.rcpt.clone(),
            older_than_s,
            ..Default::default()
        })
    }
}

fn selector(t: &Target) -> Result<godwit_relay::Selector> {
    let sel = godwit_relay::Selector {
        queue_id: t.queue_id.clone(),
        all: t.all,
        ..t.filter.selector()?
    };
    if sel.is_empty() {
        bail!("name a queue ID, a filter (--platform, --rcpt, --older-than) or --all");
    }
    Ok(sel)
}

/// The recipients of a queue file still to deliver (no final outcome yet),
/// as the recovered and adopted events name them.
pub(crate) fn pending(sp: &godwit_spool::Spooled) -> Vec<String> {
    sp.header
        .envelope
        .rcpts
        .iter()
        .zip(&sp.status)
        .filter(|(_, s)| s.as_ref().is_none_or(|s| !s.status.is_final()))
        .map(|((a, _), _)| a.clone())
        .collect()
}

/// When a deferred recipient is tried next, as "in 4m 10s" (none when it
/// is not waiting for a retry).
fn next_retry(s: Option<&godwit_spool::StatusRecord>, now: i64) -> Option<String> {
    let s = s?;
    if s.status != RcptStatus::Deferred || s.next_ms <= 0 || s.next_ms == i64::MAX {
        return None;
    }
    Some(if s.next_ms <= now {
        "now".into()
    } else {
        format!(
            "in {}",
            godwit_config::format_duration(Duration::from_secs(((s.next_ms - now) / 1000) as u64))
        )
    })
}

/// The next retry as RFC 3339 UTC, for JSON.
fn next_retry_time(s: Option<&godwit_spool::StatusRecord>) -> Option<String> {
    let s = s?;
    if s.status != RcptStatus::Deferred || s.next_ms <= 0 || s.next_ms == i64::MAX {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(s.next_ms as i128 * 1_000_000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn state_of(s: &Option<godwit_spool::StatusRecord>) -> RcptStatus {
    s.as_ref().map_or(RcptStatus::Pending, |s| s.status)
}

/// Whether `queue list` shows recipient `i` of `m`: still queued, in the
/// `--state` asked for, and matched by the filter's selector `sel`.
fn list_matches(
    f: &Filter,
    sel: &godwit_relay::Selector,
    m: &godwit_spool::Spooled,
    i: usize,
    now: i64,
) -> bool {
    let (addr, _) = &m.header.envelope.rcpts[i];
    let s = &m.status[i];
    if s.as_ref().is_some_and(|s| s.status.is_final()) {
        return false;
    }
    let route = s
        .as_ref()
        .and_then(|s| s.platform.clone())
        .unwrap_or_default();
    let state_ok = f
        .state
        .as_ref()
        .is_none_or(|st| format!("{:?}", state_of(s)).eq_ignore_ascii_case(st));
    state_ok && sel.matches(&m.header, addr, &route, now)
}

/// The queues of the other live gateways sharing a PostgreSQL store (empty
/// on SQLite, which one node owns). Says on stderr which nodes the listing
/// does not cover; a store that does not answer leaves this node's queue.
async fn fleet_queues(config: &Config, own: &str) -> Vec<(String, Vec<godwit_spool::Spooled>)> {
    if !config.store_url().starts_with("postgres") {
        return Vec::new();
    }
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        let store = crate::cli::open_store(config).await?;
        fleet::remote_queues(&store, own).await
    })
    .await;
    match result {
        Ok(Ok((queues, notes))) => {
            for n in notes {
                eprintln!("{n}");
            }
            queues
        }
        Ok(Err(e)) => {
            eprintln!("state store: {e:#}; only node {own}'s queue is listed");
            Vec::new()
        }
        Err(_) => {
            eprintln!(
                "the state store did not answer within 10 s; only node {own}'s queue is listed"
            );
            Vec::new()
        }
    }
}

pub(crate) async fn run(config: Config, command: QueueCommand) -> Result<i32> {
    use godwit_relay::QueueOp;
    match command {
        QueueCommand::List { json, filter } => list(&config, &filter, json).await,
        QueueCommand::Show {
            queue_id,
            json,
            body,
        } => show(&config, &queue_id, json, body),
        QueueCommand::Shape { by, json } => shape(&config, &by, json).await,
        QueueCommand::Destinations { json } => destinations(&config, json).await,
        QueueCommand::Hold(t) => queue_cmd(&config, QueueOp::Hold, t).await,
        QueueCommand::Release(t) => queue_cmd(&config, QueueOp::Release, t).await,
        QueueCommand::Flush(t) => queue_cmd(&config, QueueOp::Flush, t).await,
        QueueCommand::Requeue(t) => queue_cmd(&config, QueueOp::Requeue, t).await,
        QueueCommand::Delete { target, yes } => delete(&config, target, yes).await,
    }
}

/// `queue list`, like `mailq` (or `postqueue -j` with --json): this node's
/// queue and, on a shared store, every other live gateway's.
async fn list(config: &Config, filter: &Filter, json: bool) -> Result<i32> {
    let now = godwit_spool::now_ms();
    check_filter(config, filter)?;
    let sel = filter.selector()?;
    // This node's spool, then (a fleet on a shared store) every
    // other live gateway's, each message labelled with its node.
    let own = config.node_name().to_string();
    let mut msgs: Vec<(String, godwit_spool::Spooled)> = godwit_spool::list(&config.spool_dir())
        .into_iter()
        .map(|m| (own.clone(), m))
        .collect();
    let fleet_nodes = fleet_queues(config, &own).await;
    let several = !fleet_nodes.is_empty();
    for (node, list) in fleet_nodes {
        msgs.extend(list.into_iter().map(|m| (node.clone(), m)));
    }
    let mut shown = 0;
    let mut total_bytes = 0u64;
    for (node, m) in &msgs {
        let idx: Vec<usize> = (0..m.header.envelope.rcpts.len())
            .filter(|&i| list_matches(filter, &sel, m, i, now))
            .collect();
        if idx.is_empty() {
            continue;
        }
        shown += 1;
        let h = &m.header;
        if json {
            let rcpts: Vec<_> = idx
                .iter()
                .map(|&i| {
                    let s = &m.status[i];
                    serde_json::json!({
                        "address": h.envelope.rcpts[i].0,
                        "state": state_of(s),
                        "attempts": s.as_ref().map_or(0, |s| s.attempts),
                        "platform": s.as_ref().and_then(|s| s.platform.clone()),
                        "delivered_to": s.as_ref().map(|s| s.delivered_to.clone()).unwrap_or_default(),
                        "operator_hold": s.as_ref().is_some_and(|s| s.operator_hold),
                        "reason": s.as_ref().and_then(|s| s.reply.clone()),
                        "next_retry": next_retry_time(s.as_ref()),
                    })
                })
                .collect();
            let line = serde_json::json!({
                "node": node,
                "queue_id": h.queue_id,
                "message_id": h.message_id,
                "arrival_time": h.arrival_ms / 1000,
                "message_size": m.body_len,
                "sender": h.envelope.mail_from,
                "kind": h.kind,
                "recipients": rcpts,
            });
            println!("{line}");
        } else {
            if shown == 1 {
                println!(
                    "{:<12}  {:>8}  {:>8}  -Sender/Message-ID/Recipient-",
                    "-Queue ID-", "--Size--", "--Age--"
                );
            }
            total_bytes += m.body_len;
            println!(
                "{:<12}  {:>8}  {:>8}  <{}>  {}{}",
                h.queue_id,
                m.body_len,
                godwit_config::format_duration(std::time::Duration::from_secs(
                    ((now - h.arrival_ms) / 1000).max(0) as u64
                )),
                h.envelope.mail_from,
                h.message_id.as_deref().unwrap_or("-"),
                if several {
                    format!("  (on {node})")
                } else {
                    String::new()
                }
            );
            for &i in &idx {
                let s = &m.status[i];
                let why = s.as_ref().and_then(|s| s.reply.clone()).unwrap_or_default();
                let hold = if s.as_ref().is_some_and(|s| s.operator_hold) {
                    " (operator hold)"
                } else {
                    ""
                };
                println!(
                    "    {}  {:?}{hold}{}  {why}",
                    h.envelope.rcpts[i].0,
                    state_of(s),
                    next_retry(s.as_ref(), now)
                        .map(|n| format!(", next retry {n}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    if !json {
        // Postfix's mailq total line, which scripts grep for.
        if shown == 0 {
            println!("Mail queue is empty");
        } else {
            println!(
                "-- {} Kbytes in {shown} Request{}.",
                total_bytes.div_ceil(1024),
                if shown == 1 { "" } else { "s" }
            );
        }
    }
    Ok(0)
}

/// `queue show`, like `postcat`: one message's envelope, headers, each
/// recipient's state, last reply and next retry.
fn show(config: &Config, queue_id: &str, json: bool, with_body: bool) -> Result<i32> {
    let now = godwit_spool::now_ms();
    let Some(m) = godwit_spool::list(&config.spool_dir())
        .into_iter()
        .find(|m| m.header.queue_id.eq_ignore_ascii_case(queue_id))
    else {
        bail!(
            "no message {queue_id} in the queue (delivered messages leave it; see the events log)"
        );
    };
    // Read-only: the gateway may be writing beside us.
    let body = godwit_spool::read_body_at(&config.spool_dir(), &m)?;
    let end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len());
    let h = &m.header;
    if json {
        let rcpts: Vec<_> = h
            .envelope
            .rcpts
            .iter()
            .enumerate()
            .map(|(i, (a, p))| {
                let s = m.status[i].as_ref();
                serde_json::json!({
                    "address": a,
                    "state": state_of(&m.status[i]),
                    "attempts": s.map_or(0, |s| s.attempts),
                    "platform": s.and_then(|s| s.platform.clone()),
                    "delivered_to": s.map(|s| s.delivered_to.clone()).unwrap_or_default(),
                    "operator_hold": s.is_some_and(|s| s.operator_hold),
                    "last_reply": s.and_then(|s| s.reply.clone()),
                    "next_retry": next_retry_time(s),
                    "notify": p.notify,
                })
            })
            .collect();
        let mut v = serde_json::json!({
            "queue_id": h.queue_id,
            "message_id": h.message_id,
            "arrival_time": h.arrival_ms / 1000,
            "client_ip": h.envelope.client_ip,
            "helo": h.envelope.helo,
            "tls": h.envelope.tls,
            "sender": h.envelope.mail_from,
            "message_size": m.body_len,
            "recipients": rcpts,
            "headers": String::from_utf8_lossy(&body[..end]),
        });
        if with_body {
            v["message"] = String::from_utf8_lossy(&body).into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("queue id:    {}", h.queue_id);
    println!("message id:  {}", h.message_id.as_deref().unwrap_or("-"));
    println!(
        "arrived:     {} ago from {} (HELO {}{})",
        godwit_config::format_duration(std::time::Duration::from_secs(
            ((now - h.arrival_ms) / 1000).max(0) as u64
        )),
        h.envelope.client_ip,
        h.envelope.helo,
        if h.envelope.tls { ", TLS" } else { "" }
    );
    println!("sender:      <{}>", h.envelope.mail_from);
    println!("size:        {} bytes", m.body_len);
    for (i, (a, p)) in h.envelope.rcpts.iter().enumerate() {
        let s = &m.status[i];
        println!(
            "recipient:   {a}  {:?}  attempts={}  platform={}  delivered_to={:?}{}",
            state_of(s),
            s.as_ref().map_or(0, |s| s.attempts),
            s.as_ref()
                .and_then(|s| s.platform.clone())
                .unwrap_or_else(|| "-".into()),
            s.as_ref()
                .map(|s| s.delivered_to.clone())
                .unwrap_or_default(),
            if p.notify.is_empty() {
                String::new()
            } else {
                format!("  NOTIFY={}", p.notify.join(","))
            }
        );
        if let Some(r) = s.as_ref().and_then(|s| s.reply.clone()) {
            println!("             last reply: {r}");
        }
        if let Some(n) = next_retry(s.as_ref(), now) {
            println!("             next retry: {n}");
        }
    }
    if with_body {
        println!("\n*** MESSAGE CONTENTS {} ***", h.queue_id);
        print!("{}", String::from_utf8_lossy(&body).replace("\r\n", "\n"));
        println!("*** END OF MESSAGE ***");
    } else {
        println!("\n{}", String::from_utf8_lossy(&body[..end]));
    }
    Ok(0)
}

/// `queue shape`, like `qshape`: age buckets by recipient domain or platform.
async fn shape(config: &Config, by: &str, json: bool) -> Result<i32> {
    let now = godwit_spool::now_ms();
    let msgs = godwit_spool::list(&config.spool_dir());
    let store = crate::cli::open_store(config).await?;
    let routes = godwit_route::load(&store, config).await?;
    let mut rows = Vec::new();
    for m in &msgs {
        for (i, (addr, _)) in m.header.envelope.rcpts.iter().enumerate() {
            let s = &m.status[i];
            if s.as_ref().is_some_and(|s| s.status.is_final()) {
                continue;
            }
            let key = if by == "platform" {
                s.as_ref()
                    .and_then(|s| s.platform.clone())
                    .unwrap_or_else(|| routes.decide(addr).route)
            } else {
                addr.rsplit_once('@')
                    .map_or(addr.as_str(), |(_, d)| d)
                    .to_ascii_lowercase()
            };
            rows.push((key, ((now - m.header.arrival_ms) / 60_000).max(0) as u64));
        }
    }
    let shape = godwit_evidence::report::qshape(&rows);
    if json {
        println!("{}", serde_json::to_string_pretty(&shape)?);
    } else {
        print!("{}", godwit_evidence::report::render_qshape(&shape, by));
    }
    Ok(0)
}

/// `queue destinations`: each platform's delivery state on every running
/// gateway, from their heartbeats.
async fn destinations(config: &Config, json: bool) -> Result<i32> {
    let store = crate::cli::open_store(config).await?;
    let nodes = fleet::live_nodes(&store).await?;
    if nodes.is_empty() {
        println!(
            "no running gateway has reported in the last {}s",
            fleet::LIVE_MS / 1000
        );
        return Ok(1);
    }
    for n in nodes {
        if json {
            println!(
                "{}",
                serde_json::json!({"node": n.node, "queue_len": n.queue_len, "destinations": n.destinations})
            );
            continue;
        }
        println!(
            "{} (queue {} message(s), seen {}ms ago)",
            n.node,
            n.queue_len,
            godwit_spool::now_ms() - n.seen_ms
        );
        if let Some(map) = n.destinations.as_object() {
            for (p, d) in map {
                // An open circuit lets one probe through when its
                // cooldown ends: say when (`queue flush --platform`
                // closes it at once).
                let probe = match (d["circuit"].as_str(), d["down_for_s"].as_u64()) {
                    (Some("open"), Some(s)) => format!(
                        " next probe in {}",
                        godwit_config::format_duration(Duration::from_secs(s))
                    ),
                    _ => String::new(),
                };
                println!(
                    "  {p:<10} circuit={:<9} limit={}/{} in_flight={} delivered={} throttled={} recent={}{probe}",
                    d["circuit"].as_str().unwrap_or("?"),
                    d["limit"],
                    d["max"],
                    d["in_flight"],
                    d["delivered"],
                    d["throttled"],
                    d["recent_codes"]
                );
                for h in d["down_hosts"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<10} relay host {} passed over for {}s after connection failures",
                        "",
                        h[0].as_str().unwrap_or("?"),
                        h[1]
                    );
                }
            }
        }
    }
    Ok(0)
}

/// `queue delete`: asks for confirmation (unless --yes) once the selector
/// is known to be valid.
async fn delete(config: &Config, target: Target, yes: bool) -> Result<i32> {
    use godwit_relay::QueueOp;
    // A bad selector is refused before anyone is asked to confirm.
    let target = resolve_target(config, target)?;
    if !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            bail!("delete needs confirmation: run it in a terminal, or add --yes");
        }
        print!("Delete matching messages from the queue? They will not be delivered. Type `yes`: ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "yes" {
            println!("nothing deleted");
            return Ok(1);
        }
    }
    queue_targets(config, QueueOp::Delete, target).await
}

/// The recipient states `--state` names, as `queue list` shows them.
const STATES: [&str; 3] = ["pending", "deferred", "held"];

/// Refuses a filter value that could never match, naming it: an empty
/// answer to a typo reads as "the queue is empty".
fn check_filter(config: &Config, f: &Filter) -> Result<()> {
    if let Some(d) = &f.older_than {
        godwit_config::parse_duration(d).map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
    }
    if let Some(st) = &f.state
        && !STATES.iter().any(|s| s.eq_ignore_ascii_case(st))
    {
        bail!("--state `{st}`: choose one of {}", STATES.join(", "));
    }
    if let Some(p) = &f.platform
        && !config.is_route_name(p)
    {
        let names: Vec<_> = config.platforms.keys().map(String::as_str).collect();
        bail!(
            "--platform `{p}` is not a configured platform (choose one of: {}, hold)",
            names.join(", ")
        );
    }
    // The one address parser every command uses (RFC 5321 4.1.2): a value
    // that is no address could never match a queued recipient.
    if let Some(r) = &f.rcpt
        && godwit_route::Address::parse(r).is_err()
    {
        bail!("--rcpt `{r}` is not an address (expected local@domain)");
    }
    Ok(())
}

/// Queue IDs from the arguments, `-` standing for those on stdin.
fn queue_ids(args: &[String], stdin: impl std::io::Read) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stdin = Some(stdin);
    for a in args {
        if a == "-" {
            let Some(mut input) = stdin.take() else {
                bail!("`-` (queue IDs on stdin) may be given once");
            };
            let mut text = String::new();
            input
                .read_to_string(&mut text)
                .context("reading queue IDs from stdin")?;
            out.extend(text.split_whitespace().map(str::to_string));
        } else {
            out.push(a.clone());
        }
    }
    for id in &out {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("`{id}` is not a queue ID (letters and digits, as `queue list` shows)");
        }
    }
    Ok(out)
}

/// Validates a target's filters and reads its IDs (stdin for `-`).
fn resolve_target(config: &Config, mut t: Target) -> Result<Target> {
    check_filter(config, &t.filter)?;
    if t.filter.state.is_some() {
        bail!(
            "--state selects for `queue list` only; hold, release, flush, requeue and delete take IDs, --platform, --rcpt, --older-than or --all"
        );
    }
    t.queue_ids = queue_ids(&t.queue_ids, std::io::stdin().lock())?;
    if t.queue_ids.is_empty()
        && !t.all
        && t.filter.platform.is_none()
        && t.filter.rcpt.is_none()
        && t.filter.older_than.is_none()
    {
        bail!(
            "name queue IDs (or `-` for IDs on stdin), a filter (--platform, --rcpt, --older-than) or --all"
        );
    }
    Ok(t)
}

async fn queue_cmd(config: &Config, op: godwit_relay::QueueOp, t: Target) -> Result<i32> {
    let t = resolve_target(config, t)?;
    queue_targets(config, op, t).await
}

/// Runs `op` once per queue ID (or once for the filter). IDs not in the
/// queue are named; the exit is 1 when nothing matched at all.
async fn queue_targets(config: &Config, op: godwit_relay::QueueOp, t: Target) -> Result<i32> {
    let name = serde_json::to_string(&op)?.trim_matches('"').to_string();
    let msgs = godwit_spool::list(&config.spool_dir());
    let live = |m: &godwit_spool::Spooled| {
        m.status
            .iter()
            .any(|s| s.as_ref().is_none_or(|s| !s.status.is_final()))
    };
    if t.queue_ids.is_empty() {
        if !t.all {
            let store = crate::cli::open_store(config).await?;
            let routes = godwit_route::load(&store, config).await?;
            let now = godwit_spool::now_ms();
            let sel = selector(&t)?;
            let any = msgs.iter().any(|m| {
                m.header
                    .envelope
                    .rcpts
                    .iter()
                    .enumerate()
                    .any(|(i, (addr, _))| {
                        let s = &m.status[i];
                        let route = s
                            .as_ref()
                            .and_then(|s| s.platform.clone())
                            .unwrap_or_else(|| routes.decide(addr).route);
                        s.as_ref().is_none_or(|s| !s.status.is_final())
                            && sel.matches(&m.header, addr, &route, now)
                    })
            });
            if !any {
                println!("{name}: nothing in the queue matches");
                return Ok(1);
            }
        } else if !msgs.iter().any(live) {
            println!("{name}: the queue is empty");
            return Ok(1);
        }
        return queue_op(config, op, &t).await;
    }
    let mut matched = 0;
    for id in &t.queue_ids {
        if !msgs
            .iter()
            .any(|m| m.header.queue_id.eq_ignore_ascii_case(id) && live(m))
        {
            eprintln!(
                "godwit: {id}: no such message in the queue ({})",
                config.spool_dir().display()
            );
            continue;
        }
        matched += 1;
        let one = Target {
            queue_ids: Vec::new(),
            queue_id: Some(id.clone()),
            ..t.clone()
        };
        queue_op(config, op.clone(), &one).await?;
    }
    Ok(if matched == 0 { 1 } else { 0 })
}

/// Sends a queue command to the running gateways, or applies it to the spool
/// directly when none is running.
async fn queue_op(config: &Config, op: godwit_relay::QueueOp, t: &Target) -> Result<i32> {
    let sel = selector(t)?;
    let who = crate::cli::actor(t.actor.clone());
    let store = crate::cli::open_store(config).await?;
    let name = op.name();
    // The spool's lock says whether a gateway serves it. If one does, it
    // must apply the command itself, even if it has not reported in yet
    // (just started) or is slow to (a long wave transaction holding the
    // store's write lock): its files are never edited under it.
    let spool = match Spool::open(&config.spool_dir()) {
        Ok(s) => s,
        Err(e @ godwit_spool::SpoolError::Locked { .. }) => {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while fleet::live_nodes(&store).await?.is_empty() {
                if std::time::Instant::now() > deadline {
                    bail!(
                        "{e}\nIt has not reported in to the store for 10 s: nothing was changed."
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let results = fleet::send(&store, &who, &op, &sel, None).await?;
            if results.is_empty() {
                bail!(
                    "no gateway answered the {name} command within 5 s; it stays queued in the store and applies when a gateway reads it. Check with `godwit queue list`."
                );
            }
            let total: i64 = results.iter().map(|(_, a)| a).sum();
            for (node, affected) in results {
                println!("{name}: {affected} affected on {node}");
            }
            // As postsuper: nothing matched is a failure the caller can see.
            return Ok(if total == 0 { 1 } else { 0 });
        }
        Err(e) => return Err(e.into()),
    };
    // No process serves this spool: change it here. Other live gateways of
    // a fleet get the command too; this node's own heartbeat, if still
    // fresh, is a gateway that has just died.
    let fleet_results = fleet::send(&store, &who, &op, &sel, Some(config.node_name())).await?;
    for (node, affected) in &fleet_results {
        println!("{name}: {affected} affected on {node}");
    }
    let (events, writer) = EventLog::new(&config.events_dir(), config.node_name())?;
    let writer = tokio::spawn(writer.run());
    let routes = godwit_route::load(&store, config).await?;
    let affected = godwit_relay::apply_offline(
        &spool,
        &|a: &str| routes.decide(a).route,
        &op,
        &sel,
        &who,
        &mut |e| events.emit(e),
    )?;
    events.emit(Event::QueueCommand {
        op: name.to_string(),
        selector: serde_json::to_string(&sel)?,
        actor: who,
        affected,
        node: "offline".into(),
    });
    drop(events);
    let _ = writer.await;
    println!("{name}: {affected} affected (no gateway running; spool changed directly)");
    let total = affected as i64 + fleet_results.iter().map(|(_, a)| a).sum::<i64>();
    Ok(if total == 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_that_could_never_match_are_refused_by_name() {
        let config = Config::default();
        let rcpt = |r: &str| Filter {
            rcpt: Some(r.into()),
            ..Default::default()
        };
        // (filter, the refusal it gets, or None when accepted)
        let cases = [
            (rcpt("alice@example.com"), None),
            (rcpt("<Alice@Example.COM>"), None),
            (rcpt("alice"), Some("is not an address")),
            (rcpt("a@b@example.com"), Some("is not an address")),
            (rcpt("@example.com"), Some("is not an address")),
            (rcpt("alice@"), Some("is not an address")),
            (
                Filter {
                    state: Some("Deferred".into()),
                    ..Default::default()
                },
                None,
            ),
            (
                Filter {
                    state: Some("flying".into()),
                    ..Default::default()
                },
                Some("choose one of pending, deferred, held"),
            ),
            (
                Filter {
                    older_than: Some("2x".into()),
                    ..Default::default()
                },
                Some("--older-than"),
            ),
        ];
        for (f, want) in cases {
            let got = check_filter(&config, &f);
            match (want, got) {
                (None, Ok(())) => {}
                (Some(w), Err(e)) => assert!(e.to_string().contains(w), "{e} lacks `{w}`"),
                (w, g) => panic!(
                    "rcpt {:?} state {:?}: got {g:?}, want {w:?}",
                    f.rcpt, f.state
                ),
            }
        }
    }

    #[test]
    fn queue_ids_come_from_arguments_and_once_from_stdin() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ids = queue_ids(&args(&["A1", "-", "C3"]), "B2 b4\nB5\n".as_bytes()).unwrap();
        assert_eq!(ids, ["A1", "B2", "b4", "B5", "C3"]);
        let twice = queue_ids(&args(&["-", "-"]), "".as_bytes()).unwrap_err();
        assert!(twice.to_string().contains("may be given once"), "{twice}");
        let bad = queue_ids(&args(&["../etc"]), "".as_bytes()).unwrap_err();
        assert!(bad.to_string().contains("is not a queue ID"), "{bad}");
    }
}
