//! The state store: everything but the message spool (routes, directory, waves,
//! events, sync state). One SQL code path runs on SQLite (embedded, the default)
//! and PostgreSQL (a fleet of gateways and sync workers) through sqlx's `Any`
//! driver. Engine-specific SQL stays behind `Backend`.

pub mod bulk;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use std::time::Duration;

pub use sqlx::{self, AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store at {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot migrate the state store schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("state store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("state store: {0}")]
    Conflict(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The engine-specific SQL, in one place (DEPENDENCIES.md: keep SKIP LOCKED
/// and LISTEN/NOTIFY behind a small trait). SQLite serializes writers with
/// its database lock, so its versions are empty.
pub trait Dialect {
    /// Appended to a `SELECT` that claims rows: other claimers skip rows a
    /// transaction holds instead of waiting for it.
    fn skip_locked(&self) -> &'static str;
    /// A statement that serializes the transactions that run it (a campaign
    /// opening its accounts), or `None` where every writer is serialized anyway.
    fn serialize_writers(&self) -> Option<&'static str>;
    /// Run in the transaction that writes a routing version, with the version
    /// as `$1` (text): gateways LISTENing on [`ROUTING_CHANNEL`] hear of it
    /// when it commits (PostgreSQL NOTIFY is transactional). `None`: gateways poll.
    fn notify_routing(&self) -> Option<&'static str>;
}

/// The PostgreSQL channel a routing change is announced on.
pub const ROUTING_CHANNEL: &str = "godwit_routing";

impl Dialect for Backend {
    fn skip_locked(&self) -> &'static str {
        match self {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }
    fn serialize_writers(&self) -> Option<&'static str> {
        match self {
            // Transaction-scoped: released at commit or rollback.
            Backend::Postgres => Some("SELECT 1 FROM (SELECT pg_advisory_xact_lock(1717)) AS l"),
            Backend::Sqlite => None,
        }
    }
    fn notify_routing(&self) -> Option<&'static str> {
        match self {
            Backend::Postgres => {
                Some("SELECT 1 FROM (SELECT pg_notify('godwit_routing', $1)) AS n")
            }
            Backend::Sqlite => None,
        }
    }
}

impl Backend {
    /// The engine behind a connection of the `Any` pool.
    pub fn of(conn: &sqlx::AnyConnection) -> Backend {
        if conn
            .backend_name()
            .to_ascii_lowercase()
            .contains("postgres")
        {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
    /// What it was opened with (a PostgreSQL listener connects to it too).
    pub url: String,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Opens (creating if needed) the store and brings its schema up to date.
    /// `url` is `sqlite://PATH?mode=rwc` or `postgres://...`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let backend = if url.starts_with("postgres") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        if backend == Backend::Sqlite
            && let Some(path) = sqlite_path(url)
            && let Some(dir) = std::path::Path::new(path).parent()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let open = |source| StoreError::Open {
            url: redact(url),
            source,
        };
        let options = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Several processes (gateway, CLI) share the file: wait for locks
                        // rather than fail, and let readers run beside the writer.
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        // Temporary tables (a wave's address set) in memory, not
                        // in files under TMPDIR.
                        sqlx::query("PRAGMA temp_store = MEMORY")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            });
        let pool = options.connect(url).await.map_err(open)?;
        let store = Store {
            pool,
            backend,
            url: url.to_string(),
        };
        // Two processes opening a new SQLite file at once (two `godwit sync`
        // runs) race through the migrations: sqlx locks them on PostgreSQL
        // only. The loser's migration fails (a column added twice) and rolls
        // back; run again, it finds the winner's work recorded.
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(&store.pool).await {
                Ok(()) => break,
                Err(_) if backend == Backend::Sqlite && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(store)
    }

    /// Runs `f` in a transaction, retrying when a concurrent writer won the race
    /// (see [`retry`]).
    pub async fn write_tx<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: for<'c> Fn(
            &'c mut sqlx::AnyConnection,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>,
        >,
    {
        let f = &f;
        retry(move || async move {
            let mut tx = self.pool.begin().await?;
            match f(&mut tx).await {
                Ok(v) => tx.commit().await.map(|_| v).map_err(StoreError::from),
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            }
        })
        .await
    }
}

/// An error a transaction can fail with: it may carry the store's own error,
/// which says whether the transaction lost a race ([`is_retryable`]).
pub trait TxError: std::fmt::Display {
    fn store_error(&self) -> Option<&StoreError>;
}

impl TxError for StoreError {
    fn store_error(&self) -> Option<&StoreError> {
        Some(self)
    }
}

/// The one retry loop of the store's writers: runs `attempt` (a whole
/// transaction, begun and ended inside it) again while it fails because a
/// concurrent writer won the race, up to 50 times with a growing pause. Each
/// attempt starts from fresh data, so nothing the loser read is kept.
pub async fn retry<T, E, F>(mut attempt: impl FnMut() -> F) -> Result<T, E>
where
    E: TxError,
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut n = 0u32;
    loop {
        match attempt().await {
            Err(e) if n < 50 && e.store_error().is_some_and(is_retryable) => {
                tracing::debug!("retrying after a lost race: {e}");
                n += 1;
                tokio::time::sleep(Duration::from_millis(5 * u64::from(n.min(20)))).await;
            }
            other => return other,
        }
    }
}

/// Whether a failed transaction lost a race and should run again on fresh
/// data: SQLite BUSY (code 5) or locked, PostgreSQL unique violation (23505),
/// serialization failure (40001) or deadlock (40P01), the two the PostgreSQL
/// manual (13.2.3, 13.3.4) says to retry.
pub fn is_retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Sql(sqlx::Error::Database(db)) => {
            let msg = db.message().to_ascii_lowercase();
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            msg.contains("locked")
                || msg.contains("busy")
                || msg.contains("unique")
                || matches!(code.as_str(), "23505" | "40001" | "40P01" | "5")
        }
        _ => false,
    }
}

fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    Some(rest.split('?').next().unwrap_or(rest))
}

/// Never print a password that is part of a URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}://{}:***@{}", &url[..s], user, &url[at + 1..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// For tests that run the store's SQL on PostgreSQL: the URL in `var`, or
/// `None` outside CI, where the test says so and passes. Under CI
/// (`CI=true`), where `scripts/test` always provides the URL, a missing one
/// fails the test instead of letting it pass without testing.
pub fn test_postgres_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("{var} is not set under CI: scripts/test starts PostgreSQL and sets it")
        }
        _ => {
            eprintln!("{var} not set: the PostgreSQL scenarios are skipped (run ./scripts/test)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[tokio::test]
    async fn opens_and_migrates_sqlite_twice() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let s = Store::open(&url).await.unwrap();
        sqlx::query("INSERT INTO route_entries (address, route, version) VALUES ('a@x', 'old', 1)")
            .execute(&s.pool)
            .await
            .unwrap();
        drop(s);
        let s = Store::open(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM route_entries")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
