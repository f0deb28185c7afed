//! Reading the control plane: the numbered versions with their before/after,
//! and `explain` ("where does mail for this address go right now, and why").

use crate::control::{ControlChange, sync_proof, sync_records, sync_summary};
use crate::model::{Kind, MigrationState, Object};
use crate::{Basis, Change, Decision, load_one, normalize_address};
use godwit_config::Config;
use godwit_store::sqlx::{self, Row};
use godwit_store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: i64,
    pub at_ms: i64,
    pub actor: String,
    pub command: String,
    pub route_changes: i64,
    pub control_changes: i64,
}

impl VersionInfo {
    /// RFC 3339 UTC, to the second.
    pub fn time(&self) -> String {
        time::OffsetDateTime::from_unix_timestamp(self.at_ms / 1000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.at_ms.to_string())
    }
}

const VERSIONS: &str = "SELECT v.version, v.at_ms, v.actor, v.command, \
    (SELECT COUNT(*) FROM route_changes c WHERE c.version = v.version), \
    (SELECT COUNT(*) FROM control_changes c WHERE c.version = v.version) \
    FROM routing_versions v";

fn version_info(r: &sqlx::any::AnyRow) -> Result<VersionInfo, StoreError> {
    Ok(VersionInfo {
        version: r.try_get(0)?,
        at_ms: r.try_get(1)?,
        actor: r.try_get(2)?,
        command: r.try_get(3)?,
        route_changes: r.try_get(4)?,
        control_changes: r.try_get(5)?,
    })
}

/// The newest `limit` versions, newest first.
pub async fn versions(store: &Store, limit: i64) -> Result<Vec<VersionInfo>, StoreError> {
    let sql = format!("{VERSIONS} ORDER BY v.version DESC LIMIT $1");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(limit)
        .fetch_all(&store.pool)
        .await?;
    rows.iter().map(version_info).collect()
}

pub async fn version(store: &Store, n: i64) -> Result<Option<VersionInfo>, StoreError> {
    let sql = format!("{VERSIONS} WHERE v.version = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(n)
        .fetch_optional(&store.pool)
        .await?;
    row.as_ref().map(version_info).transpose()
}

pub async fn control_changes(store: &Store, n: i64) -> Result<Vec<ControlChange>, StoreError> {
    let rows = sqlx::query(
        "SELECT subject, item, before_value, after_value FROM control_changes WHERE version = $1 ORDER BY subject, item",
    )
    .bind(n)
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ControlChange {
                subject: r.try_get(0)?,
                item: r.try_get(1)?,
                before: r.try_get(2)?,
                after: r.try_get(3)?,
            })
        })
        .collect()
}

/// Route changes of version `n`, at most `limit`.
pub async fn route_changes(store: &Store, n: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
    let rows = sqlx::query(
        "SELECT address, before_route, after_route, basis FROM route_changes WHERE version = $1 ORDER BY address LIMIT $2",
    )
    .bind(n)
    .bind(limit)
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Change {
                version: n,
                address: r.try_get(0)?,
                before: r.try_get(1)?,
                after: r.try_get(2)?,
                basis: r
                    .try_get::<Option<String>, _>(3)?
                    .map(|b| Basis::parse(Some(&b))),
            })
        })
        .collect()
}

/// Everything that decides one address's route.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub address: String,
    /// The mailbox this address is an alias of.
    pub alias_of: Option<String>,
    /// The directory object: the address itself, or its mailbox.
    pub object: Option<(String, Object)>,
    pub aliases: Vec<String>,
    /// Groups listing the address (or its mailbox) as a member.
    pub member_of: Vec<String>,
    /// Members, if the object is a group (godwit does not expand it).
    pub members: Vec<String>,
    /// The address's own override and the version that set it.
    pub override_route: Option<(String, i64)>,
    /// The mailbox's override, for an alias.
    pub mailbox_override: Option<(String, i64)>,
    /// Waves holding the object: (name, status).
    pub waves: Vec<(String, String)>,
    /// The sync's proof admits the mailbox to cutover.
    pub sync_ready: bool,
    /// The sync's state in one line (proven, or why not); `None` when no
    /// sync ran for it.
    pub sync: Option<String>,
    pub target: Option<String>,
    /// What a gateway decides now.
    pub decision: Decision,
    /// The version that last changed the address's effective route.
    pub route_set_by: Option<VersionInfo>,
    /// The version that last changed the object's migration state.
    pub state_set_by: Option<VersionInfo>,
    pub rejected_at_rcpt: bool,
}

async fn strings(store: &Store, sql: &'static str, arg: &str) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(sql)
        .bind(arg.to_string())
        .fetch_all(&store.pool)
        .await?)
}

async fn override_of(store: &Store, a: &str) -> Result<Option<(String, i64)>, StoreError> {
    let r = sqlx::query("SELECT route, version FROM route_overrides WHERE address = $1")
        .bind(a.to_string())
        .fetch_optional(&store.pool)
        .await?;
    r.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

pub async fn explain(
    store: &Store,
    config: &Config,
    address: &str,
) -> Result<Explanation, StoreError> {
    let address = normalize_address(address);
    let alias_of = strings(
        store,
        "SELECT mailbox FROM directory_aliases WHERE alias = $1",
        &address,
    )
    .await?
    .pop();
    let subject = alias_of.clone().unwrap_or_else(|| address.clone());
    let obj = sqlx::query(
        "SELECT display_name, kind, platform, state FROM directory_objects WHERE address = $1",
    )
    .bind(subject.clone())
    .fetch_optional(&store.pool)
    .await?;
    let object = match obj {
        Some(r) => {
            let kind: String = r.try_get(1)?;
            let state: String = r.try_get(3)?;
            Some((
                subject.clone(),
                Object {
                    display_name: r.try_get(0)?,
                    kind: kind.parse().unwrap_or(Kind::User),
                    platform: r.try_get(2)?,
                    state: state.parse().unwrap_or(MigrationState::Pending),
                },
            ))
        }
        None => None,
    };
    let aliases = strings(
        store,
        "SELECT alias FROM directory_aliases WHERE mailbox = $1 ORDER BY alias",
        &subject,
    )
    .await?;
    let member_of = strings(
        store,
        "SELECT group_address FROM directory_members WHERE member = $1 ORDER BY group_address",
        &subject,
    )
    .await?;
    let members = strings(
        store,
        "SELECT member FROM directory_members WHERE group_address = $1 ORDER BY member",
        &subject,
    )
    .await?;
    let override_route = override_of(store, &address).await?;
    let mailbox_override = match &alias_of {
        Some(m) => override_of(store, m).await?,
        None => None,
    };
    let waves = sqlx::query(
        "SELECT w.name, w.status FROM waves w JOIN wave_members m ON m.wave = w.name WHERE m.address = $1 ORDER BY w.created_version",
    )
    .bind(subject.clone())
    .fetch_all(&store.pool)
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect::<Result<Vec<_>, StoreError>>()?;
    let map = load_one(store, config, &address).await?;
    let decision = map.decide(&address);
    let rejected_at_rcpt = map.rejects_unknown(&address);
    let route_version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM route_entries WHERE address = $1")
            .bind(address.clone())
            .fetch_optional(&store.pool)
            .await?;
    // The entry's own version, or, for an address without one, the change
    // that removed its last entry.
    let route_version = match route_version {
        Some(v) => Some(v),
        None => {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT MAX(version) FROM route_changes WHERE address = $1",
            )
            .bind(address.clone())
            .fetch_one(&store.pool)
            .await?
        }
    };
    let route_set_by = match route_version {
        Some(v) => version(store, v).await?,
        None => None,
    };
    let state_version: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(version) FROM control_changes WHERE subject = 'state' AND item = $1",
    )
    .bind(subject.clone())
    .fetch_one(&store.pool)
    .await?;
    let state_set_by = match state_version {
        Some(v) => version(store, v).await?,
        None => None,
    };
    let now = godwit_store::now_ms();
    let max_age = config.directory.max_verify_age;
    let record = sync_records(store).await.remove(&subject);
    let sync_ready = record
        .as_ref()
        .is_some_and(|r| sync_proof(r, now, max_age).is_ok());
    let sync = record.map(|r| sync_summary(&r, now, max_age));
    Ok(Explanation {
        address,
        alias_of,
        object,
        aliases,
        member_of,
        members,
        override_route,
        mailbox_override,
        waves,
        sync_ready,
        sync,
        target: config.target_platform().map(str::to_string),
        decision,
        route_set_by,
        state_set_by,
        rejected_at_rcpt,
    })
}

#[derive(Debug, Clone)]
pub struct WaveMember {
    pub address: String,
    /// The migration state, or "(not in the directory)".
    pub state: String,
    /// The effective route now, or "(default)".
    pub route: String,
    /// The sync's state (proven, or why not); `None` when no sync ran for it.
    pub sync: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Wave {
    pub name: String,
    pub status: String,
    pub created_version: i64,
    pub version: i64,
    pub members: Vec<WaveMember>,
}

#[derive(Debug, Clone)]
pub struct WaveSummary {
    pub name: String,
    pub status: String,
    pub count: i64,
    pub created_version: i64,
    pub version: i64,
}

pub async fn wave(
    store: &Store,
    name: &str,
    max_verify_age: std::time::Duration,
) -> Result<Option<Wave>, StoreError> {
    let Some(r) =
        sqlx::query("SELECT name, status, created_version, version FROM waves WHERE name = $1")
            .bind(name.to_string())
            .fetch_optional(&store.pool)
            .await?
    else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT m.address, o.state, e.route FROM wave_members m \
         LEFT JOIN directory_objects o ON o.address = m.address \
         LEFT JOIN route_entries e ON e.address = m.address \
         WHERE m.wave = $1 ORDER BY m.address",
    )
    .bind(name.to_string())
    .fetch_all(&store.pool)
    .await?;
    let now = godwit_store::now_ms();
    let records = sync_records(store).await;
    let members = rows
        .iter()
        .map(|m| {
            let address: String = m.try_get(0)?;
            Ok(WaveMember {
                sync: records
                    .get(&address)
                    .map(|r| sync_summary(r, now, max_verify_age)),
                address,
                state: m
                    .try_get::<Option<String>, _>(1)?
                    .unwrap_or_else(|| "(not in the directory)".into()),
                route: m
                    .try_get::<Option<String>, _>(2)?
                    .unwrap_or_else(|| "(default)".into()),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some(Wave {
        name: r.try_get(0)?,
        status: r.try_get(1)?,
        created_version: r.try_get(2)?,
        version: r.try_get(3)?,
        members,
    }))
}

pub async fn waves(store: &Store) -> Result<Vec<WaveSummary>, StoreError> {
    let rows = sqlx::query(
        "SELECT w.name, w.status, (SELECT COUNT(*) FROM wave_members m WHERE m.wave = w.name), \
         w.created_version, w.version FROM waves w ORDER BY w.created_version",
    )
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(WaveSummary {
                name: r.try_get(0)?,
                status: r.try_get(1)?,
                count: r.try_get(2)?,
                created_version: r.try_get(3)?,
                version: r.try_get(4)?,
            })
        })
        .collect()
}

/// One directory object as `directory list` shows it: who is where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirectoryEntry {
    pub address: String,
    pub display_name: String,
    pub kind: String,
    /// The platform that owned it before the migration.
    pub platform: String,
    pub state: String,
    /// Where its mail goes now (the effective route; `None` only for a
    /// store written before the control plane).
    pub route: Option<String>,
    /// Its own `route set` override, if any (it beats the state).
    pub override_route: Option<String>,
    /// The waves holding it, `;`-separated.
    pub waves: String,
    pub aliases: usize,
    /// The sync's state (proven, or why not); `None` when no sync ran for it.
    pub sync: Option<String>,
}

/// What `directory list` selects; `None` is any.
#[derive(Debug, Clone, Default)]
pub struct DirectoryFilter {
    pub state: Option<String>,
    pub platform: Option<String>,
    pub route: Option<String>,
    pub kind: Option<String>,
    pub wave: Option<String>,
}

/// Every mailbox's aliases, each list sorted, in one query: what a command
/// that needs the aliases of many mailboxes (a wave's probe) reads, instead
/// of one `explain` (about fifteen queries) per mailbox.
pub async fn aliases(
    store: &Store,
) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
    let mut conn = store.pool.acquire().await?;
    let rows: Vec<(String, String)> = godwit_store::bulk::select_rows(
        &mut conn,
        store.backend,
        &["mailbox", "alias"],
        "directory_aliases",
        &[],
    )
    .await?;
    let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (m, a) in rows {
        out.entry(m).or_default().push(a);
    }
    for v in out.values_mut() {
        v.sort();
    }
    Ok(out)
}

/// The directory objects matching `f`, sorted by address.
pub async fn directory(
    store: &Store,
    f: &DirectoryFilter,
    max_verify_age: std::time::Duration,
) -> Result<Vec<DirectoryEntry>, StoreError> {
    let now = godwit_store::now_ms();
    let records = sync_records(store).await;
    let mut conds = Vec::new();
    let mut args = Vec::new();
    let mut bind = |cond: &str, v: &Option<String>, args: &mut Vec<String>| {
        if let Some(v) = v {
            args.push(v.clone());
            conds.push(cond.replace('?', &format!("${}", args.len())));
        }
    };
    bind("o.state = ?", &f.state, &mut args);
    bind("o.platform = ?", &f.platform, &mut args);
    bind("e.route = ?", &f.route, &mut args);
    bind("o.kind = ?", &f.kind, &mut args);
    bind(
        "o.address IN (SELECT address FROM wave_members WHERE wave = ?)",
        &f.wave,
        &mut args,
    );
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let rest = format!(
        "directory_objects o LEFT JOIN route_entries e ON e.address = o.address \
         LEFT JOIN route_overrides r ON r.address = o.address{filter}"
    );
    type Row = (
        String,
        String,
        String,
        String,
        String,
        Option<String>,
        Option<String>,
    );
    let mut conn = store.pool.acquire().await?;
    let args: Vec<godwit_store::bulk::Arg> = args
        .iter()
        .map(|a| godwit_store::bulk::Arg::Text(a))
        .collect();
    let rows: Vec<Row> = godwit_store::bulk::select_rows(
        &mut conn,
        store.backend,
        &[
            "o.address",
            "o.display_name",
            "o.kind",
            "o.platform",
            "o.state",
            "e.route",
            "r.route",
        ],
        &rest,
        &args,
    )
    .await?;
    // Waves and alias counts: two small aggregates joined here.
    let waves: Vec<(String, String)> = godwit_store::bulk::select_rows(
        &mut conn,
        store.backend,
        &["address", "wave"],
        "wave_members",
        &[],
    )
    .await?;
    let mut wave_of: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (a, w) in waves {
        wave_of.entry(a).or_default().push(w);
    }
    drop(conn);
    let alias_count: std::collections::HashMap<String, usize> = aliases(store)
        .await?
        .into_iter()
        .map(|(m, a)| (m, a.len()))
        .collect();
    let mut out: Vec<DirectoryEntry> = rows
        .into_iter()
        .map(
            |(address, display_name, kind, platform, state, route, override_route)| {
                let mut w = wave_of.remove(&address).unwrap_or_default();
                w.sort();
                DirectoryEntry {
                    sync: records
                        .get(&address)
                        .map(|r| sync_summary(r, now, max_verify_age)),
                    aliases: alias_count.get(&address).copied().unwrap_or(0),
                    waves: w.join(";"),
                    address,
                    display_name,
                    kind,
                    platform,
                    state,
                    route,
                    override_route,
                }
            },
        )
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}
