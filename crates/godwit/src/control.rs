//! The control-plane commands `directory` and `history`, and what the wave
//! and route commands print alike (an outcome, a version). The work happens
//! in `godwit_route`; this module parses arguments and prints for people.

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
    /// Ask a platform over SMTP about every address and alias of each
    /// mailbox (RCPT TO, then RSET; never DATA) and report those it refuses.
    /// Exit 1 when any is refused.
    Probe {
        /// The platform to ask (default: the target platform).
        #[arg(long)]
        platform: Option<String>,
        /// Only this wave's members.
        #[arg(long)]
        wave: Option<String>,
        #[arg(long)]
        json: bool,
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
pub enum HistoryCommand {
    /// One version: who, when, the command, and every before/after.
    Show {
        version: i64,
        /// Every route change (default: the first 100).
        #[arg(long)]
        all: bool,
    },
}

pub(crate) fn ctx<'a>(
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

pub(crate) const SHOW: usize = 50;

pub(crate) fn print_outcome(o: &Outcome, verb: &str) {
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
    let store = crate::cli::open_store(&config).await?;
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
            let who = crate::cli::actor(actor);
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
        DirectoryCommand::Probe {
            platform,
            wave,
            json,
        } => {
            let platform = platform
                .or_else(|| config.target_platform().map(str::to_string))
                .context("--platform: no target platform is configured")?;
            let addrs = crate::probe::addresses(&config, &store, wave.as_deref()).await?;
            let r = crate::probe::probe(&config, &platform, addrs).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                crate::probe::print(&r);
            }
            return Ok(if r.refused.is_empty() { 0 } else { 1 });
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
                    // RFC 4180 quoting (a field with a comma, quote or line
                    // break is quoted), one record per line.
                    let mut out = csv::Writer::from_writer(std::io::stdout().lock());
                    out.write_record([
                        "address",
                        "display_name",
                        "kind",
                        "platform",
                        "state",
                        "route",
                        "override",
                        "waves",
                        "aliases",
                    ])?;
                    for r in &rows {
                        out.write_record([
                            r.address.as_str(),
                            &r.display_name,
                            &r.kind,
                            &r.platform,
                            &r.state,
                            r.route.as_deref().unwrap_or(""),
                            r.override_route.as_deref().unwrap_or(""),
                            &r.waves,
                            &r.aliases.to_string(),
                        ])?;
                    }
                    out.flush()?;
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
            let who = crate::cli::actor(actor);
            let cmd = format!("directory state {state} {}", addresses.join(" "));
            let list = read_members(&addresses)?;
            let o =
                control::set_state(&ctx(&store, &config, &who, &cmd, false), list, state).await?;
            print_outcome(&o, "re-routed");
        }
    }
    Ok(0)
}

/// `--members` values: an address, or a file of addresses (one per line;
/// blank lines, `#` comments and a CSV header are skipped; only the first
/// CSV column is read).
pub(crate) fn read_members(values: &[String]) -> Result<Vec<String>> {
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

pub(crate) fn version_json(v: &history::VersionInfo) -> serde_json::Value {
    serde_json::json!({
        "version": v.version,
        "time": v.time(),
        "actor": v.actor,
        "command": v.command,
        "route_changes": v.route_changes,
        "control_changes": v.control_changes,
    })
}
pub async fn history(
    config: Config,
    command: Option<HistoryCommand>,
    limit: i64,
    json: bool,
) -> Result<i32> {
    let store = crate::cli::open_store(&config).await?;
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
