//! `godwit check access`: the one check that needs the gateway's state store
//! and the [sync] accounts (the other checks are godwit-check's).

use anyhow::Result;
use godwit_config::Config;

/// `godwit check access ADDRESS`: the password from --password, else the
/// [sync] account (its target login for the target platform, its source
/// login for any other).
pub(crate) async fn check_access(
    config: Config,
    address: &str,
    password: Option<String>,
) -> Result<i32> {
    let store = crate::cli::open_store(&config).await?;
    let accounts = match (&password, &config.sync) {
        (None, Some(sync)) => godwit_imap::accounts::load(&sync.accounts)?,
        _ => Vec::new(),
    };
    let wanted = godwit_route::normalize_address(address);
    let target = config.target_platform().map(str::to_string);
    let creds = |platform: &str| {
        if let Some(p) = &password {
            return Some(godwit_access::check::Credentials {
                user: address.to_string(),
                password: p.clone(),
            });
        }
        let a = accounts
            .iter()
            .find(|a| a.address.eq_ignore_ascii_case(&wanted))?;
        let l = if target.as_deref() == Some(platform) {
            &a.target
        } else {
            &a.source
        };
        Some(godwit_access::check::Credentials {
            user: l.user.clone(),
            password: l.password.clone(),
        })
    };
    let (text, ok) = godwit_access::check::run(&config, &store, address, creds).await?;
    print!("{text}");
    Ok(if ok { 0 } else { 2 })
}
