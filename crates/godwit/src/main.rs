//! godwit: the command line. `serve` runs the gateway; the other commands
//! work beside a running gateway (they share the state store and spool).

// glibc's malloc spent a fifth of a 100,000-mailbox wave consolidating
// freed chunks; mimalloc is built for many small strings.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod adopt;
mod control;
mod dkim_cli;
mod doctor;
mod fleet;
mod journal;
mod mailboxes;
mod probe;
mod smtpd;
mod soak;
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
    /// The spool of a node that will not come back.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// The gateways and sync workers sharing this state store.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
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
    /// The fast-diagnosis playbook: inbound, routing for ADDRESS,
    /// destination, outbound, clients, in that order. Exit code: the number
    /// of the first broken question, or 0.
    Doctor(doctor::DoctorArgs),
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
    /// The configuration as godwit reads it.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// DKIM keys: make one, or show the TXT records to publish.
    Dkim {
        #[command(subcommand)]
        command: dkim_cli::DkimCommand,
    },
    /// Every change to routes, states, waves and the directory, numbered.
    History {
        #[command(subcommand)]
        command: Option<control::HistoryCommand>,
        /// How many versions to list, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// The effective configuration, every default filled in and relative
    /// paths resolved, secrets masked (like `postconf`).
    Show {
        /// Only what differs from the defaults (like `postconf -n`).
        #[arg(long)]
        non_default: bool,
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
        #[command(flatten)]
        wait: fleet::Wait,
    },
    /// Remove ADDRESS's entry: it follows the domain or global default again.
    Unset {
        address: String,
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        wait: fleet::Wait,
    },
    /// Where mail for ADDRESS goes now, and why.
    Show {
        address: String,
        #[arg(long)]
        json: bool,
    },
    /// Where mail for ADDRESS goes and everything that decides it: alias,
    /// group, state, override, wave, and the version that set it.
    Explain {
        address: String,
        #[arg(long)]
        json: bool,
    },
    /// Restore the routing as of version N, as a new version (undoable).
    /// Where a sender's (or a sender domain's) outbound mail goes: `mx`, a
    /// platform name (its outbound_relay smarthost), or `default` to follow
    /// outbound.route again. Versioned, in the history, rolled back like
    /// every routing change.
    SetOutbound {
        /// alice@example.com, or a domain (example.com) for all its senders.
        sender: String,
        route: String,
        #[arg(long)]
        actor: Option<String>,
    },
    Rollback {
        #[arg(long)]
        to: i64,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        wait: fleet::Wait,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Take over the spool of a node that will not come back (its disk
    /// mounted here): each whole queue file is checked (END record, CRC),
    /// damaged ones quarantined, and its mail delivered from this node.
    Adopt {
        /// The dead node's data_dir, or its spool folder.
        dir: PathBuf,
        /// Adopt even though the node still heartbeats in the store (or
        /// cannot be identified): only when it will surely not come back.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Per gateway and sync worker: role, last heartbeat, routing version
    /// applied, spool depth, accounts being synced, open circuits.
    Status {
        #[arg(long)]
        json: bool,
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

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve) {
        // A command's output piped into `head` ends it quietly, as a Unix
        // tool does (Rust ignores SIGPIPE, so println! would panic).
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
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
    if let Command::Dkim {
        command:
            dkim_cli::DkimCommand::Keygen {
                domain,
                selector,
                algorithm,
                out,
            },
    } = &cli.command
    {
        // Needs no configuration: keys are made before they are configured.
        return dkim_cli::keygen(domain, selector, algorithm, out);
    }
    if let Command::Check(godwit_check::cli::CheckArgs {
        target: Some(godwit_check::cli::CheckTarget::Access { address, password }),
        ..
    }) = &cli.command
    {
        let config = Config::load(&cli.config)?;
        return check_access(config, address, password.clone()).await;
    }
    if let Command::Check(args) = &cli.command {
        // The configuration is optional here: `check dns example.com` needs none.
        let config = if config_given() || cli.config.exists() {
            Some(Config::load(&cli.config)?)
        } else {
            None
        };
        return godwit_check::run(config.as_ref(), args).await;
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e @ godwit_config::ConfigError::Read { .. }) if !config_given() => {
            bail!("{e} (run with --config FILE; see examples/godwit.toml)")
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(what) = reads_data_dir(&cli.command, &config)
        && !config.data_dir.is_dir()
    {
        // A read-only command must not create an empty data directory and
        // then report an empty queue for a full one elsewhere.
        bail!(
            "data_dir {} does not exist, so there is no {what} to read; is {} the gateway's configuration? (relative paths are relative to its folder)",
            config.data_dir.display(),
            cli.config.display()
        );
    }
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
        Command::Serve => serve(config, cli.config.clone()).await,
        Command::Route { command } => route(config, command).await,
        Command::Queue { command } => queue(config, command).await,
        Command::Fleet {
            command: FleetCommand::Status { json },
        } => {
            let store = godwit_store::Store::open(&config.store_url())
                .await
                .context("opening the state store")?;
            let window = config
                .sync
                .as_ref()
                .map_or(Duration::from_secs(30), |s| s.lease);
            fleet::status(&store, window, json).await
        }
        Command::Spool {
            command: SpoolCommand::Adopt { dir, force },
        } => adopt::cli(&config, &dir, force).await,
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
        Command::Doctor(args) => doctor::run(config, args).await,
        Command::Directory { command } => control::directory(config, command).await,
        Command::Wave { command } => control::wave(config, command).await,
        Command::History {
            command,
            limit,
            json,
        } => control::history(config, command, limit, json).await,
        Command::Dkim { command } => match command {
            dkim_cli::DkimCommand::Show => dkim_cli::show(&config),
            dkim_cli::DkimCommand::Keygen { .. } => unreachable!("handled above"),
        },
        Command::Config {
            command: ConfigCommand::Show { non_default },
        } => {
            print!(
                "{}",
                godwit_config::show(&config, non_default).map_err(|e| anyhow::anyhow!(e))?
            );
            Ok(0)
        }
    }
}

/// Whether --config (or GODWIT_CONFIG) named the file, rather than the default.
fn config_given() -> bool {
    std::env::var_os("GODWIT_CONFIG").is_some()
        || std::env::args().any(|a| a == "--config" || a.starts_with("--config="))
}

/// What a read-only command reads from `data_dir`, if it reads from it at
/// all: those must find it there, never create it.
fn reads_data_dir(command: &Command, config: &Config) -> Option<&'static str> {
    let sqlite = config.store.url.as_deref().is_none_or(str::is_empty);
    let state = sqlite.then_some("state store");
    match command {
        Command::Queue { command } => match command {
            QueueCommand::List { .. } | QueueCommand::Show { .. } | QueueCommand::Shape { .. } => {
                Some("queue")
            }
            QueueCommand::Destinations { .. } => state,
            _ => None,
        },
        Command::Report { .. } | Command::Doctor(_) => Some("queue"),
        Command::Trace { .. } | Command::History { .. } => state,
        Command::Route {
            command: RouteCommand::Show { .. } | RouteCommand::Explain { .. },
        } => state,
        Command::Wave {
            command:
                control::WaveCommand::Show { .. }
                | control::WaveCommand::List { .. }
                | control::WaveCommand::Watch { .. },
        } => state,
        Command::Directory {
            command: control::DirectoryCommand::List { .. },
        } => state,
        _ => None,
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

/// Changes the stderr log filter of a running gateway (`log.level` on SIGHUP).
type LogLevel =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn init_logging(config: &Config, events_as_json: bool) -> LogLevel {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour codes only for a person at a terminal: journald, files and
    // pipes get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    if events_as_json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    handle
}

async fn serve(config: Config, config_path: PathBuf) -> Result<i32> {
    let json_log = config.log.format == "json";
    let log_level = init_logging(&config, json_log);
    // A DKIM key that does not load stops the start: mail must never leave
    // unsigned because a key file went bad.
    let dkim = godwit_outbound::DkimKeys::load(&config.dkim)?;
    for k in dkim.keys() {
        tracing::info!(domain = %k.domain, selector = %k.selector, algorithm = k.algorithm.tag(), "DKIM key loaded");
    }
    drop(dkim);
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    let store = Store::open(&config.store_url()).await?;
    let routes = SharedRoutes::new(godwit_route::load(&store, &config).await?);
    let spool = Arc::new(Spool::open(&config.spool_dir())?);
    // Says whose spool this is, should its disk be adopted by another node.
    spool.record_owner(config.node_name())?;
    let (events, writer) = EventLog::new(&config.events_dir(), config.node_name())?;
    events.stderr_json(json_log);
    let writer = tokio::spawn(writer.run());
    let relay = godwit_relay::Relay::new(
        config.clone(),
        spool.clone(),
        routes.clone(),
        events.clone(),
    );
    // Readers of the event stream, attached before the first event.
    let metrics = Arc::new(godwit_evidence::metrics::Metrics::new());
    metrics.describe(&config.platforms.keys().cloned().collect::<Vec<_>>());
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
    for addr in config.outbound.iter().flat_map(|o| o.listen.iter()) {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("outbound.listen: cannot listen on {addr}"))?;
        listen.push(l.local_addr()?.to_string());
        tokio::spawn(smtpd.clone().serve_as(l, smtpd::Listener::Relay));
    }
    if let Some(sc) = &config.submission {
        listen.extend(smtpd::start_submission(&smtpd, &config, sc, &routes, &store).await?);
    }
    tokio::spawn(relay.clone().run());
    let access = godwit_access::Access::start(
        config.clone(),
        routes.clone(),
        store.clone(),
        events.clone(),
    )
    .await?;
    {
        let relay = relay.clone();
        let access = access.clone();
        let events = events.clone();
        let store = store.clone();
        tokio::spawn(godwit_route::watch_pushed(
            store.clone(),
            routes.clone(),
            Duration::from_millis(200),
            move |version, changes, via| {
                relay.routes_changed();
                if let Some(a) = &access {
                    a.routes_changed();
                }
                // The version's own actor and command, from the store.
                let (events, store) = (events.clone(), store.clone());
                tokio::spawn(async move {
                    let (actor, command) = godwit_store::sqlx::query_as::<_, (String, String)>(
                        "SELECT actor, command FROM routing_versions WHERE version = $1",
                    )
                    .bind(version)
                    .fetch_optional(&store.pool)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                    events.emit(Event::RouteChanged {
                        version,
                        actor,
                        command,
                        changes,
                        via: via.as_str().to_string(),
                    });
                });
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
            config.node_name().to_string(),
            config.admin.token.clone(),
        );
        let admin = match &access {
            Some(a) => {
                let a = a.clone();
                let platforms: Vec<String> = config.platforms.keys().cloned().collect();
                admin.with_client_sessions(Arc::new(move || {
                    // Every platform is listed, with 0 where nobody is logged in.
                    let mut m = a.sessions();
                    for p in &platforms {
                        for proto in ["imap", "pop3"] {
                            m.entry((p.clone(), proto.to_string())).or_insert(0);
                        }
                    }
                    m
                }))
            }
            None => admin,
        };
        tokio::spawn(admin.clone().run_sampler());
        tokio::spawn(godwit_evidence::http::serve(admin, l));
        tracing::info!("admin listener (metrics, dashboard) on http://{addr}/");
    }
    tokio::spawn(fleet::heartbeat_and_commands(
        store.clone(),
        relay.clone(),
        spool.clone(),
        events.clone(),
        config.node_name().to_string(),
    ));
    tokio::spawn(soak::watch(
        config.clone(),
        store.clone(),
        relay.clone(),
        events.clone(),
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

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut current = config.clone();
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "SIGINT",
            _ = term.recv() => break "SIGTERM",
            _ = hup.recv() => {
                match reload(&config_path, &current, &smtpd, &routes, &relay, &log_level) {
                    Ok((next, applied, restart_needed)) => {
                        for key in &restart_needed {
                            tracing::warn!("reload: {key} changed; it takes effect after a restart");
                        }
                        events.emit(Event::GatewayReloaded {
                            config: config_path.display().to_string(),
                            applied,
                            restart_needed,
                        });
                        relay.routes_changed();
                        current = next;
                    }
                    Err(e) => {
                        let error = format!("{e:#}");
                        tracing::error!("reload of {} refused, the running configuration is kept: {error}", config_path.display());
                        events.emit(Event::GatewayReloadFailed {
                            config: config_path.display().to_string(),
                            error,
                        });
                    }
                }
            }
        }
    };
    // Everything accepted is already on disk: queued mail stays in the spool
    // for the next start. Only sessions in DATA are worth waiting for.
    events.emit(Event::GatewayDraining {
        reason: reason.into(),
        sessions: smtpd.sessions(),
    });
    let left = smtpd
        .drain(config.smtp.data_timeout.min(Duration::from_secs(60)))
        .await;
    events.emit(Event::GatewayStopped {
        reason: reason.into(),
        sessions_cut: left,
    });
    // The event writer ends once every handle is gone; the tasks holding the
    // others end with the runtime, so give it a moment to write the last lines.
    drop(events);
    let _ = tokio::time::timeout(Duration::from_millis(300), writer).await;
    Ok(0)
}

/// `godwit check access ADDRESS`: the password from --password, else the
/// [sync] account (its target login for the target platform, its source
/// login for any other).
async fn check_access(config: Config, address: &str, password: Option<String>) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    let accounts = match (&password, &config.sync) {
        (None, Some(sync)) => godwit_imap::accounts::load(&sync.accounts)?,
        _ => Vec::new(),
    };
    let wanted = godwit_route::normalize_address(address);
    let target = config.target_platform().map(str::to_string);
    let creds = |platform: &str| {
        if let Some(p) = &password {
            return Some(godwit_access::check::Credentials {
                user: address.to_string(),
                password: p.clone(),
            });
        }
        let a = accounts
            .iter()
            .find(|a| a.address.eq_ignore_ascii_case(&wanted))?;
        let l = if target.as_deref() == Some(platform) {
            &a.target
        } else {
            &a.source
        };
        Some(godwit_access::check::Credentials {
            user: l.user.clone(),
            password: l.password.clone(),
        })
    };
    let (text, ok) = godwit_access::check::run(&config, &store, address, creds).await?;
    print!("{text}");
    Ok(if ok { 0 } else { 2 })
}

/// SIGHUP: read and validate the file again. A bad file changes nothing.
/// `reload_plan` decides what applies live; this applies it: certificates
/// and SMTP limits (smtpd), routing defaults, platforms, queue settings,
/// outbound delivery and DKIM keys (the delivery engine), and the log
/// level. Returns the configuration now running, the keys applied live and
/// the keys that need a restart.
fn reload(
    path: &std::path::Path,
    current: &Arc<Config>,
    smtpd: &smtpd::Smtpd,
    routes: &SharedRoutes,
    relay: &godwit_relay::Relay,
    log_level: &LogLevel,
) -> Result<(Arc<Config>, Vec<String>, Vec<String>)> {
    let next = Config::load(path)?;
    // The gateway's own sections are checked as at start.
    next.require_gateway()?;
    let godwit_config::ReloadPlan {
        applied,
        restart_needed,
        effective,
    } = godwit_config::reload_plan(current, &next);
    let level = tracing_subscriber::EnvFilter::try_new(&effective.log.level)
        .with_context(|| format!("log.level `{}`", effective.log.level))?;
    // Everything that can fail is read before anything changes (the
    // certificate in smtpd.reload, the DKIM keys here), so a missing file
    // leaves the running configuration whole.
    let dkim = godwit_outbound::DkimKeys::load(&effective.dkim)?;
    let effective = Arc::new(effective);
    smtpd.reload(effective.clone())?;
    routes.reconfigure(&effective);
    let replaced = relay.reconfigure(effective.clone(), dkim);
    if !replaced.is_empty() {
        tracing::info!(
            "reload: new deliveries to {} use the new settings",
            replaced.join(", ")
        );
    }
    if std::env::var_os("RUST_LOG").is_none() {
        let _ = log_level.reload(level);
    }
    Ok((effective, applied, restart_needed))
}

/// RFC 3339, or a duration ago ("2h", "0s" = now).
pub(crate) fn parse_when(s: &str, flag: &str) -> Result<i64> {
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
            "no message found (events are kept for {}; is the Message-ID right?)",
            godwit_config::format_duration(config.events.retention)
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
    let (since_ms, until_ms) = (
        parse_when(&since, "--since")?,
        parse_when(&until, "--until")?,
    );
    if since_ms >= until_ms {
        // Durations count back from now: --since 1h --until 2h ends before it starts.
        bail!(
            "--since {since} is not before --until {until}: the window is empty (durations are ago, so --since takes the larger one)"
        );
    }
    let (since, until) = (since_ms, until_ms);
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
    // nix's getpwuid_r: thread-safe, no pointer into libc's static storage.
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
}

async fn route(config: Config, command: RouteCommand) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    match command {
        RouteCommand::Set {
            address,
            platform,
            actor: who,
            wait,
        } => {
            let address = check_address(&config, &address)?;
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
            let o = godwit_route::commit_outcome(
                &store,
                &config,
                &actor(who),
                &cmd,
                vec![(address.clone(), Some(platform.clone()))],
            )
            .await?;
            let v = o.version;
            let applied: Vec<_> = o.moved().cloned().collect();
            if !o.applied {
                println!(
                    "{address} already routes to {platform}: nothing changed, no version recorded (routing version {v})"
                );
            } else if applied.is_empty() {
                println!(
                    "{address}: {platform} is now an explicit entry; mail already went there (version {v})"
                );
            } else {
                let before = applied[0]
                    .before
                    .clone()
                    .unwrap_or_else(|| "(default)".into());
                println!("{address}: {before} -> {platform} (version {v})");
            }
            return wait.for_version(&store, v).await;
        }
        RouteCommand::Unset {
            address,
            actor: who,
            wait,
        } => {
            let address = check_address(&config, &address)?;
            let cmd = format!("route unset {address}");
            let o = godwit_route::commit_outcome(
                &store,
                &config,
                &actor(who),
                &cmd,
                vec![(address.clone(), None)],
            )
            .await?;
            let v = o.version;
            if !o.applied {
                println!(
                    "{address} had no entry: nothing changed, no version recorded (routing version {v})"
                );
            } else if o.moved().next().is_none() {
                println!("{address}: entry removed (version {v}); its route stays the same");
            } else {
                println!("{address}: entry removed (version {v}); it follows the default again");
            }
            return wait.for_version(&store, v).await;
        }
        RouteCommand::Show { address, json } => {
            let address = check_address(&config, &address)?;
            let map = godwit_route::load_one(&store, &config, &address).await?;
            let d = map.decide(&address);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "address": godwit_route::normalize_address(&address),
                        "route": d.route,
                        "why": d.why.to_string(),
                        "routing_version": d.version,
                    })
                );
                return Ok(0);
            }
            println!(
                "{}: {} ({}; routing version {})",
                godwit_route::normalize_address(&address),
                d.route,
                d.why,
                d.version
            );
        }
        RouteCommand::Explain { address, json } => {
            return control::route_explain(&config, &store, &address, json).await;
        }
        RouteCommand::SetOutbound {
            sender,
            route,
            actor: who,
        } => {
            let key = check_outbound(&config, &sender, &route)?;
            let after = (route != "default").then(|| route.clone());
            let cmd = format!("route set-outbound {sender} {route}");
            let (v, _) =
                godwit_route::commit(&store, &config, &actor(who), &cmd, vec![(key, after)])
                    .await?;
            println!("{sender}: outbound mail goes via {route} (version {v})");
        }
        RouteCommand::Rollback {
            to,
            dry_run,
            actor,
            wait,
        } => {
            return control::route_rollback(&config, &store, to, dry_run, actor, &wait).await;
        }
    }
    Ok(0)
}

/// The routing-map key for `route set-outbound SENDER|DOMAIN ROUTE`, once
/// the sender is ours and the route is `mx`, `default` or a platform with
/// an outbound_relay.
fn check_outbound(config: &Config, sender: &str, route: &str) -> Result<String> {
    if config.outbound.is_none() {
        bail!("route set-outbound needs an [outbound] section in the configuration");
    }
    let domain = match sender.rsplit_once('@') {
        Some(_) => check_address(config, sender)?
            .rsplit_once('@')
            .unwrap()
            .1
            .to_string(),
        None => sender
            .trim_start_matches('@')
            .trim_end_matches('.')
            .to_ascii_lowercase(),
    };
    if !config.is_accepted_domain(&domain) {
        bail!(
            "`{sender}` is not in an accepted domain ({})",
            config.domains.accepted.join(", ")
        );
    }
    if route != godwit_config::ROUTE_MX && route != "default" {
        match config.platforms.get(route) {
            None => bail!(
                "`{route}` is neither `mx`, `default` nor a platform ({})",
                config
                    .platforms
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(p) if p.outbound_relay.is_empty() => bail!(
                "platform `{route}` has no outbound_relay: set platforms.{route}.outbound_relay first"
            ),
            _ => {}
        }
    }
    Ok(godwit_route::outbound_key(sender))
}

/// The address as the routing map keys it, if it is one (RFC 5321 4.1.2,
/// 4.5.3.1) in an accepted domain.
fn check_address(config: &Config, address: &str) -> Result<String> {
    let a = godwit_route::Address::parse(address).map_err(|e| anyhow::anyhow!(e))?;
    if !config.is_accepted_domain(&a.domain) {
        bail!(
            "`{address}` is not in an accepted domain ({})",
            config.domains.accepted.join(", ")
        );
    }
    Ok(a.to_string())
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

/// The queues of the other live gateways sharing a PostgreSQL store (empty
/// on SQLite, which one node owns). Says on stderr which nodes the listing
/// does not cover; a store that does not answer leaves this node's queue.
async fn fleet_queues(config: &Config, own: &str) -> Vec<(String, Vec<godwit_spool::Spooled>)> {
    if !config.store_url().starts_with("postgres") {
        return Vec::new();
    }
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        let store = Store::open(&config.store_url()).await?;
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

async fn queue(config: Config, command: QueueCommand) -> Result<i32> {
    let now = godwit_spool::now_ms();
    match command {
        QueueCommand::List { json, filter } => {
            check_filter(&config, &filter)?;
            // This node's spool, then (a fleet on a shared store) every
            // other live gateway's, each message labelled with its node.
            let own = config.node_name().to_string();
            let mut msgs: Vec<(String, godwit_spool::Spooled)> =
                godwit_spool::list(&config.spool_dir())
                    .into_iter()
                    .map(|m| (own.clone(), m))
                    .collect();
            let fleet_nodes = fleet_queues(&config, &own).await;
            let several = !fleet_nodes.is_empty();
            for (node, list) in fleet_nodes {
                msgs.extend(list.into_iter().map(|m| (node.clone(), m)));
            }
            let mut shown = 0;
            let mut total_bytes = 0u64;
            for (node, m) in &msgs {
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
        }
        QueueCommand::Show {
            queue_id,
            json,
            body: with_body,
        } => {
            let Some(m) = godwit_spool::list(&config.spool_dir())
                .into_iter()
                .find(|m| m.header.queue_id.eq_ignore_ascii_case(&queue_id))
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
        }
        QueueCommand::Shape { by, json } => {
            let msgs = godwit_spool::list(&config.spool_dir());
            let store = Store::open(&config.store_url()).await?;
            let routes = godwit_route::load(&store, &config).await?;
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
                print!("{}", godwit_evidence::report::render_qshape(&shape, &by));
            }
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
        }
        QueueCommand::Hold(t) => return queue_cmd(&config, godwit_relay::QueueOp::Hold, t).await,
        QueueCommand::Release(t) => {
            return queue_cmd(&config, godwit_relay::QueueOp::Release, t).await;
        }
        QueueCommand::Flush(t) => {
            return queue_cmd(&config, godwit_relay::QueueOp::Flush, t).await;
        }
        QueueCommand::Requeue(t) => {
            return queue_cmd(&config, godwit_relay::QueueOp::Requeue, t).await;
        }
        QueueCommand::Delete { target, yes } => {
            // A bad selector is refused before anyone is asked to confirm.
            let target = resolve_target(&config, target)?;
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
            return queue_targets(&config, godwit_relay::QueueOp::Delete, target).await;
        }
    }
    Ok(0)
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
    if let Some(r) = &f.rcpt
        && !r.contains('@')
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
            let store = Store::open(&config.store_url()).await?;
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
    let who = actor(t.actor.clone());
    let store = Store::open(&config.store_url()).await?;
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
