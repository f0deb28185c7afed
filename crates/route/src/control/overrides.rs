//! `route set` / `route unset`: per-address overrides, which beat the
//! directory.

use super::txn::{IfUnchanged, Scope};
use super::{ControlError, Ctx, Outcome};
use crate::model::Sources;
use crate::{Change, normalize_address};
use godwit_config::Config;
use godwit_store::Store;

/// Sets (`Some`) or removes (`None`) per-address overrides (`route set` /
/// `route unset`) as one version. An override beats the directory; removing
/// it lets the directory (or the defaults) decide again. Returns the version
/// and the route changes that moved mail. A command that changes nothing
/// (the same override already there, or none to remove) records no version,
/// so the history never shows `old -> old`: the version returned is then the
/// one already in force.
pub async fn commit(
    store: &Store,
    config: &Config,
    actor: &str,
    command: &str,
    changes: Vec<(String, Option<String>)>,
) -> Result<(i64, Vec<Change>), ControlError> {
    let o = commit_outcome(store, config, actor, command, changes).await?;
    let moved = o.moved().cloned().collect();
    Ok((o.version, moved))
}

/// [`commit`], with the whole outcome: `applied` is false when nothing
/// changed and no version was written (`version` is then the current one).
pub async fn commit_outcome(
    store: &Store,
    config: &Config,
    actor: &str,
    command: &str,
    changes: Vec<(String, Option<String>)>,
) -> Result<Outcome, ControlError> {
    let ctx = &Ctx {
        store,
        config,
        actor,
        command,
        dry_run: false,
    };
    let changes: Vec<(String, Option<String>)> = changes
        .into_iter()
        .map(|(a, r)| (normalize_address(&a), r))
        .collect();
    let addrs = changes.iter().map(|(a, _)| a.clone()).collect();
    let (scope, changes) = (&Scope::Addresses(addrs), &changes);
    let (mut o, ()) = ctx
        .transact(move || async move {
            let mut w = ctx.begin(scope, false).await?;
            set_overrides(&mut w.after, changes);
            w.end(ctx, Ok(()), IfUnchanged::Skip).await
        })
        .await?;
    if !o.applied {
        // The claimed number was rolled back with the transaction.
        o.version -= 1;
    }
    Ok(o)
}

/// Applies `changes` (normalized address, route or `None` to remove) in
/// order: the last change of an address wins.
fn set_overrides(src: &mut Sources, changes: &[(String, Option<String>)]) {
    for (a, r) in changes {
        match r {
            Some(r) => src.overrides.insert(a.clone(), r.clone()),
            None => src.overrides.remove(a),
        };
    }
}
