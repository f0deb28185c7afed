//! Stores for tests (feature `test-util`, for dev-dependencies only): a
//! SQLite file in a temporary directory, and a PostgreSQL database of its own
//! on the test cluster, so that no crate copies this setup again.

use crate::{Store, now_ms, test_postgres_url};
use std::future::Future;

/// A store in a SQLite file that lives as long as this value.
pub struct TempStore {
    pub store: Store,
    /// The URL it was opened with (open it again for a second "process").
    pub url: String,
    pub dir: tempfile::TempDir,
}

/// A new, migrated SQLite store in a temporary directory.
pub async fn sqlite_temp() -> TempStore {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
    let store = Store::open(&url).await.expect("the SQLite store opens");
    TempStore { store, url, dir }
}

/// A database of its own on the test PostgreSQL cluster (the cluster is
/// shared by the tests of several crates), created through the admin URL in
/// `GODWIT_TEST_POSTGRES` (a role that may create databases).
pub struct Scratch {
    /// `postgres://.../NAME`: open a [`Store`] on it.
    pub url: String,
    admin: String,
    name: String,
}

/// A scratch database named after `prefix` and this process, or `None`
/// outside CI without the cluster (see [`test_postgres_url`]: under CI a
/// missing URL fails the test instead).
pub async fn postgres_scratch(prefix: &str) -> Option<Scratch> {
    let admin = test_postgres_url("GODWIT_TEST_POSTGRES")?;
    let name = format!("{prefix}_{}_{}", std::process::id(), now_ms());
    // CREATE DATABASE copies template1 and fails (55006) while another
    // session is in it: another test creating its database at the same
    // moment. That one is done within moments; try again.
    let create = format!("CREATE DATABASE {name}");
    let mut tries = 0;
    while let Err(e) = try_admin_sql(&admin, &create).await {
        let busy = matches!(&e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55006"));
        tries += 1;
        assert!(busy && tries < 50, "{create}: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("GODWIT_TEST_POSTGRES must end in /DATABASE"),
    };
    Some(Scratch { url, admin, name })
}

impl Scratch {
    /// Drops the database, closing whatever is still connected to it.
    pub async fn drop_database(self) {
        // FORCE ends the test's own leftover sessions, but not an autovacuum
        // worker that happens to be in the new database ("must be a member
        // of the role whose process is being terminated"): it is done in
        // moments, so try again; a database still there after 5 s is only
        // left behind, said on stderr, and never fails the test.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let mut last = None;
        for _ in 0..25 {
            match try_admin_sql(&self.admin, &sql).await {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        if let Some(e) = last {
            eprintln!("scratch database {} left behind: {e}", self.name);
        }
    }
}

/// Runs `scenario` on each of `n` scratch databases (their URLs), then drops
/// them, also when the scenario panics (the panic is then resumed). `None`
/// where [`postgres_scratch`] gives none.
pub async fn with_postgres<F, Fut>(prefix: &str, n: usize, scenario: F) -> Option<()>
where
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut dbs = Vec::new();
    for i in 0..n {
        dbs.push(postgres_scratch(&format!("{prefix}{i}")).await?);
    }
    let urls = dbs.iter().map(|d| d.url.clone()).collect();
    // In a task of its own, so a failing assertion comes back as an Err and
    // the databases are dropped before it is raised again.
    let result = tokio::spawn(scenario(urls)).await;
    for d in dbs {
        d.drop_database().await;
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
    Some(())
}

async fn try_admin_sql(admin: &str, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", crate::redact(admin)));
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await?;
    Ok(())
}
