//! Routing: "where does mail for this recipient go now, and why". The map
//! lives in the state store, each change a numbered version with its before
//! and after, and in memory in every running gateway. A gateway polls the
//! version and applies only the changes since its own, so a change reaches
//! it within a second and a lookup on the delivery path is a hash lookup.

use godwit_config::Config;
use godwit_store::{Row, Store, StoreError, now_ms};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Why a recipient got its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// An explicit per-address entry, set at this routing version.
    Entry {
        version: i64,
    },
    DomainDefault {
        domain: String,
    },
    GlobalDefault,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Entry { version } => write!(f, "address entry (version {version})"),
            Why::DomainDefault { domain } => write!(f, "domain default for {domain}"),
            Why::GlobalDefault => write!(f, "global default"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// A platform name, `hold` or `both`.
    pub route: String,
    pub why: Why,
    /// The routing version in force when the decision was made.
    pub version: i64,
}

/// The in-memory map: explicit entries plus the configured defaults.
#[derive(Debug, Clone, Default)]
pub struct RoutingMap {
    entries: HashMap<String, (String, i64)>,
    version: i64,
    default: String,
    domains: HashMap<String, String>,
}

/// Addresses compare case-insensitively, as mail administrators expect.
pub fn normalize_address(a: &str) -> String {
    a.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

impl RoutingMap {
    pub fn new(config: &Config) -> RoutingMap {
        RoutingMap {
            entries: HashMap::new(),
            version: 0,
            default: config.routing.default.clone(),
            domains: config
                .routing
                .domains
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn decide(&self, rcpt: &str) -> Decision {
        let addr = normalize_address(rcpt);
        if let Some((route, version)) = self.entries.get(&addr) {
            return Decision {
                route: route.clone(),
                why: Why::Entry { version: *version },
                version: self.version,
            };
        }
        let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        if let Some(route) = self.domains.get(domain) {
            return Decision {
                route: route.clone(),
                why: Why::DomainDefault {
                    domain: domain.to_string(),
                },
                version: self.version,
            };
        }
        Decision {
            route: self.default.clone(),
            why: Why::GlobalDefault,
            version: self.version,
        }
    }

    fn apply(&mut self, change: &Change) {
        match &change.after {
            Some(route) => {
                self.entries
                    .insert(change.address.clone(), (route.clone(), change.version));
            }
            None => {
                self.entries.remove(&change.address);
            }
        }
        self.version = self.version.max(change.version);
    }
}

/// One address's change at one version; `None` means "no entry".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub version: i64,
    pub address: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The map shared by the SMTP sessions and the delivery scheduler.
#[derive(Clone, Default)]
pub struct SharedRoutes(Arc<RwLock<RoutingMap>>);

impl SharedRoutes {
    pub fn new(map: RoutingMap) -> Self {
        SharedRoutes(Arc::new(RwLock::new(map)))
    }

    pub fn decide(&self, rcpt: &str) -> Decision {
        self.0.read().unwrap().decide(rcpt)
    }

    pub fn version(&self) -> i64 {
        self.0.read().unwrap().version
    }

    fn apply(&self, changes: &[Change]) {
        let mut map = self.0.write().unwrap();
        for c in changes {
            map.apply(c);
        }
    }
}

/// Loads the whole map from the store.
pub async fn load(store: &Store, config: &Config) -> Result<RoutingMap, StoreError> {
    let mut map = RoutingMap::new(config);
    let rows = sqlx_query("SELECT address, route, version FROM route_entries")
        .fetch_all(&store.pool)
        .await?;
    for r in rows {
        let address: String = r.try_get(0)?;
        let route: String = r.try_get(1)?;
        let version: i64 = r.try_get(2)?;
        map.entries.insert(address, (route, version));
    }
    map.version = current_version(store).await?;
    Ok(map)
}

fn sqlx_query(
    sql: &'static str,
) -> godwit_store::sqlx::query::Query<
    'static,
    godwit_store::sqlx::Any,
    godwit_store::sqlx::any::AnyArguments,
> {
    godwit_store::sqlx::query(sql)
}

pub async fn current_version(store: &Store) -> Result<i64, StoreError> {
    let v: Option<i64> =
        godwit_store::sqlx::query_scalar("SELECT MAX(version) FROM routing_versions")
            .fetch_one(&store.pool)
            .await?;
    Ok(v.unwrap_or(0))
}

pub async fn changes_since(store: &Store, version: i64) -> Result<Vec<Change>, StoreError> {
    let rows = sqlx_query(
        "SELECT version, address, before_route, after_route FROM route_changes WHERE version > $1 ORDER BY version, address",
    )
    .bind(version)
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Change {
                version: r.try_get(0)?,
                address: r.try_get(1)?,
                before: r.try_get(2)?,
                after: r.try_get(3)?,
            })
        })
        .collect()
}

/// Applies `changes` (address → new route, or None to remove the entry) as
/// one new version, atomically. Returns the version and the changes that
/// actually altered something.
pub async fn commit(
    store: &Store,
    actor: &str,
    command: &str,
    changes: Vec<(String, Option<String>)>,
) -> Result<(i64, Vec<Change>), StoreError> {
    let actor = actor.to_string();
    let command = command.to_string();
    store
        .write_tx(move |tx| {
            let actor = actor.clone();
            let command = command.clone();
            let changes = changes.clone();
            Box::pin(async move {
                let v: Option<i64> = godwit_store::sqlx::query_scalar("SELECT MAX(version) FROM routing_versions")
                    .fetch_one(&mut *tx)
                    .await?;
                let version = v.unwrap_or(0) + 1;
                godwit_store::sqlx::query("INSERT INTO routing_versions (version, at_ms, actor, command) VALUES ($1, $2, $3, $4)")
                    .bind(version)
                    .bind(now_ms())
                    .bind(&actor)
                    .bind(&command)
                    .execute(&mut *tx)
                    .await?;
                let mut applied = Vec::new();
                for (address, after) in changes {
                    let address = normalize_address(&address);
                    let before: Option<String> = godwit_store::sqlx::query_scalar("SELECT route FROM route_entries WHERE address = $1")
                        .bind(&address)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if before == after {
                        continue;
                    }
                    match &after {
                        Some(route) => {
                            godwit_store::sqlx::query("DELETE FROM route_entries WHERE address = $1").bind(&address).execute(&mut *tx).await?;
                            godwit_store::sqlx::query("INSERT INTO route_entries (address, route, version) VALUES ($1, $2, $3)")
                                .bind(&address)
                                .bind(route)
                                .bind(version)
                                .execute(&mut *tx)
                                .await?;
                        }
                        None => {
                            godwit_store::sqlx::query("DELETE FROM route_entries WHERE address = $1").bind(&address).execute(&mut *tx).await?;
                        }
                    }
                    godwit_store::sqlx::query(
                        "INSERT INTO route_changes (version, address, before_route, after_route) VALUES ($1, $2, $3, $4)",
                    )
                    .bind(version)
                    .bind(&address)
                    .bind(&before)
                    .bind(&after)
                    .execute(&mut *tx)
                    .await?;
                    applied.push(Change { version, address, before, after });
                }
                Ok((version, applied))
            })
        })
        .await
}

/// Keeps `shared` current: polls the store's version every `interval` and
/// applies only the changes since. Runs until the task is dropped.
pub async fn watch(
    store: Store,
    shared: SharedRoutes,
    interval: Duration,
    on_change: impl Fn(i64, usize) + Send,
) {
    loop {
        tokio::time::sleep(interval).await;
        let have = shared.version();
        match current_version(&store).await {
            Ok(v) if v > have => match changes_since(&store, have).await {
                Ok(changes) => {
                    shared.apply(&changes);
                    // Versions whose changes were all no-ops still count as seen.
                    shared.0.write().unwrap().version = v;
                    on_change(v, changes.len());
                }
                Err(e) => tracing::warn!("routing reload failed: {e}"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!("routing version check failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::parse("[domains]\naccepted=[\"example.com\"]\n[platforms.old]\nrelay=[\"127.0.0.1:1\"]\n[platforms.new]\nrelay=[\"127.0.0.1:2\"]\n[routing.domains]\n\"example.org\" = \"new\"").unwrap();
        c.data_dir = std::path::PathBuf::from("/nonexistent");
        c
    }

    #[tokio::test]
    async fn set_decide_and_incremental_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("s.db").display()
        ))
        .await
        .unwrap();
        let cfg = config();
        let shared = SharedRoutes::new(load(&store, &cfg).await.unwrap());
        assert_eq!(shared.decide("alice@example.com").why, Why::GlobalDefault);
        assert_eq!(shared.decide("x@example.org").route, "new");

        let (v, applied) = commit(
            &store,
            "t",
            "route set",
            vec![("Alice@Example.com".into(), Some("new".into()))],
        )
        .await
        .unwrap();
        assert_eq!((v, applied.len()), (1, 1));
        // Not yet seen by the running map.
        assert_eq!(shared.decide("alice@example.com").route, "old");
        let changes = changes_since(&store, shared.version()).await.unwrap();
        shared.apply(&changes);
        let d = shared.decide("ALICE@example.com");
        assert_eq!(
            (d.route.as_str(), d.why.clone()),
            ("new", Why::Entry { version: 1 })
        );

        // A no-op change records a version but no change rows.
        let (v2, applied) = commit(
            &store,
            "t",
            "route set",
            vec![("alice@example.com".into(), Some("new".into()))],
        )
        .await
        .unwrap();
        assert_eq!((v2, applied.len()), (2, 0));
        let (_, applied) = commit(
            &store,
            "t",
            "route unset",
            vec![("alice@example.com".into(), None)],
        )
        .await
        .unwrap();
        assert_eq!(applied[0].before.as_deref(), Some("new"));
        let reloaded = load(&store, &cfg).await.unwrap();
        assert_eq!(reloaded.decide("alice@example.com").route, "old");
        assert_eq!(reloaded.version(), 3);
    }

    #[tokio::test]
    async fn concurrent_writers_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let store = Store::open(&url).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = Store::open(&url).await.unwrap();
            tasks.push(tokio::spawn(async move {
                commit(
                    &s,
                    "t",
                    "set",
                    vec![(format!("u{i}@example.com"), Some("new".into()))],
                )
                .await
                .unwrap()
                .0
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            versions.push(t.await.unwrap());
        }
        versions.sort();
        assert_eq!(versions, (1..=20).collect::<Vec<i64>>());
        assert_eq!(load(&store, &config()).await.unwrap().len(), 20);
    }
}
