//! What a command changed: the pure [`diff`] of the sources of routing
//! before and after it (and the effective routes that follow), and
//! [`persist`], which writes such a difference as one version.

use super::{ControlChange, Stages, cc};
use crate::Change;
use crate::model::{Basis, Kind, MigrationState, Object, Sources};
use godwit_store::bulk::{ROWS, Rows, delete_in, insert_rows, json_param, keys_subquery, row};
use godwit_store::sqlx::{self, AnyConnection};
use godwit_store::{Backend, StoreError};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The current effective entry of an address: route, basis (as stored).
pub(super) type Entries = HashMap<String, (String, Option<String>)>;

/// One effective route that changes: `after` is `None` when the address
/// leaves the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RouteChange {
    pub address: String,
    pub before: Option<String>,
    pub after: Option<(String, Basis)>,
}

/// A key → value table's changes (aliases, overrides).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyedChanges {
    /// Keys whose old row goes.
    pub deleted: Vec<String>,
    /// New rows (key, value), after `deleted` is gone.
    pub inserted: Rows,
}

/// Everything that differs between two [`Sources`], ready to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Diff {
    /// The history rows of the sources (`mailbox`, `state`, `alias`,
    /// `override`, `member`), in address order within each kind.
    pub control: Vec<ControlChange>,
    /// Objects whose row goes (removed, or replaced by `objects_written`).
    pub objects_deleted: Vec<String>,
    /// Whole object rows: address, display_name, kind, platform, state.
    pub objects_written: Rows,
    /// Objects of which only the state changes, by new state (one UPDATE
    /// per state: a wave moves 100,000 mailboxes to `cutover` at once).
    pub states: BTreeMap<MigrationState, Vec<String>>,
    pub aliases: KeyedChanges,
    pub overrides: KeyedChanges,
    /// (group, member) pairs that go and come.
    pub members_removed: Vec<(String, String)>,
    pub members_added: Vec<(String, String)>,
    /// In address order.
    pub routes: Vec<RouteChange>,
}

impl Diff {
    /// The route changes as running gateways apply them, for `version`.
    pub fn changes(&self, version: i64) -> Vec<Change> {
        self.routes
            .iter()
            .map(|r| Change {
                version,
                address: r.address.clone(),
                before: r.before.clone(),
                after: r.after.as_ref().map(|(route, _)| route.clone()),
                basis: r.after.as_ref().map(|(_, b)| *b),
            })
            .collect()
    }
}

fn object_value(o: &Object) -> String {
    serde_json::json!({
        "display_name": o.display_name,
        "kind": o.kind.as_str(),
        "platform": o.platform,
    })
    .to_string()
}

/// The object part of a `mailbox` history value (what `rollback` restores).
pub(super) fn parse_object_value(v: &str) -> Option<(String, Kind, String)> {
    let j: serde_json::Value = serde_json::from_str(v).ok()?;
    Some((
        j["display_name"].as_str()?.to_string(),
        j["kind"].as_str()?.parse().ok()?,
        j["platform"].as_str()?.to_string(),
    ))
}

/// The keys of both, sorted and once each: rows built in this order reach
/// the B-trees in key order (see `insert_rows`), and the history lists them
/// in address order.
fn sorted_union<'a, K: Ord + ?Sized + 'a>(
    a: impl Iterator<Item = &'a K>,
    b: impl Iterator<Item = &'a K>,
) -> Vec<&'a K> {
    let mut v: Vec<&K> = a.chain(b).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn keyed(
    subject: &str,
    before: &HashMap<String, String>,
    after: &HashMap<String, String>,
    control: &mut Vec<ControlChange>,
) -> KeyedChanges {
    let mut out = KeyedChanges::default();
    for k in sorted_union(before.keys(), after.keys()) {
        let (bv, nv) = (before.get(k), after.get(k));
        if bv == nv {
            continue;
        }
        control.push(cc(subject, k.as_str(), bv.cloned(), nv.cloned()));
        if bv.is_some() {
            out.deleted.push(k.clone());
        }
        if let Some(v) = nv {
            out.inserted.push(row(&[k, v]));
        }
    }
    out
}

/// The difference between `before` and `after`, and the effective routes
/// (to `target` for mailboxes that have moved) that change against
/// `entries`, the routes in force. Every address either side mentions, or
/// that has an entry, is decided again.
pub(super) fn diff(before: &Sources, after: &Sources, entries: &Entries, target: &str) -> Diff {
    let mut d = Diff::default();
    for a in sorted_union(before.objects.keys(), after.objects.keys()) {
        let (b, n) = (before.objects.get(a), after.objects.get(a));
        if b == n {
            continue;
        }
        // Only a change of the object itself (not just its state) is a
        // `mailbox` change; a wave changes states only.
        let same_object = match (b, n) {
            (Some(b), Some(n)) => {
                b.display_name == n.display_name && b.kind == n.kind && b.platform == n.platform
            }
            _ => false,
        };
        if !same_object {
            d.control.push(cc(
                "mailbox",
                a.as_str(),
                b.map(object_value),
                n.map(object_value),
            ));
        }
        let (bs, ns) = (b.map(|o| o.state), n.map(|o| o.state));
        if bs != ns {
            d.control.push(cc(
                "state",
                a.as_str(),
                bs.map(|s| s.to_string()),
                ns.map(|s| s.to_string()),
            ));
        }
        match n {
            Some(n) if same_object => d.states.entry(n.state).or_default().push(a.clone()),
            Some(n) => {
                if b.is_some() {
                    d.objects_deleted.push(a.clone());
                }
                d.objects_written.push(row(&[
                    a,
                    &n.display_name,
                    n.kind.as_str(),
                    &n.platform,
                    n.state.as_str(),
                ]));
            }
            None => d.objects_deleted.push(a.clone()),
        }
    }
    d.aliases = keyed("alias", &before.aliases, &after.aliases, &mut d.control);
    d.overrides = keyed(
        "override",
        &before.overrides,
        &after.overrides,
        &mut d.control,
    );

    let empty = BTreeSet::new();
    let groups: BTreeSet<&String> = before.members.keys().chain(after.members.keys()).collect();
    for g in groups {
        let b = before.members.get(g).unwrap_or(&empty);
        let n = after.members.get(g).unwrap_or(&empty);
        for m in b.difference(n) {
            d.control.push(cc(
                "member",
                format!("{g} {m}"),
                Some("member".into()),
                None,
            ));
            d.members_removed.push((g.clone(), m.clone()));
        }
        for m in n.difference(b) {
            d.control.push(cc(
                "member",
                format!("{g} {m}"),
                None,
                Some("member".into()),
            ));
            d.members_added.push((g.clone(), m.clone()));
        }
    }

    let addresses = sorted_union(
        before.addresses().chain(after.addresses()),
        entries.keys().map(|s| s.as_str()),
    );
    for a in addresses {
        let now = after.effective(a, target);
        let was = entries.get(a);
        let now_key = now.as_ref().map(|(r, b)| (r.as_str(), *b));
        let was_key = was.map(|(r, b)| (r.as_str(), Basis::parse(b.as_deref())));
        if now_key != was_key {
            d.routes.push(RouteChange {
                address: a.to_string(),
                before: was.map(|(r, _)| r.clone()),
                after: now,
            });
        }
    }
    d
}

/// Writes `d` as part of `version`: the sources, the effective routes
/// (`route_entries`, with before/after in `route_changes`, which is what
/// running gateways apply) and the history (`control_changes`: `control`,
/// which is the command's own rows followed by `d.control`).
pub(super) async fn persist(
    tx: &mut AnyConnection,
    be: Backend,
    version: i64,
    d: Diff,
    control: &[ControlChange],
) -> Result<(), StoreError> {
    let mut st = Stages::new();
    let v = Some(("version", version));
    delete_in(tx, be, "directory_objects", "address", &d.objects_deleted).await?;
    let cols = ["address", "display_name", "kind", "platform", "state"];
    insert_rows(tx, be, "directory_objects", v, &cols, d.objects_written, "").await?;
    for (state, mut addrs) in d.states {
        addrs.sort_unstable();
        let sql = format!(
            "UPDATE directory_objects SET state = $1, version = $2 WHERE address IN {}",
            keys_subquery(be, 3)
        );
        for chunk in addrs.chunks(ROWS) {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(state.as_str())
                .bind(version)
                .bind(json_param(chunk))
                .execute(&mut *tx)
                .await?;
        }
    }
    st.lap("write objects");
    for (table, key_col, val_col, c) in [
        ("directory_aliases", "alias", "mailbox", d.aliases),
        ("route_overrides", "address", "route", d.overrides),
    ] {
        delete_in(tx, be, table, key_col, &c.deleted).await?;
        insert_rows(tx, be, table, v, &[key_col, val_col], c.inserted, "").await?;
    }
    for (g, m) in &d.members_removed {
        sqlx::query("DELETE FROM directory_members WHERE group_address = $1 AND member = $2")
            .bind(g.as_str())
            .bind(m.as_str())
            .execute(&mut *tx)
            .await?;
    }
    let added = d.members_added.iter().map(|(g, m)| row(&[g, m])).collect();
    let cols = ["group_address", "member"];
    insert_rows(tx, be, "directory_members", None, &cols, added, "").await?;
    st.lap("write aliases, overrides, members");

    let mut gone = Vec::new();
    let mut entries = Vec::new();
    let mut changes = Vec::new();
    for r in &d.routes {
        match &r.after {
            Some((route, b)) => entries.push(row(&[&r.address, route, &b.token()])),
            None => gone.push(r.address.clone()),
        }
        changes.push(vec![
            Some(r.address.clone()),
            r.before.clone(),
            r.after.as_ref().map(|(route, _)| route.clone()),
            r.after.as_ref().map(|(_, b)| b.token()),
        ]);
    }
    delete_in(tx, be, "route_entries", "address", &gone).await?;
    // An upsert: one statement whether the address had an entry or not.
    insert_rows(
        tx,
        be,
        "route_entries",
        v,
        &["address", "route", "basis"],
        entries,
        "ON CONFLICT (address) DO UPDATE SET route = excluded.route, version = excluded.version, basis = excluded.basis",
    )
    .await?;
    st.lap("write route_entries");
    let cols = ["address", "before_route", "after_route", "basis"];
    insert_rows(tx, be, "route_changes", v, &cols, changes, "").await?;
    st.lap("write route_changes");
    let rows = control
        .iter()
        .map(|c| {
            vec![
                Some(c.item.clone()),
                Some(c.subject.clone()),
                c.before.clone(),
                c.after.clone(),
            ]
        })
        .collect();
    let cols = ["item", "subject", "before_value", "after_value"];
    insert_rows(tx, be, "control_changes", v, &cols, rows, "").await?;
    st.lap("write control_changes");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationState::*;

    fn obj(platform: &str, state: MigrationState) -> Object {
        Object {
            display_name: "A".into(),
            kind: Kind::User,
            platform: platform.into(),
            state,
        }
    }

    /// Sources from a compact description: objects (address, platform,
    /// state), aliases (alias, mailbox), overrides (address, route), members
    /// (group, member).
    fn src(
        objects: &[(&str, &str, MigrationState)],
        aliases: &[(&str, &str)],
        overrides: &[(&str, &str)],
        members: &[(&str, &str)],
    ) -> Sources {
        let mut s = Sources::default();
        for (a, p, st) in objects {
            s.objects.insert(a.to_string(), obj(p, *st));
        }
        for (a, m) in aliases {
            s.aliases.insert(a.to_string(), m.to_string());
        }
        for (a, r) in overrides {
            s.overrides.insert(a.to_string(), r.to_string());
        }
        for (g, m) in members {
            s.members
                .entry(g.to_string())
                .or_default()
                .insert(m.to_string());
        }
        s
    }

    /// The entries a store holds for `s` (what a previous version wrote).
    fn entries_of(s: &Sources) -> Entries {
        s.addresses()
            .filter_map(|a| {
                let (r, b) = s.effective(a, "new")?;
                Some((a.to_string(), (r, Some(b.token()))))
            })
            .collect()
    }

    #[test]
    fn diff_names_every_change_and_the_routes_that_follow() {
        let a = ("a@x", "old", Pending);
        let a_ready = ("a@x", "old", Ready);
        let a_cut = ("a@x", "old", Cutover);
        let a_moved = ("a@x", "mars", Pending);
        let b = ("b@x", "old", Pending);
        // (what, before, after, history rows "subject item", route changes
        // "address before -> after", state-only updates, whole rows written)
        type Case<'a> = (
            &'a str,
            Sources,
            Sources,
            &'a [&'a str],
            &'a [&'a str],
            usize,
            usize,
        );
        let cases: Vec<Case> = vec![
            (
                "nothing",
                src(&[a], &[("a1@x", "a@x")], &[], &[]),
                src(&[a], &[("a1@x", "a@x")], &[], &[]),
                &[],
                &[],
                0,
                0,
            ),
            (
                "a new mailbox",
                src(&[], &[], &[], &[]),
                src(&[a], &[], &[], &[]),
                &["mailbox a@x", "state a@x"],
                &["a@x - -> old"],
                0,
                1,
            ),
            (
                "a state that keeps the route (only the basis changes)",
                src(&[a], &[], &[], &[]),
                src(&[a_ready], &[], &[], &[]),
                &["state a@x"],
                &["a@x old -> old"],
                1,
                0,
            ),
            (
                "a cutover moves the mailbox and its alias",
                src(&[a], &[("a1@x", "a@x")], &[], &[]),
                src(&[a_cut], &[("a1@x", "a@x")], &[], &[]),
                &["state a@x"],
                &["a1@x old -> new", "a@x old -> new"],
                1,
                0,
            ),
            (
                "a new platform rewrites the object",
                src(&[a], &[], &[], &[]),
                src(&[a_moved], &[], &[], &[]),
                &["mailbox a@x"],
                &["a@x old -> mars"],
                0,
                1,
            ),
            (
                "an override beats the directory, and goes",
                src(&[a, b], &[], &[("b@x", "hold")], &[]),
                src(&[a, b], &[], &[("a@x", "hold")], &[]),
                &["override a@x", "override b@x"],
                &["a@x old -> hold", "b@x hold -> old"],
                0,
                0,
            ),
            (
                "a removed mailbox takes its alias's route along",
                src(&[a, b], &[("a1@x", "a@x")], &[], &[]),
                src(&[b], &[], &[], &[]),
                &["mailbox a@x", "state a@x", "alias a1@x"],
                &["a1@x old -> -", "a@x old -> -"],
                0,
                0,
            ),
            (
                "members change history, not routes",
                src(&[a], &[], &[], &[("g@x", "a@x"), ("g@x", "b@y")]),
                src(&[a], &[], &[], &[("g@x", "a@x"), ("g@x", "c@y")]),
                &["member g@x b@y", "member g@x c@y"],
                &[],
                0,
                0,
            ),
        ];
        for (what, before, after, control, routes, states, written) in cases {
            let d = diff(&before, &after, &entries_of(&before), "new");
            let got: Vec<String> = d
                .control
                .iter()
                .map(|c| format!("{} {}", c.subject, c.item))
                .collect();
            assert_eq!(got, *control, "{what}: history");
            let got: Vec<String> = d
                .changes(7)
                .iter()
                .map(|c| {
                    assert_eq!(c.version, 7);
                    let show = |r: &Option<String>| r.clone().unwrap_or_else(|| "-".into());
                    format!("{} {} -> {}", c.address, show(&c.before), show(&c.after))
                })
                .collect();
            assert_eq!(got, *routes, "{what}: routes");
            let n_states: usize = d.states.values().map(Vec::len).sum();
            assert_eq!(
                (n_states, d.objects_written.len()),
                (states, written),
                "{what}: object writes"
            );
            // What the store must delete for removed rows matches the history.
            let removed = control.iter().any(|c| c.starts_with("alias"));
            assert_eq!(!d.aliases.deleted.is_empty(), removed, "{what}: aliases");
        }
    }
}
