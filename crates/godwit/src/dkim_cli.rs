//! `godwit dkim keygen` and `godwit dkim show`: the keys godwit signs with
//! and the TXT records (RFC 6376 3.6.2.1, `selector._domainkey.domain`) that
//! must be published for receivers to verify them.

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use godwit_outbound::KeyAlgorithm;
use godwit_outbound::dkim::{DkimKeys, generate, write_private_key};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Make a key pair: writes the private key (PEM, mode 0600) to --out and
    /// prints the TXT record to publish.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// rsa (2048 bits) or ed25519 (RFC 8463).
        #[arg(long, default_value = "rsa")]
        algorithm: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// For each configured [[dkim]] key, the TXT record that must be published.
    Show,
}

/// Prints a record as a zone-file line: long values are split into
/// character-strings of at most 255 octets (RFC 1035 3.3.14, RFC 6376 3.6.2.2).
fn zone_line(name: &str, txt: &str) -> String {
    let parts: Vec<String> = txt
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!("{name}. IN TXT ( {} )", parts.join(" "))
}

pub fn keygen(domain: &str, selector: &str, algorithm: &str, out: &Path) -> Result<i32> {
    let alg = match algorithm.to_ascii_lowercase().as_str() {
        "rsa" => KeyAlgorithm::Rsa,
        "ed25519" => KeyAlgorithm::Ed25519,
        other => bail!("--algorithm {other}: use rsa or ed25519"),
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let (pem, txt) = generate(alg).map_err(|e| anyhow::anyhow!(e))?;
    write_private_key(out, &pem).with_context(|| "the key file must not exist yet")?;
    println!("# private key written to {} (mode 0600)", out.display());
    println!("# publish this record, then add to the configuration:");
    println!(
        "#   [[dkim]]\n#   domain = \"{domain}\"\n#   selector = \"{selector}\"\n#   key = \"{}\"",
        out.display()
    );
    println!(
        "{}",
        zone_line(&format!("{selector}._domainkey.{domain}"), &txt)
    );
    println!("{selector}._domainkey.{domain} TXT \"{txt}\"");
    Ok(0)
}

pub fn show(config: &godwit_config::Config) -> Result<i32> {
    if config.dkim.is_empty() {
        println!("no [[dkim]] keys configured: outbound mail leaves unsigned");
        return Ok(1);
    }
    let keys = DkimKeys::load(&config.dkim)?;
    for (k, c) in keys.keys().iter().zip(&config.dkim) {
        let size = if k.bits > 0 {
            format!("{} {} bits", k.algorithm.tag(), k.bits)
        } else {
            k.algorithm.tag().to_string()
        };
        println!(
            "# {} selector {} ({size}, {})",
            k.domain,
            k.selector,
            c.key.display()
        );
        println!("{}", zone_line(&k.dns_name(), &k.txt_record()));
        println!("{} TXT \"{}\"", k.dns_name(), k.txt_record());
    }
    Ok(0)
}
