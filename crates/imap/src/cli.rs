//! `godwit sync` and `godwit verify`. The binary parses `--config` and calls
//! [`run_sync`] / [`run_verify`], which return the process exit code:
//! 0 only when every selected account verified clean, 1 otherwise.

use crate::accounts::{self, Account, secret};
use crate::conn::Server;
use crate::engine::{AccountReport, Endpoints, Progress, SyncOptions, sync_account};
use crate::lease::{Fleet, Step};
use crate::limits::ServerLimits;
use crate::verify::{AccountCheck, render, verify_account};
use anyhow::Context;
use godwit_config::{Config, SyncConfig};
use godwit_store::Store;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SyncArgs {
    /// Sync only this account (repeatable); all accounts of the CSV when absent.
    #[arg(long = "mailbox", value_name = "ADDRESS")]
    pub mailboxes: Vec<String>,
    /// Expunge on the target the messages expunged from the source since the last run.
    #[arg(long)]
    pub propagate_deletes: bool,
    /// Print the reports as JSON (one document) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Copy only; do not verify afterwards (the exit code is then 1).
    #[arg(long)]
    pub no_verify: bool,
    /// No progress bars (they are off anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Run the delta again every `sync.watch_interval` until stopped.
    #[arg(long)]
    pub watch: bool,
    /// Fleet mode: claim the selected accounts from the state store one at a
    /// time with the other workers (each account synced by one of them),
    /// until none is left; with --watch, forever.
    #[arg(long)]
    pub worker: bool,
    /// With --worker: accounts this worker syncs at once (default:
    /// sync.parallel_accounts).
    #[arg(long, value_name = "N", requires = "worker")]
    pub max_accounts: Option<usize>,
    /// Say what a run would do, per account and folder (messages to copy,
    /// flag updates, deletions, folders to create, ACL entries to set), and
    /// change nothing on the target or in the sync state.
    #[arg(long, conflicts_with_all = ["worker", "watch"])]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct VerifyArgs {
    /// Verify only this account (repeatable).
    #[arg(long = "mailbox", value_name = "ADDRESS")]
    pub mailboxes: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

fn server(
    cfg: &godwit_config::SyncServerConfig,
    key: &str,
    sync: &SyncConfig,
    bandwidth: Option<u64>,
) -> anyhow::Result<Server> {
    let mut s = Server::from_url(&cfg.url).with_context(|| format!("{key}.url"))?;
    s.tls_insecure = cfg.tls_insecure;
    s.namespace_prefix = cfg.namespace_prefix.clone();
    s.command_timeout = sync.command_timeout;
    s.max_response = sync.max_message_size + crate::conn::RESPONSE_MARGIN;
    s.limits = Arc::new(ServerLimits::new(
        sync.max_connections_per_server,
        bandwidth,
    ));
    s.auth = match cfg.auth.as_str() {
        "plain" => crate::conn::Auth::Plain,
        "xoauth2" => crate::conn::Auth::XOAuth2(Arc::new(token_source(cfg, key)?)),
        "oauthbearer" => crate::conn::Auth::OAuthBearer(Arc::new(token_source(cfg, key)?)),
        _ => crate::conn::Auth::Login,
    };
    if let (Some(user), Some(pw)) = (&cfg.master_user, &cfg.master_password) {
        s.master = Some((user.clone(), secret(pw, &format!("{key}.master_password"))?));
    }
    Ok(s)
}

fn token_source(
    cfg: &godwit_config::SyncServerConfig,
    key: &str,
) -> anyhow::Result<crate::oauth::TokenSource> {
    Ok(match (&cfg.token_url, &cfg.token_command) {
        (Some(url), _) => crate::oauth::TokenSource::ClientCredentials {
            url: url.clone(),
            client_id: cfg.client_id.clone().unwrap_or_default(),
            client_secret: secret(
                cfg.client_secret.as_deref().unwrap_or_default(),
                &format!("{key}.client_secret"),
            )?,
            scope: cfg.scope.clone(),
            tls_insecure: cfg.tls_insecure,
            cache: Default::default(),
        },
        (None, Some(argv)) => crate::oauth::TokenSource::Command { argv: argv.clone() },
        (None, None) => anyhow::bail!(
            "{key}.auth = \"{}\" needs token_url or token_command",
            cfg.auth
        ),
    })
}

/// Who is who on both sides, for ACL entries: each account's source login
/// and address name its target login.
fn acl_users(all: &[Account]) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    for a in all {
        m.insert(a.address.to_ascii_lowercase(), a.target.user.clone());
        m.insert(a.source.user.to_ascii_lowercase(), a.target.user.clone());
    }
    m
}

/// Builds the shared endpoints (one connection cap per server, for all accounts).
pub fn endpoints(sync: &SyncConfig) -> anyhow::Result<Endpoints> {
    Ok(Endpoints {
        // The byte rate protects the source, which users are still working on.
        source: server(&sync.source, "sync.source", sync, sync.max_bytes_per_second)?,
        target: server(&sync.target, "sync.target", sync, None)?,
        overrides: sync.folders.clone(),
        exclude: sync.exclude.clone(),
        acls: sync.acls,
        acl_users: Arc::new(if sync.acls {
            acl_users(&accounts::load(&sync.accounts).context("sync.accounts")?)
        } else {
            Default::default()
        }),
    })
}

/// The endpoints of one account: the shared ones, or with its own servers
/// from the accounts file's source_url/target_url columns. One `Server` per
/// URL, so the connection cap of a server holds across its accounts.
fn endpoints_for(
    shared: &Arc<Endpoints>,
    sync: &SyncConfig,
    account: &Account,
    servers: &mut std::collections::HashMap<(bool, String), Server>,
) -> anyhow::Result<Arc<Endpoints>> {
    if account.source_url.is_none() && account.target_url.is_none() {
        return Ok(shared.clone());
    }
    let mut ep = (**shared).clone();
    for (is_source, url) in [(true, &account.source_url), (false, &account.target_url)] {
        let Some(url) = url else { continue };
        let key = (is_source, url.clone());
        if !servers.contains_key(&key) {
            let (base, name, bw) = if is_source {
                (&sync.source, "source_url", sync.max_bytes_per_second)
            } else {
                (&sync.target, "target_url", None)
            };
            let cfg = godwit_config::SyncServerConfig {
                url: url.clone(),
                ..base.clone()
            };
            let s = server(
                &cfg,
                &format!(
                    "{} ({name} of {})",
                    sync.accounts.display(),
                    account.address
                ),
                sync,
                bw,
            )?;
            servers.insert(key.clone(), s);
        }
        let s = servers[&key].clone();
        if is_source {
            ep.source = s;
        } else {
            ep.target = s;
        }
    }
    Ok(Arc::new(ep))
}

/// The addresses of the directory's shared mailboxes (`kind = shared`, from
/// `godwit directory import`). A store without a directory has none.
pub async fn directory_shared(store: &Store) -> Vec<String> {
    let rows = godwit_store::sqlx::query_scalar::<_, String>(
        "SELECT address FROM directory_objects WHERE kind = 'shared' ORDER BY address",
    )
    .fetch_all(&store.pool)
    .await;
    rows.unwrap_or_else(|e| {
        tracing::debug!("no directory to read shared mailboxes from ({e})");
        Vec::new()
    })
}

/// The accounts file's rows, then each directory shared mailbox the file
/// does not list (a row in the file wins: it may name other logins).
pub fn with_shared(mut all: Vec<Account>, shared: &[String]) -> Vec<Account> {
    for address in shared {
        let a = Account::shared(address);
        if !all.iter().any(|b| b.address == a.address) {
            all.push(a);
        }
    }
    all
}

/// A shared mailbox has no password: where a side logs in with passwords
/// (`auth` login or plain), only its master user can open the mailbox. The
/// error names the missing keys; None when nothing is missing.
pub fn missing_master(account: &Account, ep: &Endpoints) -> Option<String> {
    use crate::conn::Auth;
    if !account.shared {
        return None;
    }
    let missing: Vec<String> = [("sync.source", &ep.source), ("sync.target", &ep.target)]
        .into_iter()
        .filter(|(_, s)| s.master.is_none() && matches!(s.auth, Auth::Login | Auth::Plain))
        .map(|(key, _)| format!("{key}.master_user"))
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "shared mailbox {} (directory kind shared) has no password of its own: set {} (with its master_password)",
        account.address,
        missing.join(" and ")
    ))
}

/// Every account `godwit sync` and `verify` cover: the accounts file and the
/// directory's shared mailboxes.
async fn all_accounts(sync: &SyncConfig, store: &Store) -> anyhow::Result<Vec<Account>> {
    let file = accounts::load(&sync.accounts).context("sync.accounts")?;
    Ok(with_shared(file, &directory_shared(store).await))
}

fn select(all: Vec<Account>, sync: &SyncConfig, wanted: &[String]) -> anyhow::Result<Vec<Account>> {
    if wanted.is_empty() {
        return Ok(all);
    }
    let mut out = Vec::new();
    for w in wanted {
        let w = w.to_ascii_lowercase();
        let a = all.iter().find(|a| a.address == w).with_context(|| {
            format!(
                "--mailbox {w}: not in {} nor a shared mailbox of the directory",
                sync.accounts.display()
            )
        })?;
        out.push(a.clone());
    }
    Ok(out)
}

fn sync_section(config: &Config) -> anyhow::Result<&SyncConfig> {
    Ok(config.require_sync()?)
}

#[derive(serde::Serialize)]
struct SyncOutput<'a> {
    /// --dry-run: the reports say what a run would do; nothing was changed.
    dry_run: bool,
    sync: &'a [AccountReport],
    verify: &'a [AccountCheck],
    totals: &'a Totals,
}

/// `godwit sync`: copy (or delta), then verify each account. With
/// `--watch`, again every `sync.watch_interval` until stopped (SIGINT or
/// SIGTERM), so the mailboxes stay minutes behind the source.
pub async fn run_sync(config: &Config, args: &SyncArgs) -> anyhow::Result<i32> {
    let sync = sync_section(config)?;
    if !args.watch {
        return run_sync_once(config, args).await;
    }
    let interval = sync.watch_interval;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut round = 0u64;
    loop {
        round += 1;
        let code = run_sync_once(config, args).await?;
        tracing::info!(round, code, next_in = ?interval, "sync --watch: round done");
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(code),
            _ = term.recv() => return Ok(code),
        }
    }
}

async fn run_sync_once(config: &Config, args: &SyncArgs) -> anyhow::Result<i32> {
    let sync = sync_section(config)?;
    let store = Store::open(&config.store_url())
        .await
        .context("opening the state store")?;
    let selected = select(all_accounts(sync, &store).await?, sync, &args.mailboxes)?;
    let started = std::time::Instant::now();
    let show_progress = !args.no_progress && !args.json && std::io::stderr().is_terminal();
    let mode = if args.worker {
        Mode::Worker {
            max_accounts: args.max_accounts.unwrap_or(sync.parallel_accounts).max(1),
        }
    } else {
        Mode::Plain
    };
    let (reports, checks) = sync_accounts(
        config,
        store,
        selected,
        SyncOptions {
            propagate_deletes: args.propagate_deletes,
            dry_run: args.dry_run,
            ..Default::default()
        },
        !args.no_verify && !args.dry_run,
        show_progress,
        mode,
    )
    .await?;
    // A dry run verifies nothing (the target is not meant to match yet).
    let checks = if args.dry_run { Vec::new() } else { checks };
    let totals = Totals::of(&reports, &checks, started.elapsed());
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&SyncOutput {
                dry_run: args.dry_run,
                sync: &reports,
                verify: &checks,
                totals: &totals,
            })?
        );
    } else {
        for r in &reports {
            println!("{}", render_sync(r));
        }
        if !args.dry_run {
            print!("{}", render(&checks));
        }
        print!("{}", totals.render());
    }
    if args.dry_run {
        return Ok(if reports.iter().all(|r| r.error.is_none()) {
            0
        } else {
            1
        });
    }
    Ok(if checks.iter().all(|c| c.clean) { 0 } else { 1 })
}

/// `wave cutover --final-sync`: a delta and a verify for each address that
/// the accounts file lists. Returns, per address synced, whether it verified
/// clean (or why not); addresses the file does not list are not in the map.
pub async fn final_sync(
    config: &Config,
    addresses: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, Result<(), String>>> {
    let sync = sync_section(config)?;
    let store = Store::open(&config.store_url())
        .await
        .context("opening the state store")?;
    let all = all_accounts(sync, &store).await?;
    let wanted: std::collections::BTreeSet<String> =
        addresses.iter().map(|a| a.to_ascii_lowercase()).collect();
    let selected: Vec<Account> = all
        .into_iter()
        .filter(|a| wanted.contains(&a.address))
        .collect();
    let (_, checks) = sync_accounts(
        config,
        store,
        selected,
        SyncOptions::default(),
        true,
        false,
        Mode::Plain,
    )
    .await?;
    Ok(checks
        .into_iter()
        .map(|c| {
            let verdict = if c.clean {
                Ok(())
            } else if let Some(e) = &c.error {
                Err(e.clone())
            } else {
                Err(crate::verify::differences(&c))
            };
            (c.address, verdict)
        })
        .collect())
}

/// A worker's accounts by address: (order in the file, account, endpoints).
type Claimable = std::collections::HashMap<String, (usize, Account, Arc<Endpoints>)>;

/// How a run shares its accounts with the other sync processes.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Every selected account, each under its lease (waiting while another
    /// process holds it), `parallel_accounts` at a time.
    Plain,
    /// Accounts claimed from the campaign in the store, `max_accounts` at a time.
    Worker { max_accounts: usize },
}

/// The fleet-wide slots for a server's connection cap, keyed by host:port.
fn attach(fleet: &Fleet, server: &Server, cap: usize) {
    server
        .limits
        .set_fleet(fleet.slots(&format!("{}:{}", server.host, server.port), cap));
}

/// Syncs (and, with `verify`, verifies) the accounts; reports and checks in
/// the accounts' order (in worker mode, only those this worker synced).
async fn sync_accounts(
    config: &Config,
    store: Store,
    selected: Vec<Account>,
    opts: SyncOptions,
    verify: bool,
    show_progress: bool,
    mode: Mode,
) -> anyhow::Result<(Vec<AccountReport>, Vec<AccountCheck>)> {
    let sync = sync_section(config)?;
    let ep = Arc::new(endpoints_with(sync, &selected)?);
    let fleet = Fleet::start(store.clone(), config.node_name(), sync.lease);
    let cap = sync.max_connections_per_server;
    attach(&fleet, &ep.source, cap);
    attach(&fleet, &ep.target, cap);
    let opts = SyncOptions {
        fetch_batch: sync.fetch_batch,
        max_reconnects: sync.max_reconnects,
        parallel_folders: sync.parallel_folders,
        ..opts
    };
    let bars = progress_bars();
    bars.set_draw_target(if show_progress {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    });
    let mut servers = std::collections::HashMap::new();
    let mut work = Vec::new();
    for account in selected {
        let ep = endpoints_for(&ep, sync, &account, &mut servers)?;
        work.push((account, ep));
    }
    for s in servers.values() {
        attach(&fleet, s, cap);
    }
    let job = Job {
        store,
        fleet: fleet.clone(),
        opts,
        verify,
    };
    let mut tasks = tokio::task::JoinSet::new();
    match mode {
        Mode::Plain => {
            let gate = Arc::new(tokio::sync::Semaphore::new(sync.parallel_accounts));
            for (i, (account, ep)) in work.into_iter().enumerate() {
                let (job, gate) = (job.clone(), gate.clone());
                tasks.spawn(async move {
                    let _slot = gate.acquire_owned().await.expect("never closed");
                    if job.opts.dry_run {
                        // Writes nothing, so it needs no lease (and takes none from a copy).
                        let (report, check) = job.run(&account, &ep, Default::default()).await;
                        return vec![(i, report, check)];
                    }
                    // Two runs over one account never copy it at once (issue 17).
                    let lost = match job.fleet.lock(&account.address).await {
                        Ok(t) => t,
                        Err(e) => {
                            return vec![(i, failed(&account.address, &e.to_string()), None)];
                        }
                    };
                    let (report, check) = job.run(&account, &ep, lost).await;
                    job.fleet.release(&account.address, None).await;
                    vec![(i, report, check)]
                });
            }
        }
        Mode::Worker { max_accounts } => {
            let selection: std::collections::BTreeSet<String> =
                work.iter().map(|(a, _)| a.address.clone()).collect();
            let opened = fleet
                .join_or_open(&selection)
                .await
                .context("opening the sync campaign in the state store")?;
            tracing::info!(
                worker = %fleet.me,
                accounts = selection.len(),
                "sync worker: {} the campaign over {} accounts",
                if opened { "opened" } else { "joined" },
                selection.len()
            );
            let work: Arc<Claimable> = Arc::new(
                work.into_iter()
                    .enumerate()
                    .map(|(i, (a, ep))| (a.address.clone(), (i, a, ep)))
                    .collect(),
            );
            let selection = Arc::new(selection);
            for _ in 0..max_accounts {
                let (job, work, selection) = (job.clone(), work.clone(), selection.clone());
                tasks.spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let (step, lost) = match job.fleet.claim(&selection).await {
                            Ok(s) => s,
                            Err(e) => {
                                // The store is the coordinator: without it nothing
                                // can be claimed safely. Retry, loudly.
                                tracing::error!("claiming an account from the state store: {e}");
                                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                                continue;
                            }
                        };
                        match step {
                            Step::Claim(address) => {
                                let Some((i, account, ep)) = work.get(&address) else {
                                    continue;
                                };
                                let lost = lost.unwrap_or_default();
                                let (report, check) = job.run(account, ep, lost.clone()).await;
                                if !lost.is_cancelled() {
                                    let state = if report.error.is_none() {
                                        "done"
                                    } else {
                                        "failed"
                                    };
                                    job.fleet.release(&address, Some(state)).await;
                                }
                                out.push((*i, report, check));
                            }
                            Step::Wait(d) => tokio::time::sleep(d).await,
                            Step::Done => return out,
                        }
                    }
                });
            }
        }
    }
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.extend(r.context("a sync task panicked")?);
    }
    results.sort_by_key(|r| r.0);
    let reports: Vec<AccountReport> = results.iter().map(|r| r.1.clone()).collect();
    let checks: Vec<AccountCheck> = results
        .iter()
        .map(|r| {
            r.2.clone().unwrap_or_else(|| AccountCheck {
                address: r.1.address.clone(),
                clean: false,
                error: Some(
                    r.1.error
                        .clone()
                        .unwrap_or_else(|| "not verified (--no-verify)".into()),
                ),
                ..Default::default()
            })
        })
        .collect();
    Ok((reports, checks))
}

fn failed(address: &str, error: &str) -> AccountReport {
    AccountReport {
        address: address.to_string(),
        error: Some(error.to_string()),
        ..Default::default()
    }
}

/// `endpoints`, with the ACL user map over `accounts` (the file's rows and
/// the shared mailboxes being synced).
fn endpoints_with(sync: &SyncConfig, accounts: &[Account]) -> anyhow::Result<Endpoints> {
    let mut ep = endpoints(sync)?;
    if sync.acls {
        let mut users = (*ep.acl_users).clone();
        for (k, v) in acl_users(accounts) {
            users.entry(k).or_insert(v);
        }
        ep.acl_users = Arc::new(users);
    }
    Ok(ep)
}

/// What every account's copy shares.
#[derive(Clone)]
struct Job {
    store: Store,
    fleet: Fleet,
    opts: SyncOptions,
    verify: bool,
}

impl Job {
    /// Copies (and verifies) one account whose lease this process holds;
    /// stops when `lost` says another worker took the lease over.
    async fn run(
        &self,
        account: &Account,
        ep: &Arc<Endpoints>,
        lost: tokio_util::sync::CancellationToken,
    ) -> (AccountReport, Option<AccountCheck>) {
        if let Some(e) = missing_master(account, ep) {
            if !self.opts.dry_run {
                let _ = crate::state::set_account_status(
                    &self.store,
                    &account.address,
                    crate::state::Status::Seeding,
                    Some(&e),
                )
                .await;
            }
            let mut r = failed(&account.address, &e);
            r.dry_run = self.opts.dry_run;
            return (r, None);
        }
        let bar = progress_bars().add(indicatif::ProgressBar::new(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:30} [{bar:30}] {pos}/{len} msgs {msg} {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(account.address.clone());
        let progress = Arc::new(Progress::default());
        let ticker = {
            let (progress, bar) = (progress.clone(), bar.clone());
            tokio::spawn(async move {
                loop {
                    bar.set_length(progress.messages_total.load(Ordering::Relaxed));
                    bar.set_position(progress.messages_done.load(Ordering::Relaxed));
                    bar.set_message(bytesize(progress.bytes_done.load(Ordering::Relaxed)));
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
        };
        let work = async {
            let report = sync_account(
                &self.store,
                ep,
                &account.address,
                &account.source,
                &account.target,
                &self.opts,
                progress,
            )
            .await;
            let check = if self.verify && report.error.is_none() {
                Some(
                    verify_account(
                        &self.store,
                        ep,
                        &account.address,
                        &account.source,
                        &account.target,
                    )
                    .await,
                )
            } else {
                None
            };
            (report, check)
        };
        let out = tokio::select! {
            out = work => out,
            _ = lost.cancelled() => (
                failed(
                    &account.address,
                    "stopped: another worker took over this account's lease (this one stalled past sync.lease)",
                ),
                None,
            ),
        };
        ticker.abort();
        bar.finish();
        out
    }
}

/// `godwit verify`: compare without copying.
pub async fn run_verify(config: &Config, args: &VerifyArgs) -> anyhow::Result<i32> {
    let sync = sync_section(config)?;
    let store = Store::open(&config.store_url())
        .await
        .context("opening the state store")?;
    let selected = select(all_accounts(sync, &store).await?, sync, &args.mailboxes)?;
    let ep = Arc::new(endpoints_with(sync, &selected)?);
    let mut tasks = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(sync.parallel_accounts));
    let mut servers = std::collections::HashMap::new();
    for (i, a) in selected.into_iter().enumerate() {
        let ep = endpoints_for(&ep, sync, &a, &mut servers)?;
        let (store, gate) = (store.clone(), gate.clone());
        tasks.spawn(async move {
            let _slot = gate.acquire_owned().await.expect("never closed");
            if let Some(e) = missing_master(&a, &ep) {
                let check = AccountCheck {
                    address: a.address.clone(),
                    clean: false,
                    error: Some(e),
                    ..Default::default()
                };
                return (i, check);
            }
            (
                i,
                verify_account(&store, &ep, &a.address, &a.source, &a.target).await,
            )
        });
    }
    let mut checks = Vec::new();
    while let Some(r) = tasks.join_next().await {
        checks.push(r.context("a verify task panicked")?);
    }
    checks.sort_by_key(|c| c.0);
    let checks: Vec<AccountCheck> = checks.into_iter().map(|c| c.1).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", render(&checks));
    }
    Ok(if checks.iter().all(|c| c.clean) { 0 } else { 1 })
}

/// The progress bars of `godwit sync`, shared with the log writer below.
pub fn progress_bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(|| {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    })
}

/// A tracing writer that prints log lines above the progress bars instead of
/// through them: `tracing_subscriber::fmt().with_writer(ProgressWriter)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgressWriter;

impl std::io::Write for ProgressWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        progress_bars().suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ProgressWriter {
    type Writer = ProgressWriter;
    fn make_writer(&'a self) -> Self::Writer {
        ProgressWriter
    }
}

/// A run's totals, as imapsync ends every run ("++++ Statistics"): what an
/// operator compares between the pre-seed and the deltas, and pastes into a
/// change ticket.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    /// --dry-run: what a run would do; nothing was copied or changed.
    pub dry_run: bool,
    pub accounts: usize,
    /// Accounts whose sync stopped with an error.
    pub accounts_failed: usize,
    /// Accounts whose verify was not clean (including not verified).
    pub accounts_not_verified: usize,
    pub folders: usize,
    pub folders_unchanged: usize,
    /// Target folders created (with --dry-run: to create).
    pub folders_created: usize,
    /// ACL entries set (with --dry-run: to set).
    pub acls_set: u64,
    pub messages_copied: u64,
    pub bytes_copied: u64,
    /// Found already on the target and paired instead of copied.
    pub messages_matched: u64,
    pub messages_skipped: usize,
    pub flag_updates: u64,
    pub deleted: u64,
    pub reconnects: u64,
    pub elapsed_s: f64,
    pub messages_per_s: f64,
    pub mb_per_s: f64,
    /// Every error, named by account.
    pub errors: Vec<String>,
}

impl Totals {
    pub fn of(
        reports: &[AccountReport],
        checks: &[AccountCheck],
        elapsed: std::time::Duration,
    ) -> Totals {
        let mut t = Totals {
            accounts: reports.len(),
            elapsed_s: elapsed.as_secs_f64(),
            ..Default::default()
        };
        for r in reports {
            t.folders += r.folders.len();
            t.folders_unchanged += r.folders.iter().filter(|f| f.unchanged).count();
            t.folders_created += r.folders.iter().filter(|f| f.created).count();
            t.acls_set += r.folders.iter().map(|f| f.acls_set).sum::<u64>();
            t.dry_run |= r.dry_run;
            t.messages_copied += r.copied();
            t.bytes_copied += r.folders.iter().map(|f| f.bytes).sum::<u64>();
            t.messages_matched += r.folders.iter().map(|f| f.matched).sum::<u64>();
            t.messages_skipped += r.skipped();
            t.flag_updates += r.folders.iter().map(|f| f.flags_updated).sum::<u64>();
            t.deleted += r.folders.iter().map(|f| f.deleted).sum::<u64>();
            t.reconnects += u64::from(r.reconnects);
            if let Some(e) = &r.error {
                t.accounts_failed += 1;
                t.errors.push(format!("{}: {e}", r.address));
            }
        }
        for c in checks {
            if !c.clean {
                t.accounts_not_verified += 1;
                // A sync error is already listed; a verify's own error is not.
                let listed = reports
                    .iter()
                    .any(|r| r.address == c.address && r.error.is_some());
                if let (Some(e), false) = (&c.error, listed) {
                    t.errors.push(format!("{}: {e}", c.address));
                }
            }
        }
        if t.elapsed_s > 0.0 {
            t.messages_per_s = t.messages_copied as f64 / t.elapsed_s;
            t.mb_per_s = t.bytes_copied as f64 / 1e6 / t.elapsed_s;
        }
        t
    }

    pub fn render(&self) -> String {
        let mut s = String::from(if self.dry_run {
            "++++ Statistics (dry run: what a sync would do; nothing was changed)\n"
        } else {
            "++++ Statistics\n"
        });
        let row = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<28}: {v}\n"));
        row(
            &mut s,
            "Accounts synced",
            format!(
                "{} ({} failed, {} not verified clean)",
                self.accounts, self.accounts_failed, self.accounts_not_verified
            ),
        );
        row(
            &mut s,
            "Folders",
            format!(
                "{} ({} unchanged, {} {})",
                self.folders,
                self.folders_unchanged,
                self.folders_created,
                if self.dry_run { "to create" } else { "created" }
            ),
        );
        row(
            &mut s,
            "Messages transferred",
            self.messages_copied.to_string(),
        );
        row(
            &mut s,
            "Messages already on target",
            self.messages_matched.to_string(),
        );
        row(
            &mut s,
            "Messages skipped",
            self.messages_skipped.to_string(),
        );
        row(&mut s, "Flag updates", self.flag_updates.to_string());
        row(&mut s, "ACL entries set", self.acls_set.to_string());
        row(
            &mut s,
            "Messages deleted on target",
            self.deleted.to_string(),
        );
        row(
            &mut s,
            "Total bytes transferred",
            format!("{} ({})", self.bytes_copied, bytesize(self.bytes_copied)),
        );
        row(&mut s, "Reconnects", self.reconnects.to_string());
        row(&mut s, "Elapsed time", format!("{:.2} s", self.elapsed_s));
        row(&mut s, "Messages/s", format!("{:.1}", self.messages_per_s));
        row(&mut s, "MB/s", format!("{:.2}", self.mb_per_s));
        row(&mut s, "Errors", self.errors.len().to_string());
        for e in &self.errors {
            s.push_str(&format!("  {e}\n"));
        }
        s
    }
}

fn bytesize(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

/// A --dry-run account: per folder, what a sync would do.
fn render_plan(r: &AccountReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let sum = |f: fn(&crate::engine::FolderReport) -> u64| r.folders.iter().map(f).sum::<u64>();
    let _ = writeln!(
        s,
        "{} (dry run): would copy {} messages ({}), update flags on {}, delete {}, create {} folders, set {} ACL entries; {} skipped",
        r.address,
        r.copied(),
        bytesize(sum(|f| f.bytes)),
        sum(|f| f.flags_updated),
        sum(|f| f.deleted),
        r.folders.iter().filter(|f| f.created).count(),
        sum(|f| f.acls_set),
        r.skipped(),
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error: {e}");
    }
    for f in r.folders.iter().filter(|f| !f.source.is_empty()) {
        let mut what = Vec::new();
        if f.created {
            what.push("create the folder".to_string());
        }
        if f.copied > 0 {
            what.push(format!("copy {} ({})", f.copied, bytesize(f.bytes)));
        }
        if f.flags_updated > 0 {
            what.push(format!("update flags on {}", f.flags_updated));
        }
        if f.deleted > 0 {
            what.push(format!("delete {}", f.deleted));
        }
        if f.acls_set > 0 {
            what.push(format!("set {} ACL entries", f.acls_set));
        }
        let what = if what.is_empty() {
            "nothing to do".to_string()
        } else {
            what.join(", ")
        };
        let _ = writeln!(s, "  {} -> {}: {what}", f.source, f.target);
    }
    for f in &r.folders {
        for n in &f.notes {
            let _ = writeln!(s, "  {} -> {}: {n}", f.source, f.target);
        }
        for k in &f.skipped {
            let _ = writeln!(s, "  {} -> {}: would skip {k}", f.source, f.target);
        }
    }
    s
}

pub fn render_sync(r: &AccountReport) -> String {
    use std::fmt::Write;
    if r.dry_run {
        return render_plan(r);
    }
    let mut s = String::new();
    let unchanged = r.folders.iter().filter(|f| f.unchanged).count();
    let _ = writeln!(
        s,
        "{}: {} copied ({}), {} matched, {} re-paired, {} flag updates, {} deleted, {} skipped, {} folders unchanged{}",
        r.address,
        r.copied(),
        bytesize(r.folders.iter().map(|f| f.bytes).sum()),
        r.folders.iter().map(|f| f.matched).sum::<u64>(),
        r.folders.iter().map(|f| f.repaired).sum::<u64>(),
        r.folders.iter().map(|f| f.flags_updated).sum::<u64>(),
        r.folders.iter().map(|f| f.deleted).sum::<u64>(),
        r.skipped(),
        unchanged,
        if r.reconnects > 0 {
            format!(", {} reconnects", r.reconnects)
        } else {
            String::new()
        }
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error: {e}");
    }
    for f in &r.folders {
        for n in &f.notes {
            let _ = writeln!(s, "  {} -> {}: {n}", f.source, f.target);
        }
        for k in &f.skipped {
            let _ = writeln!(s, "  {} -> {}: skipped {k}", f.source, f.target);
        }
    }
    s
}

#[cfg(test)]
mod totals_tests {
    use super::*;
    use crate::engine::FolderReport;
    use std::time::Duration;

    fn folder(copied: u64, bytes: u64, unchanged: bool) -> FolderReport {
        FolderReport {
            source: "INBOX".into(),
            target: "INBOX".into(),
            unchanged,
            copied,
            bytes,
            matched: 1,
            flags_updated: 2,
            skipped: vec!["UID 9: too big".into()],
            ..Default::default()
        }
    }

    #[test]
    fn totals_sum_accounts_and_name_every_error_once() {
        let reports = vec![
            AccountReport {
                address: "a@x".into(),
                folders: vec![folder(10, 2_000_000, false), folder(0, 0, true)],
                reconnects: 1,
                ..Default::default()
            },
            AccountReport {
                address: "b@x".into(),
                folders: vec![folder(5, 1_000_000, false)],
                error: Some("NO [AUTHENTICATIONFAILED] bad".into()),
                ..Default::default()
            },
        ];
        let checks = vec![
            AccountCheck {
                address: "a@x".into(),
                clean: false,
                error: Some("verify: INBOX differs".into()),
                ..Default::default()
            },
            AccountCheck {
                address: "b@x".into(),
                clean: false,
                error: Some("NO [AUTHENTICATIONFAILED] bad".into()),
                ..Default::default()
            },
        ];
        let t = Totals::of(&reports, &checks, Duration::from_secs(2));
        assert_eq!(
            (t.accounts, t.accounts_failed, t.accounts_not_verified),
            (2, 1, 2)
        );
        assert_eq!((t.folders, t.folders_unchanged), (3, 1));
        assert_eq!((t.messages_copied, t.bytes_copied), (15, 3_000_000));
        assert_eq!(
            (t.messages_matched, t.messages_skipped, t.flag_updates),
            (3, 3, 6)
        );
        assert_eq!(t.reconnects, 1);
        assert_eq!((t.messages_per_s, t.mb_per_s), (7.5, 1.5));
        assert_eq!(
            t.errors,
            vec![
                "b@x: NO [AUTHENTICATIONFAILED] bad".to_string(),
                "a@x: verify: INBOX differs".to_string()
            ]
        );
        let text = t.render();
        assert!(text.starts_with("++++ Statistics\n"), "{text}");
        assert!(
            text.contains("Messages transferred        : 15\n"),
            "{text}"
        );
        assert!(text.contains("Errors                      : 2\n"), "{text}");
    }

    #[test]
    fn shared_mailboxes_join_the_file_and_need_a_master_user() {
        let file =
            accounts::parse("a@x,a,p,a2,p\ninfo@x,info-src,p,info-dst,p\n", "a.csv").unwrap();
        let all = with_shared(file, &["Info@x".into(), "sales@x".into()]);
        let got: Vec<(&str, &str, &str, bool)> = all
            .iter()
            .map(|a| {
                (
                    a.address.as_str(),
                    a.source.user.as_str(),
                    a.target.user.as_str(),
                    a.shared,
                )
            })
            .collect();
        // A row of the file wins over the directory; a shared mailbox logs in
        // as its address on both sides.
        assert_eq!(
            got,
            vec![
                ("a@x", "a", "a2", false),
                ("info@x", "info-src", "info-dst", false),
                ("sales@x", "sales@x", "sales@x", true),
            ]
        );
        let sales = &all[2];
        let server = |master: bool, auth: crate::conn::Auth| {
            let mut s = Server::from_url("imap://h:143").unwrap();
            s.auth = auth;
            if master {
                s.master = Some(("admin".into(), "pw".into()));
            }
            s
        };
        let ep = |source: Server, target: Server| Endpoints {
            source,
            target,
            overrides: Default::default(),
            exclude: vec![],
            acls: false,
            acl_users: Default::default(),
        };
        use crate::conn::Auth;
        let token = || {
            Auth::XOAuth2(Arc::new(crate::oauth::TokenSource::Command {
                argv: vec!["t".into()],
            }))
        };
        for (source, target, missing) in [
            (server(true, Auth::Login), server(true, Auth::Plain), None),
            (
                server(true, Auth::Login),
                server(false, Auth::Login),
                Some("set sync.target.master_user (with"),
            ),
            (
                server(false, Auth::Plain),
                server(false, Auth::Login),
                Some("set sync.source.master_user and sync.target.master_user"),
            ),
            // An OAuth token is issued for the address itself.
            (server(false, token()), server(true, Auth::Login), None),
        ] {
            let e = ep(source, target);
            let got = missing_master(sales, &e);
            match missing {
                None => assert_eq!(got, None),
                Some(m) => {
                    let got = got.unwrap();
                    assert!(got.contains(m) && got.contains("sales@x"), "{got}");
                }
            }
            assert_eq!(
                missing_master(&all[0], &e),
                None,
                "a file row has a password"
            );
        }
    }

    #[test]
    fn an_instant_run_divides_by_nothing() {
        let t = Totals::of(&[], &[], Duration::ZERO);
        assert_eq!((t.messages_per_s, t.mb_per_s), (0.0, 0.0));
    }
}
