//! The control plane's writes: directory import, migration states, overrides,
//! waves and rollback. Every command is one transaction that
//!
//! 1. claims the next routing version (inserting its row first, so two
//!    administrators racing for the same number serialize on the primary key
//!    and the loser retries on fresh data: nothing is lost);
//! 2. loads the sources of routing for the addresses it touches;
//! 3. changes them in memory;
//! 4. writes the difference: the sources, their before/after
//!    (`control_changes`), and the recomputed effective routes
//!    (`route_entries`, with before/after in `route_changes`, which is what
//!    running gateways apply).
//!
//! A wave of 100,000 mailboxes is therefore one version and one transaction:
//! all or nothing.

use crate::model::{Basis, Kind, MigrationState, Object, Sources};
use crate::{Change, normalize_address};
use godwit_config::Config;
use godwit_store::sqlx::{self, AnyConnection, Row};
use godwit_store::{Backend, Store, StoreError, now_ms};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A refusal that names what to do next.
    #[error("{0}")]
    Refused(String),
    #[error(
        "wave `{wave}`: {} of {total} mailbox(es) are not ready for cutover (their sync is not `ready`): {}{}\n  \
         wait for the sync, mark them with `godwit directory state ready ADDRESS...`, remove them from the wave, or run again with --force (recorded in the history)",
        addresses.len(), list_some(addresses), more(addresses)
    )]
    NotReady {
        wave: String,
        total: usize,
        addresses: Vec<String>,
    },
}

impl From<sqlx::Error> for ControlError {
    fn from(e: sqlx::Error) -> Self {
        ControlError::Store(StoreError::Sql(e))
    }
}

fn list_some(v: &[String]) -> String {
    v.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
}

fn more(v: &[String]) -> String {
    if v.len() > 10 {
        format!(" and {} more", v.len() - 10)
    } else {
        String::new()
    }
}

fn refused(m: impl Into<String>) -> ControlError {
    ControlError::Refused(m.into())
}

/// One before/after of something that is not an effective route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlChange {
    /// mailbox | state | alias | member | override | wave | wave-member | note
    pub subject: String,
    pub item: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

fn cc(
    subject: &str,
    item: impl Into<String>,
    before: Option<String>,
    after: Option<String>,
) -> ControlChange {
    ControlChange {
        subject: subject.into(),
        item: item.into(),
        before,
        after,
    }
}

/// What one command did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The version written (or that a dry run would have written).
    pub version: i64,
    pub applied: bool,
    pub control: Vec<ControlChange>,
    /// Effective-route changes, as running gateways will apply them.
    pub routes: Vec<Change>,
}

impl Outcome {
    /// Route changes that move mail (not just a new reason for the same route).
    pub fn moved(&self) -> impl Iterator<Item = &Change> {
        self.routes.iter().filter(|c| c.before != c.after)
    }
}

// ---------------------------------------------------------------- SQL helpers

/// Rows go to the store as one JSON array per statement, unpacked by the
/// engine's JSON table function (SQLite `json_each`, PostgreSQL
/// `json_array_elements`): a 100,000-row change is a handful of statements
/// instead of thousands of bound parameters, which sqlx binds slowly.
fn json_rows(b: Backend, param: usize) -> String {
    match b {
        Backend::Sqlite => format!("json_each(${param}) AS j"),
        Backend::Postgres => format!("json_array_elements(CAST(${param} AS json)) AS j(value)"),
    }
}

/// Rows per statement: bounds the size of one JSON parameter.
const ROWS: usize = 50_000;

type Rows = Vec<Vec<Option<String>>>;

fn row(vals: &[&str]) -> Vec<Option<String>> {
    vals.iter().map(|v| Some(v.to_string())).collect()
}

/// `INSERT INTO table (version_col?, cols...)` for every row; `version`
/// fills `version_col` in every row.
async fn insert_rows(
    tx: &mut AnyConnection,
    b: Backend,
    table: &str,
    version_col: Option<(&str, i64)>,
    cols: &[&str],
    rows: Rows,
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS) {
        let json = serde_json::to_string(chunk).expect("strings serialize");
        let picks: Vec<String> = (0..cols.len())
            .map(|i| format!("j.value ->> {i}"))
            .collect();
        let sql = match version_col {
            Some((vc, _)) => format!(
                "INSERT INTO {table} ({vc}, {}) SELECT CAST($1 AS BIGINT), {} FROM {}",
                cols.join(", "),
                picks.join(", "),
                json_rows(b, 2)
            ),
            None => format!(
                "INSERT INTO {table} ({}) SELECT {} FROM {}",
                cols.join(", "),
                picks.join(", "),
                json_rows(b, 1)
            ),
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some((_, v)) = version_col {
            q = q.bind(v);
        }
        q.bind(json).execute(&mut *tx).await?;
    }
    Ok(())
}

/// `(SELECT j.value ->> 0 FROM <json $param>)`: the keys as a subquery.
fn keys_subquery(b: Backend, param: usize) -> String {
    format!("(SELECT j.value ->> 0 FROM {})", json_rows(b, param))
}

fn keys_json(keys: &[String]) -> String {
    let rows: Vec<[&str; 1]> = keys.iter().map(|k| [k.as_str()]).collect();
    serde_json::to_string(&rows).expect("strings serialize")
}

/// `DELETE FROM table WHERE col IN (keys)`.
async fn delete_in(
    tx: &mut AnyConnection,
    b: Backend,
    table: &str,
    col: &str,
    keys: &[String],
) -> Result<(), sqlx::Error> {
    for chunk in keys.chunks(ROWS) {
        let sql = format!("DELETE FROM {table} WHERE {col} IN {}", keys_subquery(b, 1));
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(keys_json(chunk))
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Which addresses a command loads the sources of.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    /// The members of one wave (mailboxes), their aliases, and nothing else.
    Wave(String),
    Addresses(Vec<String>),
}

/// Runs `select` for the rows whose `col` is in `keys`, or for every row.
async fn select_in(
    tx: &mut AnyConnection,
    b: Backend,
    select: &'static str,
    col: &str,
    keys: Keys<'_>,
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let keys = match keys {
        Keys::All => return sqlx::query(select).fetch_all(&mut *tx).await,
        Keys::Wave(name) => {
            let sql = format!("{select} WHERE {col} IN ({WAVE_SET})");
            return sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(name.to_string())
                .fetch_all(&mut *tx)
                .await;
        }
        Keys::List(keys) => keys,
    };
    let mut out = Vec::new();
    for chunk in keys.chunks(ROWS) {
        let sql = format!("{select} WHERE {col} IN {}", keys_subquery(b, 1));
        out.extend(
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(keys_json(chunk))
                .fetch_all(&mut *tx)
                .await?,
        );
    }
    Ok(out)
}

/// Which rows `select_in` reads.
#[derive(Clone, Copy)]
enum Keys<'a> {
    All,
    List(&'a [String]),
    /// The closed address set of a wave (`WAVE_SET`), computed by the engine.
    Wave(&'a str),
}

/// A wave's members, the mailboxes of members that are aliases, and every
/// alias of those: the same closure `load` computes for a list, in SQL, so a
/// 100,000-member wave does not travel to the client and back.
const WAVE_SET: &str = "SELECT address FROM wave_members WHERE wave = $1 \
    UNION SELECT mailbox FROM directory_aliases WHERE alias IN (SELECT address FROM wave_members WHERE wave = $1) \
    UNION SELECT alias FROM directory_aliases WHERE mailbox IN (SELECT address FROM wave_members WHERE wave = $1) \
    UNION SELECT alias FROM directory_aliases WHERE mailbox IN \
        (SELECT mailbox FROM directory_aliases WHERE alias IN (SELECT address FROM wave_members WHERE wave = $1))";

/// The current effective entry of an address: route, basis.
type Entries = HashMap<String, (String, Option<String>)>;

const OBJECTS: &str = "SELECT address, display_name, kind, platform, state FROM directory_objects";
const ALIASES: &str = "SELECT alias, mailbox FROM directory_aliases";
const OVERRIDES: &str = "SELECT address, route FROM route_overrides";
const ENTRIES: &str = "SELECT address, route, basis FROM route_entries";
const MEMBERS: &str = "SELECT group_address, member FROM directory_members";

fn put_object(src: &mut Sources, r: &sqlx::any::AnyRow) -> Result<(), ControlError> {
    let address: String = r.try_get(0)?;
    let kind: String = r.try_get(2)?;
    let state: String = r.try_get(4)?;
    let bad = |what: &str, v: &str| {
        refused(format!(
            "the store holds an unknown {what} `{v}` for {address}; was it written by a newer godwit?"
        ))
    };
    let object = Object {
        display_name: r.try_get(1)?,
        kind: kind.parse().map_err(|_| bad("kind", &kind))?,
        platform: r.try_get(3)?,
        state: state.parse().map_err(|_| bad("state", &state))?,
    };
    src.objects.insert(address, object);
    Ok(())
}

/// Loads the sources and current entries for `scope`, closed so that every
/// address whose effective route the sources decide is complete: an alias
/// comes with its mailbox, a mailbox with all its aliases.
async fn load(
    tx: &mut AnyConnection,
    b: Backend,
    scope: &Scope,
    with_members: bool,
) -> Result<(Sources, Entries), ControlError> {
    let mut src = Sources::default();
    let mut entries = Entries::new();
    // The address set S: everything, a wave's closure, or a list's closure.
    let list: Option<Vec<String>> = match scope {
        Scope::Addresses(a) => {
            let seeds: Vec<String> = a.iter().map(|a| normalize_address(a)).collect();
            let mut s: BTreeSet<String> = seeds.iter().cloned().collect();
            // An alias in the set brings its mailbox...
            for r in select_in(tx, b, ALIASES, "alias", Keys::List(&seeds)).await? {
                s.insert(r.try_get(1)?);
            }
            // ...and every mailbox in the set brings all its aliases.
            let s0: Vec<String> = s.iter().cloned().collect();
            for r in select_in(tx, b, ALIASES, "mailbox", Keys::List(&s0)).await? {
                s.insert(r.try_get(0)?);
            }
            Some(s.into_iter().collect())
        }
        _ => None,
    };
    let keys = match (scope, &list) {
        (Scope::Wave(name), _) => Keys::Wave(name),
        (_, Some(list)) => Keys::List(list),
        _ => Keys::All,
    };
    for r in select_in(tx, b, OBJECTS, "address", keys).await? {
        put_object(&mut src, &r)?;
    }
    for r in select_in(tx, b, ALIASES, "alias", keys).await? {
        src.aliases.insert(r.try_get(0)?, r.try_get(1)?);
    }
    for r in select_in(tx, b, OVERRIDES, "address", keys).await? {
        src.overrides.insert(r.try_get(0)?, r.try_get(1)?);
    }
    for r in select_in(tx, b, ENTRIES, "address", keys).await? {
        entries.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?));
    }
    if with_members {
        for r in select_in(tx, b, MEMBERS, "group_address", keys).await? {
            let (g, m): (String, String) = (r.try_get(0)?, r.try_get(1)?);
            src.members.entry(g).or_default().insert(m);
        }
    }
    Ok((src, entries))
}

fn object_value(o: &Object) -> String {
    serde_json::json!({
        "display_name": o.display_name,
        "kind": o.kind.as_str(),
        "platform": o.platform,
    })
    .to_string()
}

fn parse_object_value(v: &str) -> Option<(String, Kind, String)> {
    let j: serde_json::Value = serde_json::from_str(v).ok()?;
    Some((
        j["display_name"].as_str()?.to_string(),
        j["kind"].as_str()?.parse().ok()?,
        j["platform"].as_str()?.to_string(),
    ))
}

/// Writes the difference between `before` and `after` (and the recomputed
/// effective routes) as part of `version`.
#[allow(clippy::too_many_arguments)] // each is one distinct input of the diff
async fn write_diff(
    tx: &mut AnyConnection,
    be: Backend,
    version: i64,
    before: &Sources,
    after: &Sources,
    entries: &Entries,
    target: &str,
    mut control: Vec<ControlChange>,
) -> Result<Outcome, ControlError> {
    // Directory objects.
    let mut del_objects = Vec::new();
    let mut new_objects = Vec::new();
    let mut state_only: BTreeMap<MigrationState, Vec<String>> = BTreeMap::new();
    // Hash sets, not ordered ones: a 100,000-mailbox wave passes through
    // here and order does not matter to the store.
    let keys: HashSet<&String> = before.objects.keys().chain(after.objects.keys()).collect();
    for a in keys {
        let (b, n) = (before.objects.get(a), after.objects.get(a));
        if b == n {
            continue;
        }
        let (bv, nv) = (b.map(object_value), n.map(object_value));
        if bv != nv {
            control.push(cc("mailbox", a.as_str(), bv.clone(), nv.clone()));
        }
        let (bs, ns) = (b.map(|o| o.state), n.map(|o| o.state));
        if bs != ns {
            control.push(cc(
                "state",
                a.as_str(),
                bs.map(|s| s.to_string()),
                ns.map(|s| s.to_string()),
            ));
        }
        match n {
            Some(n) if b.is_some() && bv == nv => {
                state_only.entry(n.state).or_default().push(a.clone())
            }
            Some(n) => {
                if b.is_some() {
                    del_objects.push(a.clone());
                }
                new_objects.push(row(&[
                    a,
                    &n.display_name,
                    n.kind.as_str(),
                    &n.platform,
                    n.state.as_str(),
                ]));
            }
            None => del_objects.push(a.clone()),
        }
    }
    delete_in(tx, be, "directory_objects", "address", &del_objects).await?;
    insert_rows(
        tx,
        be,
        "directory_objects",
        Some(("version", version)),
        &["address", "display_name", "kind", "platform", "state"],
        new_objects,
    )
    .await?;
    for (state, addrs) in state_only {
        for chunk in addrs.chunks(ROWS) {
            let sql = format!(
                "UPDATE directory_objects SET state = $1, version = $2 WHERE address IN {}",
                keys_subquery(be, 3)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(state.as_str())
                .bind(version)
                .bind(keys_json(chunk))
                .execute(&mut *tx)
                .await?;
        }
    }

    // Aliases and overrides: key → value tables.
    for (subject, table, key_col, val_col, b, n) in [
        (
            "alias",
            "directory_aliases",
            "alias",
            "mailbox",
            &before.aliases,
            &after.aliases,
        ),
        (
            "override",
            "route_overrides",
            "address",
            "route",
            &before.overrides,
            &after.overrides,
        ),
    ] {
        let mut dels = Vec::new();
        let mut ins = Vec::new();
        let keys: HashSet<&String> = b.keys().chain(n.keys()).collect();
        for k in keys {
            let (bv, nv) = (b.get(k), n.get(k));
            if bv == nv {
                continue;
            }
            control.push(cc(subject, k.as_str(), bv.cloned(), nv.cloned()));
            if bv.is_some() {
                dels.push(k.clone());
            }
            if let Some(v) = nv {
                ins.push(row(&[k, v]));
            }
        }
        delete_in(tx, be, table, key_col, &dels).await?;
        insert_rows(
            tx,
            be,
            table,
            Some(("version", version)),
            &[key_col, val_col],
            ins,
        )
        .await?;
    }

    // Group members.
    let groups: BTreeSet<&String> = before.members.keys().chain(after.members.keys()).collect();
    let empty = BTreeSet::new();
    for g in groups {
        let (b, n) = (
            before.members.get(g).unwrap_or(&empty),
            after.members.get(g).unwrap_or(&empty),
        );
        if b == n {
            continue;
        }
        for m in b.difference(n) {
            control.push(cc(
                "member",
                format!("{g} {m}"),
                Some("member".into()),
                None,
            ));
            sqlx::query("DELETE FROM directory_members WHERE group_address = $1 AND member = $2")
                .bind(g.as_str())
                .bind(m.as_str())
                .execute(&mut *tx)
                .await?;
        }
        let added: Rows = n
            .difference(b)
            .map(|m| {
                control.push(cc(
                    "member",
                    format!("{g} {m}"),
                    None,
                    Some("member".into()),
                ));
                row(&[g, m])
            })
            .collect();
        insert_rows(
            tx,
            be,
            "directory_members",
            None,
            &["group_address", "member"],
            added,
        )
        .await?;
    }

    // Effective routes.
    let mut addresses: HashSet<&str> = before.addresses();
    addresses.extend(after.addresses());
    addresses.extend(entries.keys().map(|s| s.as_str()));
    let mut routes = Vec::new();
    let mut dels = Vec::new();
    let mut ins = Vec::new();
    let mut change_rows = Vec::new();
    for a in addresses {
        let now = after.effective(a, target);
        let was = entries.get(a);
        let now_key = now.as_ref().map(|(r, b)| (r.as_str(), *b));
        let was_key = was.map(|(r, b)| (r.as_str(), Basis::parse(b.as_deref())));
        if now_key == was_key {
            continue;
        }
        match &now {
            Some((r, b)) => ins.push(row(&[a, r, &b.token()])),
            None => dels.push(a.to_string()),
        }
        let before_route = was.map(|(r, _)| r.clone());
        let after_route = now.as_ref().map(|(r, _)| r.clone());
        let basis = now.as_ref().map(|(_, b)| *b);
        change_rows.push(vec![
            Some(a.to_string()),
            before_route.clone(),
            after_route.clone(),
            basis.map(|b| b.token()),
        ]);
        routes.push(Change {
            version,
            address: a.to_string(),
            before: before_route,
            after: after_route,
            basis,
        });
    }
    delete_in(tx, be, "route_entries", "address", &dels).await?;
    // An upsert: one statement per chunk whether the address had an entry or
    // not. (`WHERE true` keeps SQLite from reading ON CONFLICT as a join.)
    for chunk in ins.chunks(ROWS) {
        let sql = format!(
            "INSERT INTO route_entries (version, address, route, basis) \
             SELECT CAST($1 AS BIGINT), j.value ->> 0, j.value ->> 1, j.value ->> 2 FROM {} WHERE true \
             ON CONFLICT (address) DO UPDATE SET route = excluded.route, version = excluded.version, basis = excluded.basis",
            json_rows(be, 2)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(version)
            .bind(serde_json::to_string(chunk).expect("strings serialize"))
            .execute(&mut *tx)
            .await?;
    }
    insert_rows(
        tx,
        be,
        "route_changes",
        Some(("version", version)),
        &["address", "before_route", "after_route", "basis"],
        change_rows,
    )
    .await?;
    let rows = control
        .iter()
        .map(|c| {
            vec![
                Some(c.subject.clone()),
                Some(c.item.clone()),
                c.before.clone(),
                c.after.clone(),
            ]
        })
        .collect();
    insert_rows(
        tx,
        be,
        "control_changes",
        Some(("version", version)),
        &["subject", "item", "before_value", "after_value"],
        rows,
    )
    .await?;
    routes.sort_unstable_by(|a, b| a.address.cmp(&b.address));
    Ok(Outcome {
        version,
        applied: false,
        control,
        routes,
    })
}

/// Whether a failed transaction lost a race and should run again on fresh
/// data (SQLite BUSY/locked, PostgreSQL unique or serialization conflicts).
fn retryable(e: &ControlError) -> bool {
    let ControlError::Store(StoreError::Sql(sqlx::Error::Database(db))) = e else {
        return false;
    };
    let msg = db.message().to_ascii_lowercase();
    let code = db.code().map(|c| c.to_string()).unwrap_or_default();
    msg.contains("locked")
        || msg.contains("busy")
        || msg.contains("unique")
        || matches!(code.as_str(), "23505" | "40001" | "40P01" | "5")
}

/// The context a command runs in.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub config: &'a Config,
    pub actor: &'a str,
    pub command: &'a str,
    /// Compute and report, then roll back.
    pub dry_run: bool,
}

impl Ctx<'_> {
    fn target(&self) -> Result<String, ControlError> {
        self.config.target_platform().map(str::to_string).ok_or_else(|| {
            refused("no platform is called `new`: set [directory] target_platform to the platform mailboxes move to")
        })
    }

    /// Runs `f` in one transaction as a new version, retrying lost races.
    /// `f` returns the changed sources and extra history rows; an `Err`
    /// rolls everything back.
    async fn run<F>(
        &self,
        scope: Scope,
        with_members: bool,
        skip_empty: bool,
        f: F,
    ) -> Result<Outcome, ControlError>
    where
        F: Fn(&mut Sources, i64) -> Result<Vec<ControlChange>, ControlError>,
    {
        self.run_tx(scope, with_members, skip_empty, |_tx, src, v| {
            let r = f(src, v);
            Box::pin(async move { r })
        })
        .await
    }

    /// With `skip_empty`, a command that changes nothing writes no version.
    async fn run_tx<F>(
        &self,
        scope: Scope,
        with_members: bool,
        skip_empty: bool,
        f: F,
    ) -> Result<Outcome, ControlError>
    where
        F: for<'c> Fn(
            &'c mut AnyConnection,
            &'c mut Sources,
            i64,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Vec<ControlChange>, ControlError>>
                    + Send
                    + 'c,
            >,
        >,
    {
        let target = self.target()?;
        let be = self.store.backend;
        let mut attempt = 0u32;
        loop {
            // SQLite: take the write lock up front, so a concurrent writer
            // waits (busy_timeout) instead of failing at its first write and
            // redoing all its work.
            let mut tx = match be {
                Backend::Sqlite => self.store.pool.begin_with("BEGIN IMMEDIATE").await,
                Backend::Postgres => self.store.pool.begin().await,
            }
            .map_err(StoreError::from)?;
            if be == Backend::Sqlite {
                // A wave touches a few tables' worth of 100,000 rows: SQLite's
                // default 2 MB page cache would re-read them from the OS.
                sqlx::query("PRAGMA cache_size = -65536")
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            let result = async {
                let t = std::time::Instant::now();
                let version = claim_version(&mut tx, self.actor, self.command).await?;
                let (before, entries) = load(&mut tx, be, &scope, with_members).await?;
                let loaded = t.elapsed();
                let mut after = before.clone();
                let extra = f(&mut tx, &mut after, version).await?;
                let r = write_diff(
                    &mut tx, be, version, &before, &after, &entries, &target, extra,
                )
                .await;
                tracing::debug!(
                    "version {version}: loaded in {loaded:?}, written by {:?}",
                    t.elapsed()
                );
                r
            }
            .await;
            let result = match result {
                Ok(mut o)
                    if !self.dry_run
                        && (!skip_empty || !o.control.is_empty() || !o.routes.is_empty()) =>
                {
                    tx.commit().await?;
                    o.applied = true;
                    Ok(o)
                }
                other => {
                    let _ = tx.rollback().await;
                    other
                }
            };
            match result {
                Err(e) if attempt < 50 && retryable(&e) => {
                    tracing::debug!("retrying after a lost race: {e}");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt.min(20)))).await;
                }
                other => return other,
            }
        }
    }
}

/// Inserts the next version's row. Done first in every command: a concurrent
/// command claiming the same number blocks (PostgreSQL) or fails to upgrade
/// its lock (SQLite), and retries after this one commits.
async fn claim_version(
    tx: &mut AnyConnection,
    actor: &str,
    command: &str,
) -> Result<i64, ControlError> {
    let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM routing_versions")
        .fetch_one(&mut *tx)
        .await?;
    let version = v.unwrap_or(0) + 1;
    sqlx::query(
        "INSERT INTO routing_versions (version, at_ms, actor, command) VALUES ($1, $2, $3, $4)",
    )
    .bind(version)
    .bind(now_ms())
    .bind(actor)
    .bind(command)
    .execute(&mut *tx)
    .await?;
    Ok(version)
}

// ---------------------------------------------------------------- commands

/// Sets (`Some`) or removes (`None`) per-address overrides (`route set` /
/// `route unset`) as one version. An override beats the directory; removing
/// it lets the directory (or the defaults) decide again. Returns the version
/// and the route changes that moved mail.
pub async fn commit(
    store: &Store,
    config: &Config,
    actor: &str,
    command: &str,
    changes: Vec<(String, Option<String>)>,
) -> Result<(i64, Vec<Change>), ControlError> {
    let ctx = Ctx {
        store,
        config,
        actor,
        command,
        dry_run: false,
    };
    let addrs: Vec<String> = changes.iter().map(|(a, _)| normalize_address(a)).collect();
    let o = ctx
        .run(Scope::Addresses(addrs), false, false, |src, _| {
            for (a, r) in &changes {
                let a = normalize_address(a);
                match r {
                    Some(r) => src.overrides.insert(a, r.clone()),
                    None => src.overrides.remove(&a),
                };
            }
            Ok(Vec::new())
        })
        .await?;
    let moved = o.moved().cloned().collect();
    Ok((o.version, moved))
}

/// A directory import's difference, object by object.
#[derive(Debug, Clone, Default)]
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
    rows: Vec<crate::directory::DirectoryRow>,
) -> Result<(ImportDiff, Option<Outcome>), ControlError> {
    let diff = std::sync::Mutex::new(ImportDiff::default());
    let body = |src: &mut Sources, _v: i64| {
        let mut d = ImportDiff::default();
        let mut objects = HashMap::new();
        let mut aliases = HashMap::new();
        let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in &rows {
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
        for r in &rows {
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
        *diff.lock().unwrap() = d;
        Ok(Vec::new())
    };
    // An unchanged directory records no version at all (an import is idempotent).
    let o = ctx.run(Scope::All, true, true, &body).await?;
    let d = diff.lock().unwrap().clone();
    Ok((d, o.applied.then_some(o)))
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
    ctx.run(Scope::Addresses(addrs.clone()), false, false, |src, _| {
        for a in &addrs {
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
        Ok(Vec::new())
    })
    .await
}

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
    let name = name.to_string();
    let be = ctx.store.backend;
    ctx.run_tx(Scope::Addresses(members.clone()), false, false, move |tx, src, version| {
        let name = name.clone();
        let members = members.clone();
        Box::pin(async move {
            let exists: Option<String> = sqlx::query_scalar("SELECT name FROM waves WHERE name = $1")
                .bind(name.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_some() {
                return Err(refused(format!(
                    "wave `{name}` exists; choose another name (godwit wave list)"
                )));
            }
            let mut resolved = BTreeSet::new();
            let mut unknown = Vec::new();
            for a in &members {
                let m = src.aliases.get(a).unwrap_or(a);
                if src.objects.contains_key(m) {
                    resolved.insert(m.clone());
                } else {
                    unknown.push(a.clone());
                }
            }
            if !unknown.is_empty() {
                return Err(refused(format!(
                    "{} address(es) are not in the directory: {}{}; import them first or remove them from the member list",
                    unknown.len(),
                    list_some(&unknown),
                    more(&unknown)
                )));
            }
            sqlx::query("INSERT INTO waves (name, status, created_version, version) VALUES ($1, 'created', $2, $2)")
                .bind(name.as_str())
                .bind(version)
                .execute(&mut *tx)
                .await?;
            let rows = resolved.iter().map(|m| row(&[&name, m])).collect();
            insert_rows(tx, be, "wave_members", None, &["wave", "address"], rows).await?;
            let mut control = vec![cc("wave", name.as_str(), None, Some("created".into()))];
            control.extend(
                resolved
                    .iter()
                    .map(|m| cc("wave-member", format!("{name} {m}"), None, Some("member".into()))),
            );
            Ok(control)
        })
    })
    .await
}

/// The sync's verdict per account, from the sync engine's `sync_accounts`
/// table (status `seeding`, `ready` or `verified`). The table belongs to the
/// mailbox sync; until it exists (or if its shape differs), every account
/// counts as not synced and only the directory state (`ready`, set by
/// `godwit directory state ready`) admits a mailbox to cutover.
pub async fn sync_ready_accounts(store: &Store) -> BTreeSet<String> {
    let rows: Result<Vec<(String, String)>, _> =
        sqlx::query_as("SELECT address, status FROM sync_accounts")
            .fetch_all(&store.pool)
            .await;
    match rows {
        Ok(rows) => rows
            .into_iter()
            .filter(|(_, s)| matches!(s.as_str(), "ready" | "verified"))
            .map(|(a, _)| normalize_address(&a))
            .collect(),
        Err(e) => {
            tracing::debug!(
                "no sync status available ({e}); the directory state decides readiness"
            );
            BTreeSet::new()
        }
    }
}

/// Whether a wave member may be cut over without `--force`. Groups have no
/// mailbox to sync. A rolled-back mailbox was ready when it first moved, and
/// the sync keeps running after a rollback.
pub fn ready_for_cutover(kind: Kind, state: MigrationState, sync_ready: bool) -> bool {
    kind == Kind::Group
        || sync_ready
        || matches!(state, MigrationState::Ready | MigrationState::RolledBack)
}

async fn set_wave_status(
    tx: &mut AnyConnection,
    name: &str,
    status: &str,
    version: i64,
) -> Result<ControlChange, ControlError> {
    let before: Option<String> = sqlx::query_scalar("SELECT status FROM waves WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(before) = before else {
        return Err(refused(format!("no wave `{name}` (godwit wave list)")));
    };
    sqlx::query("UPDATE waves SET status = $1, version = $2 WHERE name = $3")
        .bind(status)
        .bind(version)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    Ok(cc("wave", name, Some(before), Some(status.into())))
}

/// Moves every member of a wave to the target platform (state `cutover`),
/// in one version. Refuses members that are not ready unless `force`, which
/// is recorded in the history as a `note`.
pub async fn wave_cutover(ctx: &Ctx<'_>, name: &str, force: bool) -> Result<Outcome, ControlError> {
    let sync = sync_ready_accounts(ctx.store).await;
    let name = name.to_string();
    ctx.run_tx(
        Scope::Wave(name.clone()),
        false,
        false,
        move |tx, src, version| {
            let name = name.clone();
            let sync = sync.clone();
            Box::pin(async move {
                let mut control = vec![set_wave_status(tx, &name, "cutover", version).await?];
                let members: Vec<String> = sqlx::query_scalar(
                    "SELECT address FROM wave_members WHERE wave = $1 ORDER BY address",
                )
                .bind(name.as_str())
                .fetch_all(&mut *tx)
                .await?;
                let mut not_ready = Vec::new();
                let mut missing = Vec::new();
                for m in &members {
                    let Some(o) = src.objects.get_mut(m) else {
                        missing.push(m.clone());
                        continue;
                    };
                    if o.state.routes_to_target() {
                        continue;
                    }
                    if !ready_for_cutover(o.kind, o.state, sync.contains(m)) {
                        not_ready.push(m.clone());
                        if !force {
                            continue;
                        }
                    }
                    o.state = MigrationState::Cutover;
                }
                if !not_ready.is_empty() && !force {
                    return Err(ControlError::NotReady {
                        wave: name.clone(),
                        total: members.len(),
                        addresses: not_ready,
                    });
                }
                if !not_ready.is_empty() {
                    control.push(cc(
                        "note",
                        "forced",
                        None,
                        Some(format!(
                            "--force: {} mailbox(es) cut over without a ready sync: {}{}",
                            not_ready.len(),
                            list_some(&not_ready),
                            more(&not_ready)
                        )),
                    ));
                }
                if !missing.is_empty() {
                    control.push(cc(
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
                Ok(control)
            })
        },
    )
    .await
}

/// Moves every member of a wave that is at the target (`cutover` or
/// `migrated`) back to the platform that owned it (`rolled-back`), in one
/// version. Mail already queued follows at its next attempt.
pub async fn wave_rollback(ctx: &Ctx<'_>, name: &str) -> Result<Outcome, ControlError> {
    let name = name.to_string();
    ctx.run_tx(
        Scope::Wave(name.clone()),
        false,
        false,
        move |tx, src, version| {
            let name = name.clone();
            Box::pin(async move {
                let control = vec![set_wave_status(tx, &name, "rolled-back", version).await?];
                let members: Vec<String> =
                    sqlx::query_scalar("SELECT address FROM wave_members WHERE wave = $1")
                        .bind(name.as_str())
                        .fetch_all(&mut *tx)
                        .await?;
                for m in &members {
                    if let Some(o) = src.objects.get_mut(m)
                        && o.state.routes_to_target()
                    {
                        o.state = MigrationState::RolledBack;
                    }
                }
                Ok(control)
            })
        },
    )
    .await
}

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
    ctx.run_tx(Scope::All, true, false, move |tx, src, version| {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT subject, item, before_value FROM control_changes \
                 WHERE version > $1 AND subject IN ('mailbox', 'state', 'alias', 'member', 'override') \
                 ORDER BY version",
            )
            .bind(to)
            .fetch_all(&mut *tx)
            .await?;
            // The value at `to` is the `before` of the first change after it.
            let mut at: BTreeMap<(String, String), Option<String>> = BTreeMap::new();
            for r in rows {
                let key: (String, String) = (r.try_get(0)?, r.try_get(1)?);
                let before: Option<String> = r.try_get(2)?;
                at.entry(key).or_insert(before);
            }
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
            let mut control = vec![cc("note", "rollback", None, Some(format!("restored the routing of version {to}")))];
            // A wave's status follows the routing it describes; a wave created
            // since `to` stays, as not yet cut over.
            let rows = sqlx::query(
                "SELECT item, before_value FROM control_changes WHERE version > $1 AND subject = 'wave' ORDER BY version",
            )
            .bind(to)
            .fetch_all(&mut *tx)
            .await?;
            let mut waves: BTreeMap<String, String> = BTreeMap::new();
            for r in rows {
                let before: Option<String> = r.try_get(1)?;
                waves
                    .entry(r.try_get(0)?)
                    .or_insert(before.unwrap_or_else(|| "created".into()));
            }
            for (name, status) in waves {
                let c = set_wave_status(tx, &name, &status, version).await?;
                if c.before != c.after {
                    control.push(c);
                }
            }
            Ok(control)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{Rules, parse};
    use crate::{load, map_at};

    fn config() -> Config {
        let mut c = Config::parse(
            "[domains]\naccepted=[\"example.com\"]\n[platforms.old]\nrelay=[\"127.0.0.1:1\"]\n[platforms.new]\nrelay=[\"127.0.0.1:2\"]",
        )
        .unwrap();
        c.data_dir = std::path::PathBuf::from("/nonexistent");
        c
    }

    async fn store(dir: &tempfile::TempDir) -> (Store, String) {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        (Store::open(&url).await.unwrap(), url)
    }

    fn rows(text: &str) -> Vec<crate::directory::DirectoryRow> {
        let platforms = vec!["old".to_string(), "new".to_string()];
        let accepted = |d: &str| d == "example.com";
        parse(
            &format!("address,display_name,kind,aliases,members,platform\n{text}"),
            &Rules {
                accepted_domain: &accepted,
                platforms: &platforms,
            },
        )
        .unwrap()
    }

    fn ctx<'a>(store: &'a Store, config: &'a Config, command: &'a str) -> Ctx<'a> {
        Ctx {
            store,
            config,
            actor: "test",
            command,
            dry_run: false,
        }
    }

    #[tokio::test]
    async fn rollback_restores_the_map_of_version_n_and_can_itself_be_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = store(&dir).await;
        rollback_scenario(&s).await;
    }

    /// With `GODWIT_TEST_POSTGRES=postgres://USER:PASS@HOST/DB` (a role that
    /// may create databases), the same scenarios run on PostgreSQL in a
    /// database of their own, dropped afterwards. Without it this test says
    /// so and passes: SQLite is the embedded default and always tested.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_sql_runs_on_postgresql() {
        let Ok(admin) = std::env::var("GODWIT_TEST_POSTGRES") else {
            eprintln!("GODWIT_TEST_POSTGRES not set: PostgreSQL scenarios skipped");
            return;
        };
        sqlx::any::install_default_drivers();
        let db = format!("godwit_control_{}_{}", std::process::id(), now_ms());
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db}"),
            None => panic!("GODWIT_TEST_POSTGRES must end in /DATABASE"),
        };
        let db2 = format!("{db}_c");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db2}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url2 = url.replace(&db, &db2);
        let result = {
            let url = url.clone();
            tokio::spawn(async move {
                let s = Store::open(&url).await.unwrap();
                assert_eq!(s.backend, Backend::Postgres);
                rollback_scenario(&s).await;
                cutover_scenario(&s).await;
                s.pool.close().await;
                concurrency_scenario(url2).await;
            })
            .await
        };
        for d in [&db, &db2] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {d} WITH (FORCE)"
            )))
            .execute(&mut conn)
            .await
            .unwrap();
        }
        result.unwrap();
    }

    async fn rollback_scenario(s: &Store) {
        let s = s.clone();
        let cfg = config();
        let c = |cmd| ctx(&s, &cfg, cmd);
        import(&c("import"), rows("a@example.com,A,user,a1@example.com,,old\nb@example.com,B,user,,,old\ng@example.com,G,group,,a@example.com,old\n")).await.unwrap();
        set_state(
            &c("state"),
            vec!["a@example.com".into()],
            MigrationState::Ready,
        )
        .await
        .unwrap();
        wave_create(
            &c("wave"),
            "w",
            vec!["a1@example.com".into(), "g@example.com".into()],
        )
        .await
        .unwrap();
        commit(
            &s,
            &cfg,
            "test",
            "set",
            vec![("x@example.com".into(), Some("hold".into()))],
        )
        .await
        .unwrap();
        let n = crate::current_version(&s).await.unwrap();
        let at_n = load(&s, &cfg).await.unwrap().snapshot();
        assert_eq!(map_at(&s, &cfg, n).await.unwrap().snapshot(), at_n);

        // Change everything there is to change.
        wave_cutover(&c("cutover"), "w", false).await.unwrap();
        import(&c("import 2"), rows("a@example.com,A,user,a2@example.com,,new\nc@example.com,C,shared,,,old\ng@example.com,G,group,,b@example.com,old\n")).await.unwrap();
        commit(
            &s,
            &cfg,
            "test",
            "set",
            vec![
                ("x@example.com".into(), None),
                ("c@example.com".into(), Some("new".into())),
            ],
        )
        .await
        .unwrap();
        let changed = load(&s, &cfg).await.unwrap().snapshot();
        assert_ne!(changed, at_n);

        let o = rollback_to(&c("rollback"), n).await.unwrap();
        assert!(o.applied && o.version > n);
        assert_eq!(load(&s, &cfg).await.unwrap().snapshot(), at_n);
        // Sources too: b is back, c gone, the alias and members as they were.
        let e = crate::history::explain(&s, &cfg, "a1@example.com")
            .await
            .unwrap();
        assert_eq!(e.alias_of.as_deref(), Some("a@example.com"));
        assert_eq!(e.object.unwrap().1.state, MigrationState::Ready);
        let g = crate::history::explain(&s, &cfg, "g@example.com")
            .await
            .unwrap();
        assert_eq!(g.members, vec!["a@example.com"]);
        assert_eq!(g.waves, vec![("w".to_string(), "created".to_string())]);

        // The rollback is a version like any other: undo it.
        rollback_to(&c("undo"), o.version - 1).await.unwrap();
        assert_eq!(load(&s, &cfg).await.unwrap().snapshot(), changed);
        // And the gateway's incremental view agrees with a full load.
        assert_eq!(
            map_at(&s, &cfg, crate::current_version(&s).await.unwrap())
                .await
                .unwrap()
                .snapshot(),
            changed
        );
    }

    #[tokio::test]
    async fn cutover_is_all_or_nothing_and_force_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = store(&dir).await;
        cutover_scenario(&s).await;
    }

    /// The routes of the `u*` mailboxes (other scenarios may share the store).
    async fn wave_routes(s: &Store, cfg: &Config) -> Vec<String> {
        let snap = load(s, cfg).await.unwrap().snapshot();
        let v: Vec<String> = snap
            .into_iter()
            .filter(|(a, _)| a.starts_with('u'))
            .map(|(_, r)| r)
            .collect();
        assert_eq!(v.len(), 300);
        v
    }

    async fn cutover_scenario(s: &Store) {
        let s = s.clone();
        let cfg = config();
        let c = |cmd| ctx(&s, &cfg, cmd);
        let text: String = (0..300)
            .map(|i| format!("u{i}@example.com,U,user,,,old\n"))
            .collect();
        import(&c("import"), rows(&text)).await.unwrap();
        let all: Vec<String> = (0..300).map(|i| format!("u{i}@example.com")).collect();
        wave_create(&c("wave"), "big", all.clone()).await.unwrap();
        set_state(&c("ready"), all[..299].to_vec(), MigrationState::Ready)
            .await
            .unwrap();
        let before = crate::current_version(&s).await.unwrap();
        let err = wave_cutover(&c("cutover"), "big", false).await.unwrap_err();
        assert!(
            err.to_string().contains("1 of 300") && err.to_string().contains("u299@example.com"),
            "{err}"
        );
        // Nothing written: no version, no state, no route.
        assert_eq!(crate::current_version(&s).await.unwrap(), before);
        assert!(wave_routes(&s, &cfg).await.iter().all(|r| r == "old"));

        let dry = Ctx {
            dry_run: true,
            ..c("cutover --force")
        };
        let o = wave_cutover(&dry, "big", true).await.unwrap();
        assert!(!o.applied && o.moved().count() == 300);
        assert_eq!(crate::current_version(&s).await.unwrap(), before);

        let o = wave_cutover(&c("wave cutover big --force"), "big", true)
            .await
            .unwrap();
        assert_eq!((o.version, o.moved().count()), (before + 1, 300));
        let notes = crate::history::control_changes(&s, o.version)
            .await
            .unwrap();
        assert!(
            notes
                .iter()
                .any(|n| n.subject == "note"
                    && n.after.as_deref().unwrap().contains("u299@example.com")),
            "{notes:?}"
        );
        assert!(wave_routes(&s, &cfg).await.iter().all(|r| r == "new"));
        let o = wave_rollback(&c("rollback"), "big").await.unwrap();
        assert_eq!(o.moved().count(), 300);
        assert!(wave_routes(&s, &cfg).await.iter().all(|r| r == "old"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_administrators_at_once_lose_nothing_and_history_is_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let (_, url) = store(&dir).await;
        concurrency_scenario(url).await;
    }

    /// Needs a store of its own: it checks the version numbers from 1.
    async fn concurrency_scenario(url: String) {
        let s = Store::open(&url).await.unwrap();
        let cfg = config();
        let text: String = (0..40)
            .map(|i| format!("u{i}@example.com,U,user,,,old\n"))
            .collect();
        import(&ctx(&s, &cfg, "import"), rows(&text)).await.unwrap();
        let mut tasks = Vec::new();
        for admin in 0..2 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let s = Store::open(&url).await.unwrap();
                let cfg = config();
                for i in 0..20 {
                    let a = format!("u{}@example.com", admin * 20 + i);
                    if i % 2 == 0 {
                        commit(&s, &cfg, "admin", "set", vec![(a, Some("hold".into()))])
                            .await
                            .unwrap();
                    } else {
                        let c = ctx(&s, &cfg, "state");
                        set_state(&c, vec![a], MigrationState::Cutover)
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let map = load(&s, &cfg).await.unwrap();
        for i in 0..40 {
            let d = map.decide(&format!("u{i}@example.com"));
            let want = if i % 2 == 0 { "hold" } else { "new" };
            assert_eq!(d.route, want, "u{i}");
        }
        let vs = crate::history::versions(&s, 1000).await.unwrap();
        assert_eq!(vs.len(), 41);
        let numbers: Vec<i64> = vs.iter().rev().map(|v| v.version).collect();
        assert_eq!(numbers, (1..=41).collect::<Vec<_>>());
        assert!(
            vs.windows(2).all(|w| w[0].at_ms >= w[1].at_ms),
            "time follows version order"
        );
        assert!(
            vs.iter()
                .take(40)
                .all(|v| v.route_changes == 1 && v.control_changes == 1)
        );
    }
}
