//! What the commands share: the state store they open, who is acting, and
//! the addresses and times an operator types.

use anyhow::{Result, bail};
use godwit_config::Config;
use godwit_store::Store;

/// The state store the configuration names (SQLite under data_dir, or the
/// fleet's PostgreSQL). Its error already says which store did not open.
pub(crate) async fn open_store(config: &Config) -> Result<Store> {
    Ok(Store::open(&config.store_url()).await?)
}

/// RFC 3339, or a duration ago ("2h", "0s" = now).
pub(crate) fn parse_when(s: &str, flag: &str) -> Result<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let d = godwit_config::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("{flag}: an RFC 3339 time or a duration ago; {e}"))?;
    Ok(godwit_spool::now_ms() - d.as_millis() as i64)
}

pub(crate) fn actor(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("SUDO_USER").ok())
        .or_else(|| std::env::var("USER").ok())
        .or_else(os_user)
        .unwrap_or_else(|| "unknown".into())
}

/// The login name of the real user, from the password database.
fn os_user() -> Option<String> {
    // nix's getpwuid_r: thread-safe, no pointer into libc's static storage.
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// The address as the routing map keys it, if it is one (RFC 5321 4.1.2,
/// 4.5.3.1) in an accepted domain.
pub(crate) fn check_address(config: &Config, address: &str) -> Result<String> {
    let a = godwit_route::Address::parse(address).map_err(|e| anyhow::anyhow!(e))?;
    if !config.is_accepted_domain(&a.domain) {
        bail!(
            "`{address}` is not in an accepted domain ({})",
            config.domains.accepted.join(", ")
        );
    }
    Ok(a.to_string())
}
