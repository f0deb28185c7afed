//! The wave commands: a wave is a named set of mailboxes that move together.
//! `create`, `add`/`remove` members, `delete`, `cutover` (to the target
//! platform, guarded by the sync's proof) and `rollback` (back to where each
//! member came from), each one version.

use super::proof::{ready_for_cutover, sync_proof, sync_records};
use super::txn::{IfUnchanged, Scope, Work};
use super::{ControlChange, ControlError, Ctx, Outcome, cc, list_some, more, refused};
use crate::model::{MigrationState, Sources};
use crate::normalize_address;
use godwit_store::bulk::{Arg, ROWS, insert_rows, json_param, keys_subquery, row, select_rows};
use godwit_store::sqlx::{self, AnyConnection};
use godwit_store::{Backend, now_ms};
use std::collections::{BTreeMap, BTreeSet};

pub fn check_wave_name(name: &str) -> Result<(), ControlError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(refused(format!(
            "`{name}` is not a wave name: use 1 to 64 letters, digits, `-`, `_` or `.`"
        )));
    }
    Ok(())
}

/// Creates a wave of directory objects. Aliases are resolved to their
/// mailbox; an address the directory does not know is refused.
pub async fn wave_create(
    ctx: &Ctx<'_>,
    name: &str,
    members: Vec<String>,
) -> Result<Outcome, ControlError> {
    check_wave_name(name)?;
    if members.is_empty() {
        return Err(refused("a wave needs members: --members FILE or addresses"));
    }
    let members: Vec<String> = members.iter().map(|a| normalize_address(a)).collect();
    let (scope, members) = (&Scope::Addresses(members.clone()), &members);
    ctx.transact(move || async move {
        let mut w = ctx.begin(scope, false).await?;
        let r = create(&mut w, name, members).await;
        Ok(w.end(ctx, r, IfUnchanged::Record).await?.0)
    })
    .await
}

async fn create(w: &mut Work, name: &str, members: &[String]) -> Result<(), ControlError> {
    if wave_status(w.tx(), name).await?.is_some() {
        return Err(refused(format!(
            "wave `{name}` exists; choose another name (godwit wave list)"
        )));
    }
    let (resolved, unknown) = resolve(&w.after, members, |m| w.after.objects.contains_key(m));
    if !unknown.is_empty() {
        return Err(refused(format!(
            "{} address(es) are not in the directory: {}{}; import them first or remove them from the member list",
            unknown.len(),
            list_some(&unknown),
            more(&unknown)
        )));
    }
    sqlx::query(
        "INSERT INTO waves (name, status, created_version, version) VALUES ($1, 'created', $2, $2)",
    )
    .bind(name)
    .bind(w.version)
    .execute(w.tx())
    .await?;
    insert_members(w, name, resolved.iter()).await?;
    w.control
        .push(cc("wave", name, None, Some("created".into())));
    w.control.extend(resolved.iter().map(|m| {
        cc(
            "wave-member",
            format!("{name} {m}"),
            None,
            Some("member".into()),
        )
    }));
    Ok(())
}

/// Adds members to a wave (`add`) or removes them, as one version. Aliases
/// resolve to their mailbox. Adding an address the directory lacks, or
/// removing one the wave does not hold, is refused with the addresses named.
/// Routing does not change: a member keeps its state, so a member added to a
/// cut-over wave moves at the wave's next `cutover`, and one removed after
/// cutover stays on the target until its own state changes.
pub async fn wave_members_change(
    ctx: &Ctx<'_>,
    name: &str,
    members: Vec<String>,
    add: bool,
) -> Result<Outcome, ControlError> {
    if members.is_empty() {
        return Err(refused("name the members: --members FILE or addresses"));
    }
    let members: Vec<String> = members.iter().map(|a| normalize_address(a)).collect();
    let (scope, members) = (&Scope::Addresses(members.clone()), &members);
    ctx.transact(move || async move {
        let mut w = ctx.begin(scope, false).await?;
        let r = change_members(&mut w, name, members, add).await;
        Ok(w.end(ctx, r, IfUnchanged::Skip).await?.0)
    })
    .await
}

async fn change_members(
    w: &mut Work,
    name: &str,
    members: &[String],
    add: bool,
) -> Result<(), ControlError> {
    let be = w.be;
    existing_wave_status(w.tx(), name).await?;
    let current: BTreeSet<String> = wave_members(w.tx(), be, name).await?.into_iter().collect();
    let (resolved, bad) = resolve(&w.after, members, |m| {
        if add {
            w.after.objects.contains_key(m)
        } else {
            current.contains(m)
        }
    });
    if !bad.is_empty() {
        return Err(refused(if add {
            format!(
                "{} address(es) are not in the directory: {}{}; import them first",
                bad.len(),
                list_some(&bad),
                more(&bad)
            )
        } else {
            format!(
                "{} address(es) are not members of wave `{name}`: {}{} (godwit wave show {name})",
                bad.len(),
                list_some(&bad),
                more(&bad)
            )
        }));
    }
    let change: Vec<String> = resolved
        .into_iter()
        .filter(|m| current.contains(m) != add)
        .collect();
    if add {
        insert_members(w, name, change.iter()).await?;
    } else {
        let sql = format!(
            "DELETE FROM wave_members WHERE wave = $1 AND address IN {}",
            keys_subquery(be, 2)
        );
        for chunk in change.chunks(ROWS) {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(name)
                .bind(json_param(chunk))
                .execute(w.tx())
                .await?;
        }
    }
    if !change.is_empty() {
        sqlx::query("UPDATE waves SET version = $1 WHERE name = $2")
            .bind(w.version)
            .bind(name)
            .execute(w.tx())
            .await?;
    }
    let member = Some("member".to_string());
    let (before, after) = if add { (None, member) } else { (member, None) };
    w.control.extend(change.iter().map(|m| {
        cc(
            "wave-member",
            format!("{name} {m}"),
            before.clone(),
            after.clone(),
        )
    }));
    Ok(())
}

/// Deletes a wave's definition (not its members' states or routes), as one
/// version. A wave that is cut over is refused: roll it back first, or keep
/// it as the record of what moved together.
pub async fn wave_delete(ctx: &Ctx<'_>, name: &str) -> Result<Outcome, ControlError> {
    let scope = &Scope::Addresses(Vec::new());
    ctx.transact(move || async move {
        let mut w = ctx.begin(scope, false).await?;
        let r = delete(&mut w, name).await;
        Ok(w.end(ctx, r, IfUnchanged::Record).await?.0)
    })
    .await
}

async fn delete(w: &mut Work, name: &str) -> Result<(), ControlError> {
    let be = w.be;
    let status = existing_wave_status(w.tx(), name).await?;
    if status == "cutover" {
        return Err(refused(format!(
            "wave `{name}` is cut over; roll it back first (godwit wave rollback {name}) or keep it"
        )));
    }
    let members = wave_members(w.tx(), be, name).await?;
    for sql in [
        "DELETE FROM wave_members WHERE wave = $1",
        "DELETE FROM waves WHERE name = $1",
    ] {
        sqlx::query(sql).bind(name).execute(w.tx()).await?;
    }
    w.control.push(cc("wave", name, Some(status), None));
    w.control.extend(members.iter().map(|m| {
        cc(
            "wave-member",
            format!("{name} {m}"),
            Some("member".into()),
            None,
        )
    }));
    Ok(())
}

/// The mailboxes `members` name (an alias names its mailbox) that `ok`
/// admits, and the addresses as given that it does not.
fn resolve(
    src: &Sources,
    members: &[String],
    ok: impl Fn(&String) -> bool,
) -> (BTreeSet<String>, Vec<String>) {
    let mut resolved = BTreeSet::new();
    let mut bad = Vec::new();
    for a in members {
        let m = src.aliases.get(a).unwrap_or(a);
        if ok(m) {
            resolved.insert(m.clone());
        } else {
            bad.push(a.clone());
        }
    }
    (resolved, bad)
}

/// Adds `members` (mailboxes) to wave `name`.
async fn insert_members(
    w: &mut Work,
    name: &str,
    members: impl Iterator<Item = &String>,
) -> Result<(), ControlError> {
    let rows = members.map(|m| row(&[m, name])).collect();
    let be = w.be;
    let cols = ["address", "wave"];
    insert_rows(w.tx(), be, "wave_members", None, &cols, rows, "").await?;
    Ok(())
}

/// A wave's status, or `None` if there is no such wave.
pub(super) async fn wave_status(
    tx: &mut AnyConnection,
    name: &str,
) -> Result<Option<String>, ControlError> {
    Ok(
        sqlx::query_scalar("SELECT status FROM waves WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?,
    )
}

/// A wave's status, refusing a wave that does not exist.
async fn existing_wave_status(tx: &mut AnyConnection, name: &str) -> Result<String, ControlError> {
    wave_status(tx, name)
        .await?
        .ok_or_else(|| refused(format!("no wave `{name}` (godwit wave list)")))
}

pub(super) async fn set_wave_status(
    tx: &mut AnyConnection,
    name: &str,
    status: &str,
    version: i64,
) -> Result<ControlChange, ControlError> {
    let before = existing_wave_status(tx, name).await?;
    sqlx::query("UPDATE waves SET status = $1, version = $2 WHERE name = $3")
        .bind(status)
        .bind(version)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    Ok(cc("wave", name, Some(before), Some(status.into())))
}

/// A wave's member addresses, sorted.
async fn wave_members(
    tx: &mut AnyConnection,
    be: Backend,
    name: &str,
) -> Result<Vec<String>, ControlError> {
    let rows: Vec<(String,)> = select_rows(
        tx,
        be,
        &["address"],
        "wave_members WHERE wave = $1",
        &[Arg::Text(name)],
    )
    .await?;
    let mut members: Vec<String> = rows.into_iter().map(|(a,)| a).collect();
    members.sort_unstable();
    Ok(members)
}

/// Moves every member of a wave to the target platform (state `cutover`),
/// in one version. Refuses members that are not ready (`ready_for_cutover`)
/// unless `force`, which is recorded in the history as a `note`.
pub async fn wave_cutover(ctx: &Ctx<'_>, name: &str, force: bool) -> Result<Outcome, ControlError> {
    wave_cutover_only(ctx, name, force, None).await
}

/// `wave_cutover`, restricted to `only` when given: `wave cutover --final-sync`
/// moves only the members that verified clean just now and leaves the others
/// (named by the caller) where they are.
pub async fn wave_cutover_only(
    ctx: &Ctx<'_>,
    name: &str,
    force: bool,
    only: Option<BTreeSet<String>>,
) -> Result<Outcome, ControlError> {
    let now = now_ms();
    let max_age = ctx.config.directory.max_verify_age;
    let sync: BTreeMap<String, Result<(), String>> = sync_records(ctx.store)
        .await
        .into_iter()
        .map(|(a, r)| (a, sync_proof(&r, now, max_age)))
        .collect();
    let guard = Guard {
        force,
        dry_run: ctx.dry_run,
        only: only.as_ref(),
        sync: &sync,
    };
    let scope = &Scope::Wave(name.to_string());
    ctx.transact(move || async move {
        let mut w = ctx.begin(scope, false).await?;
        let r = cutover(&mut w, name, guard).await;
        Ok(w.end(ctx, r, IfUnchanged::Record).await?.0)
    })
    .await
}

/// What a cutover admits.
#[derive(Clone, Copy)]
struct Guard<'a> {
    force: bool,
    dry_run: bool,
    only: Option<&'a BTreeSet<String>>,
    /// Each synced account's proof (`sync_proof`).
    sync: &'a BTreeMap<String, Result<(), String>>,
}

async fn cutover(w: &mut Work, name: &str, g: Guard<'_>) -> Result<(), ControlError> {
    let (be, version) = (w.be, w.version);
    let status = set_wave_status(w.tx(), name, "cutover", version).await?;
    w.control.push(status);
    let members = wave_members(w.tx(), be, name).await?;
    let mut blocked = Vec::new();
    let mut not_ready: Vec<(String, String)> = Vec::new();
    let mut missing = Vec::new();
    for m in &members {
        if g.only.is_some_and(|o| !o.contains(m)) {
            continue;
        }
        let Some(o) = w.after.objects.get_mut(m) else {
            missing.push(m.clone());
            continue;
        };
        if o.state.routes_to_target() {
            continue;
        }
        if let Err(why) = ready_for_cutover(o.kind, o.state, g.sync.get(m).cloned()) {
            // A dry run shows the plan and why each member is held back.
            blocked.push(cc(
                "note",
                format!("blocked {m}"),
                None,
                Some(format!("{m} blocked: {why} (or --force)")),
            ));
            not_ready.push((m.clone(), why));
            if !g.force {
                continue;
            }
        }
        o.state = MigrationState::Cutover;
    }
    if g.dry_run && !g.force {
        w.control.extend(blocked);
        return Ok(());
    }
    if !not_ready.is_empty() && !g.force {
        return Err(ControlError::NotReady {
            wave: name.to_string(),
            total: members.len(),
            refused: not_ready,
        });
    }
    if !not_ready.is_empty() {
        let named: Vec<String> = not_ready
            .iter()
            .map(|(a, why)| format!("{a} ({why})"))
            .collect();
        w.control.push(cc(
            "note",
            "forced",
            None,
            Some(format!(
                "--force: {} mailbox(es) cut over without a proven sync: {}{}",
                not_ready.len(),
                list_some(&named),
                more(&named)
            )),
        ));
    }
    if !missing.is_empty() {
        w.control.push(cc(
            "note",
            "not-in-directory",
            None,
            Some(format!(
                "{} member(s) no longer in the directory were skipped: {}{}",
                missing.len(),
                list_some(&missing),
                more(&missing)
            )),
        ));
    }
    Ok(())
}

/// Moves every member of a wave that is at the target (`cutover` or
/// `migrated`) back to the platform that owned it (`rolled-back`), in one
/// version. Mail already queued follows at its next attempt.
pub async fn wave_rollback(ctx: &Ctx<'_>, name: &str) -> Result<Outcome, ControlError> {
    let scope = &Scope::Wave(name.to_string());
    ctx.transact(move || async move {
        let mut w = ctx.begin(scope, false).await?;
        let r = roll_back(&mut w, name).await;
        Ok(w.end(ctx, r, IfUnchanged::Record).await?.0)
    })
    .await
}

async fn roll_back(w: &mut Work, name: &str) -> Result<(), ControlError> {
    let (be, version) = (w.be, w.version);
    let status = set_wave_status(w.tx(), name, "rolled-back", version).await?;
    w.control.push(status);
    for m in wave_members(w.tx(), be, name).await? {
        if let Some(o) = w.after.objects.get_mut(&m)
            && o.state.routes_to_target()
        {
            o.state = MigrationState::RolledBack;
        }
    }
    Ok(())
}
