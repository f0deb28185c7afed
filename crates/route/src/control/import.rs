//! The directory commands: `directory import` (the whole directory
//! replaced by a file's rows, idempotently) and the migration states
//! (`directory state`, and the sync marking a mailbox `ready`).

use super::txn::{IfUnchanged, Scope};
use super::{ControlError, Ctx, Outcome, refused};
use crate::directory::DirectoryRow;
use crate::model::{MigrationState, Object, Sources};
use crate::normalize_address;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A directory import's difference, object by object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportDiff {
    pub added: Vec<String>,
    /// address, what changed
    pub changed: Vec<(String, Vec<String>)>,
    pub removed: Vec<String>,
}

impl ImportDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Replaces the directory with `rows` (already checked by
/// `directory::parse`). Existing objects keep their migration state; new
/// ones start `pending`. Applies only if `ctx.dry_run` is false and
/// something differs.
pub async fn import(
    ctx: &Ctx<'_>,
    rows: Vec<DirectoryRow>,
) -> Result<(ImportDiff, Option<Outcome>), ControlError> {
    let rows = &rows;
    let (o, d) = ctx
        .transact(move || async move {
            let mut w = ctx.begin(&Scope::All, true).await?;
            let d = replace_directory(&mut w.after, rows);
            // An unchanged directory records no version at all (an import
            // is idempotent).
            w.end(ctx, Ok(d), IfUnchanged::Skip).await
        })
        .await?;
    Ok((d, o.applied.then_some(o)))
}

/// Replaces the objects, aliases and group members of `src` with `rows`,
/// keeping each existing object's migration state, and says what differs.
fn replace_directory(src: &mut Sources, rows: &[DirectoryRow]) -> ImportDiff {
    let mut d = ImportDiff::default();
    let mut objects = HashMap::new();
    let mut aliases = HashMap::new();
    let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in rows {
        let state = src
            .objects
            .get(&r.address)
            .map_or(MigrationState::Pending, |o| o.state);
        objects.insert(
            r.address.clone(),
            Object {
                display_name: r.display_name.clone(),
                kind: r.kind,
                platform: r.platform.clone(),
                state,
            },
        );
        for a in &r.aliases {
            aliases.insert(a.clone(), r.address.clone());
        }
        if !r.members.is_empty() {
            members.insert(r.address.clone(), r.members.iter().cloned().collect());
        }
    }
    for r in rows {
        let Some(old) = src.objects.get(&r.address) else {
            d.added.push(r.address.clone());
            continue;
        };
        let new = &objects[&r.address];
        let mut what = Vec::new();
        if old.display_name != new.display_name {
            what.push(format!(
                "display_name {:?} -> {:?}",
                old.display_name, new.display_name
            ));
        }
        if old.kind != new.kind {
            what.push(format!("kind {} -> {}", old.kind, new.kind));
        }
        if old.platform != new.platform {
            what.push(format!("platform {} -> {}", old.platform, new.platform));
        }
        let (oa, na) = (
            src.aliases_of(&r.address),
            r.aliases
                .iter()
                .map(|s| s.as_str())
                .collect::<BTreeSet<_>>(),
        );
        let oa: BTreeSet<&str> = oa.into_iter().collect();
        if oa != na {
            what.push(format!(
                "aliases [{}] -> [{}]",
                oa.into_iter().collect::<Vec<_>>().join(";"),
                na.into_iter().collect::<Vec<_>>().join(";")
            ));
        }
        let empty = BTreeSet::new();
        let (om, nm) = (
            src.members.get(&r.address).unwrap_or(&empty),
            members.get(&r.address).unwrap_or(&empty),
        );
        if om != nm {
            what.push(format!("members: {} -> {}", om.len(), nm.len()));
        }
        if !what.is_empty() {
            d.changed.push((r.address.clone(), what));
        }
    }
    let mut removed: Vec<String> = src
        .objects
        .keys()
        .filter(|a| !objects.contains_key(*a))
        .cloned()
        .collect();
    removed.sort();
    d.removed = removed;
    src.objects = objects;
    src.aliases = aliases;
    src.members = members;
    d
}

/// Sets the migration state of directory objects (what the sync does as a
/// mailbox becomes `ready`, and what an administrator does to finish with
/// `migrated`). Aliases are resolved to their mailbox.
pub async fn set_state(
    ctx: &Ctx<'_>,
    addresses: Vec<String>,
    state: MigrationState,
) -> Result<Outcome, ControlError> {
    let addrs: Vec<String> = addresses.iter().map(|a| normalize_address(a)).collect();
    let (scope, addrs) = (&Scope::Addresses(addrs.clone()), &addrs);
    ctx.transact(move || async move {
        let mut w = ctx.begin(scope, false).await?;
        let r = set_states(&mut w.after, addrs, state);
        Ok(w.end(ctx, r, IfUnchanged::Record).await?.0)
    })
    .await
}

fn set_states(
    src: &mut Sources,
    addrs: &[String],
    state: MigrationState,
) -> Result<(), ControlError> {
    for a in addrs {
        let m = src.aliases.get(a).cloned().unwrap_or_else(|| a.clone());
        match src.objects.get_mut(&m) {
            Some(o) => o.state = state,
            None => {
                return Err(refused(format!(
                    "`{a}` is not in the directory; import it first (godwit directory import FILE --apply)"
                )));
            }
        }
    }
    Ok(())
}
