//! The unit of work every command runs in: [`Ctx::begin`] opens the
//! transaction, claims the next routing version and loads the sources of
//! routing for the command's [`Scope`] into a [`Work`]; the command changes
//! `Work::after` (and writes what is its own: waves, their members) through
//! `Work::tx`; [`Work::end`] writes the [`diff`] and commits, or rolls back.
//! [`Ctx::transact`] runs such an attempt again when it lost a race: the
//! store's retry loop ([`godwit_store::retry`]).

use super::diff::{Entries, diff, persist};
use super::{ControlChange, ControlError, Ctx, Outcome, Stages, refused};
use crate::model::{Object, Sources};
use crate::normalize_address;
use godwit_store::bulk::{ROWS, json_keys, json_param, keyed_rows, select_rows};
use godwit_store::sqlx::{self, Any, AnyConnection, Transaction};
use godwit_store::{Backend, StoreError, now_ms};
use std::future::Future;

/// Which addresses a command loads the sources of.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    /// The members of one wave (mailboxes), their aliases, and nothing else.
    Wave(String),
    Addresses(Vec<String>),
}

/// Whether a command that changes nothing still writes a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IfUnchanged {
    /// Write it anyway (a wave's status changes even with no member moving).
    Record,
    /// Write nothing, so the history never shows `old -> old`.
    Skip,
}

/// One attempt of a command: its transaction, the version it claimed, and
/// the sources as loaded (`before`) and as the command leaves them (`after`).
pub(super) struct Work {
    tx: Transaction<'static, Any>,
    pub be: Backend,
    pub version: i64,
    target: String,
    before: Sources,
    /// What the command changes; the difference to `before` is written.
    pub after: Sources,
    entries: Entries,
    /// The command's own history rows (waves, wave members, notes), written
    /// before the sources' own.
    pub control: Vec<ControlChange>,
    started: std::time::Instant,
}

impl Ctx<'_> {
    pub(super) fn target(&self) -> Result<String, ControlError> {
        self.config.target_platform().map(str::to_string).ok_or_else(|| {
            refused("no platform is called `new`: set [directory] target_platform to the platform mailboxes move to")
        })
    }

    /// Runs `attempt` (one `begin` .. `end`) until it does not lose a race
    /// to a concurrent command.
    pub(super) async fn transact<T, F>(&self, attempt: impl FnMut() -> F) -> Result<T, ControlError>
    where
        F: Future<Output = Result<T, ControlError>>,
    {
        godwit_store::retry(attempt).await
    }

    /// Opens a command's transaction as a new version and loads the sources
    /// of `scope` (group members too when `with_members`).
    pub(super) async fn begin(
        &self,
        scope: &Scope,
        with_members: bool,
    ) -> Result<Work, ControlError> {
        let target = self.target()?;
        let be = self.store.backend;
        // SQLite: take the write lock up front, so a concurrent writer
        // waits (busy_timeout) instead of failing at its first write and
        // redoing all its work.
        let mut tx = match be {
            Backend::Sqlite => self.store.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.store.pool.begin().await,
        }
        .map_err(StoreError::from)?;
        let started = std::time::Instant::now();
        let loaded = async {
            if be == Backend::Sqlite {
                // A wave touches a few tables' worth of 100,000 rows: SQLite's
                // default 2 MB page cache would re-read them from the OS.
                sqlx::query("PRAGMA cache_size = -65536")
                    .execute(&mut *tx)
                    .await?;
            }
            let version = claim_version(&mut tx, self.actor, self.command).await?;
            let (before, entries) = load(&mut tx, be, scope, with_members).await?;
            Ok::<_, ControlError>((version, before, entries))
        }
        .await;
        match loaded {
            Ok((version, before, entries)) => {
                tracing::debug!("version {version}: loaded in {:?}", started.elapsed());
                Ok(Work {
                    tx,
                    be,
                    version,
                    target,
                    after: before.clone(),
                    before,
                    entries,
                    control: Vec::new(),
                    started,
                })
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }
}

impl Work {
    /// The command's transaction.
    pub fn tx(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Ends the attempt with the command's `result`: an `Err` rolls
    /// everything back; otherwise the difference is written and committed,
    /// unless this is a dry run or (`IfUnchanged::Skip`) nothing changed.
    /// Returns the outcome with the command's own value.
    pub async fn end<T>(
        mut self,
        ctx: &Ctx<'_>,
        result: Result<T, ControlError>,
        if_unchanged: IfUnchanged,
    ) -> Result<(Outcome, T), ControlError> {
        let value = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = self.tx.rollback().await;
                return Err(e);
            }
        };
        let mut st = Stages::new();
        let mut d = diff(&self.before, &self.after, &self.entries, &self.target);
        st.lap("diff");
        let mut control = std::mem::take(&mut self.control);
        control.append(&mut d.control);
        let mut o = Outcome {
            version: self.version,
            applied: false,
            routes: d.changes(self.version),
            control,
        };
        let keep = !ctx.dry_run
            && (if_unchanged == IfUnchanged::Record
                || !o.control.is_empty()
                || !o.routes.is_empty());
        if !keep {
            let _ = self.tx.rollback().await;
            return Ok((o, value));
        }
        if let Err(e) = persist(&mut self.tx, self.be, self.version, d, &o.control).await {
            // Explicitly, not on drop: SQLite holds its write lock until
            // the rollback has run.
            let _ = self.tx.rollback().await;
            return Err(e.into());
        }
        tracing::debug!(
            "version {}: written by {:?}",
            self.version,
            self.started.elapsed()
        );
        let t = std::time::Instant::now();
        self.tx.commit().await?;
        tracing::debug!("commit: {:?}", t.elapsed());
        o.applied = true;
        Ok((o, value))
    }
}

/// The temporary table that holds a scoped command's address set, so the
/// engine computes the set once and every load joins against it.
const SCOPE_TABLE: &str = "CREATE TEMP TABLE IF NOT EXISTS godwit_scope (address TEXT PRIMARY KEY)";
const IN_SCOPE: &str = "IN (SELECT address FROM godwit_scope)";

/// Fills `godwit_scope` with the closure of `scope`: its addresses, the
/// mailbox of each alias among them, and every alias of each mailbox.
/// Returns false for `Scope::All` (no filter needed).
async fn fill_scope(
    tx: &mut AnyConnection,
    b: Backend,
    scope: &Scope,
) -> Result<bool, sqlx::Error> {
    match scope {
        Scope::All => return Ok(false),
        Scope::Wave(name) => {
            sqlx::query(SCOPE_TABLE).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM godwit_scope")
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO godwit_scope (address) SELECT address FROM wave_members WHERE wave = $1")
                .bind(name.as_str())
                .execute(&mut *tx)
                .await?;
        }
        Scope::Addresses(a) => {
            sqlx::query(SCOPE_TABLE).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM godwit_scope")
                .execute(&mut *tx)
                .await?;
            let seeds: Vec<String> = a.iter().map(|a| normalize_address(a)).collect();
            for chunk in seeds.chunks(ROWS) {
                // (`WHERE true` keeps SQLite from reading ON CONFLICT as a join.)
                let sql = format!(
                    "INSERT INTO godwit_scope (address) SELECT DISTINCT j.value FROM {} WHERE true ON CONFLICT DO NOTHING",
                    json_keys(b, 1)
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(json_param(chunk))
                    .execute(&mut *tx)
                    .await?;
            }
        }
    }
    // An alias in the set brings its mailbox...
    sqlx::query(
        "INSERT INTO godwit_scope (address) SELECT DISTINCT mailbox FROM directory_aliases \
         WHERE alias IN (SELECT address FROM godwit_scope) ON CONFLICT DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    // ...and every mailbox in the set brings all its aliases.
    sqlx::query(
        "INSERT INTO godwit_scope (address) SELECT alias FROM directory_aliases \
         WHERE mailbox IN (SELECT address FROM godwit_scope) ON CONFLICT DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    Ok(true)
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
    let mut st = Stages::new();
    let filter = fill_scope(tx, b, scope).await?.then_some(IN_SCOPE);
    st.lap("scope");
    let mut src = Sources::default();
    type ObjectRow = (String, String, String, String, String);
    let objects = keyed_rows::<ObjectRow>(
        tx,
        b,
        &["address", "display_name", "kind", "platform", "state"],
        "directory_objects",
        filter,
        |r| &r.0,
    )
    .await?;
    src.objects.reserve(objects.len());
    for (address, display_name, kind, platform, state) in objects {
        let bad = |what: &str, v: &str| {
            refused(format!(
                "the store holds an unknown {what} `{v}` for {address}; was it written by a newer godwit?"
            ))
        };
        let object = Object {
            display_name,
            kind: kind.parse().map_err(|_| bad("kind", &kind))?,
            platform,
            state: state.parse().map_err(|_| bad("state", &state))?,
        };
        src.objects.insert(address, object);
    }
    st.lap("load objects");
    let pairs = ["alias", "mailbox"];
    src.aliases =
        keyed_rows::<(String, String)>(tx, b, &pairs, "directory_aliases", filter, |r| &r.0)
            .await?
            .into_iter()
            .collect();
    let pairs = ["address", "route"];
    src.overrides =
        keyed_rows::<(String, String)>(tx, b, &pairs, "route_overrides", filter, |r| &r.0)
            .await?
            .into_iter()
            .collect();
    if with_members {
        // Keyed by (group, member): one aggregate, scoped or not.
        let rest = match filter {
            Some(f) => format!("directory_members WHERE group_address {f}"),
            None => "directory_members".to_string(),
        };
        let cols = ["group_address", "member"];
        for (g, m) in select_rows::<(String, String)>(tx, b, &cols, &rest, &[]).await? {
            src.members.entry(g).or_default().insert(m);
        }
    }
    st.lap("load aliases, overrides, members");
    let rows = keyed_rows::<(String, String, Option<String>)>(
        tx,
        b,
        &["address", "route", "basis"],
        "route_entries",
        filter,
        |r| &r.0,
    )
    .await?;
    let entries: Entries = rows
        .into_iter()
        .map(|(a, r, basis)| (a, (r, basis)))
        .collect();
    st.lap("load entries");
    Ok((src, entries))
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
    // Pushed to the gateways at commit, in this same transaction (issue 17).
    if let Some(sql) = godwit_store::Dialect::notify_routing(&Backend::of(tx)) {
        sqlx::query(sql)
            .bind(version.to_string())
            .execute(&mut *tx)
            .await?;
    }
    Ok(version)
}
