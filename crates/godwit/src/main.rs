//! godwit: the command line. `serve` runs the gateway; the other commands
//! work beside a running gateway (they share the state store and spool).
//!
//! This file is the CLI's definition and dispatch only: each command family
//! lives in its module (`serve`, `queue`, `route`, `wave`, `control` for the
//! directory and history, `evidence` for trace and report, `fleet`, `adopt`,
//! `doctor`, `check`, `dkim_cli`), and `cli` holds what they share.

// glibc's malloc spent a fifth of a 100,000-mailbox wave consolidating
// freed chunks; mimalloc is built for many small strings.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod adopt;
mod check;
mod cli;
mod control;
mod dkim_cli;
mod doctor;
mod evidence;
mod fleet;
mod journal;
mod mailboxes;
mod probe;
mod queue;
mod route;
mod serve;
mod smtpd;
mod soak;
mod tls;
mod wave;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use godwit_config::Config;
use queue::QueueCommand;
use route::RouteCommand;
use std::path::PathBuf;
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
        command: wave::WaveCommand,
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

fn main() {
    // No transparent huge pages: mimalloc's thread heaps touch a few small
    // pages in many 2 MiB regions, and with THP each counts whole. A
    // 100,000-message backlog was 513 MiB resident for a 41 MB heap with
    // them, 214 MiB without. The `no_thp` feature stops mimalloc asking for
    // them (madvise); this covers systems where THP is "always".
    // SAFETY: prctl with integer arguments only; a failure changes nothing.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
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
        return check::check_access(config, address, password.clone()).await;
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
        Command::Serve => serve::serve(config, cli.config.clone()).await,
        Command::Route { command } => route::run(config, command).await,
        Command::Queue { command } => queue::run(config, command).await,
        Command::Fleet {
            command: FleetCommand::Status { json },
        } => {
            let store = cli::open_store(&config)
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
        } => evidence::trace(config, key, rcpt, since, until, json, mailboxes).await,
        Command::Report {
            since,
            until,
            format,
            sample,
        } => evidence::report(config, since, until, format, sample).await,
        Command::Doctor(args) => doctor::run(config, args).await,
        Command::Directory { command } => control::directory(config, command).await,
        Command::Wave { command } => wave::run(config, command).await,
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
                wave::WaveCommand::Show { .. }
                | wave::WaveCommand::List { .. }
                | wave::WaveCommand::Watch { .. },
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
