//! godwit: the command line. `serve` runs the gateway; the other commands
//! work beside a running gateway (they share the state store and spool).

mod control;
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
    /// Route ADDRESS to PLATFORM (a configured platform, or `hold`).
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
    },
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
    let config = Config::load(&cli.config)
        .with_context(|| "run with --config FILE (see examples/godwit.toml)")?;
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Route { command } => route(config, command).await,
        Command::Queue { command } => queue(config, command).await,
        Command::Directory { command } => control::directory(config, command).await,
        Command::Wave { command } => control::wave(config, command).await,
        Command::History { command, limit } => control::history(config, command, limit).await,
    }
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

fn actor(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
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
            if platform == godwit_config::ROUTE_BOTH {
                bail!(
                    "route `both` (dual delivery) is not available yet; use a platform name or `hold`"
                );
            }
            if !config.is_route_name(&platform) {
                let names: Vec<_> = config
                    .platforms
                    .keys()
                    .cloned()
                    .chain(["hold".to_string()])
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

async fn queue(config: Config, command: QueueCommand) -> Result<i32> {
    match command {
        QueueCommand::List { json } => {
            let msgs = godwit_spool::list(&config.spool_dir());
            let now = godwit_spool::now_ms();
            for m in &msgs {
                let h = &m.header;
                if json {
                    let rcpts: Vec<_> = h
                        .envelope
                        .rcpts
                        .iter()
                        .zip(&m.status)
                        .map(|((a, _), s)| {
                            serde_json::json!({
                                "address": a,
                                "state": s.as_ref().map_or(RcptStatus::Pending, |s| s.status),
                                "attempts": s.as_ref().map_or(0, |s| s.attempts),
                                "platform": s.as_ref().and_then(|s| s.platform.clone()),
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
                    for ((a, _), s) in h.envelope.rcpts.iter().zip(&m.status) {
                        let state = s.as_ref().map_or(RcptStatus::Pending, |s| s.status);
                        let why = s.as_ref().and_then(|s| s.reply.clone()).unwrap_or_default();
                        println!("    {a}  {state:?}  {why}");
                    }
                }
            }
            if !json {
                println!("-- {} message(s) in queue", msgs.len());
            }
        }
    }
    Ok(0)
}
