//! `godwit spool adopt DIR [--force]`: takes over the spool of a node that
//! will not come back (its disk mounted here), so that its queued mail is
//! delivered from this node.
//!
//! One path for every case: the source spool is opened for exclusive use and
//! `recover`ed by the spool crate itself (END record and CRC checked, damaged
//! files moved to its `corrupt/`, torn status records cut off), then each
//! message is moved by `Spool::adopt` with its status records, so recipients
//! already delivered on the dead node are never sent again. A running gateway
//! does this itself, when the CLI asks through the store, and delivers at
//! once; with no gateway running, the CLI does it into the spool, and the
//! gateway delivers when it starts.

use anyhow::{Context, Result, bail};
use godwit_config::Config;
use godwit_events::{Event, EventLog};
use godwit_spool::{Spool, Spooled};
use godwit_store::{Store, now_ms};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The queue command (through the store's `queue_commands`) that asks a
/// running gateway to adopt a spool.
pub const OP: &str = "spool.adopt";

/// What the CLI asks a running gateway to do.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Request {
    /// The gateway that must do it (its `node_name`); the others ignore it.
    pub node: String,
    pub dir: PathBuf,
    pub from_node: Option<String>,
}

/// What was done, for the operator (and the CLI's exit code).
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Report {
    pub from_node: Option<String>,
    /// Queue IDs now in this node's spool.
    pub adopted: Vec<String>,
    /// Damaged files (file, reason), left in the source's `corrupt/`.
    pub quarantined: Vec<(String, String)>,
    /// Queue IDs left in the source (queue ID, why).
    pub refused: Vec<(String, String)>,
    /// Set when the whole adoption failed (the source could not be opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// DIR may name the node's `data_dir` (holding `spool/`) or its spool
/// folder itself (holding `queue/`).
pub fn resolve(dir: &Path) -> Result<PathBuf> {
    for cand in [dir.join("spool"), dir.to_path_buf()] {
        if cand.join("queue").is_dir() {
            return cand
                .canonicalize()
                .with_context(|| format!("spool adopt: {}", cand.display()));
        }
    }
    bail!(
        "spool adopt: {} holds no spool (neither {}/spool/queue nor {}/queue exists); name the dead node's data_dir or its spool folder",
        dir.display(),
        dir.display(),
        dir.display()
    )
}

/// Whether the spool as a whole must be refused, and why. `heartbeat_age_ms`
/// is the age of `from_node`'s last gateway heartbeat in the shared store
/// (`None`: it never heartbeat there).
pub fn refusal(
    src: &Path,
    own_spool: &Path,
    from_node: Option<&str>,
    own_node: &str,
    heartbeat_age_ms: Option<i64>,
    force: bool,
) -> Option<String> {
    if src == own_spool {
        return Some(format!(
            "{} is this node's own spool; nothing to adopt",
            src.display()
        ));
    }
    if force {
        return None;
    }
    let Some(from) = from_node else {
        return Some(format!(
            "cannot tell which node served {} (no `node` file, and the store has no event for its queue IDs), so cannot check that it has stopped; use --force if you know it will not come back",
            src.display()
        ));
    };
    if from == own_node {
        return Some(format!(
            "{} was served by a node named {from}, as this one is: two nodes must not share a node_name; use --force if this node replaces it",
            src.display()
        ));
    }
    match heartbeat_age_ms {
        Some(age) if age <= crate::fleet::LIVE_MS => Some(format!(
            "node {from} still heartbeats (last seen {:.1} s ago): it is running and delivers its own spool; stop it first, or use --force if you know it will not come back",
            age as f64 / 1000.0
        )),
        _ => None,
    }
}

/// Whether this node's events already name `queue_id` (it accepted or
/// adopted a message under that ID, even if delivered and gone since): a
/// restored copy of an adopted file must not be delivered again.
async fn known_in_store(store: &Store, node: &str, queue_id: &str) -> Result<bool> {
    let n: i64 = godwit_store::sqlx::query_scalar(
        "SELECT COUNT(*) FROM events WHERE queue_id = $1 AND node = $2",
    )
    .bind(queue_id)
    .bind(node)
    .fetch_one(&store.pool)
    .await
    .context("spool adopt: reading the event index")?;
    Ok(n > 0)
}

/// Adopts every whole message of the spool at `src` into `here`. Returns
/// what was done and the adopted messages (for a running gateway to queue).
pub async fn adopt(
    here: &Spool,
    src: &Path,
    from_node: Option<String>,
    own_node: &str,
    store: &Store,
    events: &EventLog,
) -> Result<(Report, Vec<Spooled>)> {
    // The lock: a spool still served by a process on this machine is refused.
    let from = Spool::open(src).with_context(|| format!("spool adopt {}", src.display()))?;
    let (good, bad) = from.recover()?;
    let mut report = Report {
        from_node: from_node.clone(),
        ..Default::default()
    };
    for (path, reason) in bad {
        events.emit(Event::QueueCorrupt {
            file: path.display().to_string(),
            reason: reason.clone(),
        });
        report
            .quarantined
            .push((path.display().to_string(), reason));
    }
    let mut adopted = Vec::new();
    for m in good {
        let id = m.header.queue_id.clone();
        if here.knows(&id) || known_in_store(store, own_node, &id).await? {
            report.refused.push((
                id,
                "queue ID already known on this node; left in the source".into(),
            ));
            continue;
        }
        match here.adopt(&from, &m).and_then(|sp| due_now(here, sp)) {
            Ok(sp) => {
                let pending = crate::queue::pending(&sp);
                events.emit(Event::QueueAdopted {
                    queue_id: id.clone(),
                    message_id: sp.header.message_id.clone(),
                    from_node: from_node.clone(),
                    from_dir: src.display().to_string(),
                    pending,
                });
                report.adopted.push(id);
                adopted.push(sp);
            }
            Err(e) => report.refused.push((id, e.to_string())),
        }
    }
    Ok((report, adopted))
}

/// Makes the adopted message's deferred recipients due now (a status record
/// each): the retry time the dead node chose reflects its own view of the
/// platform, and this node should try at once.
fn due_now(here: &Spool, mut sp: Spooled) -> Result<Spooled, godwit_spool::SpoolError> {
    let now = now_ms();
    let mut recs = Vec::new();
    for rec in sp.status.iter_mut().flatten() {
        if rec.status == godwit_spool::RcptStatus::Deferred && rec.next_ms > now {
            rec.next_ms = now;
            recs.push(rec.clone());
        }
    }
    if !recs.is_empty() {
        here.record_many(&sp.header.queue_id, &recs)?;
    }
    Ok(sp)
}

/// The node whose spool `src` is: its `node` file, or else the node that
/// accepted its queue IDs according to the store's event index.
async fn node_of(src: &Path, store: &Store) -> Result<Option<String>> {
    if let Some(n) = godwit_spool::owner(src) {
        return Ok(Some(n));
    }
    let mut names: Vec<String> = std::fs::read_dir(src.join("queue"))
        .with_context(|| format!("spool adopt: {}", src.join("queue").display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for id in names.iter().take(20) {
        let node: Option<String> = godwit_store::sqlx::query_scalar(
            "SELECT node FROM events WHERE queue_id = $1 AND name = 'message.accepted' LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&store.pool)
        .await?;
        if node.is_some() {
            return Ok(node);
        }
    }
    Ok(None)
}

/// `godwit spool adopt DIR [--force]`. Exit code 0 when everything whole was
/// adopted, 1 when something was refused or quarantined.
pub async fn cli(config: &Config, dir: &Path, force: bool) -> Result<i32> {
    let src = resolve(dir)?;
    std::fs::create_dir_all(config.spool_dir())
        .with_context(|| format!("spool {}", config.spool_dir().display()))?;
    let own_spool = config.spool_dir().canonicalize()?;
    let own_node = config.node_name().to_string();
    let store = tokio::time::timeout(Duration::from_secs(10), crate::cli::open_store(config))
        .await
        .map_err(|_| anyhow::anyhow!("the state store did not answer within 10 s"))
        .and_then(|r| r)
        .context(
            "spool adopt needs the state store (to check that the node has stopped heartbeating, and to record what it does); nothing was changed",
        )?;
    let from_node = node_of(&src, &store).await?;
    let age = match &from_node {
        Some(n) => godwit_store::sqlx::query_scalar::<_, i64>(
            "SELECT seen_ms FROM gateway_nodes WHERE node = $1",
        )
        .bind(n)
        .fetch_optional(&store.pool)
        .await?
        .map(|seen| now_ms() - seen),
        None => None,
    };
    if let Some(why) = refusal(
        &src,
        &own_spool,
        from_node.as_deref(),
        &own_node,
        age,
        force,
    ) {
        bail!("spool adopt refused: {why}. Nothing was changed.");
    }
    let report = match Spool::open(&config.spool_dir()) {
        Ok(here) => {
            // No gateway serves this node's spool: adopt into it here; the
            // gateway delivers when it starts (its recovery finds the files).
            let (events, writer) = EventLog::new(&config.events_dir(), &own_node)?;
            let indexer = tokio::spawn(godwit_evidence::index::run_indexer(
                store.clone(),
                events.tap(),
            ));
            let writer = tokio::spawn(writer.run());
            let result = adopt(&here, &src, from_node, &own_node, &store, &events).await;
            drop(events);
            let _ = writer.await;
            let _ = tokio::time::timeout(Duration::from_secs(10), indexer).await;
            let (report, _) = result?;
            println!(
                "no gateway is running on this node: the adopted mail is delivered when `godwit serve` starts"
            );
            report
        }
        Err(godwit_spool::SpoolError::Locked { .. }) => {
            let req = Request {
                node: own_node.clone(),
                dir: src.clone(),
                from_node,
            };
            let out = crate::fleet::send_to(
                &store,
                &own_node,
                OP,
                &serde_json::to_string(&req)?,
                Duration::from_secs(120),
            )
            .await?
            .with_context(|| {
                format!(
                    "the gateway serving {} (node {own_node}) did not answer within 120 s; check that it reaches the state store",
                    config.spool_dir().display()
                )
            })?;
            let report: Report = serde_json::from_str(&out)
                .with_context(|| format!("the gateway's answer: {out}"))?;
            if let Some(e) = &report.error {
                bail!("the gateway could not adopt {}: {e}", src.display());
            }
            report
        }
        Err(e) => return Err(e.into()),
    };
    print_report(&report, &src, &own_node);
    Ok(
        if report.refused.is_empty() && report.quarantined.is_empty() {
            0
        } else {
            1
        },
    )
}

fn print_report(r: &Report, src: &Path, own_node: &str) {
    let from = r.from_node.as_deref().unwrap_or("an unknown node");
    println!(
        "adopted {} message(s) from {} ({from}) into node {own_node}",
        r.adopted.len(),
        src.display()
    );
    for id in &r.adopted {
        println!("  adopted {id}");
    }
    for (file, why) in &r.quarantined {
        println!("  quarantined {file}: {why}");
    }
    for (id, why) in &r.refused {
        println!("  refused {id}: {why}");
    }
}

/// A running gateway's side of [`OP`]: adopts, then queues what it adopted
/// for delivery at once. The answer is the JSON of a [`Report`].
pub async fn serve_request(
    req: Request,
    here: &Spool,
    relay: &godwit_relay::Relay,
    store: &Store,
    events: &EventLog,
) -> String {
    let report = match adopt(here, &req.dir, req.from_node, &req.node, store, events).await {
        Ok((report, adopted)) => {
            for sp in adopted {
                relay.enqueue(sp);
            }
            report
        }
        Err(e) => Report {
            error: Some(format!("{e:#}")),
            ..Default::default()
        },
    };
    serde_json::to_string(&report).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_table() {
        let (a, b) = (Path::new("/d/a/spool"), Path::new("/d/b/spool"));
        // (src, from node, heartbeat age, force) -> refused, and why.
        type Case<'a> = (
            &'a Path,
            Option<&'a str>,
            Option<i64>,
            bool,
            Option<&'a str>,
        );
        let cases: &[Case] = &[
            (a, Some("a"), None, false, None),
            (a, Some("a"), Some(60_000), false, None),
            (a, Some("a"), Some(500), false, Some("still heartbeats")),
            (a, Some("a"), Some(500), true, None),
            (a, None, None, false, Some("cannot tell which node")),
            (a, None, None, true, None),
            (
                a,
                Some("b"),
                None,
                false,
                Some("must not share a node_name"),
            ),
            (b, Some("a"), None, true, Some("own spool")),
        ];
        for (src, from, age, force, want) in cases {
            let got = refusal(src, b, *from, "b", *age, *force);
            match want {
                None => assert!(got.is_none(), "{src:?} {from:?} {age:?} {force}: {got:?}"),
                Some(w) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(w)),
                    "{src:?} {from:?} {age:?} {force}: {got:?}"
                ),
            }
        }
    }
}
