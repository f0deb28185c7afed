//! Routing: "where does mail for this recipient go now, and why". The map
//! lives in the state store, each change a numbered version with its before
//! and after, and in memory in every running gateway. A gateway polls the
//! version and applies only the changes since its own, so a change reaches
//! it within a second and a lookup on the delivery path is a hash lookup.

mod address;
pub use address::Address;
pub mod control;
pub mod directory;
pub mod history;
pub mod ldif;
pub mod model;
pub mod soak;

use godwit_config::{Config, UnknownRecipient};
use godwit_store::{Row, Store, StoreError, bulk};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use control::{commit, commit_outcome};
pub use model::{Basis, Kind, MigrationState};

/// Why a recipient got its route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// An explicit per-address override (`route set`), set at this version.
    Entry {
        version: i64,
    },
    /// The directory: a mailbox's or group's migration state, or an alias
    /// following its mailbox; last changed at this version.
    Directory {
        basis: Basis,
        version: i64,
    },
    DomainDefault {
        domain: String,
    },
    GlobalDefault,
    /// Not in the imported directory; `[directory] unknown_recipient = "hold"`.
    UnknownHeld,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Entry { version } => write!(f, "override (address entry, version {version})"),
            Why::Directory { basis, version } => {
                write!(f, "directory: {basis} (version {version})")
            }
            Why::UnknownHeld => {
                f.write_str("not in the directory; held by directory.unknown_recipient = \"hold\"")
            }
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

/// One address's entry, kept small: a million of them is the design point.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Index into `RoutingMap::routes` (routes are a handful of names).
    route: u16,
    basis: Basis,
    version: i64,
}

/// The in-memory map: every address the store names (overrides, directory
/// objects, aliases) plus the configured defaults. A lookup is one hash
/// probe and never touches the store.
#[derive(Debug, Clone, Default)]
pub struct RoutingMap {
    entries: HashMap<Box<str>, Entry>,
    routes: Vec<String>,
    version: i64,
    default: String,
    domains: HashMap<String, String>,
    unknown: UnknownRecipient,
    /// Entries that come from the directory: the unknown-recipient policy
    /// applies only while this is above zero.
    directory_entries: usize,
    /// Group → members, held only with `directory.expand_groups`.
    groups: Option<HashMap<Box<str>, Vec<Box<str>>>>,
    expansion_limit: usize,
}

/// What expanding one recipient gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expansion {
    /// Not a group with members, or expansion is off: deliver as addressed.
    Itself,
    /// The addresses the groups (nested ones too) finally name, in order,
    /// each once; and the groups expanded on the way.
    Members {
        members: Vec<String>,
        groups: Vec<String>,
    },
    /// More than `directory.expansion_limit` addresses: the group goes to its
    /// own route and that platform expands it.
    OverLimit { limit: usize },
}

/// Addresses compare case-insensitively, as mail administrators expect.
pub fn normalize_address(a: &str) -> String {
    a.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

/// Outbound routes (`route set-outbound`) live in the same versioned map as
/// recipient routes, under keys no recipient address can take
/// (`outbound:alice@example.com`, `outbound:@example.com`): so they are in
/// the history and roll back like every other routing change.
pub const OUTBOUND_KEY_PREFIX: &str = "outbound:";

/// The map key of sender `sender` (an address) or of a sender domain
/// (`example.com` or `@example.com`).
pub fn outbound_key(sender_or_domain: &str) -> String {
    let s = normalize_address(sender_or_domain);
    if s.contains('@') {
        format!("{OUTBOUND_KEY_PREFIX}{s}")
    } else {
        format!("{OUTBOUND_KEY_PREFIX}@{}", s.trim_end_matches('.'))
    }
}

impl RoutingMap {
    /// The outbound route set for envelope sender `sender`: its own entry,
    /// else its domain's, else the nearest parent domain's. None: the
    /// configured `outbound.route` applies. Returns (route, why).
    pub fn outbound_route(&self, sender: &str) -> Option<(String, String)> {
        let addr = normalize_address(sender);
        let hit = |key: String| {
            self.entries.get(key.as_str()).map(|e| {
                (
                    self.routes[e.route as usize].clone(),
                    format!(
                        "outbound route for {} (version {})",
                        &key[OUTBOUND_KEY_PREFIX.len()..],
                        e.version
                    ),
                )
            })
        };
        if addr.contains('@')
            && let Some(r) = hit(outbound_key(&addr))
        {
            return Some(r);
        }
        let mut domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or(&addr);
        loop {
            if domain.is_empty() {
                return None;
            }
            if let Some(r) = hit(outbound_key(domain)) {
                return Some(r);
            }
            domain = domain.split_once('.')?.1;
        }
    }

    pub fn new(config: &Config) -> RoutingMap {
        RoutingMap {
            entries: HashMap::new(),
            routes: Vec::new(),
            version: 0,
            default: config.routing.default.clone(),
            domains: config
                .routing
                .domains
                .iter()
                .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v.clone()))
                .collect(),
            unknown: config.directory.unknown_recipient,
            directory_entries: 0,
            groups: config.directory.expand_groups.then(HashMap::new),
            expansion_limit: config.directory.expansion_limit,
        }
    }

    /// Whether groups are expanded here (`directory.expand_groups`).
    pub fn expands_groups(&self) -> bool {
        self.groups.is_some()
    }

    /// Adds (`present`) or removes one group member.
    pub fn set_member(&mut self, group: &str, member: &str, present: bool) {
        let Some(groups) = &mut self.groups else {
            return;
        };
        let list = groups.entry(group.into()).or_default();
        let at = list.iter().position(|m| &**m == member);
        match (present, at) {
            (true, None) => list.push(member.into()),
            (false, Some(i)) => {
                list.remove(i);
                if list.is_empty() {
                    groups.remove(group);
                }
            }
            _ => {}
        }
    }

    /// Expands `rcpt` if it is a group, depth first through nested groups
    /// (each visited once, so a loop ends), as Postfix's virtual alias
    /// expansion does before the message is queued.
    pub fn expand(&self, rcpt: &str) -> Expansion {
        let Some(groups) = &self.groups else {
            return Expansion::Itself;
        };
        let addr = normalize_address(rcpt);
        if !groups.contains_key(addr.as_str()) {
            return Expansion::Itself;
        }
        let mut members = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut expanded = Vec::new();
        let mut stack = vec![addr.as_str()];
        seen.insert(addr.as_str());
        while let Some(a) = stack.pop() {
            match groups.get(a) {
                Some(list) => {
                    expanded.push(a.to_string());
                    // Reversed, so members come out in their listed order.
                    for m in list.iter().rev() {
                        if seen.insert(m) {
                            stack.push(m);
                        }
                    }
                }
                None => {
                    members.push(a.to_string());
                    if members.len() > self.expansion_limit {
                        return Expansion::OverLimit {
                            limit: self.expansion_limit,
                        };
                    }
                }
            }
        }
        Expansion::Members {
            members,
            groups: expanded,
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

    /// Whether a directory has been imported (some entry comes from it).
    pub fn has_directory(&self) -> bool {
        self.directory_entries > 0
    }

    /// Every entry as (address, route), sorted: to compare two maps.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(a, e)| (a.to_string(), self.routes[e.route as usize].clone()))
            .collect();
        v.sort();
        v
    }

    /// Whether RCPT should refuse `rcpt` as unknown (550 5.1.1): only with
    /// `unknown_recipient = "reject"`, only once a directory exists, and
    /// never for postmaster (RFC 5321 4.5.1).
    pub fn rejects_unknown(&self, rcpt: &str) -> bool {
        if self.unknown != UnknownRecipient::Reject || !self.has_directory() {
            return false;
        }
        let addr = normalize_address(rcpt);
        if addr.split('@').next() == Some("postmaster") {
            return false;
        }
        !self.entries.contains_key(addr.as_str())
    }

    pub fn decide(&self, rcpt: &str) -> Decision {
        let addr = normalize_address(rcpt);
        if let Some(e) = self.entries.get(addr.as_str()) {
            let why = match e.basis {
                Basis::Override { .. } => Why::Entry { version: e.version },
                basis => Why::Directory {
                    basis,
                    version: e.version,
                },
            };
            return Decision {
                route: self.routes[e.route as usize].clone(),
                why,
                version: self.version,
            };
        }
        if self.unknown == UnknownRecipient::Hold
            && self.has_directory()
            && addr.split('@').next() != Some("postmaster")
        {
            return Decision {
                route: godwit_config::ROUTE_HOLD.to_string(),
                why: Why::UnknownHeld,
                version: self.version,
            };
        }
        let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        if let Some((key, route)) = self.domain_default(domain) {
            return Decision {
                route: route.clone(),
                why: Why::DomainDefault {
                    domain: key.to_string(),
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

    /// The most specific domain default for `domain`: its own entry, else
    /// the nearest parent's (`.parent` or `parent`), so subdomains follow
    /// their parent's coexistence route unless they have their own (common
    /// mistake 5: "coexistence routing missing for subdomains").
    fn domain_default(&self, domain: &str) -> Option<(&str, &String)> {
        if let Some((k, v)) = self.domains.get_key_value(domain) {
            return Some((k.as_str(), v));
        }
        let mut rest = domain;
        while let Some((_, parent)) = rest.split_once('.') {
            for key in [format!(".{parent}"), parent.to_string()] {
                if let Some((k, v)) = self.domains.get_key_value(key.as_str()) {
                    return Some((k.as_str(), v));
                }
            }
            rest = parent;
        }
        None
    }

    fn route_index(&mut self, route: &str) -> u16 {
        match self.routes.iter().position(|r| r == route) {
            Some(i) => i as u16,
            None => {
                self.routes.push(route.to_string());
                (self.routes.len() - 1) as u16
            }
        }
    }

    /// Sets or removes one address's entry (the address already normalized).
    pub fn set(&mut self, address: &str, entry: Option<(&str, Basis)>, version: i64) {
        let old = match entry {
            Some((route, basis)) => {
                let route = self.route_index(route);
                self.entries.insert(
                    address.into(),
                    Entry {
                        route,
                        basis,
                        version,
                    },
                )
            }
            None => self.entries.remove(address),
        };
        if old.is_some_and(|e| e.basis.in_directory()) {
            self.directory_entries -= 1;
        }
        if entry.is_some_and(|(_, b)| b.in_directory()) {
            self.directory_entries += 1;
        }
    }

    fn apply(&mut self, change: &Change) {
        let basis = change.basis.unwrap_or(Basis::Override {
            in_directory: false,
        });
        self.set(
            &change.address,
            change.after.as_deref().map(|r| (r, basis)),
            change.version,
        );
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
    /// What decided `after` (`None` for a removed entry).
    pub basis: Option<Basis>,
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

    /// See `RoutingMap::outbound_route`.
    pub fn outbound_route(&self, sender: &str) -> Option<(String, String)> {
        self.0.read().unwrap().outbound_route(sender)
    }

    /// See `RoutingMap::expand`.
    pub fn expand(&self, rcpt: &str) -> Expansion {
        self.0.read().unwrap().expand(rcpt)
    }

    pub fn expands_groups(&self) -> bool {
        self.0.read().unwrap().expands_groups()
    }

    /// Whether a directory has been imported; see `RoutingMap::has_directory`.
    pub fn has_directory(&self) -> bool {
        self.0.read().unwrap().has_directory()
    }

    /// Whether RCPT should refuse `rcpt` as unknown; see `RoutingMap::rejects_unknown`.
    pub fn rejects_unknown(&self, rcpt: &str) -> bool {
        self.0.read().unwrap().rejects_unknown(rcpt)
    }

    pub fn snapshot(&self) -> Vec<(String, String)> {
        self.0.read().unwrap().snapshot()
    }

    /// A reloaded configuration (SIGHUP): the global and per-domain defaults,
    /// the unknown-recipient policy and the expansion limit. Entries from the
    /// store stay as they are.
    pub fn reconfigure(&self, config: &Config) {
        let fresh = RoutingMap::new(config);
        let mut map = self.0.write().unwrap();
        map.default = fresh.default;
        map.domains = fresh.domains;
        map.unknown = fresh.unknown;
        map.expansion_limit = fresh.expansion_limit;
    }

    /// Applies a batch under one write lock: a 100,000-address wave is one
    /// batch and takes milliseconds, so lookups wait at most that long.
    pub fn apply(&self, changes: &[Change]) {
        let mut map = self.0.write().unwrap();
        map.entries.reserve(changes.len());
        for c in changes {
            map.apply(c);
        }
    }
}

/// Loads the whole map from the store.
pub async fn load(store: &Store, config: &Config) -> Result<RoutingMap, StoreError> {
    let mut map = RoutingMap::new(config);
    let mut conn = store.pool.acquire().await?;
    type Row = (String, String, i64, Option<String>);
    let rows: Vec<Row> = bulk::select_all(
        &mut conn,
        store.backend,
        &["address", "route", "version", "basis"],
        "route_entries",
        "address",
        bulk::PAGE,
        |r: &Row| r.0.as_str(),
    )
    .await?;
    map.entries.reserve(rows.len());
    for (address, route, version, basis) in rows {
        map.set(
            &address,
            Some((&route, Basis::parse(basis.as_deref()))),
            version,
        );
    }
    if map.expands_groups() {
        let members: Vec<(String, String)> = bulk::select_rows(
            &mut conn,
            store.backend,
            &["group_address", "member"],
            "directory_members",
            &[],
        )
        .await?;
        for (g, m) in members {
            map.set_member(&g, &m, true);
        }
    }
    map.version = current_version(store).await?;
    Ok(map)
}

/// Group membership changes after version `after` up to `upto`: (group,
/// member, present), in order. Membership is not routing, so it travels in
/// control_changes (subject `member`, item `GROUP MEMBER`).
pub async fn member_changes(
    store: &Store,
    after: i64,
    upto: i64,
) -> Result<Vec<(String, String, bool)>, StoreError> {
    let mut conn = store.pool.acquire().await?;
    let mut rows: Vec<(i64, String, Option<String>)> = bulk::select_rows(
        &mut conn,
        store.backend,
        &["version", "item", "after_value"],
        "control_changes WHERE subject = 'member' AND version > $1 AND version <= $2",
        &[bulk::Arg::Int(after), bulk::Arg::Int(upto)],
    )
    .await?;
    rows.sort_by_key(|r| r.0);
    Ok(rows
        .into_iter()
        .filter_map(|(_, item, after)| {
            let (g, m) = item.split_once(' ')?;
            Some((g.to_string(), m.to_string(), after.is_some()))
        })
        .collect())
}

/// The map as a gateway would hold it, with only `address`'s entry loaded:
/// for `route show`/`route explain` beside a store of a million addresses.
pub async fn load_one(
    store: &Store,
    config: &Config,
    address: &str,
) -> Result<RoutingMap, StoreError> {
    let mut map = RoutingMap::new(config);
    let address = normalize_address(address);
    let row = sqlx_query("SELECT route, version, basis FROM route_entries WHERE address = $1")
        .bind(address.clone())
        .fetch_optional(&store.pool)
        .await?;
    if let Some(r) = row {
        let route: String = r.try_get(0)?;
        let basis: Option<String> = r.try_get(2)?;
        map.set(
            &address,
            Some((&route, Basis::parse(basis.as_deref()))),
            r.try_get(1)?,
        );
    }
    let directory: Option<i64> = godwit_store::sqlx::query_scalar(
        "SELECT 1 FROM route_entries WHERE basis IS NOT NULL AND basis <> 'override' LIMIT 1",
    )
    .fetch_optional(&store.pool)
    .await?;
    // Only "is there a directory" matters outside the full map.
    map.directory_entries = map.directory_entries.max(usize::from(directory.is_some()));
    map.version = current_version(store).await?;
    Ok(map)
}

/// The map as it was at version `version`, replayed from the change history.
pub async fn map_at(
    store: &Store,
    config: &Config,
    version: i64,
) -> Result<RoutingMap, StoreError> {
    let mut map = RoutingMap::new(config);
    let mut conn = store.pool.acquire().await?;
    for c in changes_where(&mut conn, store.backend, "version <= $1", version).await? {
        map.apply(&c);
    }
    map.version = version;
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
    let mut conn = store.pool.acquire().await?;
    changes_where(&mut conn, store.backend, "version > $1", version).await
}

/// Route changes matching `filter` (with `$1` bound to `version`), in the
/// order they were made: by version, then address.
async fn changes_where(
    conn: &mut godwit_store::sqlx::AnyConnection,
    backend: godwit_store::Backend,
    filter: &str,
    version: i64,
) -> Result<Vec<Change>, StoreError> {
    type Row = (i64, String, Option<String>, Option<String>, Option<String>);
    let rows: Vec<Row> = bulk::select_rows(
        conn,
        backend,
        &["version", "address", "before_route", "after_route", "basis"],
        &format!("route_changes WHERE {filter}"),
        &[bulk::Arg::Int(version)],
    )
    .await?;
    let mut changes: Vec<Change> = rows
        .into_iter()
        .map(|(version, address, before, after, basis)| Change {
            version,
            address,
            before,
            after,
            basis: basis.map(|b| Basis::parse(Some(&b))),
        })
        .collect();
    changes.sort_unstable_by(|a, b| (a.version, &a.address).cmp(&(b.version, &b.address)));
    Ok(changes)
}

/// Which path brought a routing change to this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A PostgreSQL NOTIFY, sent in the transaction that wrote the version.
    Listen,
    /// The periodic version check (SQLite, or while the listener is down).
    Poll,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Listen => "listen",
            Via::Poll => "poll",
        }
    }
}

/// How long the watcher sleeps between version checks: `interval` while it
/// has no listener (SQLite, or the LISTEN connection dropped), a slow safety
/// net while the listener pushes every change.
pub fn poll_interval(listening: bool, interval: Duration) -> Duration {
    if listening {
        interval.max(Duration::from_secs(5))
    } else {
        interval
    }
}

/// Keeps `shared` current: polls the store's version every `interval` and
/// applies only the changes since. Runs until the task is dropped.
pub async fn watch(
    store: Store,
    shared: SharedRoutes,
    interval: Duration,
    on_change: impl Fn(i64, usize) + Send,
) {
    watch_pushed(store, shared, interval, move |v, n, _| on_change(v, n)).await
}

/// Keeps the LISTEN connection on PostgreSQL: wakes `wake` on every routing
/// NOTIFY, and says in `listening` whether it is connected (the watcher polls
/// quickly while it is not). Reconnects after a drop, once a second.
async fn listen(
    url: String,
    wake: std::sync::Arc<tokio::sync::Notify>,
    listening: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering::SeqCst;
    let mut said = false;
    loop {
        let connected = async {
            let mut l = godwit_store::sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(godwit_store::ROUTING_CHANNEL).await?;
            Ok::<_, godwit_store::sqlx::Error>(l)
        }
        .await;
        match connected {
            Ok(mut l) => {
                listening.store(true, SeqCst);
                // A change committed while we were not listening is found by
                // the check this wake-up triggers.
                wake.notify_one();
                if said {
                    tracing::warn!("routing: LISTEN connection to the state store is back");
                }
                said = false;
                // `None` or an error: the connection dropped.
                while let Ok(Some(_)) = l.try_recv().await {
                    wake.notify_one();
                }
                listening.store(false, SeqCst);
                tracing::warn!(
                    "routing: LISTEN connection to the state store dropped; polling until it is back"
                );
            }
            Err(e) => {
                listening.store(false, SeqCst);
                if !said {
                    said = true;
                    tracing::warn!("routing: cannot LISTEN on the state store ({e}); polling");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// [`watch`], with changes pushed by PostgreSQL NOTIFY where the store is
/// PostgreSQL, and `on_change` told which path brought each change.
pub async fn watch_pushed(
    store: Store,
    shared: SharedRoutes,
    interval: Duration,
    on_change: impl Fn(i64, usize, Via) + Send,
) {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let listening = std::sync::Arc::new(AtomicBool::new(false));
    let _listener = (store.backend == godwit_store::Backend::Postgres).then(|| {
        AbortOnDrop(tokio::spawn(listen(
            store.url.clone(),
            wake.clone(),
            listening.clone(),
        )))
    });
    loop {
        let via = tokio::select! {
            _ = tokio::time::sleep(poll_interval(listening.load(SeqCst), interval)) => Via::Poll,
            _ = wake.notified() => Via::Listen,
        };
        let have = shared.version();
        match current_version(&store).await {
            Ok(v) if v > have => match changes_since(&store, have).await {
                Ok(changes) => {
                    if shared.0.read().unwrap().expands_groups() {
                        match member_changes(&store, have, v).await {
                            Ok(m) => {
                                let mut map = shared.0.write().unwrap();
                                for (g, member, present) in m {
                                    map.set_member(&g, &member, present);
                                }
                            }
                            Err(e) => {
                                // Retried from the same version next time.
                                tracing::warn!("group membership reload failed: {e}");
                                continue;
                            }
                        }
                    }
                    shared.apply(&changes);
                    // Versions whose changes were all no-ops still count as seen.
                    shared.0.write().unwrap().version = v;
                    on_change(v, changes.len(), via);
                }
                Err(e) => tracing::warn!("routing reload failed: {e}"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!("routing version check failed: {e}"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_fast_only_without_a_listener() {
        let ms = Duration::from_millis;
        for (listening, interval, want) in [
            (false, ms(200), ms(200)),
            (true, ms(200), ms(5000)),
            (true, ms(10_000), ms(10_000)),
            (false, ms(10_000), ms(10_000)),
        ] {
            assert_eq!(
                poll_interval(listening, interval),
                want,
                "{listening} {interval:?}"
            );
        }
    }

    fn config() -> Config {
        let mut c = Config::parse("[domains]\naccepted=[\"example.com\"]\n[platforms.old]\nrelay=[\"127.0.0.1:1\"]\n[platforms.new]\nrelay=[\"127.0.0.1:2\"]\n[routing.domains]\n\"example.org\" = \"new\"").unwrap();
        c.data_dir = std::path::PathBuf::from("/nonexistent");
        c
    }

    #[test]
    fn domain_defaults_by_the_most_specific_domain() {
        let mut c = config();
        c.routing.domains.insert("example.com".into(), "new".into());
        c.routing
            .domains
            .insert(".eu.example.com".into(), "old".into());
        c.routing
            .domains
            .insert("Lab.EU.example.com".into(), "hold".into());
        let m = RoutingMap::new(&c);
        for (addr, route) in [
            ("a@example.com", "new"),
            ("a@sub.example.com", "new"),
            ("a@eu.example.com", "new"),
            ("a@x.eu.example.com", "old"),
            ("a@lab.eu.example.com", "hold"),
            ("a@y.lab.eu.example.com", "hold"),
            ("a@example.org", "new"),
            ("a@example.net", "old"),
            ("a@notexample.com", "old"),
        ] {
            assert_eq!(m.decide(addr).route, route, "{addr}");
        }
    }

    #[test]
    fn outbound_routes_by_sender_then_domain_then_parent() {
        let mut m = RoutingMap::new(&config());
        let ov = Basis::Override {
            in_directory: false,
        };
        m.set(&outbound_key("@example.com"), Some(("new", ov)), 3);
        m.set(&outbound_key("Boss@Example.com"), Some(("mx", ov)), 4);
        m.set(&outbound_key("eu.example.org"), Some(("old", ov)), 5);
        for (sender, want) in [
            ("boss@example.com", Some("mx")),
            ("<alice@example.com>", Some("new")),
            ("a@x.eu.example.org", Some("old")),
            ("a@example.org", None),
            ("", None),
        ] {
            assert_eq!(
                m.outbound_route(sender).map(|r| r.0),
                want.map(str::to_string),
                "{sender}"
            );
        }
        // No recipient address can collide with an outbound key.
        assert_eq!(m.decide("alice@example.com").route, "old");
        assert!(
            m.outbound_route("boss@example.com")
                .unwrap()
                .1
                .contains("version 4")
        );
    }

    #[test]
    fn groups_expand_through_nesting_and_loops_within_the_limit() {
        let mut c = config();
        assert_eq!(
            RoutingMap::new(&c).expand("all@example.com"),
            Expansion::Itself
        );
        c.directory.expand_groups = true;
        c.directory.expansion_limit = 4;
        let mut m = RoutingMap::new(&c);
        for (g, member) in [
            ("all@example.com", "sales@example.com"),
            ("all@example.com", "zed@example.com"),
            ("sales@example.com", "alice@example.com"),
            ("sales@example.com", "all@example.com"), // a loop
            ("sales@example.com", "Partner@Elsewhere.test"),
            ("sales@example.com", "zed@example.com"), // twice
        ] {
            m.set_member(g, &normalize_address(member), true);
        }
        assert_eq!(
            m.expand("<ALL@example.com>"),
            Expansion::Members {
                members: vec![
                    "alice@example.com".into(),
                    "partner@elsewhere.test".into(),
                    "zed@example.com".into()
                ],
                groups: vec!["all@example.com".into(), "sales@example.com".into()],
            }
        );
        assert_eq!(m.expand("alice@example.com"), Expansion::Itself);
        for extra in ["b@example.com", "c@example.com"] {
            m.set_member("sales@example.com", extra, true);
        }
        assert_eq!(
            m.expand("all@example.com"),
            Expansion::OverLimit { limit: 4 }
        );
        // Removing members (a re-import) brings it back under the limit;
        // an emptied group is no group at all.
        m.set_member("sales@example.com", "b@example.com", false);
        assert!(
            matches!(m.expand("sales@example.com"), Expansion::Members { members, .. } if members.len() == 4)
        );
        for member in [
            "alice@example.com",
            "all@example.com",
            "partner@elsewhere.test",
            "zed@example.com",
            "c@example.com",
        ] {
            m.set_member("sales@example.com", member, false);
        }
        assert_eq!(m.expand("sales@example.com"), Expansion::Itself);
    }

    #[tokio::test]
    async fn set_decide_and_incremental_reload() {
        let t = godwit_store::testing::sqlite_temp().await;
        let store = t.store.clone();
        let cfg = config();
        let shared = SharedRoutes::new(load(&store, &cfg).await.unwrap());
        assert_eq!(shared.decide("alice@example.com").why, Why::GlobalDefault);
        assert_eq!(shared.decide("x@example.org").route, "new");

        let (v, applied) = commit(
            &store,
            &cfg,
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

        // A no-op change records no version: the history shows no `new -> new`.
        let (v2, applied) = commit(
            &store,
            &cfg,
            "t",
            "route set",
            vec![("alice@example.com".into(), Some("new".into()))],
        )
        .await
        .unwrap();
        assert_eq!((v2, applied.len()), (1, 0));
        let (_, applied) = commit(
            &store,
            &cfg,
            "t",
            "route unset",
            vec![("alice@example.com".into(), None)],
        )
        .await
        .unwrap();
        assert_eq!(applied[0].before.as_deref(), Some("new"));
        let reloaded = load(&store, &cfg).await.unwrap();
        assert_eq!(reloaded.decide("alice@example.com").route, "old");
        assert_eq!(reloaded.version(), 2);
        // Unsetting what is not set is a no-op too.
        let (v3, applied) = commit(
            &store,
            &cfg,
            "t",
            "route unset",
            vec![("alice@example.com".into(), None)],
        )
        .await
        .unwrap();
        assert_eq!((v3, applied.len()), (2, 0));
    }

    #[test]
    fn unknown_recipient_policy_applies_only_with_a_directory() {
        use godwit_config::UnknownRecipient::*;
        let dir_entry = Basis::State {
            kind: Kind::User,
            state: MigrationState::Cutover,
        };
        // (policy, directory imported, address, route, rejected at RCPT)
        let cases = [
            (Reject, true, "alice@example.com", "new", false),
            (Reject, true, "stranger@example.com", "old", true),
            (Reject, true, "Postmaster@example.com", "old", false),
            (Reject, true, "pinned@example.com", "hold", false),
            (Reject, false, "stranger@example.com", "old", false),
            (Hold, true, "stranger@example.com", "hold", false),
            (Hold, true, "stranger@example.org", "hold", false),
            (Hold, true, "postmaster@example.com", "old", false),
            (Hold, false, "stranger@example.com", "old", false),
            (Default, true, "stranger@example.com", "old", false),
            (Default, true, "stranger@example.org", "new", false),
        ];
        for (policy, directory, addr, route, rejected) in cases {
            let mut cfg = config();
            cfg.directory.unknown_recipient = policy;
            let mut map = RoutingMap::new(&cfg);
            map.set(
                "pinned@example.com",
                Some((
                    "hold",
                    Basis::Override {
                        in_directory: false,
                    },
                )),
                1,
            );
            if directory {
                map.set("alice@example.com", Some(("new", dir_entry)), 2);
            }
            let d = map.decide(addr);
            assert_eq!(
                (d.route.as_str(), map.rejects_unknown(addr)),
                (route, rejected),
                "{policy:?} directory={directory} {addr}: {:?}",
                d.why
            );
        }
        // Removing the last directory entry turns the policy off again.
        let mut cfg = config();
        cfg.directory.unknown_recipient = Reject;
        let mut map = RoutingMap::new(&cfg);
        map.set("alice@example.com", Some(("new", dir_entry)), 2);
        map.set(
            "alice@example.com",
            Some(("old", Basis::Override { in_directory: true })),
            3,
        );
        assert!(map.rejects_unknown("x@example.com"));
        map.set("alice@example.com", None, 4);
        assert!(!map.rejects_unknown("x@example.com"));
    }

    #[tokio::test]
    async fn concurrent_writers_lose_nothing() {
        let t = godwit_store::testing::sqlite_temp().await;
        let store = t.store.clone();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = Store::open(&t.url).await.unwrap();
            tasks.push(tokio::spawn(async move {
                commit(
                    &s,
                    &config(),
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
