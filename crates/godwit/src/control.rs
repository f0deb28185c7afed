//! The control-plane commands: `directory`, `wave`, `history`, and
//! `route explain` / `route rollback`. The work happens in `godwit_route`;
//! this module parses arguments and prints for people.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use godwit_config::Config;
use godwit_route::control::{self, Ctx, Outcome};
use godwit_route::history;
use godwit_route::{MigrationState, normalize_address};
use godwit_store::Store;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum DirectoryCommand {
    /// Compare a CSV or LDIF export with the directory; with --apply, replace it.
    ///
    /// CSV header: address,display_name,kind,aliases,members,platform (any
    /// order; display_name, aliases and members optional). kind: user,
    /// shared, resource or group. aliases and members are `;`-separated.
    /// platform: the platform that owns the object today.
    ///
    /// LDIF (ldapsearch -LLL, slapcat, ldifde): mail, displayName/cn,
    /// objectClass (groups), mailAlternateAddress/mailLocalAddress/
    /// proxyAddresses (aliases), member/uniqueMember/rfc822MailMember, and
    /// godwitPlatform or --platform.
    Import {
        file: PathBuf,
        /// csv or ldif (default: ldif for a .ldif or .ldi file, else csv).
        #[arg(long)]
        format: Option<String>,
        /// LDIF: the platform owning entries without godwitPlatform.
        #[arg(long)]
        platform: Option<String>,
        /// Apply the difference (default: only show it).
        #[arg(long)]
        apply: bool,
        #[arg(long)]
        actor: Option<String>,
        /// The whole difference (every address, not the first few) and the
        /// outcome as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Who is where: every directory object with its kind, owning platform,
    /// migration state, current route, override and waves, with a summary.
    List {
        /// Only objects in this migration state.
        #[arg(long)]
        state: Option<String>,
        /// Only objects owned by this platform before the migration.
        #[arg(long)]
        platform: Option<String>,
        /// Only objects whose mail goes here now (a platform, hold or both).
        #[arg(long)]
        route: Option<String>,
        /// Only objects of this kind (user, shared, resource, group).
        #[arg(long)]
        kind: Option<String>,
        /// Only members of this wave.
        #[arg(long)]
        wave: Option<String>,
        /// text (a summary, then the first 50 unless --all), csv or json.
        #[arg(long, default_value = "text")]
        format: String,
        #[arg(long)]
        all: bool,
    },
    /// Set the migration state of mailboxes (pending, seeding, ready,
    /// cutover, migrated, rolled-back).
    State {
        state: String,
        /// Addresses, or files of addresses (one per line, as for waves).
        #[arg(required = true, value_name = "ADDR|FILE")]
        addresses: Vec<String>,
        #[arg(long)]
        actor: Option<String>,
    },
}

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
        #[arg(long)]
        actor: Option<String>,
        #[command(flatten)]
        wait: crate::fleet::Wait,
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

#[derive(Subcommand)]
pub enum HistoryCommand {
    /// One version: who, when, the command, and every before/after.
    Show {
        version: i64,
        /// Every route change (default: the first 100).
        #[arg(long)]
        all: bool,
    },
}

fn ctx<'a>(
    store: &'a Store,
    config: &'a Config,
    actor: &'a str,
    command: &'a str,
    dry_run: bool,
) -> Ctx<'a> {
    Ctx {
        store,
        config,
        actor,
        command,
        dry_run,
    }
}

const SHOW: usize = 50;

fn print_outcome(o: &Outcome, verb: &str) {
    let moved: Vec<_> = o.moved().collect();
    for c in moved.iter().take(SHOW) {
        println!(
            "  {}: {} -> {}",
            c.address,
            c.before.as_deref().unwrap_or("(default)"),
            c.after.as_deref().unwrap_or("(default)")
        );
    }
    if moved.len() > SHOW {
        println!("  ... and {} more", moved.len() - SHOW);
    }
    if !o.applied {
        // A dry run shows everything it would change, not only routes: the
        // directory states, aliases, members and overrides too.
        let others: Vec<_> = o
            .control
            .iter()
            .filter(|c| c.subject != "note" && c.before != c.after)
            .collect();
        for c in others.iter().take(SHOW) {
            println!(
                "  {} {}: {} -> {}",
                c.subject,
                c.item,
                c.before.as_deref().unwrap_or("(none)"),
                c.after.as_deref().unwrap_or("(none)")
            );
        }
        if others.len() > SHOW {
            println!("  ... and {} more directory change(s)", others.len() - SHOW);
        }
    }
    for n in o.control.iter().filter(|c| c.subject == "note") {
        println!("  note: {}", n.after.as_deref().unwrap_or(""));
    }
    if o.applied {
        println!(
            "{} address(es) {verb} (version {}; `godwit route rollback --to {}` undoes it)",
            moved.len(),
            o.version,
            o.version - 1
        );
    } else {
        println!(
            "dry run: {} address(es) would be {verb} as version {}; nothing changed",
            moved.len(),
            o.version
        );
    }
}

pub async fn directory(config: Config, command: DirectoryCommand) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    match command {
        DirectoryCommand::Import {
            file,
            format,
            platform,
            apply,
            actor,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let platforms: Vec<String> = config
                .platforms
                .keys()
                .cloned()
                .chain([godwit_config::ROUTE_HOLD.to_string()])
                .collect();
            let accepted = |d: &str| config.is_accepted_domain(d);
            let rules = godwit_route::directory::Rules {
                accepted_domain: &accepted,
                platforms: &platforms,
            };
            let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
            let ldif = match format.as_deref() {
                Some("ldif") => true,
                Some("csv") => false,
                Some(f) => bail!("--format {f}: expected csv or ldif"),
                None => ext.eq_ignore_ascii_case("ldif") || ext.eq_ignore_ascii_case("ldi"),
            };
            if platform.is_some() && !ldif {
                bail!(
                    "--platform is for LDIF; a CSV file names the platform in its platform column"
                );
            }
            let parsed = if ldif {
                godwit_route::ldif::parse(&text, &rules, platform.as_deref())
            } else {
                godwit_route::directory::parse(&text, &rules)
            };
            let rows = match parsed {
                Ok(rows) => rows,
                Err(errors) => {
                    let list: Vec<String> = errors
                        .iter()
                        .map(|e| format!("  {}: {e}", file.display()))
                        .collect();
                    bail!(
                        "{} problem(s) in {}; nothing was applied. Fix them and run again:\n{}",
                        errors.len(),
                        file.display(),
                        list.join("\n")
                    );
                }
            };
            let n = rows.len();
            let who = crate::actor(actor);
            let cmd = format!(
                "directory import {}{}",
                file.display(),
                if apply { " --apply" } else { "" }
            );
            let (diff, outcome) =
                control::import(&ctx(&store, &config, &who, &cmd, !apply), rows).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "file": file.display().to_string(),
                        "objects": n,
                        "added": diff.added,
                        "changed": diff.changed.iter().map(|(a, what)| serde_json::json!({"address": a, "changes": what})).collect::<Vec<_>>(),
                        "removed": diff.removed,
                        "applied": outcome.is_some(),
                        "version": outcome.as_ref().map(|o| o.version),
                        "routes_changed": outcome.as_ref().map(|o| o.moved().count()).unwrap_or(0),
                        "dry_run": !apply,
                    })
                );
                return Ok(0);
            }
            for a in diff.added.iter().take(SHOW) {
                println!("+ {a}");
            }
            if diff.added.len() > SHOW {
                println!("+ ... and {} more", diff.added.len() - SHOW);
            }
            for (a, what) in diff.changed.iter().take(SHOW) {
                println!("~ {a}: {}", what.join(", "));
            }
            if diff.changed.len() > SHOW {
                println!("~ ... and {} more", diff.changed.len() - SHOW);
            }
            for a in diff.removed.iter().take(SHOW) {
                println!("- {a}");
            }
            if diff.removed.len() > SHOW {
                println!("- ... and {} more", diff.removed.len() - SHOW);
            }
            let summary = format!(
                "{n} object(s) in the file: {} added, {} changed, {} removed",
                diff.added.len(),
                diff.changed.len(),
                diff.removed.len()
            );
            match outcome {
                Some(o) => println!(
                    "{summary}; applied as version {} ({} route(s) changed)",
                    o.version,
                    o.moved().count()
                ),
                None if diff.is_empty() => {
                    println!("{summary}; the directory already matches, nothing to do")
                }
                None => println!("{summary}; nothing applied: run again with --apply"),
            }
        }
        DirectoryCommand::List {
            state,
            platform,
            route,
            kind,
            wave,
            format,
            all,
        } => {
            // As stored: the canonical names.
            let state = match state {
                Some(st) => Some(
                    st.parse::<MigrationState>()
                        .map_err(anyhow::Error::msg)?
                        .as_str()
                        .to_string(),
                ),
                None => None,
            };
            let kind = match kind {
                Some(k) => Some(
                    k.parse::<godwit_route::Kind>()
                        .map_err(anyhow::Error::msg)?
                        .as_str()
                        .to_string(),
                ),
                None => None,
            };
            let filter = history::DirectoryFilter {
                state,
                platform,
                route,
                kind,
                wave,
            };
            let rows = history::directory(&store, &filter, config.directory.max_verify_age).await?;
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&rows)?),
                "csv" => {
                    println!(
                        "address,display_name,kind,platform,state,route,override,waves,aliases"
                    );
                    for r in &rows {
                        let f = [
                            r.address.as_str(),
                            &r.display_name,
                            &r.kind,
                            &r.platform,
                            &r.state,
                            r.route.as_deref().unwrap_or(""),
                            r.override_route.as_deref().unwrap_or(""),
                            &r.waves,
                            &r.aliases.to_string(),
                        ];
                        let f: Vec<String> = f.iter().map(|v| csv_field(v)).collect();
                        println!("{}", f.join(","));
                    }
                }
                "text" => {
                    let count = |key: &dyn Fn(&history::DirectoryEntry) -> String| {
                        let mut m = std::collections::BTreeMap::new();
                        for r in &rows {
                            *m.entry(key(r)).or_insert(0) += 1;
                        }
                        m.iter()
                            .map(|(k, n)| format!("{k} {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    println!("{} object(s)", rows.len());
                    if !rows.is_empty() {
                        println!("  by state: {}", count(&|r| r.state.clone()));
                        println!(
                            "  by route now: {}",
                            count(&|r| r.route.clone().unwrap_or_else(|| "(none)".into()))
                        );
                        let overrides = rows.iter().filter(|r| r.override_route.is_some()).count();
                        if overrides > 0 {
                            println!("  with an override: {overrides}");
                        }
                    }
                    let limit = if all { usize::MAX } else { SHOW };
                    for r in rows.iter().take(limit) {
                        println!(
                            "  {}  {}  {}  owned by {}  -> {}{}{}{}",
                            r.address,
                            r.kind,
                            r.state,
                            r.platform,
                            r.route.as_deref().unwrap_or("(none)"),
                            r.override_route
                                .as_deref()
                                .map(|o| format!(" (override {o})"))
                                .unwrap_or_default(),
                            if r.waves.is_empty() {
                                String::new()
                            } else {
                                format!("  waves: {}", r.waves)
                            },
                            r.sync
                                .as_deref()
                                .map(|s| format!("  sync: {s}"))
                                .unwrap_or_default()
                        );
                    }
                    if rows.len() > limit {
                        println!("  ... and {} more (--all lists them)", rows.len() - limit);
                    }
                }
                other => bail!("--format {other}: expected text, csv or json"),
            }
        }
        DirectoryCommand::State {
            state,
            addresses,
            actor,
        } => {
            let state: MigrationState = state.parse().map_err(anyhow::Error::msg)?;
            let who = crate::actor(actor);
            let cmd = format!("directory state {state} {}", addresses.join(" "));
            let list = read_members(&addresses)?;
            let o =
                control::set_state(&ctx(&store, &config, &who, &cmd, false), list, state).await?;
            print_outcome(&o, "re-routed");
        }
    }
    Ok(0)
}

/// A CSV field (RFC 4180): quoted when it holds a comma, quote or newline.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// `--members` values: an address, or a file of addresses (one per line;
/// blank lines, `#` comments and a CSV header are skipped; only the first
/// CSV column is read).
fn read_members(values: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for v in values {
        if v.contains('@') && !std::path::Path::new(v).exists() {
            out.push(normalize_address(v));
            continue;
        }
        let text = std::fs::read_to_string(v).with_context(|| {
            format!("`{v}` is neither an address nor a readable file of addresses")
        })?;
        for line in text.lines() {
            let first = line.split(',').next().unwrap_or("").trim();
            if first.is_empty() || first.starts_with('#') || first == "address" {
                continue;
            }
            out.push(normalize_address(first));
        }
    }
    Ok(out)
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
    let who = crate::actor(actor);
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

pub async fn wave(config: Config, command: WaveCommand) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    match command {
        WaveCommand::Create {
            name,
            members,
            actor,
        } => {
            let list = read_members(&members)?;
            let who = crate::actor(actor);
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
            let who = crate::actor(actor);
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
            actor,
            wait,
        } => {
            let who = crate::actor(actor);
            let cmd = format!(
                "wave cutover {name}{}{}",
                if force { " --force" } else { "" },
                if final_sync { " --final-sync" } else { "" }
            );
            let only = if final_sync {
                Some(final_sync_members(&config, &store, &name).await?)
            } else {
                None
            };
            let o = control::wave_cutover_only(
                &ctx(&store, &config, &who, &cmd, dry_run),
                &name,
                force,
                only,
            )
            .await?;
            print_outcome(&o, "moved to the target platform");
            if o.applied {
                return wait.for_version(&store, o.version).await;
            }
            // A dry run with members held back: the plan, and exit 1.
            if o.control.iter().any(|c| c.item.starts_with("blocked ")) {
                return Ok(1);
            }
        }
        WaveCommand::Rollback {
            name,
            dry_run,
            actor,
            wait,
        } => {
            let who = crate::actor(actor);
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

fn version_json(v: &history::VersionInfo) -> serde_json::Value {
    serde_json::json!({
        "version": v.version,
        "time": v.time(),
        "actor": v.actor,
        "command": v.command,
        "route_changes": v.route_changes,
        "control_changes": v.control_changes,
    })
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

pub async fn history(
    config: Config,
    command: Option<HistoryCommand>,
    limit: i64,
    json: bool,
) -> Result<i32> {
    let store = Store::open(&config.store_url()).await?;
    match command {
        None => {
            let vs = history::versions(&store, limit).await?;
            if json {
                let v: Vec<_> = vs.iter().map(version_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            if vs.is_empty() {
                println!("no versions yet");
            }
            for v in vs {
                println!(
                    "{:>6}  {}  {:<12}  {}  ({} route change(s), {} other)",
                    v.version,
                    v.time(),
                    v.actor,
                    v.command,
                    v.route_changes,
                    v.control_changes
                );
            }
        }
        Some(HistoryCommand::Show { version, all }) => {
            let v = history::version(&store, version)
                .await?
                .with_context(|| format!("no version {version} (godwit history lists them)"))?;
            if json {
                let mut out = version_json(&v);
                out["control"] = history::control_changes(&store, version)
                    .await?
                    .iter()
                    .map(|c| serde_json::json!({"subject": c.subject, "item": c.item, "before": c.before, "after": c.after}))
                    .collect();
                out["routes"] = history::route_changes(&store, version, i64::MAX)
                    .await?
                    .iter()
                    .map(|c| serde_json::json!({"address": c.address, "before": c.before, "after": c.after, "basis": c.basis.map(|b| b.to_string())}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(0);
            }
            println!("version {}", v.version);
            println!("  time:    {}", v.time());
            println!("  actor:   {}", v.actor);
            println!("  command: {}", v.command);
            for c in history::control_changes(&store, version).await? {
                println!(
                    "  {:<11} {}: {} -> {}",
                    c.subject,
                    c.item,
                    c.before.as_deref().unwrap_or("(none)"),
                    c.after.as_deref().unwrap_or("(none)")
                );
            }
            let limit = if all { i64::MAX } else { 100 };
            let routes = history::route_changes(&store, version, limit).await?;
            println!("  route changes: {}", v.route_changes);
            for c in &routes {
                if c.before == c.after {
                    // Same platform, another reason (e.g. an override now
                    // pins what the default already did): no mail moves.
                    println!(
                        "    {}: {} (route unchanged{})",
                        c.address,
                        c.after.as_deref().unwrap_or("(default)"),
                        c.basis
                            .map(|b| format!("; now decided by {b}"))
                            .unwrap_or_default()
                    );
                    continue;
                }
                println!(
                    "    {}: {} -> {}{}",
                    c.address,
                    c.before.as_deref().unwrap_or("(default)"),
                    c.after.as_deref().unwrap_or("(default)"),
                    c.basis.map(|b| format!(" ({b})")).unwrap_or_default()
                );
            }
            if (routes.len() as i64) < v.route_changes {
                println!(
                    "    ... and {} more (--all lists them)",
                    v.route_changes - routes.len() as i64
                );
            }
        }
    }
    Ok(0)
}

pub async fn route_explain(
    config: &Config,
    store: &Store,
    address: &str,
    json: bool,
) -> Result<i32> {
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
    Ok(0)
}

pub async fn route_rollback(
    config: &Config,
    store: &Store,
    to: i64,
    dry_run: bool,
    actor: Option<String>,
    wait: &crate::fleet::Wait,
) -> Result<i32> {
    let who = crate::actor(actor);
    let cmd = format!("route rollback --to {to}");
    let o = control::rollback_to(&ctx(store, config, &who, &cmd, dry_run), to).await?;
    print_outcome(&o, &format!("restored to their route at version {to}"));
    if o.applied {
        return wait.for_version(store, o.version).await;
    }
    Ok(0)
}
