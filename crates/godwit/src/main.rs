//! godwit: the command line. `serve` runs the gateway; the other commands
//! work beside a running gateway (they share the state store and spool).

// glibc's malloc spent a fifth of a 100,000-mailbox wave consolidating
// freed chunks; mimalloc is built for many small strings.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod control;
mod fleet;
mod mailboxes;
mod smtpd;
mod tls;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use godwit_config::Config;
use godwit_events::{Event, EventLog};
use godwit_route::SharedRoutes;
use godwit_spool::{RcptStatus, Spool};
use godwit_store::Store;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "godwit",
    version,
    about = "Zero-downtime email migration gateway"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(
        long,
        global = true,
        env = "GODWIT_CONFIG",
        default_value = "godwit.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SMTP gateway.
    Serve,
    /// Show or change where a recipient's mail goes.
    Route {
        #[command(subcommand)]
        command: RouteCommand,
    },
    /// Inspect the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Preflight: DNS, SPF/DKIM/DMARC, TLS, SMTP and IMAP checks with a
    /// verdict. Exit 0: nothing blocks; 1: warnings only; 2: something blocks.
    Check(godwit_check::cli::CheckArgs),
    /// Copy mailboxes IMAP to IMAP (pre-seed, then deltas); exits 0 only when
    /// every account verified clean.
    Sync(godwit_imap::cli::SyncArgs),
    /// Compare source and target mailboxes without copying.
    Verify(godwit_imap::cli::VerifyArgs),
    /// The chain of custody of a message: by Message-ID, queue ID, or
    /// recipient and time window.
    Trace {
        /// A Message-ID (with or without <>) or a queue ID.
        key: Option<String>,
        /// Messages to this recipient (with --since/--until).
        #[arg(long)]
        rcpt: Option<String>,
        /// RFC 3339 time, or a duration ago ("2h").
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        json: bool,
        /// Also search both platforms' mailboxes (IMAP, the [sync] credentials)
        /// for each recipient.
        #[arg(long)]
        mailboxes: bool,
    },
    /// Evidence for a wave or an incident window: volumes, codes, latency,
    /// what is still queued, and a sample traced end to end.
    Report {
        /// RFC 3339 time, or a duration ago ("24h").
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long, default_value = "0s")]
        until: String,
        /// md, csv or json.
        #[arg(long, default_value = "md")]
        format: String,
        /// How many Message-IDs to trace end to end.
        #[arg(long, default_value_t = 10)]
        sample: usize,
    },
    /// The directory: mailboxes, aliases, groups and their migration state.
    Directory {
        #[command(subcommand)]
        command: control::DirectoryCommand,
    },
    /// Waves: move a set of mailboxes (and back) in one command.
    Wave {
        #[command(subcommand)]
        command: control::WaveCommand,
    },
    /// Every change to routes, states, waves and the directory, numbered.
    History {
        #[command(subcommand)]
        command: Option<control::HistoryCommand>,
        /// How many versions to list, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum RouteCommand {
    /// Route ADDRESS to PLATFORM (a configured platform, `both` or `hold`).
    Set {
        address: String,
        platform: String,
        /// Who made the change (default: the OS user).
        #[arg(long)]
        actor: Option<String>,
    },
    /// Remove ADDRESS's entry: it follows the domain or global default again.
    Unset {
        address: String,
        #[arg(long)]
        actor: Option<String>,
    },
    /// Where mail for ADDRESS goes now, and why.
    Show { address: String },
    /// Where mail for ADDRESS goes and everything that decides it: alias,
    /// group, state, override, wave, and the version that set it.
    Explain { address: String },
    /// Restore the routing as of version N, as a new version (undoable).
    Rollback {
        #[arg(long)]
        to: i64,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        actor: Option<String>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Messages in the queue with each recipient's state.
    List {
        /// One JSON object per message per line (like `postqueue -j`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        filter: Filter,
    },
    /// One message: envelope, headers, each recipient's state and last reply.
    Show { queue_id: String },
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
struct Filter {
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
struct Target {
    /// A queue ID.
    queue_id: Option<String>,
    #[command(flatten)]
    filter: Filter,
    /// Every message in the queue.
    #[arg(long)]
    all: bool,
    #[arg(long)]
    actor: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("godwit: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    if let Command::Check(args) = &cli.command {
        // The configuration is optional here: `check dns example.com` needs none.
        let explicit = std::env::args().any(|a| a == "--config" || a.starts_with("--config="));
        let config = if explicit || cli.config.exists() {
            Some(Config::load(&cli.config)?)
        } else {
            None
        };
        return godwit_check::run(config.as_ref(), args).await;
    }
    let config = Config::load(&cli.config)
        .with_context(|| "run with --config FILE (see examples/godwit.toml)")?;
    // Each command checks the sections it needs: a sync-only file runs
    // `godwit sync`, a gateway-only file runs the gateway.
    match &cli.command {
        Command::Sync(_) | Command::Verify(_) => {
            config
                .require_sync()
                .with_context(|| format!("{}: add the [sync] sections", cli.config.display()))?;
        }
        Command::Serve
        | Command::Route { .. }
        | Command::Directory { .. }
        | Command::Wave { .. } => config
            .require_gateway()
            .with_context(|| format!("{}: add the gateway's sections", cli.config.display()))?,
        _ => {}
    }
    if !matches!(
        cli.command,
        Command::Serve | Command::Sync(_) | Command::Verify(_)
    ) {
        // Other commands print for people (and JSON for scripts): logs only on
        // errors, or as RUST_LOG asks (e.g. RUST_LOG=godwit_route=debug for timings).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "error".into());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Route { command } => route(config, command).await,
        Command::Queue { command } => queue(config, command).await,
        Command::Check(_) => unreachable!("handled above"),
        Command::Sync(args) => {
            init_sync_logging(&config);
            godwit_imap::cli::run_sync(&config, &args).await
        }
        Command::Verify(args) => {
            init_sync_logging(&config);
            godwit_imap::cli::run_verify(&config, &args).await
        }
        Command::Trace {
            key,
            rcpt,
            since,
            until,
            json,
            mailboxes,
        } => trace(config, key, rcpt, since, until, json, mailboxes).await,
        Command::Report {
            since,
            until,
            format,
            sample,
        } => report(config, since, until, format, sample).await,
        Command::Directory { command } => control::directory(config, command).await,
        Command::Wave { command } => control::wave(config, command).await,
        Command::History { command, limit } => control::history(config, command, limit).await,
    }
}

/// Sync logs go through the progress bars' writer, so lines never tear them.
fn init_sync_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(godwit_imap::cli::ProgressWriter)
        .init();
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(config: Config) -> Result<i32> {
    init_logging(&config);
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.store_url()).await?;
    let routes = SharedRoutes::new(godwit_route::load(&store, &config).await?);
    let spool = Arc::new(Spool::open(&config.spool_dir())?);
    let (events, writer) = EventLog::new(&config.events_dir(), &config.hostname)?;
    tokio::spawn(writer.run());
    let relay = godwit_relay::Relay::new(
        config.clone(),
        spool.clone(),
        routes.clone(),
        events.clone(),
    );
    // Readers of the event stream, attached before the first event.
    let metrics = Arc::new(godwit_evidence::metrics::Metrics::new());
    tokio::spawn(metrics.clone().run(events.tap()));
    tokio::spawn(godwit_evidence::index::run_indexer(
        store.clone(),
        events.tap(),
    ));
    tokio::spawn(godwit_evidence::index::run_retention(
        store.clone(),
        config.events_dir(),
        config.events.retention,
    ));
    if let Some(path) = &config.events.postfix_log {
        tokio::spawn(godwit_evidence::maillog::run(
            path.clone(),
            config.hostname.clone(),
            events.tap(),
        ));
    }

    let (recovered, corrupt) = spool.recover()?;
    for (path, reason) in corrupt {
        events.emit(Event::QueueCorrupt {
            file: path.display().to_string(),
            reason,
        });
    }
    let n_recovered = recovered.len();
    for sp in recovered {
        let pending = sp
            .header
            .envelope
            .rcpts
            .iter()
            .zip(&sp.status)
            .filter(|(_, s)| s.as_ref().is_none_or(|s| !s.status.is_final()))
            .map(|((a, _), _)| a.clone())
            .collect();
        events.emit(Event::QueueRecovered {
            queue_id: sp.header.queue_id.clone(),
            message_id: sp.header.message_id.clone(),
            pending,
        });
        relay.enqueue(sp);
    }

    let smtpd = smtpd::Smtpd::new(config.clone(), spool.clone(), relay.clone(), events.clone())?;
    let mut listen = Vec::new();
    for addr in &config.smtp.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("smtp.listen: cannot listen on {addr}"))?;
        listen.push(l.local_addr()?.to_string());
        tokio::spawn(smtpd.clone().serve(l));
    }
    tokio::spawn(relay.clone().run());
    {
        let relay = relay.clone();
        let events = events.clone();
        let store = store.clone();
        tokio::spawn(godwit_route::watch(
            store,
            routes.clone(),
            Duration::from_millis(200),
            move |version, changes| {
                events.emit(Event::RouteChanged {
                    version,
                    actor: String::new(),
                    command: "reload".into(),
                    changes,
                });
                relay.routes_changed();
            },
        ));
    }
    if let Some(addr) = config.admin.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin.listen: cannot listen on {addr}"))?;
        let admin = godwit_evidence::http::Admin::new(
            metrics.clone(),
            relay.clone(),
            routes.clone(),
            store.clone(),
            config.hostname.clone(),
            config.admin.token.clone(),
        );
        tokio::spawn(admin.clone().run_sampler());
        tokio::spawn(godwit_evidence::http::serve(admin, l));
        tracing::info!("admin listener (metrics, dashboard) on http://{addr}/");
    }
    tokio::spawn(fleet::heartbeat_and_commands(
        store.clone(),
        relay.clone(),
        events.clone(),
        config.hostname.clone(),
    ));
    events.emit(Event::GatewayStarted {
        hostname: config.hostname.clone(),
        listen: listen.clone(),
        recovered: n_recovered,
        routing_version: routes.version(),
    });
    tracing::info!(
        "godwit listening on {}; {} message(s) recovered",
        listen.join(", "),
        n_recovered
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Everything accepted is already on disk; nothing to flush but the event log.
    events.emit(Event::GatewayStopped {
        reason: "signal".into(),
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(0)
}

/// RFC 3339, or a duration ago ("2h", "0s" = now).
fn parse_when(s: &str, flag: &str) -> Result<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let d = godwit_config::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{flag}: an RFC 3339 time or a duration ago; {e}"))?;
    Ok(godwit_spool::now_ms() - d.as_millis() as i64)
}

async fn trace(
    config: Config,
    key: Option<String>,
    rcpt: Option<String>,
    since: Option<String>,
    until: Option<String>,
    json: bool,
    search_mailboxes: bool,
) -> Result<i32> {
    if key.is_none() && rcpt.is_none() {
        bail!("give a Message-ID or queue ID, or --rcpt ADDRESS with --since/--until");
    }
    let store = Store::open(&config.store_url()).await?;
    let q = godwit_evidence::trace::Query {
        key,
        rcpt,
        since_ms: since
            .as_deref()
            .map(|s| parse_when(s, "--since"))
            .transpose()?,
        until_ms: until
            .as_deref()
            .map(|s| parse_when(s, "--until"))
            .transpose()?,
    };
    let traces = godwit_evidence::trace::find(&store, &q).await?;
    let mut found = Vec::new();
    if search_mailboxes {
        for t in &traces {
            let mut sides = Vec::new();
            if let Some(mid) = &t.message_id {
                let rcpts = t.events.iter().find_map(|r| match &r.event {
                    godwit_events::Event::MessageAccepted { rcpts, .. } => Some(rcpts.clone()),
                    _ => None,
                });
                for a in rcpts.unwrap_or_default() {
                    sides.extend(mailboxes::search(&config, &a, mid).await?);
                }
            }
            found.push(sides);
        }
    }
    if json {
        if search_mailboxes {
            let v: Vec<_> = traces
                .iter()
                .zip(&found)
                .map(|(t, m)| serde_json::json!({"trace": t, "mailboxes": m}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&traces)?);
        }
    } else if traces.is_empty() {
        println!(
            "no message found (events are kept for {:?}; is the Message-ID right?)",
            config.events.retention
        );
    } else {
        for (i, t) in traces.iter().enumerate() {
            println!("{}", godwit_evidence::trace::render(t));
            if let Some(sides) = found.get(i) {
                if sides.is_empty() {
                    println!("Mailboxes: no recipient of this message is in sync.accounts");
                } else {
                    println!("Mailboxes:\n{}", mailboxes::render(sides));
                }
            }
        }
    }
    Ok(if traces.is_empty() { 1 } else { 0 })
}

async fn report(
    config: Config,
    since: String,
    until: String,
    format: String,
    sample: usize,
) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    let (since, until) = (
        parse_when(&since, "--since")?,
        parse_when(&until, "--until")?,
    );
    let r =
        godwit_evidence::report::build(&store, &config.spool_dir(), since, until, sample).await?;
    match format.as_str() {
        "md" => print!("{}", godwit_evidence::report::markdown(&r)),
        "csv" => print!("{}", godwit_evidence::report::csv(&r)),
        "json" => println!("{}", serde_json::to_string_pretty(&r)?),
        other => bail!("--format {other}: choose md, csv or json"),
    }
    Ok(0)
}

fn actor(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .or_else(os_user)
        .unwrap_or_else(|| "unknown".into())
}

/// The login name of the real user, from the password database.
fn os_user() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy
    // the name out immediately and call it from one thread (the CLI).
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_str()
            .ok()
            .map(str::to_string)
    }
}

async fn route(config: Config, command: RouteCommand) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    match command {
        RouteCommand::Set {
            address,
            platform,
            actor: who,
        } => {
            check_address(&config, &address)?;
            if platform == godwit_config::ROUTE_BOTH && config.platforms.len() < 2 {
                bail!("route `both` needs at least two platforms in the configuration");
            }
            if !config.is_route_name(&platform) {
                let names: Vec<_> = config
                    .platforms
                    .keys()
                    .cloned()
                    .chain(["both".to_string(), "hold".to_string()])
                    .collect();
                bail!(
                    "`{platform}` is not a platform; choose one of: {}",
                    names.join(", ")
                );
            }
            let cmd = format!("route set {address} {platform}");
            let (v, applied) = godwit_route::commit(
                &store,
                &config,
                &actor(who),
                &cmd,
                vec![(address.clone(), Some(platform.clone()))],
            )
            .await?;
            if applied.is_empty() {
                println!(
                    "{address} already routes to {platform} (version {v} recorded, nothing changed)"
                );
            } else {
                let before = applied[0]
                    .before
                    .clone()
                    .unwrap_or_else(|| "(default)".into());
                println!("{address}: {before} -> {platform} (version {v})");
            }
        }
        RouteCommand::Unset {
            address,
            actor: who,
        } => {
            let cmd = format!("route unset {address}");
            let (v, applied) = godwit_route::commit(
                &store,
                &config,
                &actor(who),
                &cmd,
                vec![(address.clone(), None)],
            )
            .await?;
            if applied.is_empty() {
                println!("{address} had no entry (version {v})");
            } else {
                println!("{address}: entry removed (version {v}); it follows the default again");
            }
        }
        RouteCommand::Show { address } => {
            check_address(&config, &address)?;
            let map = godwit_route::load_one(&store, &config, &address).await?;
            let d = map.decide(&address);
            println!(
                "{}: {} ({}; routing version {})",
                godwit_route::normalize_address(&address),
                d.route,
                d.why,
                d.version
            );
        }
        RouteCommand::Explain { address } => {
            return control::route_explain(&config, &store, &address).await;
        }
        RouteCommand::Rollback { to, dry_run, actor } => {
            return control::route_rollback(&config, &store, to, dry_run, actor).await;
        }
    }
    Ok(0)
}

fn check_address(config: &Config, address: &str) -> Result<()> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        bail!("`{address}` is not an address (expected local@domain)");
    };
    if local.is_empty() || !config.is_accepted_domain(domain) {
        bail!(
            "`{address}` is not in an accepted domain ({})",
            config.domains.accepted.join(", ")
        );
    }
    Ok(())
}

fn selector(t: &Target) -> Result<godwit_relay::Selector> {
    let older_than_s = match &t.filter.older_than {
        Some(d) => Some(
            godwit_config::parse_duration(d)
                .map_err(|e| anyhow::anyhow!("--older-than: {e}"))?
                .as_secs(),
        ),
        None => None,
    };
    let sel = godwit_relay::Selector {
        queue_id: t.queue_id.clone(),
        platform: t.filter.platform.clone(),
        rcpt: t.filter.rcpt.clone(),
        older_than_s,
        all: t.all,
    };
    if sel.is_empty() {
        bail!("name a queue ID, a filter (--platform, --rcpt, --older-than) or --all");
    }
    Ok(sel)
}

fn state_of(s: &Option<godwit_spool::StatusRecord>) -> RcptStatus {
    s.as_ref().map_or(RcptStatus::Pending, |s| s.status)
}

fn list_matches(f: &Filter, m: &godwit_spool::Spooled, i: usize, now: i64) -> Result<bool> {
    let (addr, _) = &m.header.envelope.rcpts[i];
    let s = &m.status[i];
    if s.as_ref().is_some_and(|s| s.status.is_final()) {
        return Ok(false);
    }
    let route = s
        .as_ref()
        .and_then(|s| s.platform.clone())
        .unwrap_or_default();
    let older = match &f.older_than {
        Some(d) => Some(
            godwit_config::parse_duration(d)
                .map_err(|e| anyhow::anyhow!("--older-than: {e}"))?
                .as_secs(),
        ),
        None => None,
    };
    let sel = godwit_relay::Selector {
        platform: f.platform.clone(),
        rcpt: f.rcpt.clone(),
        older_than_s: older,
        ..Default::default()
    };
    let state_ok = f
        .state
        .as_ref()
        .is_none_or(|st| format!("{:?}", state_of(s)).eq_ignore_ascii_case(st));
    Ok(state_ok && sel.matches(&m.header, addr, &route, now))
}

async fn queue(config: Config, command: QueueCommand) -> Result<i32> {
    let now = godwit_spool::now_ms();
    match command {
        QueueCommand::List { json, filter } => {
            let msgs = godwit_spool::list(&config.spool_dir());
            let mut shown = 0;
            for m in &msgs {
                let idx: Vec<usize> = (0..m.header.envelope.rcpts.len())
                    .filter(|&i| list_matches(&filter, m, i, now).unwrap_or(false))
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
                            })
                        })
                        .collect();
                    let line = serde_json::json!({
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
                    println!(
                        "{}  {:>8}  {:>6}s  <{}>  {}",
                        h.queue_id,
                        m.body_len,
                        (now - h.arrival_ms) / 1000,
                        h.envelope.mail_from,
                        h.message_id.as_deref().unwrap_or("-")
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
                            "    {}  {:?}{hold}  {why}",
                            h.envelope.rcpts[i].0,
                            state_of(s)
                        );
                    }
                }
            }
            if !json {
                println!("-- {shown} message(s) in queue");
            }
        }
        QueueCommand::Show { queue_id } => {
            let Some(m) = godwit_spool::list(&config.spool_dir())
                .into_iter()
                .find(|m| m.header.queue_id.eq_ignore_ascii_case(&queue_id))
            else {
                bail!(
                    "no message {queue_id} in the queue (delivered messages leave it; see the events log)"
                );
            };
            let h = &m.header;
            println!("queue id:    {}", h.queue_id);
            println!("message id:  {}", h.message_id.as_deref().unwrap_or("-"));
            println!(
                "arrived:     {}s ago from {} (HELO {}{})",
                (now - h.arrival_ms) / 1000,
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
            }
            let spool = Spool::open(&config.spool_dir())?;
            let body = spool.read_body(&m)?;
            let end = body
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(body.len());
            println!("\n{}", String::from_utf8_lossy(&body[..end]));
        }
        QueueCommand::Destinations { json } => {
            let store = Store::open(&config.store_url()).await?;
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
                        println!(
                            "  {p:<10} circuit={:<9} limit={}/{} in_flight={} delivered={} throttled={} down_for={}s recent={}",
                            d["circuit"].as_str().unwrap_or("?"),
                            d["limit"],
                            d["max"],
                            d["in_flight"],
                            d["delivered"],
                            d["throttled"],
                            d["down_for_s"],
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
        }
        QueueCommand::Hold(t) => return queue_op(&config, godwit_relay::QueueOp::Hold, &t).await,
        QueueCommand::Release(t) => {
            return queue_op(&config, godwit_relay::QueueOp::Release, &t).await;
        }
        QueueCommand::Flush(t) => return queue_op(&config, godwit_relay::QueueOp::Flush, &t).await,
        QueueCommand::Requeue(t) => {
            return queue_op(&config, godwit_relay::QueueOp::Requeue, &t).await;
        }
        QueueCommand::Delete { target, yes } => {
            // A bad selector is refused before anyone is asked to confirm.
            selector(&target)?;
            if !yes {
                use std::io::{BufRead, IsTerminal, Write};
                if !std::io::stdin().is_terminal() {
                    bail!("delete needs confirmation: run it in a terminal, or add --yes");
                }
                print!(
                    "Delete matching messages from the queue? They will not be delivered. Type `yes`: "
                );
                std::io::stdout().flush()?;
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != "yes" {
                    println!("nothing deleted");
                    return Ok(1);
                }
            }
            return queue_op(&config, godwit_relay::QueueOp::Delete, &target).await;
        }
    }
    Ok(0)
}

/// Sends a queue command to the running gateways, or applies it to the spool
/// directly when none is running.
async fn queue_op(config: &Config, op: godwit_relay::QueueOp, t: &Target) -> Result<i32> {
    let sel = selector(t)?;
    let who = actor(t.actor.clone());
    let store = Store::open(&config.store_url()).await?;
    let results = fleet::send(&store, &who, &op, &sel).await?;
    let name = serde_json::to_string(&op)?.trim_matches('"').to_string();
    if !results.is_empty() {
        for (node, affected) in results {
            println!("{name}: {affected} affected on {node}");
        }
        return Ok(0);
    }
    // Offline: no gateway is running; change the spool records directly.
    let spool = Spool::open(&config.spool_dir())?;
    let (events, writer) = EventLog::new(&config.events_dir(), &config.hostname)?;
    let writer = tokio::spawn(writer.run());
    let routes = godwit_route::load(&store, config).await?;
    let now = godwit_spool::now_ms();
    let mut affected = 0;
    for m in godwit_spool::list(&config.spool_dir()) {
        let h = &m.header;
        let mut recs = Vec::new();
        let mut matched = Vec::new();
        for (i, (addr, _)) in h.envelope.rcpts.iter().enumerate() {
            let s = &m.status[i];
            if s.as_ref().is_some_and(|s| s.status.is_final()) {
                continue;
            }
            let route = s
                .as_ref()
                .and_then(|s| s.platform.clone())
                .unwrap_or_else(|| routes.decide(addr).route);
            if !sel.matches(h, addr, &route, now) {
                continue;
            }
            matched.push(addr.clone());
            let mut rec = s.clone().unwrap_or(godwit_spool::StatusRecord {
                rcpt: i,
                status: RcptStatus::Pending,
                at_ms: now,
                attempts: 0,
                next_ms: 0,
                platform: None,
                reply: None,
                delivered_to: vec![],
                operator_hold: false,
                warned: false,
            });
            rec.at_ms = now;
            match op {
                godwit_relay::QueueOp::Hold => {
                    rec.operator_hold = true;
                    rec.status = RcptStatus::Held;
                }
                godwit_relay::QueueOp::Release
                | godwit_relay::QueueOp::Flush
                | godwit_relay::QueueOp::Requeue => {
                    if op == godwit_relay::QueueOp::Release {
                        rec.operator_hold = false;
                    } else if rec.operator_hold {
                        continue;
                    }
                    if op == godwit_relay::QueueOp::Requeue {
                        rec.platform = None;
                    }
                    rec.status = RcptStatus::Deferred;
                    rec.next_ms = 0;
                }
                godwit_relay::QueueOp::Delete => {}
            }
            recs.push(rec);
        }
        if matched.is_empty() {
            continue;
        }
        if op == godwit_relay::QueueOp::Delete {
            spool.remove_durable(&h.queue_id)?;
            events.emit(Event::QueueDeleted {
                queue_id: h.queue_id.clone(),
                message_id: h.message_id.clone(),
                rcpts: matched,
                actor: who.clone(),
            });
            affected += 1;
        } else if !recs.is_empty() {
            affected += recs.len();
            spool.record_many(&h.queue_id, &recs)?;
        }
    }
    events.emit(Event::QueueCommand {
        op: name.clone(),
        selector: serde_json::to_string(&sel)?,
        actor: who,
        affected,
        node: "offline".into(),
    });
    drop(events);
    let _ = writer.await;
    println!("{name}: {affected} affected (no gateway running; spool changed directly)");
    Ok(0)
}
