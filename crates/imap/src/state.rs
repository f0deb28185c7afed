//! Sync state in the store (migration `0100_sync.sql`): what was copied where,
//! so that no rerun copies anything twice, and each account's status, which the
//! control plane's cutover guard reads.

use godwit_store::{Row, Store, now_ms, sqlx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Copy under way (or interrupted): the account is not ready for cutover.
    Seeding,
    /// Every folder was copied; verify has not yet passed.
    Ready,
    /// Verify found both sides equal; `verified_at_ms` is when it started.
    Verified,
    /// Verify found a difference (`last_error` says which): the cutover guard
    /// refuses the account until a later verify is clean.
    Differs,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Seeding => "seeding",
            Status::Ready => "ready",
            Status::Verified => "verified",
            Status::Differs => "differs",
        }
    }
    fn parse(s: &str) -> Status {
        match s {
            "verified" => Status::Verified,
            "ready" => Status::Ready,
            "differs" => Status::Differs,
            _ => Status::Seeding,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountStatus {
    pub address: String,
    pub status: Status,
    pub status_at_ms: i64,
    /// When verify last passed, even if a later sync moved the status back.
    pub verified_at_ms: Option<i64>,
    /// When the last sync run started.
    pub synced_at_ms: Option<i64>,
    pub last_error: Option<String>,
}

/// The cutover guard's question: where is this mailbox's copy? `None` means no
/// sync ever ran for it.
pub async fn account_status(
    store: &Store,
    address: &str,
) -> Result<Option<AccountStatus>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT address, status, status_at_ms, verified_at_ms, last_error, synced_at_ms FROM sync_accounts WHERE address = $1",
    )
    .bind(address.to_ascii_lowercase())
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.map(|r| AccountStatus {
        address: r.get(0),
        status: Status::parse(&r.get::<String, _>(1)),
        status_at_ms: r.get(2),
        verified_at_ms: r.get(3),
        last_error: r.get(4),
        synced_at_ms: r.get(5),
    }))
}

/// A sync run starts: the account is `seeding`, and no verify before this
/// instant proves anything about it any more.
pub async fn sync_run_started(store: &Store, address: &str) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO sync_accounts (address, status, status_at_ms, synced_at_ms) VALUES ($1, 'seeding', $2, $2) \
         ON CONFLICT (address) DO UPDATE SET status = 'seeding', status_at_ms = excluded.status_at_ms, \
         synced_at_ms = excluded.synced_at_ms, last_error = NULL",
    )
    .bind(address.to_ascii_lowercase())
    .bind(now)
    .execute(&store.pool)
    .await?;
    Ok(())
}

/// A verify that started at `started_ms` found both sides equal.
pub async fn set_verified(
    store: &Store,
    address: &str,
    started_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sync_accounts (address, status, status_at_ms, verified_at_ms) VALUES ($1, 'verified', $2, $3) \
         ON CONFLICT (address) DO UPDATE SET status = 'verified', status_at_ms = excluded.status_at_ms, \
         verified_at_ms = excluded.verified_at_ms, last_error = NULL",
    )
    .bind(address.to_ascii_lowercase())
    .bind(now_ms())
    .bind(started_ms)
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub async fn set_account_status(
    store: &Store,
    address: &str,
    status: Status,
    error: Option<&str>,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    let verified = (status == Status::Verified).then_some(now);
    sqlx::query(
        "INSERT INTO sync_accounts (address, status, status_at_ms, verified_at_ms, last_error) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (address) DO UPDATE SET status = excluded.status, status_at_ms = excluded.status_at_ms, \
         verified_at_ms = COALESCE(excluded.verified_at_ms, sync_accounts.verified_at_ms), last_error = excluded.last_error",
    )
    .bind(address.to_ascii_lowercase())
    .bind(status.as_str())
    .bind(now)
    .bind(verified)
    .bind(error.map(str::to_string))
    .execute(&store.pool)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderState {
    pub target_folder: String,
    pub source_uidvalidity: u32,
    pub target_uidvalidity: u32,
    pub source_uidnext: u32,
    pub source_highestmodseq: u64,
    pub source_exists: u32,
}

pub async fn folder_state(
    store: &Store,
    address: &str,
    source_folder: &str,
) -> Result<Option<FolderState>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT target_folder, source_uidvalidity, target_uidvalidity, source_uidnext, source_highestmodseq, source_exists \
         FROM sync_folders WHERE address = $1 AND source_folder = $2",
    )
    .bind(address)
    .bind(source_folder)
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.map(|r| FolderState {
        target_folder: r.get(0),
        source_uidvalidity: r.get::<i64, _>(1) as u32,
        target_uidvalidity: r.get::<i64, _>(2) as u32,
        source_uidnext: r.get::<i64, _>(3) as u32,
        source_highestmodseq: r.get::<i64, _>(4) as u64,
        source_exists: r.get::<i64, _>(5) as u32,
    }))
}

pub async fn save_folder_state(
    store: &Store,
    address: &str,
    source_folder: &str,
    s: &FolderState,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sync_folders (address, source_folder, target_folder, source_uidvalidity, target_uidvalidity, \
         source_uidnext, source_highestmodseq, source_exists, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (address, source_folder) DO UPDATE SET target_folder = excluded.target_folder, \
         source_uidvalidity = excluded.source_uidvalidity, target_uidvalidity = excluded.target_uidvalidity, \
         source_uidnext = excluded.source_uidnext, source_highestmodseq = excluded.source_highestmodseq, \
         source_exists = excluded.source_exists, updated_at_ms = excluded.updated_at_ms",
    )
    .bind(address)
    .bind(source_folder)
    .bind(&s.target_folder)
    .bind(i64::from(s.source_uidvalidity))
    .bind(i64::from(s.target_uidvalidity))
    .bind(i64::from(s.source_uidnext))
    .bind(s.source_highestmodseq as i64)
    .bind(i64::from(s.source_exists))
    .bind(now_ms())
    .execute(&store.pool)
    .await?;
    Ok(())
}

/// One copied (or re-paired) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub source_uidvalidity: u32,
    pub source_uid: u32,
    pub target_folder: String,
    pub target_uidvalidity: u32,
    pub target_uid: Option<u32>,
    pub message_id: Option<String>,
    /// SHA-256 of the raw message, hex.
    pub digest: String,
    /// Space-separated, sorted, without `\Recent`.
    pub flags: String,
}

pub async fn messages(
    store: &Store,
    address: &str,
    source_folder: &str,
) -> Result<Vec<MessageRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT source_uidvalidity, source_uid, target_folder, target_uidvalidity, target_uid, message_id, digest, flags \
         FROM sync_messages WHERE address = $1 AND source_folder = $2",
    )
    .bind(address)
    .bind(source_folder)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| MessageRow {
            source_uidvalidity: r.get::<i64, _>(0) as u32,
            source_uid: r.get::<i64, _>(1) as u32,
            target_folder: r.get(2),
            target_uidvalidity: r.get::<i64, _>(3) as u32,
            target_uid: r.get::<Option<i64>, _>(4).map(|u| u as u32),
            message_id: r.get(5),
            digest: r.get(6),
            flags: r.get(7),
        })
        .collect())
}

pub async fn count_messages(
    store: &Store,
    address: &str,
    source_folder: &str,
    uidvalidity: u32,
) -> Result<u64, sqlx::Error> {
    let row = sqlx::query(
        "SELECT COUNT(*) FROM sync_messages WHERE address = $1 AND source_folder = $2 AND source_uidvalidity = $3",
    )
    .bind(address)
    .bind(source_folder)
    .bind(i64::from(uidvalidity))
    .fetch_one(&store.pool)
    .await?;
    Ok(row.get::<i64, _>(0) as u64)
}

/// Records rows in one transaction (upsert: a re-pairing replaces the old row).
pub async fn record_messages(
    store: &Store,
    address: &str,
    source_folder: &str,
    rows: &[MessageRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut tx = store.pool.begin().await?;
    let now = now_ms();
    for m in rows {
        sqlx::query(
            "INSERT INTO sync_messages (address, source_folder, source_uidvalidity, source_uid, target_folder, \
             target_uidvalidity, target_uid, message_id, digest, flags, copied_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (address, source_folder, source_uidvalidity, source_uid) DO UPDATE SET \
             target_folder = excluded.target_folder, target_uidvalidity = excluded.target_uidvalidity, \
             target_uid = excluded.target_uid, message_id = excluded.message_id, digest = excluded.digest, \
             flags = excluded.flags",
        )
        .bind(address)
        .bind(source_folder)
        .bind(i64::from(m.source_uidvalidity))
        .bind(i64::from(m.source_uid))
        .bind(&m.target_folder)
        .bind(i64::from(m.target_uidvalidity))
        .bind(m.target_uid.map(i64::from))
        .bind(m.message_id.clone())
        .bind(&m.digest)
        .bind(&m.flags)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Drops rows: messages expunged on the source (with `--propagate-deletes`), or
/// the rows of a UIDVALIDITY that no longer exists after re-pairing.
pub async fn forget_messages(
    store: &Store,
    address: &str,
    source_folder: &str,
    keys: &[(u32, u32)],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut tx = store.pool.begin().await?;
    for (validity, uid) in keys {
        sqlx::query(
            "DELETE FROM sync_messages WHERE address = $1 AND source_folder = $2 AND source_uidvalidity = $3 AND source_uid = $4",
        )
        .bind(address)
        .bind(source_folder)
        .bind(i64::from(*validity))
        .bind(i64::from(*uid))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

pub async fn record_skipped(
    store: &Store,
    address: &str,
    source_folder: &str,
    source_uidvalidity: u32,
    source_uid: u32,
    message_id: Option<&str>,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sync_skipped (address, source_folder, source_uidvalidity, source_uid, message_id, reason, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (address, source_folder, source_uidvalidity, source_uid) \
         DO UPDATE SET reason = excluded.reason, at_ms = excluded.at_ms",
    )
    .bind(address)
    .bind(source_folder)
    .bind(i64::from(source_uidvalidity))
    .bind(i64::from(source_uid))
    .bind(message_id.map(str::to_string))
    .bind(reason)
    .bind(now_ms())
    .execute(&store.pool)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub source_uid: u32,
    pub message_id: Option<String>,
    pub reason: String,
}

pub async fn skipped(
    store: &Store,
    address: &str,
    source_folder: &str,
) -> Result<Vec<Skipped>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT source_uid, message_id, reason FROM sync_skipped WHERE address = $1 AND source_folder = $2 ORDER BY source_uid",
    )
    .bind(address)
    .bind(source_folder)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Skipped {
            source_uid: r.get::<i64, _>(0) as u32,
            message_id: r.get(1),
            reason: r.get(2),
        })
        .collect())
}

pub async fn record_event(
    store: &Store,
    address: &str,
    kind: &str,
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO sync_events (address, at_ms, kind, detail) VALUES ($1, $2, $3, $4)")
        .bind(address)
        .bind(now_ms())
        .bind(kind)
        .bind(detail)
        .execute(&store.pool)
        .await?;
    Ok(())
}

pub async fn events(store: &Store, address: &str, kind: &str) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT detail FROM sync_events WHERE address = $1 AND kind = $2 ORDER BY at_ms",
    )
    .bind(address)
    .bind(kind)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_round_trip_keeps_verified_time() {
        let t = godwit_store::testing::sqlite_temp().await;
        round_trip(&t.store).await;
    }

    /// The same SQL on PostgreSQL, in a scratch database of its own
    /// (`godwit_store::testing::postgres_scratch`: GODWIT_TEST_POSTGRES).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_round_trip_on_postgres() {
        godwit_store::testing::with_postgres("godwit_imap_state", 1, |urls| async move {
            let store = Store::open(&urls[0]).await.unwrap();
            round_trip(&store).await;
            store.pool.close().await;
        })
        .await;
    }

    async fn round_trip(store: &Store) {
        let store = store.clone();
        assert!(account_status(&store, "a@x.test").await.unwrap().is_none());
        set_account_status(&store, "A@x.test", Status::Seeding, None)
            .await
            .unwrap();
        assert_eq!(
            account_status(&store, "a@x.test")
                .await
                .unwrap()
                .unwrap()
                .status,
            Status::Seeding
        );
        set_account_status(&store, "a@x.test", Status::Verified, None)
            .await
            .unwrap();
        let v = account_status(&store, "a@x.test").await.unwrap().unwrap();
        assert_eq!(v.status, Status::Verified);
        assert!(v.verified_at_ms.is_some());
        set_account_status(&store, "a@x.test", Status::Seeding, Some("delta running"))
            .await
            .unwrap();
        let s = account_status(&store, "a@x.test").await.unwrap().unwrap();
        assert_eq!(
            (s.status, s.verified_at_ms),
            (Status::Seeding, v.verified_at_ms)
        );

        let row = MessageRow {
            source_uidvalidity: 7,
            source_uid: 1,
            target_folder: "Sent Items".into(),
            target_uidvalidity: 9,
            target_uid: Some(3),
            message_id: None,
            digest: "ab".into(),
            flags: "\\Seen".into(),
        };
        record_messages(&store, "a@x.test", "Sent", std::slice::from_ref(&row))
            .await
            .unwrap();
        record_messages(&store, "a@x.test", "Sent", std::slice::from_ref(&row))
            .await
            .unwrap();
        assert_eq!(
            messages(&store, "a@x.test", "Sent").await.unwrap(),
            vec![row]
        );
        forget_messages(&store, "a@x.test", "Sent", &[(7, 1)])
            .await
            .unwrap();
        assert!(
            messages(&store, "a@x.test", "Sent")
                .await
                .unwrap()
                .is_empty()
        );
    }
}
