//! "The forensic way" (the seed's Task 13): search both platforms' mailboxes
//! for a Message-ID over IMAP, with the sync configuration's credentials.
//! `UID SEARCH HEADER Message-ID` in every folder (RFC 3501 6.4.4), read-only
//! (EXAMINE, so nothing is marked seen).

use anyhow::{Context, Result};
use futures::TryStreamExt;
use godwit_config::Config;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Side {
    /// "old (sync source)" or "new (sync target)".
    pub platform: String,
    pub address: String,
    /// (folder, UID) where the Message-ID was found.
    pub found: Vec<(String, u32)>,
    pub error: Option<String>,
}

pub async fn search(config: &Config, address: &str, message_id: &str) -> Result<Vec<Side>> {
    let sync = config
        .sync
        .as_ref()
        .context("--mailboxes needs the [sync] section (servers and accounts)")?;
    let ends = godwit_imap::cli::endpoints(sync)?;
    let accounts = godwit_imap::accounts::load(&sync.accounts).context("sync.accounts")?;
    let Some(account) = accounts
        .iter()
        .find(|a| a.address.eq_ignore_ascii_case(address))
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (label, server, login) in [
        ("old (sync source)", &ends.source, &account.source),
        ("new (sync target)", &ends.target, &account.target),
    ] {
        let found = search_one(server, login, message_id).await;
        out.push(Side {
            platform: label.into(),
            address: account.address.clone(),
            found: found.as_ref().map(|f| f.clone()).unwrap_or_default(),
            error: found.err().map(|e| format!("{e:#}")),
        });
    }
    Ok(out)
}

async fn search_one(
    server: &godwit_imap::conn::Server,
    login: &godwit_imap::conn::Login,
    message_id: &str,
) -> Result<Vec<(String, u32)>> {
    let mut conn = godwit_imap::conn::Conn::open(server, login).await?;
    let names: Vec<String> = conn
        .session
        .list(Some(""), Some("*"))
        .await?
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .filter(|n| {
            !n.attributes()
                .iter()
                .any(|a| matches!(a, async_imap::types::NameAttribute::NoSelect))
        })
        .map(|n| n.name().to_string())
        .collect();
    let mut found = Vec::new();
    let needle = godwit_imap::conn::quote(message_id);
    for name in names {
        if conn.session.examine(&name).await.is_err() {
            continue;
        }
        let uids = conn
            .session
            .uid_search(format!("HEADER Message-ID {needle}"))
            .await?;
        let display = godwit_imap::utf7::decode(&name).unwrap_or(name.clone());
        let mut uids: Vec<u32> = uids.into_iter().collect();
        uids.sort();
        found.extend(uids.into_iter().map(|u| (display.clone(), u)));
    }
    conn.logout().await;
    Ok(found)
}

pub fn render(sides: &[Side]) -> String {
    sides
        .iter()
        .map(|s| match (&s.error, s.found.is_empty()) {
            (Some(e), _) => format!("  {} <{}>: search failed: {e}", s.platform, s.address),
            (None, true) => format!("  not in {} <{}>", s.platform, s.address),
            (None, false) => format!(
                "  found in {} <{}>: {}",
                s.platform,
                s.address,
                s.found
                    .iter()
                    .map(|(f, u)| format!("{f}, UID {u}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
