//! Stand-in for `godwit sync|verify --config FILE ...` until the main binary
//! wires the subcommands; used by the SIGKILL test and by bench/sync-vs-mbsync.
//!
//!     cargo run --release -p godwit-imap --example sync -- --config godwit.toml sync --mailbox a@example.com

use clap::{Parser, Subcommand};
use godwit_imap::cli::{SyncArgs, VerifyArgs, run_sync, run_verify};

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    config: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Sync(SyncArgs),
    Verify(VerifyArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(godwit_imap::cli::ProgressWriter)
        .init();
    let config = godwit_config::Config::load(&cli.config)?;
    let code = match &cli.command {
        Command::Sync(a) => run_sync(&config, a).await?,
        Command::Verify(a) => run_verify(&config, a).await?,
    };
    std::process::exit(code);
}
