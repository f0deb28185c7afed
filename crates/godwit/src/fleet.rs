//! How CLI queue commands reach running gateways: through the state store.
//! Each gateway announces itself every second (liveness, queue size,
//! destination state) and executes new `queue_commands` rows, recording its
//! result. A command with no live gateway is applied to the spool directly.

use anyhow::{Context, Result};
use godwit_events::{Event, EventLog};
use godwit_relay::{QueueOp, Relay, Selector};
use godwit_store::{Row, Store, now_ms};
use std::time::Duration;

/// A gateway not seen for this long is considered stopped.
pub const LIVE_MS: i64 = 3000;

pub async fn heartbeat_and_commands(
    store: Store,
    relay: Relay,
    spool: std::sync::Arc<godwit_spool::Spool>,
    events: EventLog,
    node: String,
    first_beat: tokio::sync::oneshot::Sender<()>,
) {
    let mut first_beat = Some(first_beat);
    let started = now_ms();
    // Commands issued before this node started are not replayed.
    let mut seen: i64 =
        godwit_store::sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(id) FROM queue_commands")
            .fetch_one(&store.pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
    let mut last_beat = 0;
    let mut reported_version = -1;
    // Whether the store answered the last heartbeat (None: not yet known).
    let mut store_up: Option<bool> = None;
    loop {
        // The first beat goes at once: `route set` waits only for the nodes
        // it finds, so a gateway that has said it started must be listed.
        if first_beat.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let version = relay.routes().version();
        // A new routing version is reported at once: `route set` waits for it.
        if now_ms() - last_beat >= 1000 || version != reported_version {
            last_beat = now_ms();
            reported_version = version;
            let dests = serde_json::to_string(&relay.destinations()).unwrap_or_default();
            let n = node.clone();
            let len = relay.len() as i64;
            // The oldest message still queued (0: none), for `fleet status`.
            let oldest = relay
                .snapshot()
                .iter()
                .map(|m| m.arrival_ms)
                .min()
                .unwrap_or(0);
            // Bounded: the pool waits 30 s for a connection, and the store
            // being down must show within seconds (godwit_store_up).
            let beat = store.write_tx(move |tx| {
                    let (n, dests) = (n.clone(), dests.clone());
                    Box::pin(async move {
                        godwit_store::sqlx::query("DELETE FROM gateway_nodes WHERE node = $1").bind(&n).execute(&mut *tx).await?;
                        godwit_store::sqlx::query(
                            "INSERT INTO gateway_nodes (node, started_ms, seen_ms, queue_len, destinations, routing_version, oldest_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        )
                        .bind(&n)
                        .bind(started)
                        .bind(now_ms())
                        .bind(len)
                        .bind(&dests)
                        .bind(version)
                        .bind(oldest)
                        .execute(&mut *tx)
                        .await?;
                        Ok(())
                    })
                });
            let r = match tokio::time::timeout(Duration::from_secs(5), beat).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("no answer within 5s".to_string()),
            };
            let up = r.is_ok();
            if store_up != Some(up) {
                let error = r.as_ref().err().cloned().unwrap_or_default();
                if up {
                    tracing::warn!(
                        "state store reachable again: routing changes and queue commands resume"
                    );
                } else {
                    // Loud: the control plane is down. Mail still flows by the
                    // routing last applied; nothing is refused for this.
                    tracing::error!(
                        "state store unreachable ({error}): accepting and delivering with routing version {version}; routing changes and queue commands wait until it is back"
                    );
                }
                store_up = Some(up);
                events.emit(Event::StoreState { up, error });
            } else if let Err(e) = r {
                tracing::warn!("heartbeat: {e}");
            }
        }
        if let Some(tx) = first_beat.take() {
            let _ = tx.send(());
        }
        // Bounded like the heartbeat, so that a store outage shows at once.
        let rows = match tokio::time::timeout(
            Duration::from_secs(5),
            godwit_store::sqlx::query(
                "SELECT id, actor, op, selector FROM queue_commands WHERE id > $1 ORDER BY id",
            )
            .bind(seen)
            .fetch_all(&store.pool),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!("queue commands: {e}");
                continue;
            }
            Err(_) => {
                tracing::warn!("queue commands: the state store did not answer within 5s");
                continue;
            }
        };
        for row in rows {
            let (id, actor, op, sel): (i64, String, String, String) = (
                row.try_get(0).unwrap_or(0),
                row.try_get(1).unwrap_or_default(),
                row.try_get(2).unwrap_or_default(),
                row.try_get(3).unwrap_or_default(),
            );
            seen = seen.max(id);
            if op == LIST_OP {
                // Read-only, and quick: answered in line.
                if serde_json::from_str::<ListRequest>(&sel).is_ok_and(|r| r.except != node) {
                    let listed: Vec<Listed> = godwit_spool::list(spool.dir())
                        .into_iter()
                        .map(|m| Listed {
                            header: m.header,
                            body_len: m.body_len,
                            status: m.status,
                        })
                        .collect();
                    let out = serde_json::to_string(&listed).unwrap_or_default();
                    answer(&store, id, &node, listed.len() as i64, &out).await;
                }
                continue;
            }
            if op == crate::adopt::OP {
                // Aimed at one node; slow for a big spool, so it runs beside
                // the heartbeat, which must not stop meanwhile.
                let Ok(req) = serde_json::from_str::<crate::adopt::Request>(&sel) else {
                    tracing::warn!("queue command {id}: cannot parse `{sel}`");
                    continue;
                };
                if req.node != node {
                    continue;
                }
                let (store, relay, spool, events, node) = (
                    store.clone(),
                    relay.clone(),
                    spool.clone(),
                    events.clone(),
                    node.clone(),
                );
                tokio::spawn(async move {
                    let out =
                        crate::adopt::serve_request(req, &spool, &relay, &store, &events).await;
                    answer(&store, id, &node, 0, &out).await;
                });
                continue;
            }
            let (Ok(op_v), Ok(selector)) = (
                serde_json::from_str::<QueueOp>(&format!("\"{op}\"")),
                serde_json::from_str::<Selector>(&sel),
            ) else {
                tracing::warn!("queue command {id}: cannot parse `{op}` `{sel}`");
                continue;
            };
            let affected = relay.apply_op(&op_v, &selector, &actor).await;
            events.emit(Event::QueueCommand {
                op: op.clone(),
                selector: sel.clone(),
                actor: actor.clone(),
                affected,
                node: node.clone(),
            });
            let _ = godwit_store::sqlx::query("INSERT INTO queue_command_results (id, node, done_ms, affected) VALUES ($1, $2, $3, $4)")
                .bind(id)
                .bind(&node)
                .bind(now_ms())
                .bind(affected as i64)
                .execute(&store.pool)
                .await;
        }
    }
}

/// The queue command that asks every other live gateway for its queue
/// (`queue list` across a fleet).
pub const LIST_OP: &str = "queue.list";

#[derive(serde::Serialize, serde::Deserialize)]
struct ListRequest {
    /// The asking node, which lists its own spool itself.
    except: String,
}

/// One queued message as another gateway lists it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Listed {
    header: godwit_spool::Header,
    body_len: u64,
    status: Vec<Option<godwit_spool::StatusRecord>>,
}

/// What the other gateways of the fleet hold, node by node, for `queue
/// list`: every live gateway but `own` answers with its spool (read-only).
/// Also returns notes on the gateways whose queue is not listed (stopped,
/// or silent), so the operator knows what the listing covers.
pub async fn remote_queues(
    store: &Store,
    own: &str,
) -> Result<(Vec<(String, Vec<godwit_spool::Spooled>)>, Vec<String>)> {
    let mut notes = Vec::new();
    let now = now_ms();
    let all = members(store, Duration::from_millis(LIVE_MS as u64)).await?;
    let mut stopped: Vec<String> = all
        .iter()
        .filter(|m| m.role == "gateway" && !m.live && m.node != own)
        .map(|m| {
            format!(
                "node {}: stopped (last heartbeat {} s ago); its spool is not listed (if it will not come back: godwit spool adopt ITS_DATA_DIR)",
                m.node,
                (now - m.last_heartbeat_ms) / 1000
            )
        })
        .collect();
    let live: Vec<String> = live_nodes(store)
        .await?
        .into_iter()
        .map(|n| n.node)
        .filter(|n| n != own)
        .collect();
    notes.append(&mut stopped);
    if live.is_empty() {
        return Ok((Vec::new(), notes));
    }
    let req = serde_json::to_string(&ListRequest {
        except: own.to_string(),
    })?;
    let id = insert_command(store, "godwit", LIST_OP, &req).await?;
    let deadline = now_ms() + 5000;
    let rows = loop {
        let rows = godwit_store::sqlx::query(
            "SELECT node, output FROM queue_command_results WHERE id = $1",
        )
        .bind(id)
        .fetch_all(&store.pool)
        .await?;
        if rows.len() >= live.len() || now_ms() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = Vec::new();
    for r in rows {
        let node: String = r.try_get(0)?;
        let text: Option<String> = r.try_get(1)?;
        let listed: Vec<Listed> = serde_json::from_str(text.as_deref().unwrap_or("[]"))
            .with_context(|| format!("the queue of node {node}"))?;
        let msgs = listed
            .into_iter()
            .map(|l| godwit_spool::Spooled {
                header: l.header,
                body_offset: 0,
                body_len: l.body_len,
                status: l.status,
            })
            .collect();
        out.push((node, msgs));
    }
    for n in live {
        if !out.iter().any(|(o, _)| *o == n) {
            notes.push(format!(
                "node {n}: did not answer within 5 s; its queue is not listed"
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, notes))
}

/// Records a node's answer to command `id`, with its output.
async fn answer(store: &Store, id: i64, node: &str, affected: i64, output: &str) {
    let r = godwit_store::sqlx::query(
        "INSERT INTO queue_command_results (id, node, done_ms, affected, output) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(node)
    .bind(now_ms())
    .bind(affected)
    .bind(output)
    .execute(&store.pool)
    .await;
    if let Err(e) = r {
        tracing::warn!("queue command {id}: cannot record the answer: {e}");
    }
}

/// Queues command `op` (with `payload`) for one gateway, `node`, and waits
/// up to `timeout` for its answer. `None`: it did not answer in time.
pub async fn send_to(
    store: &Store,
    node: &str,
    op: &str,
    payload: &str,
    timeout: Duration,
) -> Result<Option<String>> {
    let id = insert_command(store, "godwit", op, payload).await?;
    let deadline = now_ms() + timeout.as_millis() as i64;
    loop {
        let out: Option<Option<String>> = godwit_store::sqlx::query_scalar(
            "SELECT output FROM queue_command_results WHERE id = $1 AND node = $2",
        )
        .bind(id)
        .bind(node)
        .fetch_optional(&store.pool)
        .await?;
        if let Some(out) = out {
            return Ok(Some(out.unwrap_or_default()));
        }
        if now_ms() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn insert_command(store: &Store, actor: &str, op: &str, payload: &str) -> Result<i64> {
    let (op_s, sel_s, actor) = (op.to_string(), payload.to_string(), actor.to_string());
    Ok(store
        .write_tx(move |tx| {
            let (op_s, sel_s, actor) = (op_s.clone(), sel_s.clone(), actor.clone());
            Box::pin(async move {
                let max: Option<i64> = godwit_store::sqlx::query_scalar("SELECT MAX(id) FROM queue_commands").fetch_one(&mut *tx).await?;
                let id = max.unwrap_or(0) + 1;
                godwit_store::sqlx::query("INSERT INTO queue_commands (id, at_ms, actor, op, selector) VALUES ($1, $2, $3, $4, $5)")
                    .bind(id)
                    .bind(now_ms())
                    .bind(&actor)
                    .bind(&op_s)
                    .bind(&sel_s)
                    .execute(&mut *tx)
                    .await?;
                Ok(id)
            })
        })
        .await?)
}

pub struct LiveNode {
    pub node: String,
    pub seen_ms: i64,
    pub queue_len: i64,
    pub destinations: serde_json::Value,
    /// The routing version this gateway routes by.
    pub routing_version: i64,
}

pub async fn live_nodes(store: &Store) -> Result<Vec<LiveNode>> {
    let rows = godwit_store::sqlx::query("SELECT node, seen_ms, queue_len, destinations, routing_version FROM gateway_nodes WHERE seen_ms > $1 ORDER BY node")
        .bind(now_ms() - LIVE_MS)
        .fetch_all(&store.pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| LiveNode {
            node: r.try_get(0).unwrap_or_default(),
            seen_ms: r.try_get(1).unwrap_or(0),
            queue_len: r.try_get(2).unwrap_or(0),
            destinations: serde_json::from_str(&r.try_get::<String, _>(3).unwrap_or_default())
                .unwrap_or_default(),
            routing_version: r.try_get(4).unwrap_or(0),
        })
        .collect())
}

/// Waits until every gateway live now reports routing `version` or later.
/// Returns the gateways that had not when `timeout` passed (empty: all did).
/// A gateway that stops meanwhile is not waited for: it routes by the store
/// when it starts again.
pub async fn wait_applied(store: &Store, version: i64, timeout: Duration) -> Result<Vec<String>> {
    let deadline = now_ms() + timeout.as_millis() as i64;
    let waiting: Vec<String> = live_nodes(store)
        .await?
        .into_iter()
        .map(|n| n.node)
        .collect();
    loop {
        let nodes = live_nodes(store).await?;
        let behind: Vec<String> = waiting
            .iter()
            .filter(|w| {
                nodes
                    .iter()
                    .any(|n| &n.node == *w && n.routing_version < version)
            })
            .cloned()
            .collect();
        if behind.is_empty() || now_ms() > deadline {
            return Ok(behind);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the commands that change routing wait for the running gateways.
#[derive(clap::Args, Clone, Debug)]
pub struct Wait {
    /// Return at once, without waiting for running gateways to apply it.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for every running gateway to apply the change.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub wait_timeout: String,
}

impl Wait {
    /// After a version was committed: waits (unless --no-wait) and says
    /// which gateways did not apply it in time. Returns the exit code.
    pub async fn for_version(&self, store: &Store, version: i64) -> Result<i32> {
        if self.no_wait {
            return Ok(0);
        }
        let timeout = godwit_config::parse_duration(&self.wait_timeout)
            .map_err(|e| anyhow::anyhow!("--wait-timeout: {e}"))?;
        let behind = wait_applied(store, version, timeout).await?;
        if behind.is_empty() {
            return Ok(0);
        }
        eprintln!(
            "not yet applied after {}: {} (still routing by an older version; check that they reach the state store)",
            self.wait_timeout,
            behind.join(", ")
        );
        Ok(1)
    }
}

/// Sends a command to every live gateway (but `except`, a node known to be
/// down) and waits for each to answer. Returns (node, affected) pairs;
/// empty when no gateway is running.
pub async fn send(
    store: &Store,
    actor: &str,
    op: &QueueOp,
    sel: &Selector,
    except: Option<&str>,
) -> Result<Vec<(String, i64)>> {
    let mut nodes = live_nodes(store).await?;
    nodes.retain(|n| Some(n.node.as_str()) != except);
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let op_s = serde_json::to_string(op)?.trim_matches('"').to_string();
    let sel_s = serde_json::to_string(sel)?;
    let id = insert_command(store, actor, &op_s, &sel_s).await?;
    let deadline = now_ms() + 5000;
    loop {
        let rows = godwit_store::sqlx::query(
            "SELECT node, affected FROM queue_command_results WHERE id = $1",
        )
        .bind(id)
        .fetch_all(&store.pool)
        .await?;
        if rows.len() >= nodes.len() || now_ms() > deadline {
            return rows
                .into_iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, godwit_store::sqlx::Error>>()
                .context("reading command results");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One member of the fleet as `godwit fleet status` shows it.
#[derive(serde::Serialize, Debug)]
pub struct Member {
    /// "gateway" or "sync-worker".
    pub role: &'static str,
    pub node: String,
    /// A sync worker's process identity (`node:pid:start`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub last_heartbeat_ms: i64,
    /// Whether it heartbeat recently enough to count as running.
    pub live: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool_depth: Option<i64>,
    /// When the oldest message in its spool arrived (unix ms), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_message_ms: Option<i64>,
    pub accounts: Vec<String>,
    /// Destinations whose circuit is not closed, with its state.
    pub open_circuits: Vec<String>,
}

/// Whether a member seen at `seen_ms` counts as running at `now`: within
/// `window` of its last heartbeat.
pub fn is_live(seen_ms: i64, now: i64, window: Duration) -> bool {
    now - seen_ms <= window.as_millis() as i64
}

/// Circuits not closed, from a gateway's `destinations` heartbeat.
pub fn open_circuits(destinations: &serde_json::Value) -> Vec<String> {
    destinations
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(name, d)| {
                    let c = d.get("circuit")?.as_str()?;
                    (c != "closed").then(|| format!("{name} ({c})"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every gateway and sync worker that ever announced itself in this store.
pub async fn members(store: &Store, worker_window: Duration) -> Result<Vec<Member>> {
    let now = now_ms();
    let mut out = Vec::new();
    let rows = godwit_store::sqlx::query(
        "SELECT node, seen_ms, queue_len, destinations, routing_version, oldest_ms FROM gateway_nodes ORDER BY node",
    )
    .fetch_all(&store.pool)
    .await
    .context("reading gateway_nodes from the state store")?;
    for r in rows {
        let seen: i64 = r.try_get(1).unwrap_or(0);
        let dests: serde_json::Value =
            serde_json::from_str(&r.try_get::<String, _>(3).unwrap_or_default())
                .unwrap_or_default();
        out.push(Member {
            role: "gateway",
            node: r.try_get(0).unwrap_or_default(),
            worker: None,
            last_heartbeat_ms: seen,
            live: is_live(seen, now, Duration::from_millis(LIVE_MS as u64)),
            routing_version: Some(r.try_get(4).unwrap_or(0)),
            spool_depth: Some(r.try_get(2).unwrap_or(0)),
            oldest_message_ms: Some(r.try_get::<i64, _>(5).unwrap_or(0)).filter(|&t| t > 0),
            accounts: Vec::new(),
            open_circuits: open_circuits(&dests),
        });
    }
    let rows = godwit_store::sqlx::query(
        "SELECT worker, node, seen_ms, accounts FROM sync_workers ORDER BY node, worker",
    )
    .fetch_all(&store.pool)
    .await
    .context("reading sync_workers from the state store")?;
    for r in rows {
        let seen: i64 = r.try_get(2).unwrap_or(0);
        let live = is_live(seen, now, worker_window);
        out.push(Member {
            role: "sync-worker",
            node: r.try_get(1).unwrap_or_default(),
            worker: Some(r.try_get(0).unwrap_or_default()),
            last_heartbeat_ms: seen,
            live,
            routing_version: None,
            spool_depth: None,
            oldest_message_ms: None,
            accounts: serde_json::from_str(&r.try_get::<String, _>(3).unwrap_or_default())
                .unwrap_or_default(),
            open_circuits: Vec::new(),
        });
    }
    Ok(out)
}

/// `godwit fleet status [--json]`. Stopped sync workers are left out of
/// the table after an hour (their rows stay for the record).
pub async fn status(store: &Store, worker_window: Duration, json: bool) -> Result<i32> {
    let members = members(store, worker_window).await?;
    let now = now_ms();
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(0);
    }
    println!(
        "{:<12} {:<24} {:<8} {:>10} {:>8} {:>6} {:>8}  {:<24} OPEN CIRCUITS",
        "ROLE", "NODE", "STATE", "HEARTBEAT", "ROUTING", "SPOOL", "OLDEST", "ACCOUNTS"
    );
    for m in members
        .iter()
        .filter(|m| m.live || m.role == "gateway" || now - m.last_heartbeat_ms < 3_600_000)
    {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<12} {:<24} {:<8} {:>9}s {:>8} {:>6} {:>8}  {:<24} {}",
            m.role,
            m.node,
            if m.live { "live" } else { "stopped" },
            (now - m.last_heartbeat_ms) / 1000,
            opt(m.routing_version),
            opt(m.spool_depth),
            m.oldest_message_ms
                .map(|t| godwit_config::format_duration(Duration::from_secs(
                    ((now - t) / 1000).max(0) as u64
                )))
                .unwrap_or_else(|| "-".into()),
            if m.accounts.is_empty() {
                "-".to_string()
            } else {
                m.accounts.join(",")
            },
            if m.open_circuits.is_empty() {
                "-".to_string()
            } else {
                m.open_circuits.join(", ")
            },
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_table() {
        let w = Duration::from_secs(3);
        for (seen, now, want) in [(1000, 1000, true), (1000, 4000, true), (1000, 4001, false)] {
            assert_eq!(is_live(seen, now, w), want, "{seen} {now}");
        }
    }

    #[test]
    fn open_circuits_are_those_not_closed() {
        let d = serde_json::json!({
            "old": {"circuit": "closed"},
            "new": {"circuit": "open"},
            "hold": {"circuit": "half-open"},
        });
        assert_eq!(open_circuits(&d), vec!["hold (half-open)", "new (open)"]);
        assert!(open_circuits(&serde_json::json!(null)).is_empty());
    }
}
