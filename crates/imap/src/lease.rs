//! Sync work shared by a fleet (issue 17): every account is leased by one
//! sync process at a time, and every server's `max_connections_per_server`
//! is a set of connection slots leased in the store, so the cap holds summed
//! over all workers. Both leases are renewed by the process's heartbeat and
//! expire `sync.lease` after it stops, so a dead worker's accounts and
//! slots go to the others. The copy itself resumes from the shared sync
//! state (the engine pairs what a killed run appended by Message-ID and
//! digest), so a takeover copies nothing twice.
//!
//! A campaign: `godwit sync --worker` marks the selected accounts `pending`
//! unless a campaign over them is already in progress (then it joins it),
//! claims pending accounts one at a time, and exits when none is pending.
//! The decisions are the pure functions below; the SQL is a thin driver,
//! with PostgreSQL's `FOR UPDATE SKIP LOCKED` behind [`Dialect`].

use godwit_store::{Dialect, Row, Store, now_ms, sqlx};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One row of `sync_queue` as the decisions see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: String,
    pub state: String,
    pub holder: Option<String>,
    pub expires_ms: i64,
}

/// Whether a lease may be taken now: nobody holds it, or its holder stopped
/// renewing it and it expired. One that this process holds is not free:
/// its concurrent claim loops share one identity and must not share an
/// account.
pub fn lease_free(holder: Option<&str>, expires_ms: i64, now: i64) -> bool {
    match holder {
        None => true,
        Some(_) => expires_ms <= now,
    }
}

/// What a worker does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take this account (free, or its holder's lease expired).
    Claim(String),
    /// Every pending account is leased by a live worker: look again after this.
    Wait(Duration),
    /// No selected account is pending: the campaign is over for this worker.
    Done,
}

/// The next step over `rows` (the selected accounts' rows). Free accounts
/// before expired ones, so a takeover happens only when nothing else is
/// left; by address within each, so workers spread over the list in order.
pub fn next_step(rows: &[Lease], now: i64) -> Step {
    let pending: Vec<&Lease> = rows.iter().filter(|r| r.state == "pending").collect();
    let mut free: Vec<&&Lease> = pending
        .iter()
        .filter(|r| lease_free(r.holder.as_deref(), r.expires_ms, now))
        .collect();
    free.sort_by_key(|r| (r.holder.is_some(), r.address.clone()));
    if let Some(r) = free.first() {
        return Step::Claim(r.address.clone());
    }
    match pending.iter().map(|r| r.expires_ms - now).min() {
        // Look again when the first lease could expire, but at least every
        // second (its holder may finish sooner) and not busier than 50 ms.
        Some(left) => Step::Wait(Duration::from_millis(left.clamp(50, 1000) as u64)),
        None => Step::Done,
    }
}

/// Whether a campaign over `selected` must be opened: none of its accounts is
/// pending (otherwise this worker joins the one in progress).
pub fn must_open(rows: &[Lease], selected: &BTreeSet<String>) -> bool {
    !rows
        .iter()
        .any(|r| selected.contains(&r.address) && r.state == "pending")
}

/// A sync process's identity and heartbeat: renews every lease and slot it
/// holds, and cancels the accounts whose lease another worker took over
/// (this one stalled past `sync.lease`), so that two never copy one mailbox.
#[derive(Clone)]
pub struct Fleet {
    pub store: Store,
    /// Unique per process: `node:pid:start`.
    pub me: String,
    pub node: String,
    pub lease: Duration,
    held: Arc<Mutex<HashMap<String, CancellationToken>>>,
    started_ms: i64,
    /// Counts the clones: the heartbeat stops when it holds the last one.
    alive: Arc<()>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("me", &self.me).finish()
    }
}

fn rows_to_leases(rows: Vec<godwit_store::sqlx::any::AnyRow>) -> Vec<Lease> {
    rows.into_iter()
        .map(|r| Lease {
            address: r.try_get(0).unwrap_or_default(),
            state: r.try_get(1).unwrap_or_default(),
            holder: r.try_get(2).unwrap_or_default(),
            expires_ms: r.try_get(3).unwrap_or(0),
        })
        .collect()
}

impl Fleet {
    /// Starts the heartbeat (every third of the lease).
    pub fn start(store: Store, node: &str, lease: Duration) -> Fleet {
        let started_ms = now_ms();
        let fleet = Fleet {
            store,
            me: format!("{node}:{}:{started_ms}", std::process::id()),
            node: node.to_string(),
            lease,
            held: Default::default(),
            started_ms,
            alive: Arc::new(()),
        };
        let f = fleet.clone();
        tokio::spawn(async move {
            while Arc::strong_count(&f.alive) > 1 {
                if let Err(e) = f.beat().await {
                    tracing::warn!("sync heartbeat to the state store: {e}");
                }
                tokio::time::sleep(f.lease / 3).await;
            }
        });
        fleet
    }

    fn expiry(&self) -> i64 {
        now_ms() + self.lease.as_millis() as i64
    }

    async fn beat(&self) -> Result<(), sqlx::Error> {
        let exp = self.expiry();
        sqlx::query("UPDATE sync_queue SET expires_ms = $1 WHERE holder = $2")
            .bind(exp)
            .bind(&self.me)
            .execute(&self.store.pool)
            .await?;
        sqlx::query("UPDATE sync_slots SET expires_ms = $1 WHERE holder = $2")
            .bind(exp)
            .bind(&self.me)
            .execute(&self.store.pool)
            .await?;
        // What this worker held before asking the store: an account locked
        // after this point is not in the answer yet, and must not be taken
        // for one lost (a --watch round re-locks its accounts every round).
        let before: BTreeSet<String> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let still: BTreeSet<String> =
            sqlx::query_scalar("SELECT address FROM sync_queue WHERE holder = $1")
                .bind(&self.me)
                .fetch_all(&self.store.pool)
                .await?
                .into_iter()
                .collect();
        let accounts: Vec<String> = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for (address, token) in held.iter() {
                if before.contains(address) && !still.contains(address) {
                    tracing::error!(
                        account = %address,
                        "lost the lease of {address} (this worker stalled past sync.lease and another took it over): stopping its copy"
                    );
                    token.cancel();
                }
            }
            held.keys().cloned().collect()
        };
        let accounts = serde_json::to_string(&accounts).unwrap_or_default();
        sqlx::query("DELETE FROM sync_workers WHERE worker = $1")
            .bind(&self.me)
            .execute(&self.store.pool)
            .await?;
        sqlx::query("INSERT INTO sync_workers (worker, node, started_ms, seen_ms, accounts) VALUES ($1, $2, $3, $4, $5)")
            .bind(&self.me)
            .bind(&self.node)
            .bind(self.started_ms)
            .bind(now_ms())
            .bind(&accounts)
            .execute(&self.store.pool)
            .await?;
        Ok(())
    }

    /// Makes sure every selected account has a row (a plain `godwit sync`
    /// creates them `done`: it does not open a campaign).
    async fn ensure_rows(
        tx: &mut sqlx::AnyConnection,
        selected: &BTreeSet<String>,
    ) -> Result<(), sqlx::Error> {
        for a in selected {
            sqlx::query(
                "INSERT INTO sync_queue (address, state, expires_ms) VALUES ($1, 'done', 0) ON CONFLICT (address) DO NOTHING",
            )
            .bind(a)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// `--worker`: joins the campaign in progress over these accounts, or
    /// opens one (every selected account pending). Returns whether it opened.
    pub async fn join_or_open(
        &self,
        selected: &BTreeSet<String>,
    ) -> Result<bool, godwit_store::StoreError> {
        let backend = self.store.backend;
        let selected = selected.clone();
        self.store
            .write_tx(move |tx| {
                let selected = selected.clone();
                Box::pin(async move {
                    if let Some(sql) = backend.serialize_writers() {
                        sqlx::query(sql).execute(&mut *tx).await?;
                    }
                    Self::ensure_rows(tx, &selected).await?;
                    let rows = rows_to_leases(
                        sqlx::query("SELECT address, state, holder, expires_ms FROM sync_queue")
                            .fetch_all(&mut *tx)
                            .await?,
                    );
                    if !must_open(&rows, &selected) {
                        return Ok(false);
                    }
                    for a in &selected {
                        sqlx::query("UPDATE sync_queue SET state = 'pending' WHERE address = $1")
                            .bind(a)
                            .execute(&mut *tx)
                            .await?;
                    }
                    Ok(true)
                })
            })
            .await
    }

    /// Claims the next account of the campaign, or says to wait or stop.
    /// A claimed account comes with the token its lease loss cancels.
    pub async fn claim(
        &self,
        selected: &BTreeSet<String>,
    ) -> Result<(Step, Option<CancellationToken>), godwit_store::StoreError> {
        let backend = self.store.backend;
        let me = self.me.clone();
        let exp = self.expiry();
        let sel = selected.clone();
        // The candidates are read without locks and tried in `next_step`'s
        // order; a candidate another claimer's transaction holds right now is
        // skipped (SKIP LOCKED) rather than waited for. The conditional UPDATE
        // is what makes the claim exclusive on both engines.
        let claimed = self
            .store
            .write_tx(move |tx| {
                let (me, sel) = (me.clone(), sel.clone());
                Box::pin(async move {
                    let now = now_ms();
                    let mut rows: Vec<Lease> = rows_to_leases(
                        sqlx::query(
                            "SELECT address, state, holder, expires_ms FROM sync_queue \
                             WHERE state = 'pending' AND (holder IS NULL OR expires_ms <= $1)",
                        )
                        .bind(now)
                        .fetch_all(&mut *tx)
                        .await?,
                    )
                    .into_iter()
                    .filter(|r| sel.contains(&r.address))
                    .collect();
                    while let Step::Claim(address) = next_step(&rows, now) {
                        let previous = rows
                            .iter()
                            .find(|r| r.address == address)
                            .and_then(|r| r.holder.clone());
                        rows.retain(|r| r.address != address);
                        let sql = format!(
                            "SELECT address FROM sync_queue WHERE address = $1 AND state = 'pending' \
                             AND (holder IS NULL OR expires_ms <= $2){}",
                            backend.skip_locked()
                        );
                        let locked: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                            .bind(&address)
                            .bind(now)
                            .fetch_optional(&mut *tx)
                            .await?;
                        if locked.is_none() {
                            continue;
                        }
                        let n = sqlx::query(
                            "UPDATE sync_queue SET holder = $1, expires_ms = $2, claims = claims + 1 \
                             WHERE address = $3 AND state = 'pending' AND (holder IS NULL OR expires_ms <= $4)",
                        )
                        .bind(&me)
                        .bind(exp)
                        .bind(&address)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        if n == 1 {
                            return Ok(Some((address, previous)));
                        }
                    }
                    Ok(None)
                })
            })
            .await?;
        if let Some((address, previous)) = claimed {
            match previous.filter(|p| p != &self.me) {
                Some(p) => {
                    tracing::warn!(account = %address, "took over {address}: the lease of {p} expired")
                }
                None => tracing::info!(account = %address, "claimed {address}"),
            }
            return Ok((Step::Claim(address.clone()), Some(self.hold(&address))));
        }
        let rows: Vec<Lease> = rows_to_leases(
            sqlx::query("SELECT address, state, holder, expires_ms FROM sync_queue")
                .fetch_all(&self.store.pool)
                .await?,
        )
        .into_iter()
        .filter(|r| selected.contains(&r.address))
        .collect();
        Ok(match next_step(&rows, now_ms()) {
            // Free in the snapshot but not claimable a moment ago: another
            // worker is taking it. Look again soon.
            Step::Claim(_) => (Step::Wait(Duration::from_millis(50)), None),
            other => (other, None),
        })
    }

    fn hold(&self, address: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(address.to_string(), token.clone());
        token
    }

    /// A plain `godwit sync`: waits until it holds the account's lease.
    pub async fn lock(&self, address: &str) -> Result<CancellationToken, godwit_store::StoreError> {
        let mut said = false;
        loop {
            let (me, exp, a) = (self.me.clone(), self.expiry(), address.to_string());
            let got = self
                .store
                .write_tx(move |tx| {
                    let (me, a) = (me.clone(), a.clone());
                    Box::pin(async move {
                        Self::ensure_rows(tx, &BTreeSet::from([a.clone()])).await?;
                        let n = sqlx::query(
                            "UPDATE sync_queue SET holder = $1, expires_ms = $2 \
                             WHERE address = $3 AND (holder IS NULL OR expires_ms <= $4)",
                        )
                        .bind(&me)
                        .bind(exp)
                        .bind(&a)
                        .bind(now_ms())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        Ok(n == 1)
                    })
                })
                .await?;
            if got {
                return Ok(self.hold(address));
            }
            if !said {
                said = true;
                tracing::info!(account = %address, "{address} is being synced by another process: waiting for it");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Gives the account back; `state` is `Some("done"/"failed")` for a
    /// campaign's account, `None` for a plain sync's lock.
    pub async fn release(&self, address: &str, state: Option<&str>) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(address);
        let r = match state {
            Some(s) => sqlx::query(
                "UPDATE sync_queue SET holder = NULL, expires_ms = 0, state = $1, done_ms = $2, done_by = $3 \
                 WHERE address = $4 AND holder = $3",
            )
            .bind(s)
            .bind(now_ms())
            .bind(&self.me)
            .bind(address)
            .execute(&self.store.pool)
            .await,
            None => sqlx::query(
                "UPDATE sync_queue SET holder = NULL, expires_ms = 0 WHERE address = $1 AND holder = $2",
            )
            .bind(address)
            .bind(&self.me)
            .execute(&self.store.pool)
            .await,
        };
        if let Err(e) = r {
            // The lease expires by itself; another worker then redoes a delta.
            tracing::warn!(account = %address, "releasing the lease of {address}: {e}");
        }
    }

    /// Connection slots of `server` (its `host:port`) under `cap`, fleet-wide.
    pub fn slots(&self, server: &str, cap: usize) -> Arc<FleetSlots> {
        Arc::new(FleetSlots {
            fleet: self.clone(),
            server: server.to_string(),
            cap: cap.max(1) as i64,
            ready: tokio::sync::OnceCell::new(),
        })
    }
}

/// One server's connection slots in the store.
#[derive(Debug)]
pub struct FleetSlots {
    fleet: Fleet,
    server: String,
    cap: i64,
    ready: tokio::sync::OnceCell<()>,
}

impl FleetSlots {
    /// Takes a free slot now, if there is one; returns its number.
    pub async fn try_take(&self) -> Option<i64> {
        match self.try_take_inner().await {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(server = %self.server, "connection slot in the state store: {e}");
                None
            }
        }
    }

    async fn try_take_inner(&self) -> Result<Option<i64>, sqlx::Error> {
        let pool = &self.fleet.store.pool;
        self.ready
            .get_or_try_init(|| async {
                for slot in 0..self.cap {
                    sqlx::query("INSERT INTO sync_slots (server, slot, expires_ms) VALUES ($1, $2, 0) ON CONFLICT (server, slot) DO NOTHING")
                        .bind(&self.server)
                        .bind(slot)
                        .execute(pool)
                        .await?;
                }
                Ok::<(), sqlx::Error>(())
            })
            .await?;
        let now = now_ms();
        // Slots at or above the cap (a lowered cap) are never handed out.
        let sql = format!(
            "UPDATE sync_slots SET holder = $1, expires_ms = $2 WHERE server = $3 AND slot = \
             (SELECT slot FROM sync_slots WHERE server = $3 AND slot < $4 AND (holder IS NULL OR expires_ms <= $5) \
              ORDER BY slot LIMIT 1{}) \
             AND (holder IS NULL OR expires_ms <= $5) RETURNING slot",
            self.fleet.store.backend.skip_locked()
        );
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
            .bind(&self.fleet.me)
            .bind(self.fleet.expiry())
            .bind(&self.server)
            .bind(self.cap)
            .bind(now)
            .fetch_optional(pool)
            .await
    }

    /// Waits for a slot.
    pub async fn take(&self) -> i64 {
        let mut pause = 20u64;
        loop {
            if let Some(slot) = self.try_take().await {
                return slot;
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            pause = (pause * 2).min(250);
        }
    }

    pub async fn give_back(&self, slot: i64) {
        let r = sqlx::query("UPDATE sync_slots SET holder = NULL, expires_ms = 0 WHERE server = $1 AND slot = $2 AND holder = $3")
            .bind(&self.server)
            .bind(slot)
            .bind(&self.fleet.me)
            .execute(&self.fleet.store.pool)
            .await;
        if let Err(e) = r {
            tracing::warn!(server = %self.server, "giving back connection slot {slot}: {e} (it expires by itself)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(a: &str, state: &str, holder: Option<&str>, exp: i64) -> Lease {
        Lease {
            address: a.into(),
            state: state.into(),
            holder: holder.map(Into::into),
            expires_ms: exp,
        }
    }

    #[test]
    fn lease_free_table() {
        // (holder, expires, now, free)
        let cases: &[(Option<&str>, i64, i64, bool)] = &[
            (None, 0, 100, true),
            // Held by this very process (another of its claim loops).
            (Some("me"), 500, 100, false),
            (Some("other"), 500, 100, false),
            (Some("other"), 100, 100, true),
            (Some("other"), 99, 100, true),
        ];
        for (holder, exp, now, want) in cases {
            assert_eq!(
                lease_free(*holder, *exp, *now),
                *want,
                "{holder:?} {exp} {now}"
            );
        }
    }

    #[test]
    fn next_step_table() {
        let now = 1000;
        let cases: Vec<(Vec<Lease>, Step)> = vec![
            (vec![], Step::Done),
            (
                vec![row("a", "done", None, 0), row("b", "failed", None, 0)],
                Step::Done,
            ),
            (
                vec![row("b", "pending", None, 0), row("a", "pending", None, 0)],
                Step::Claim("a".into()),
            ),
            // A free account before taking over an expired one.
            (
                vec![
                    row("a", "pending", Some("dead"), 10),
                    row("b", "pending", None, 0),
                ],
                Step::Claim("b".into()),
            ),
            (
                vec![row("a", "pending", Some("dead"), 10)],
                Step::Claim("a".into()),
            ),
            // All held by live workers: wait for the first expiry, 50 ms..1 s.
            (
                vec![
                    row("a", "pending", Some("w2"), 1300),
                    row("b", "pending", Some("w3"), 1200),
                ],
                Step::Wait(Duration::from_millis(200)),
            ),
            (
                vec![row("a", "pending", Some("w2"), 60_000)],
                Step::Wait(Duration::from_millis(1000)),
            ),
            (
                vec![row("a", "pending", Some("w2"), 1001)],
                Step::Wait(Duration::from_millis(50)),
            ),
            // Held leases of done accounts (a plain sync) are not waited for.
            (vec![row("a", "done", Some("w2"), 60_000)], Step::Done),
        ];
        for (rows, want) in cases {
            assert_eq!(next_step(&rows, now), want, "{rows:?}");
        }
    }

    #[test]
    fn must_open_table() {
        let sel: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let cases: Vec<(Vec<Lease>, bool)> = vec![
            (vec![], true),
            (
                vec![row("a", "done", None, 0), row("b", "done", None, 0)],
                true,
            ),
            (
                vec![row("a", "done", None, 0), row("b", "pending", None, 0)],
                false,
            ),
            // Another selection's campaign does not count.
            (vec![row("c", "pending", None, 0)], true),
        ];
        for (rows, want) in cases {
            assert_eq!(must_open(&rows, &sel), want, "{rows:?}");
        }
    }

    async fn stores() -> Vec<(tempfile::TempDir, Store)> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display());
        let mut out = vec![(dir, Store::open(&url).await.unwrap())];
        if let Some(pg) = godwit_store::test_postgres_url("GODWIT_TEST_POSTGRES_URL") {
            // Shared with other tests: each uses addresses of its own.
            out.push((
                tempfile::tempdir().unwrap(),
                Store::open(&pg).await.unwrap(),
            ));
        }
        out
    }

    /// Two claimers racing over 20 accounts on each engine: every account
    /// is claimed exactly once; slots never exceed the cap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_are_exclusive_and_slots_capped() {
        for (_dir, store) in stores().await {
            let tag = format!("{}-{}", now_ms(), std::process::id());
            let sel: BTreeSet<String> = (0..20).map(|i| format!("u{i:02}@{tag}")).collect();
            let a = Fleet::start(store.clone(), "a", Duration::from_secs(30));
            let b = Fleet::start(store.clone(), "b", Duration::from_secs(30));
            assert!(a.join_or_open(&sel).await.unwrap());
            assert!(!b.join_or_open(&sel).await.unwrap(), "b joins a's campaign");
            let mut tasks = tokio::task::JoinSet::new();
            for f in [a.clone(), b.clone(), a.clone(), b.clone()] {
                let sel = sel.clone();
                tasks.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        match f.claim(&sel).await.unwrap() {
                            (Step::Claim(addr), _) => {
                                f.release(&addr, Some("done")).await;
                                mine.push(addr);
                            }
                            (Step::Wait(d), _) => tokio::time::sleep(d).await,
                            (Step::Done, _) => return mine,
                        }
                    }
                });
            }
            let mut all = Vec::new();
            while let Some(r) = tasks.join_next().await {
                all.extend(r.unwrap());
            }
            all.sort();
            assert_eq!(
                all,
                sel.iter().cloned().collect::<Vec<_>>(),
                "{:?}",
                store.backend
            );

            let server = format!("h-{tag}:1");
            let (sa, sb) = (a.slots(&server, 2), b.slots(&server, 2));
            let s1 = sa.try_take().await.unwrap();
            let s2 = sb.try_take().await.unwrap();
            assert_ne!(s1, s2);
            assert_eq!(sa.try_take().await, None, "a third slot over cap 2");
            sb.give_back(s2).await;
            assert_eq!(sa.try_take().await, Some(s2));
        }
    }

    /// A holder that stops renewing loses the account after the lease.
    #[tokio::test]
    async fn expired_lease_is_taken_over() {
        for (_dir, store) in stores().await {
            let only = format!("only@{}-{}", now_ms(), std::process::id());
            let sel: BTreeSet<String> = [only.clone()].into();
            let dead = Fleet {
                store: store.clone(),
                me: "dead:1:1".into(),
                node: "dead".into(),
                lease: Duration::from_secs(2),
                held: Default::default(),
                started_ms: 0,
                alive: Arc::new(()),
            };
            dead.join_or_open(&sel).await.unwrap();
            // (Wait only while another test's claimer holds a row lock.)
            while !matches!(dead.claim(&sel).await.unwrap().0, Step::Claim(_)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let live = Fleet::start(store.clone(), "live", Duration::from_secs(30));
            let (step, _) = live.claim(&sel).await.unwrap();
            assert!(matches!(step, Step::Wait(_)), "{step:?}");
            let start = std::time::Instant::now();
            loop {
                match live.claim(&sel).await.unwrap().0 {
                    Step::Claim(a) => {
                        assert_eq!(a, only);
                        break;
                    }
                    Step::Wait(d) => tokio::time::sleep(d).await,
                    Step::Done => panic!("not done before it was synced"),
                }
                assert!(start.elapsed() < Duration::from_secs(5));
            }
            live.release(&only, Some("done")).await;
            assert_eq!(live.claim(&sel).await.unwrap().0, Step::Done);
        }
    }
}
