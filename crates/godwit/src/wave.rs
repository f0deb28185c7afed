//! `godwit wave`: move a set of mailboxes (and back) in one command:
//! create, members, cutover (guarded, soaked, after a final sync), rollback.

use crate::control::{SHOW, ctx, print_outcome, read_members};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use godwit_config::Config;
use godwit_route::control;
use godwit_route::history;
use godwit_store::Store;

#[derive(Subcommand)]
pub enum WaveCommand {
    /// Create a wave from addresses and/or files (one address per line).
    Create {
        name: String,
        #[arg(long, num_args = 1.., required = true, value_name = "FILE|ADDR")]
        members: Vec<String>,
        #[arg(long)]
        actor: Option<String>,
    },
    /// Add members (addresses and/or files); they move at the wave's next cutover.
    Add {
        name: String,
        #[arg(long, num_args = 1.., required = true, value_name = "FILE|ADDR")]
        members: Vec<String>,
        #[arg(long)]
        actor: Option<String>,
    },
    /// Remove members; their state and route stay as they are.
    Remove {
        name: String,
        #[arg(long, num_args = 1.., required = true, value_name = "FILE|ADDR")]
        members: Vec<String>,
        #[arg(long)]
        actor: Option<String>,
    },
    /// Delete a wave that is not cut over (its members keep their states).
    Delete {
        name: String,
        #[arg(long)]
        actor: Option<String>,
    },
    /// A wave's members with their state and route.
    Show {
        name: String,
        /// List every member (default: the first 50).
        #[arg(long)]
        all: bool,
        /// The wave and every member as JSON.
        #[arg(long)]
        json: bool,
    },
    /// All waves.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Route every member to the target platform, in one version.
    Cutover {
        name: String,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Cut over members whose sync is not ready (recorded in the history).
        #[arg(long)]
        force: bool,
        /// First a delta and a verify for every member in the sync's
        /// accounts file; then cut over only those that verified clean,
        /// naming the others and why.
        #[arg(long)]
        final_sync: bool,
        /// After the cutover, watch mail to the members this long ("2h")
        /// and roll the wave back by itself on a --rollback-if breach.
        #[arg(long)]
        soak: Option<String>,
        /// Thresholds over mail to the members since the cutover, e.g.
        /// "defer_rate>5%,queue_age>15m,bounces>0" (the default with --soak);
        /// also deferrals>N and latency_p95>DURATION.
        #[arg(long, requires = "soak")]
        rollback_if: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        wait: crate::fleet::Wait,
    },
    /// A soaking wave's live status: time left, thresholds, the latest
    /// measurements, and the breach and rollback if one happened.
    Watch {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Route every member back to the platform that owned it, in one version.
    Rollback {
        name: String,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        wait: crate::fleet::Wait,
    },
}

/// `wave add` (`add`) or `wave remove`.
async fn change_members(
    store: &Store,
    config: &Config,
    name: &str,
    members: &[String],
    actor: Option<String>,
    add: bool,
) -> Result<()> {
    let list = read_members(members)?;
    let who = crate::cli::actor(actor);
    let verb = if add { "add" } else { "remove" };
    let cmd = format!("wave {verb} {name} --members {}", members.join(" "));
    let o = control::wave_members_change(&ctx(store, config, &who, &cmd, false), name, list, add)
        .await?;
    let n = o.control.len();
    if !o.applied {
        println!(
            "nothing to change: wave {name} already {} them",
            if add { "holds" } else { "lacks" }
        );
    } else if add {
        println!(
            "{n} member(s) added to wave {name} (version {}); they move at its next cutover (godwit wave cutover {name})",
            o.version
        );
    } else {
        println!(
            "{n} member(s) removed from wave {name} (version {}); their states and routes are unchanged",
            o.version
        );
    }
    Ok(())
}

pub async fn run(config: Config, command: WaveCommand) -> Result<i32> {
    let store = crate::cli::open_store(&config).await?;
    match command {
        WaveCommand::Create {
            name,
            members,
            actor,
        } => {
            let list = read_members(&members)?;
            let who = crate::cli::actor(actor);
            let cmd = format!("wave create {name} --members {}", members.join(" "));
            let o =
                control::wave_create(&ctx(&store, &config, &who, &cmd, false), &name, list).await?;
            let n = o
                .control
                .iter()
                .filter(|c| c.subject == "wave-member")
                .count();
            println!(
                "wave {name} created with {n} member(s) (version {}); `godwit wave cutover {name} --dry-run` shows what it would move",
                o.version
            );
        }
        WaveCommand::Add {
            name,
            members,
            actor,
        } => change_members(&store, &config, &name, &members, actor, true).await?,
        WaveCommand::Remove {
            name,
            members,
            actor,
        } => change_members(&store, &config, &name, &members, actor, false).await?,
        WaveCommand::Delete { name, actor } => {
            let who = crate::cli::actor(actor);
            let cmd = format!("wave delete {name}");
            let o = control::wave_delete(&ctx(&store, &config, &who, &cmd, false), &name).await?;
            println!(
                "wave {name} deleted with {} member(s) (version {}); their states and routes are unchanged",
                o.control.len() - 1,
                o.version
            );
        }
        WaveCommand::Show { name, all, json } => {
            let w = history::wave(&store, &name, config.directory.max_verify_age)
                .await?
                .with_context(|| format!("no wave `{name}` (godwit wave list)"))?;
            if json {
                let members: Vec<_> = w
                    .members
                    .iter()
                    .map(|m| serde_json::json!({"address": m.address, "state": m.state, "route": m.route}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "name": w.name,
                        "status": w.status,
                        "created_version": w.created_version,
                        "version": w.version,
                        "members": members,
                    }))?
                );
                return Ok(0);
            }
            println!(
                "wave {}: {} ({} member(s); created at version {}, last changed at version {})",
                w.name,
                w.status,
                w.members.len(),
                w.created_version,
                w.version
            );
            let mut by_state = std::collections::BTreeMap::new();
            for m in &w.members {
                *by_state.entry(m.state.clone()).or_insert(0) += 1;
            }
            let counts: Vec<String> = by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
            println!("  states: {}", counts.join(", "));
            let limit = if all { usize::MAX } else { SHOW };
            for m in w.members.iter().take(limit) {
                println!(
                    "  {}  {}  -> {}{}",
                    m.address,
                    m.state,
                    m.route,
                    m.sync
                        .as_deref()
                        .map(|s| format!("  sync: {s}"))
                        .unwrap_or_default()
                );
            }
            if w.members.len() > limit {
                println!(
                    "  ... and {} more (--all lists them)",
                    w.members.len() - limit
                );
            }
        }
        WaveCommand::List { json } => {
            let waves = history::waves(&store).await?;
            if json {
                let v: Vec<_> = waves
                    .iter()
                    .map(|w| serde_json::json!({"name": w.name, "status": w.status, "members": w.count, "created_version": w.created_version, "version": w.version}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            if waves.is_empty() {
                println!("no waves yet: godwit wave create NAME --members FILE|ADDR...");
            }
            for w in waves {
                println!(
                    "{}  {}  {} member(s)  (created at version {}, last changed at version {})",
                    w.name, w.status, w.count, w.created_version, w.version
                );
            }
        }
        WaveCommand::Cutover {
            name,
            dry_run,
            force,
            final_sync,
            soak,
            rollback_if,
            actor,
            wait,
        } => {
            // Thresholds first: a typo is an error before anything moves.
            let soak = soak
                .map(|s| {
                    let d = godwit_config::parse_duration(&s)
                        .map_err(|e| anyhow::anyhow!("--soak: {e}"))?;
                    let r = rollback_if
                        .clone()
                        .unwrap_or_else(|| godwit_route::soak::DEFAULT_ROLLBACK_IF.into());
                    godwit_route::soak::parse_rollback_if(&r).map_err(anyhow::Error::msg)?;
                    anyhow::Ok((d, r))
                })
                .transpose()?;
            // Pause: no cutover into an open circuit or a queue that is
            // already growing old, unless forced (and then the history says
            // what was overridden).
            let paused = pause_reasons(&config, &store).await?;
            if !paused.is_empty() && !force && !dry_run {
                bail!(
                    "wave {name} not cut over: {}; wait for the queue to drain, or --force (recorded in the history)",
                    paused.join("; ")
                );
            }
            let mut only = if final_sync {
                Some(final_sync_members(&config, &store, &name).await?)
            } else {
                None
            };
            // Identity proof: members with an address the target refuses
            // stay behind, each address named (--force moves them anyway).
            let probe_note = probe_members(&config, &store, &name, force, &mut only).await?;
            let held_back = probe_note.starts_with(" (probe held back");
            let who = crate::cli::actor(actor);
            let cmd = format!(
                "wave cutover {name}{}{}{probe_note}{}{}",
                if force { " --force" } else { "" },
                if force && !paused.is_empty() {
                    format!(" (overriding the pause: {})", paused.join("; "))
                } else {
                    String::new()
                },
                if final_sync { " --final-sync" } else { "" },
                soak.as_ref()
                    .map(|(d, r)| format!(
                        " --soak {} --rollback-if {r}",
                        humantime::format_duration(*d)
                    ))
                    .unwrap_or_default()
            );
            let o = control::wave_cutover_only(
                &ctx(&store, &config, &who, &cmd, dry_run),
                &name,
                force,
                only,
            )
            .await?;
            print_outcome(&o, "moved to the target platform");
            if o.applied {
                if let Some((d, r)) = &soak {
                    crate::soak::start(&store, &name, *d, r).await?;
                    println!(
                        "soaking for {}: the gateway rolls wave {name} back by itself if {r} (godwit wave watch {name})",
                        humantime::format_duration(*d)
                    );
                }
                let waited = wait.for_version(&store, o.version).await?;
                return Ok(if held_back { waited.max(1) } else { waited });
            }
            // A dry run with members held back: the plan, and exit 1.
            if o.control.iter().any(|c| c.item.starts_with("blocked ")) {
                return Ok(1);
            }
        }
        WaveCommand::Watch { name, json } => return watch(&store, &name, json).await,
        WaveCommand::Rollback {
            name,
            dry_run,
            actor,
            wait,
        } => {
            let who = crate::cli::actor(actor);
            let cmd = format!("wave rollback {name}");
            let o =
                control::wave_rollback(&ctx(&store, &config, &who, &cmd, dry_run), &name).await?;
            print_outcome(&o, "moved back");
            if o.applied {
                return wait.for_version(&store, o.version).await;
            }
        }
    }
    Ok(0)
}

/// `wave watch NAME`: the soak of a cut-over wave, as the gateway that
/// watches it last measured it.
async fn watch(store: &Store, name: &str, json: bool) -> Result<i32> {
    let Some(r) = crate::soak::rows(store, Some(name)).await?.pop() else {
        bail!("wave `{name}` has no soak (godwit wave cutover {name} --soak 2h)");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    let now = godwit_store::now_ms();
    println!("wave {name}: {}", r.status);
    println!(
        "  soak:      until {} ({} left), rollback if {}",
        time::OffsetDateTime::from_unix_timestamp(r.until_ms / 1000)
            .ok()
            .and_then(|t| t
                .format(&time::format_description::well_known::Rfc3339)
                .ok())
            .unwrap_or_default(),
        humantime::format_duration(std::time::Duration::from_secs(
            ((r.until_ms - now).max(0) / 1000) as u64
        )),
        r.rollback_if
    );
    if let Some(o) = &r.owner {
        println!("  watched by {o}");
    }
    if let Some(m) = &r.measurements {
        println!(
            "  measured {}s ago: {} delivered, {} deferred, {} bounced, oldest queued {}s, p95 latency {:.1}s",
            (now - r.measured_ms).max(0) / 1000,
            m["delivered"],
            m["deferred"],
            m["bounced"],
            m["queue_age_s"],
            m["latency_p95_s"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(b) = &r.breach {
        println!(
            "  BREACH:    {b}; rolled back automatically at version {}",
            r.rollback_version.unwrap_or(0)
        );
    }
    Ok(0)
}

/// Identity proof before a cutover (`probe`): members with an address the
/// target refuses stay behind, each address named (--force moves them
/// anyway). Narrows `only` to the members that may move, and returns the
/// note the history records.
async fn probe_members(
    config: &Config,
    store: &Store,
    name: &str,
    force: bool,
    only: &mut Option<std::collections::BTreeSet<String>>,
) -> Result<String> {
    let mut probe_note = String::new();
    if let Some(target) = config.target_platform() {
        let addrs = crate::probe::addresses(config, store, Some(name)).await?;
        let members: std::collections::BTreeSet<String> = addrs.keys().cloned().collect();
        match crate::probe::probe(config, target, addrs).await {
            Ok(r) if !r.refused.is_empty() => {
                crate::probe::print(&r);
                let refused: std::collections::BTreeSet<&String> =
                    r.refused.iter().map(|x| &x.mailbox).collect();
                let list: Vec<String> = r
                    .refused
                    .iter()
                    .map(|x| format!("{} ({})", x.address, x.reply))
                    .collect();
                if force {
                    probe_note = format!(" (probe refused: {})", list.join("; "));
                } else {
                    println!(
                        "held back (an address refused by {target}; --force moves them): {}",
                        refused
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    let keep: std::collections::BTreeSet<String> = members
                        .iter()
                        .filter(|m| !refused.contains(m))
                        .cloned()
                        .collect();
                    *only = Some(match only.take() {
                        Some(o) => o.intersection(&keep).cloned().collect(),
                        None => keep,
                    });
                    probe_note = format!(" (probe held back: {})", list.join("; "));
                }
            }
            Ok(_) => {}
            // A target that cannot be asked proves nothing either
            // way: the sync guard and the pause still decide, and
            // the history says the probe did not run.
            Err(e) => {
                eprintln!("warning: identity probe of {target} not run: {e:#}");
                probe_note = format!(" (identity probe not run: {e:#})");
            }
        }
    }
    Ok(probe_note)
}

/// The running gateways' circuits and this host's oldest queued message,
/// judged by `godwit_route::soak::pause_reasons`.
async fn pause_reasons(config: &Config, store: &Store) -> Result<Vec<String>> {
    let mut circuits = Vec::new();
    for n in crate::fleet::live_nodes(store).await? {
        if let Some(map) = n.destinations.as_object() {
            for (p, d) in map {
                circuits.push((p.clone(), d["circuit"].as_str().unwrap_or("").to_string()));
            }
        }
    }
    let now = godwit_store::now_ms();
    let oldest = godwit_spool::list(&config.spool_dir())
        .iter()
        .map(|m| (now - m.header.arrival_ms).max(0))
        .max()
        .unwrap_or(0);
    Ok(godwit_route::soak::pause_reasons(
        &circuits,
        std::time::Duration::from_millis(oldest as u64),
        config.queue.wave_pause_age,
    ))
}

/// `wave cutover --final-sync`: syncs and verifies the wave's members that
/// the accounts file lists, prints those that did not verify clean, and
/// returns the members to cut over (the clean ones, and those godwit does not
/// sync, which the guard judges as usual).
async fn final_sync_members(
    config: &Config,
    store: &Store,
    name: &str,
) -> Result<std::collections::BTreeSet<String>> {
    config
        .require_sync()
        .context("--final-sync runs the sync: add the [sync] sections")?;
    let w = history::wave(store, name, config.directory.max_verify_age)
        .await?
        .with_context(|| format!("no wave `{name}` (godwit wave list)"))?;
    let members: Vec<String> = w.members.iter().map(|m| m.address.clone()).collect();
    let verdicts = godwit_imap::cli::final_sync(config, &members).await?;
    let mut only = std::collections::BTreeSet::new();
    let mut left = 0;
    for m in members {
        match verdicts.get(&m) {
            Some(Err(why)) => {
                left += 1;
                println!("  not cut over: {m}: {why}");
            }
            _ => {
                only.insert(m);
            }
        }
    }
    println!(
        "final sync: {} member(s) synced, {} verified clean, {left} stay where they are",
        verdicts.len(),
        verdicts.len() - left
    );
    Ok(only)
}
