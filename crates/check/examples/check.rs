//! `godwit check` without the rest of godwit, for trying the preflight before
//! the binary wires it in: `cargo run -p godwit-check --example check -- dns example.com`.
//! With `--config FILE` it runs the configuration-driven check.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    /// godwit configuration file (TOML) for the configuration-driven run.
    #[arg(long, global = true)]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    check: godwit_check::cli::CheckArgs,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => match godwit_config::Config::load(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(3);
            }
        },
        None => None,
    };
    match godwit_check::run(config.as_ref(), &cli.check).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(3);
        }
    }
}
