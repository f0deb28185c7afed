//! `history rollback`: every source of routing back to what it was at an
//! earlier version, written as a new version (so it can be undone too).

use super::diff::parse_object_value;
use super::txn::{IfUnchanged, Scope, Work};
use super::waves::{set_wave_status, wave_status};
use super::{ControlError, Ctx, Outcome, cc, refused};
use crate::model::{MigrationState, Object, Sources};
use godwit_store::StoreError;
use godwit_store::bulk::{Arg, select_rows};
use godwit_store::sqlx::{self, Row};
use std::collections::BTreeMap;

/// Restores every source of routing (directory objects, states, aliases,
/// group members, overrides) to what it was at version `to`, as a new
/// version, so the rollback can itself be rolled back. Waves keep their
/// definitions; the routing they caused is restored like anything else.
pub async fn rollback_to(ctx: &Ctx<'_>, to: i64) -> Result<Outcome, ControlError> {
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM routing_versions")
        .fetch_one(&ctx.store.pool)
        .await
        .map_err(StoreError::from)?;
    let current = current.unwrap_or(0);
    if to < 0 || to > current {
        return Err(refused(format!(
            "there is no version {to}: versions run from 0 (before any change) to {current} (godwit history)"
        )));
    }
    ctx.transact(move || async move {
        let mut w = ctx.begin(&Scope::All, true).await?;
        let r = restore(&mut w, to).await;
        Ok(w.end(ctx, r, IfUnchanged::Record).await?.0)
    })
    .await
}

async fn restore(w: &mut Work, to: i64) -> Result<(), ControlError> {
    let (be, version) = (w.be, w.version);
    type Before = (i64, String, String, Option<String>);
    let mut rows: Vec<Before> = select_rows(
        w.tx(),
        be,
        &["version", "subject", "item", "before_value"],
        "control_changes WHERE version > $1 \
         AND subject IN ('mailbox', 'state', 'alias', 'member', 'override')",
        &[Arg::Int(to)],
    )
    .await?;
    // Versions written before the control plane existed (migration
    // 0200) have no control_changes; every route then was an
    // override, so their route_changes are override changes.
    let legacy: Vec<(i64, String, Option<String>)> = select_rows(
        w.tx(),
        be,
        &["version", "address", "before_route"],
        "route_changes WHERE version > $1 AND basis IS NULL \
         AND version NOT IN (SELECT version FROM control_changes)",
        &[Arg::Int(to)],
    )
    .await?;
    rows.extend(
        legacy
            .into_iter()
            .map(|(v, a, b)| (v, "override".to_string(), a, b)),
    );
    rows.sort_by_key(|r| r.0);
    // The value at `to` is the `before` of the first change after it.
    let mut at: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
    for (_, subject, item, before) in rows {
        at.entry((subject, item)).or_insert(before);
    }
    restore_sources(&mut w.after, at);
    w.control.push(cc(
        "note",
        "rollback",
        None,
        Some(format!("restored the routing of version {to}")),
    ));
    // A wave's status follows the routing it describes; a wave created
    // since `to` stays, as not yet cut over.
    let rows = sqlx::query(
        "SELECT item, before_value FROM control_changes WHERE version > $1 AND subject = 'wave' ORDER BY version",
    )
    .bind(to)
    .fetch_all(w.tx())
    .await?;
    let mut waves: BTreeMap<String, String> = BTreeMap::new();
    for r in rows {
        let before: Option<String> = r.try_get(1)?;
        waves
            .entry(r.try_get(0)?)
            .or_insert(before.unwrap_or_else(|| "created".into()));
    }
    for (name, status) in waves {
        // A deleted wave stays deleted: definitions are not routing.
        if wave_status(w.tx(), &name).await?.is_none() {
            continue;
        }
        let c = set_wave_status(w.tx(), &name, &status, version).await?;
        if c.before != c.after {
            w.control.push(c);
        }
    }
    Ok(())
}

/// Puts back into `src` the value each source had at the version rolled
/// back to (`at`: (subject, item) -> value then, `None` for absent).
fn restore_sources(src: &mut Sources, at: BTreeMap<(String, String), Option<String>>) {
    // Objects first (a restored object needs to exist before its state).
    for ((subject, item), value) in &at {
        if subject != "mailbox" {
            continue;
        }
        match value.as_deref().and_then(parse_object_value) {
            None => {
                src.objects.remove(item);
            }
            Some((display_name, kind, platform)) => {
                let state = src
                    .objects
                    .get(item)
                    .map_or(MigrationState::Pending, |o| o.state);
                src.objects.insert(
                    item.clone(),
                    Object {
                        display_name,
                        kind,
                        platform,
                        state,
                    },
                );
            }
        }
    }
    for ((subject, item), value) in at {
        match (subject.as_str(), value) {
            ("state", Some(s)) => {
                if let (Some(o), Ok(s)) = (src.objects.get_mut(&item), s.parse()) {
                    o.state = s;
                }
            }
            ("alias", None) => {
                src.aliases.remove(&item);
            }
            ("alias", Some(m)) => {
                src.aliases.insert(item, m);
            }
            ("override", None) => {
                src.overrides.remove(&item);
            }
            ("override", Some(r)) => {
                src.overrides.insert(item, r);
            }
            ("member", v) => {
                if let Some((g, m)) = item.split_once(' ') {
                    let set = src.members.entry(g.to_string()).or_default();
                    if v.is_some() {
                        set.insert(m.to_string());
                    } else {
                        set.remove(m);
                    }
                }
            }
            _ => {}
        }
    }
    src.members.retain(|_, m| !m.is_empty());
}
