//! `godwit serve`: the gateway's wiring (store, spool, relay, listeners,
//! readers of the event stream, the fleet heartbeat) and its signals:
//! SIGHUP reloads the configuration, SIGTERM/SIGINT drain and stop.

use crate::{fleet, smtpd, soak};
use anyhow::{Context, Result};
use godwit_config::Config;
use godwit_events::{Event, EventLog};
use godwit_route::SharedRoutes;
use godwit_spool::Spool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

pub(crate) async fn serve(config: Config, config_path: PathBuf) -> Result<i32> {
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
    let store = crate::cli::open_store(&config).await?;
    let routes = SharedRoutes::new(godwit_route::load(&store, &config).await?);
    let spool = Arc::new(Spool::open(&config.spool_dir())?);
    // Says whose spool this is, should its disk be adopted by another node.
    spool.record_owner(config.node_name())?;
    let (events, writer) = EventLog::new(&config.events_dir(), config.node_name())?;
    events.stderr_json(json_log);
    events.set_max_lag(config.events.max_lag);
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

    let n_recovered = recover(&spool, &events, &relay)?;

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
    watch_routes(&store, &routes, &relay, &access, &events);
    if let Some(addr) = config.admin.listen {
        start_admin(&config, addr, &metrics, &relay, &routes, &store, &access).await?;
    }
    let (beat_tx, beat_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(fleet::heartbeat_and_commands(
        store.clone(),
        relay.clone(),
        spool.clone(),
        events.clone(),
        config.node_name().to_string(),
        beat_tx,
    ));
    // gateway.started means the node is listed for `route set` to wait for;
    // a store that does not answer delays the start by 2 s at most (mail
    // flows without it).
    let _ = tokio::time::timeout(Duration::from_secs(2), beat_rx).await;
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

/// Takes the queue files back after a restart (RFC 5321 4.5.4.1: queued
/// mail is retried): the damaged ones are named, the whole ones handed to the
/// relay. Returns how many were recovered.
fn recover(spool: &Spool, events: &EventLog, relay: &godwit_relay::Relay) -> Result<usize> {
    // One message at a time: the relay keeps a waiting message's summary,
    // and a backlog's headers are never all in memory at once.
    let mut n_recovered = 0;
    let corrupt = spool.recover_each(&mut |sp| {
        n_recovered += 1;
        let pending = crate::queue::pending(&sp);
        events.emit(Event::QueueRecovered {
            queue_id: sp.header.queue_id.clone(),
            message_id: sp.header.message_id.clone(),
            pending,
        });
        relay.enqueue(sp);
    })?;
    for (path, reason) in corrupt {
        events.emit(Event::QueueCorrupt {
            file: path.display().to_string(),
            reason,
        });
    }
    Ok(n_recovered)
}

/// Follows the routing versions other commands commit: the relay and the
/// access front re-decide, and each version is recorded as an event with its
/// own actor and command.
fn watch_routes(
    store: &godwit_store::Store,
    routes: &SharedRoutes,
    relay: &godwit_relay::Relay,
    access: &Option<Arc<godwit_access::Access>>,
    events: &EventLog,
) {
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

/// The admin listener: metrics, the dashboard and its sampler, and (with
/// the access front) the client sessions per platform.
async fn start_admin(
    config: &Config,
    addr: std::net::SocketAddr,
    metrics: &Arc<godwit_evidence::metrics::Metrics>,
    relay: &godwit_relay::Relay,
    routes: &SharedRoutes,
    store: &godwit_store::Store,
    access: &Option<Arc<godwit_access::Access>>,
) -> Result<()> {
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
    Ok(())
}
