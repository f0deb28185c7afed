//! The evidence commands: `trace` (a message's chain of custody) and
//! `report` (a wave's or an incident window's figures).

use crate::cli::parse_when;
use crate::mailboxes;
use anyhow::{Result, bail};
use godwit_config::Config;

pub(crate) async fn trace(
    config: Config,
    key: Option<String>,
    rcpt: Option<String>,
    since: Option<String>,
    until: Option<String>,
    json: bool,
    search_mailboxes: bool,
) -> Result<i32> {
    if key.is_none() && rcpt.is_none() {
        bail!("give a Message-ID or queue ID, or --rcpt ADDRESS with --since/--until");
    }
    let store = crate::cli::open_store(&config).await?;
    let q = godwit_evidence::trace::Query {
        key,
        rcpt,
        since_ms: since
            .as_deref()
            .map(|s| parse_when(s, "--since"))
            .transpose()?,
        until_ms: until
            .as_deref()
            .map(|s| parse_when(s, "--until"))
            .transpose()?,
    };
    let traces = godwit_evidence::trace::find(&store, &q).await?;
    let mut found = Vec::new();
    if search_mailboxes {
        for t in &traces {
            let mut sides = Vec::new();
            if let Some(mid) = &t.message_id {
                let rcpts = t.events.iter().find_map(|r| match &r.event {
                    godwit_events::Event::MessageAccepted { rcpts, .. } => Some(rcpts.clone()),
                    _ => None,
                });
                for a in rcpts.unwrap_or_default() {
                    sides.extend(mailboxes::search(&config, &a, mid).await?);
                }
            }
            found.push(sides);
        }
    }
    if json {
        if search_mailboxes {
            let v: Vec<_> = traces
                .iter()
                .zip(&found)
                .map(|(t, m)| serde_json::json!({"trace": t, "mailboxes": m}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&traces)?);
        }
    } else if traces.is_empty() {
        println!(
            "no message found (events are kept for {}; is the Message-ID right?)",
            godwit_config::format_duration(config.events.retention)
        );
    } else {
        for (i, t) in traces.iter().enumerate() {
            println!("{}", godwit_evidence::trace::render(t));
            if let Some(sides) = found.get(i) {
                if sides.is_empty() {
                    println!("Mailboxes: no recipient of this message is in sync.accounts");
                } else {
                    println!("Mailboxes:\n{}", mailboxes::render(sides));
                }
            }
        }
    }
    Ok(if traces.is_empty() { 1 } else { 0 })
}

pub(crate) async fn report(
    config: Config,
    since: String,
    until: String,
    format: String,
    sample: usize,
) -> Result<i32> {
    let store = crate::cli::open_store(&config).await?;
    let (since_ms, until_ms) = (
        parse_when(&since, "--since")?,
        parse_when(&until, "--until")?,
    );
    if since_ms >= until_ms {
        // Durations count back from now: --since 1h --until 2h ends before it starts.
        bail!(
            "--since {since} is not before --until {until}: the window is empty (durations are ago, so --since takes the larger one)"
        );
    }
    let (since, until) = (since_ms, until_ms);
    let r =
        godwit_evidence::report::build(&store, &config.spool_dir(), since, until, sample).await?;
    match format.as_str() {
        "md" => print!("{}", godwit_evidence::report::markdown(&r)),
        "csv" => print!("{}", godwit_evidence::report::csv(&r)),
        "json" => println!("{}", serde_json::to_string_pretty(&r)?),
        other => bail!("--format {other}: choose md, csv or json"),
    }
    Ok(0)
}
