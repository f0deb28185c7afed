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

pub async fn heartbeat_and_commands(store: Store, relay: Relay, events: EventLog, node: String) {
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
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if now_ms() - last_beat >= 1000 {
            last_beat = now_ms();
            let dests = serde_json::to_string(&relay.destinations()).unwrap_or_default();
            let n = node.clone();
            let len = relay.len() as i64;
            let r = store
                .write_tx(move |tx| {
                    let (n, dests) = (n.clone(), dests.clone());
                    Box::pin(async move {
                        godwit_store::sqlx::query("DELETE FROM gateway_nodes WHERE node = $1").bind(&n).execute(&mut *tx).await?;
                        godwit_store::sqlx::query(
                            "INSERT INTO gateway_nodes (node, started_ms, seen_ms, queue_len, destinations) VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(&n)
                        .bind(started)
                        .bind(now_ms())
                        .bind(len)
                        .bind(&dests)
                        .execute(&mut *tx)
                        .await?;
                        Ok(())
                    })
                })
                .await;
            if let Err(e) = r {
                tracing::warn!("heartbeat: {e}");
            }
        }
        let rows = match godwit_store::sqlx::query(
            "SELECT id, actor, op, selector FROM queue_commands WHERE id > $1 ORDER BY id",
        )
        .bind(seen)
        .fetch_all(&store.pool)
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("queue commands: {e}");
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

pub struct LiveNode {
    pub node: String,
    pub seen_ms: i64,
    pub queue_len: i64,
    pub destinations: serde_json::Value,
}

pub async fn live_nodes(store: &Store) -> Result<Vec<LiveNode>> {
    let rows = godwit_store::sqlx::query("SELECT node, seen_ms, queue_len, destinations FROM gateway_nodes WHERE seen_ms > $1 ORDER BY node")
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
        })
        .collect())
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
    let actor = actor.to_string();
    let id = store
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
        .await?;
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
