//! `godwit route`: where a recipient's (or a sender's outbound) mail goes,
//! changing it as a new routing version, explaining it, and rolling it back.

use crate::cli::{actor, check_address};
use crate::control::{ctx, print_outcome, version_json};
use crate::fleet;
use anyhow::{Result, bail};
use clap::Subcommand;
use godwit_config::Config;
use godwit_route::history;
use godwit_store::Store;

#[derive(Subcommand)]
pub(crate) enum RouteCommand {
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

pub(crate) async fn run(config: Config, command: RouteCommand) -> Result<i32> {
    let store = crate::cli::open_store(&config).await?;
    match command {
        RouteCommand::Set {
            address,
            platform,
            actor: who,
            wait,
        } => set(&config, &store, &address, &platform, who, &wait).await,
        RouteCommand::Unset {
            address,
            actor: who,
            wait,
        } => unset(&config, &store, &address, who, &wait).await,
        RouteCommand::Show { address, json } => show(&config, &store, &address, json).await,
        RouteCommand::Explain { address, json } => explain(&config, &store, &address, json).await,
        RouteCommand::SetOutbound {
            sender,
            route,
            actor: who,
        } => set_outbound(&config, &store, &sender, &route, who).await,
        RouteCommand::Rollback {
            to,
            dry_run,
            actor,
            wait,
        } => rollback(&config, &store, to, dry_run, actor, &wait).await,
    }
}

/// `route set ADDRESS PLATFORM`: an explicit entry, as a new version.
async fn set(
    config: &Config,
    store: &Store,
    address: &str,
    platform: &str,
    who: Option<String>,
    wait: &fleet::Wait,
) -> Result<i32> {
    let address = check_address(config, address)?;
    if platform == godwit_config::ROUTE_BOTH && config.platforms.len() < 2 {
        bail!("route `both` needs at least two platforms in the configuration");
    }
    if !config.is_route_name(platform) {
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
        store,
        config,
        &actor(who),
        &cmd,
        vec![(address.clone(), Some(platform.to_string()))],
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
    wait.for_version(store, v).await
}

/// `route unset ADDRESS`: the entry goes, the address follows the defaults.
async fn unset(
    config: &Config,
    store: &Store,
    address: &str,
    who: Option<String>,
    wait: &fleet::Wait,
) -> Result<i32> {
    let address = check_address(config, address)?;
    let cmd = format!("route unset {address}");
    let o = godwit_route::commit_outcome(
        store,
        config,
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
    wait.for_version(store, v).await
}

/// `route show ADDRESS`: where its mail goes now, and why.
async fn show(config: &Config, store: &Store, address: &str, json: bool) -> Result<i32> {
    let address = check_address(config, address)?;
    let map = godwit_route::load_one(store, config, &address).await?;
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
    Ok(0)
}

/// `route set-outbound SENDER|DOMAIN ROUTE`: where their outbound mail goes.
async fn set_outbound(
    config: &Config,
    store: &Store,
    sender: &str,
    route: &str,
    who: Option<String>,
) -> Result<i32> {
    let key = check_outbound(config, sender, route)?;
    let after = (route != "default").then(|| route.to_string());
    let cmd = format!("route set-outbound {sender} {route}");
    let (v, _) = godwit_route::commit(store, config, &actor(who), &cmd, vec![(key, after)]).await?;
    println!("{sender}: outbound mail goes via {route} (version {v})");
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

async fn explain(config: &Config, store: &Store, address: &str, json: bool) -> Result<i32> {
    let e = history::explain(store, config, address).await?;
    let d = &e.decision;
    if json {
        let v = serde_json::json!({
            "address": e.address,
            "route": d.route,
            "why": d.why.to_string(),
            "routing_version": d.version,
            "rejected_at_rcpt": e.rejected_at_rcpt,
            "alias_of": e.alias_of,
            "directory": e.object.as_ref().map(|(a, o)| serde_json::json!({
                "address": a,
                "kind": o.kind.to_string(),
                "display_name": o.display_name,
                "platform": o.platform,
                "state": o.state.to_string(),
            })),
            "sync_ready": e.sync_ready,
            "aliases": e.aliases,
            "member_of": e.member_of,
            "members": e.members,
            "override": e.override_route.as_ref().map(|(r, v)| serde_json::json!({"route": r, "version": v})),
            "waves": e.waves.iter().map(|(w, s)| serde_json::json!({"wave": w, "status": s})).collect::<Vec<_>>(),
            "route_set_by": e.route_set_by.as_ref().map(version_json),
            "state_set_by": e.state_set_by.as_ref().map(version_json),
            "loops": loops_for(store, &e.address).await,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if e.rejected_at_rcpt {
        println!(
            "{}: refused at RCPT (550 5.1.1): not in the directory and directory.unknown_recipient = \"reject\"",
            e.address
        );
    } else {
        println!("{}: {} ({})", e.address, d.route, d.why);
    }
    if let Some(m) = &e.alias_of {
        println!("  alias of:  {m} (routes with it)");
    }
    match &e.object {
        Some((a, o)) => {
            println!(
                "  directory: {a} {} {:?}, owned today by {}",
                o.kind, o.display_name, o.platform
            );
            println!(
                "  state:     {}{}{}",
                o.state,
                if o.state.routes_to_target() {
                    format!(
                        " (routes to the target platform {})",
                        e.target.as_deref().unwrap_or("?")
                    )
                } else {
                    format!(" (routes to its owner {})", o.platform)
                },
                if e.sync_ready {
                    "; its sync is proven (cutover admits it)"
                } else {
                    ""
                }
            );
            if let Some(sync) = &e.sync {
                println!("  sync:      {sync}");
            }
            if let Some(v) = &e.state_set_by {
                println!(
                    "             set at version {} by {} at {}: {}",
                    v.version,
                    v.actor,
                    v.time(),
                    v.command
                );
            }
            if o.kind == godwit_route::Kind::Group {
                if config.directory.expand_groups {
                    println!(
                        "  group:     {} member(s), expanded by godwit at acceptance (directory.expand_groups, limit {}); each member routes on its own",
                        e.members.len(),
                        config.directory.expansion_limit
                    );
                } else {
                    println!(
                        "  group:     {} member(s), expanded by the platform it routes to (directory.expand_groups = false)",
                        e.members.len()
                    );
                }
            }
        }
        None => println!("  directory: not in the directory"),
    }
    if !e.aliases.is_empty() {
        println!("  aliases:   {}", e.aliases.join(", "));
    }
    if !e.member_of.is_empty() {
        println!("  member of: {}", e.member_of.join(", "));
    }
    if let Some((r, v)) = &e.override_route {
        println!(
            "  override:  {r} (set at version {v}; it beats the directory; `godwit route unset` removes it)"
        );
    }
    if let Some((r, v)) = &e.mailbox_override {
        println!("  mailbox override: {r} (set at version {v})");
    }
    for (w, status) in &e.waves {
        println!("  wave:      {w} ({status})");
    }
    match &e.route_set_by {
        Some(v) => println!(
            "  route set at version {} by {} at {}: {}",
            v.version,
            v.actor,
            v.time(),
            v.command
        ),
        None => println!("  route: no version has named this address; the defaults decide"),
    }
    println!("  routing version now: {}", d.version);
    for l in loops_for(store, &e.address).await {
        println!("  LOOP:      {l}");
    }
    Ok(0)
}

/// The `message.loop` events (last 7 days) for `address`, as one line each:
/// the held queue ID and the path it went round.
async fn loops_for(store: &Store, address: &str) -> Vec<String> {
    let since = godwit_store::now_ms() - 7 * 86_400_000;
    let rows = godwit_store::sqlx::query(
        "SELECT body FROM events WHERE name = 'message.loop' AND ts_ms >= $1 ORDER BY ts_ms",
    )
    .bind(since)
    .fetch_all(&store.pool)
    .await
    .unwrap_or_default();
    rows.into_iter()
        .filter_map(|r| godwit_store::Row::try_get::<String, _>(&r, 0).ok())
        .filter_map(|b| serde_json::from_str::<godwit_events::Record>(&b).ok())
        .filter_map(|r| loop_line(&r.event, Some(address)))
        .collect()
}

/// One `message.loop` event as a line, if it concerns `address` (or any).
pub(crate) fn loop_line(ev: &godwit_events::Event, address: Option<&str>) -> Option<String> {
    let godwit_events::Event::MessageLoop {
        queue_id,
        rcpts,
        trace_hops,
        path,
        max_trace_hops,
        ..
    } = ev
    else {
        return None;
    };
    if let Some(a) = address
        && !rcpts.iter().any(|r| r.eq_ignore_ascii_case(a))
    {
        return None;
    }
    Some(format!(
        "{queue_id} held ({} X-Godwit-Trace headers > smtp.max_trace_hops {max_trace_hops}): {}",
        trace_hops.len(),
        path.join(" -> ")
    ))
}

async fn rollback(
    config: &Config,
    store: &Store,
    to: i64,
    dry_run: bool,
    actor: Option<String>,
    wait: &crate::fleet::Wait,
) -> Result<i32> {
    let who = crate::cli::actor(actor);
    let cmd = format!("route rollback --to {to}");
    let o =
        godwit_route::control::rollback_to(&ctx(store, config, &who, &cmd, dry_run), to).await?;
    print_outcome(&o, &format!("restored to their route at version {to}"));
    if o.applied {
        return wait.for_version(store, o.version).await;
    }
    Ok(0)
}
