//! The cutover guard's evidence: whether the sync engine has proven a
//! mailbox's copy (`sync_accounts`, crates/imap), and whether a wave member
//! may move without `--force`. Pure decisions, table-tested, plus the read
//! of the sync records they decide on.

use crate::model::{Kind, MigrationState};
use crate::normalize_address;
use godwit_store::sqlx;
use godwit_store::{Store, now_ms};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One account's row in the sync engine's `sync_accounts` table (migrations
/// 0100 and 0101; the table belongs to crates/imap).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncRecord {
    /// `seeding`, `ready` (copied, not proven), `verified` or `differs`.
    pub status: String,
    pub status_at_ms: i64,
    /// When the last clean verify started (what it proves is the state then).
    pub verified_at_ms: Option<i64>,
    /// When the last sync run started.
    pub synced_at_ms: Option<i64>,
    pub last_error: Option<String>,
}

/// Whether a mailbox's copy is proven complete: its last verify was clean,
/// came after its last sync run, and is at most `max_verify_age` old. The
/// error is the reason, for the operator (the seed's Task 12: "if destination
/// counts are wildly lower, do not cut over that user").
pub fn sync_proof(rec: &SyncRecord, now_ms: i64, max_verify_age: Duration) -> Result<(), String> {
    let why = |s: &str| match rec.last_error.as_deref() {
        Some(e) if !e.is_empty() => format!("{s}: {e}"),
        _ => s.to_string(),
    };
    match rec.status.as_str() {
        "verified" => {
            let Some(v) = rec.verified_at_ms else {
                return Err("verified without a time: run godwit verify".into());
            };
            if rec.synced_at_ms.is_some_and(|s| v < s) {
                return Err(
                    "the last verify came before the last sync run: run godwit verify".into(),
                );
            }
            let age = Duration::from_millis(now_ms.saturating_sub(v).max(0) as u64);
            if age > max_verify_age {
                return Err(format!(
                    "the last clean verify is {} old, more than directory.max_verify_age ({}): run godwit verify",
                    human(age),
                    human(max_verify_age)
                ));
            }
            Ok(())
        }
        "differs" => Err(why("the last verify found differences")),
        "ready" => Err(why("copied but not verified (run godwit verify)")),
        "seeding" => Err(why("the sync has not finished")),
        other => Err(format!("unknown sync status `{other}`")),
    }
}

/// A duration as people read it, to the second.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 if d.subsec_millis() == 0 => format!("{s}s"),
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One line on a mailbox's sync for `wave show`, `directory list` and
/// `route explain`: proven, or why not.
pub fn sync_summary(rec: &SyncRecord, now_ms: i64, max_verify_age: Duration) -> String {
    match sync_proof(rec, now_ms, max_verify_age) {
        Ok(()) => format!(
            "verified clean {} ago",
            human(Duration::from_millis(
                now_ms
                    .saturating_sub(rec.verified_at_ms.unwrap_or(now_ms))
                    .max(0) as u64
            ))
        ),
        Err(why) => format!("{}: {why}", rec.status),
    }
}

/// Every account's sync record, keyed by normalized address. Until the sync
/// engine's table exists (or if its shape differs), no account has one.
pub async fn sync_records(store: &Store) -> BTreeMap<String, SyncRecord> {
    type R = (
        String,
        String,
        i64,
        Option<i64>,
        Option<i64>,
        Option<String>,
    );
    let rows: Result<Vec<R>, _> = sqlx::query_as(
        "SELECT address, status, status_at_ms, verified_at_ms, synced_at_ms, last_error FROM sync_accounts",
    )
    .fetch_all(&store.pool)
    .await;
    match rows {
        Ok(rows) => rows
            .into_iter()
            .map(
                |(a, status, status_at_ms, verified_at_ms, synced_at_ms, last_error)| {
                    (
                        normalize_address(&a),
                        SyncRecord {
                            status,
                            status_at_ms,
                            verified_at_ms,
                            synced_at_ms,
                            last_error,
                        },
                    )
                },
            )
            .collect(),
        Err(e) => {
            tracing::debug!(
                "no sync status available ({e}); the directory state decides readiness"
            );
            BTreeMap::new()
        }
    }
}

/// The accounts whose copy is proven (see `sync_proof`).
pub async fn sync_ready_accounts(store: &Store, max_verify_age: Duration) -> BTreeSet<String> {
    let now = now_ms();
    sync_records(store)
        .await
        .into_iter()
        .filter(|(_, r)| sync_proof(r, now, max_verify_age).is_ok())
        .map(|(a, _)| a)
        .collect()
}

/// Whether a wave member may be cut over without `--force`, or why not.
/// Groups have no mailbox to sync. When godwit syncs the mailbox (it has a
/// sync record), only the sync's proof counts: a directory state set by hand
/// cannot outvote a verify that found a difference. A mailbox godwit does not
/// sync (moved by another tool) is admitted by its directory state `ready`,
/// or `rolled-back` (it was ready when it first moved).
pub fn ready_for_cutover(
    kind: Kind,
    state: MigrationState,
    sync: Option<Result<(), String>>,
) -> Result<(), String> {
    if kind == Kind::Group {
        return Ok(());
    }
    match sync {
        Some(proof) => proof,
        None if matches!(state, MigrationState::Ready | MigrationState::RolledBack) => Ok(()),
        None => Err(format!(
            "no sync has run for it and its directory state is {state}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard's decision, row by row: only a clean verify after the last
    /// sync run, within max_verify_age, is proof.
    #[test]
    fn only_a_fresh_clean_verify_after_the_last_sync_is_proof() {
        const H: i64 = 3_600_000;
        let now = 100 * H;
        let max = Duration::from_secs(3600);
        let rec = |status: &str, verified: Option<i64>, synced: Option<i64>, err: Option<&str>| {
            SyncRecord {
                status: status.into(),
                status_at_ms: now,
                verified_at_ms: verified,
                synced_at_ms: synced,
                last_error: err.map(str::to_string),
            }
        };
        let cases: [(SyncRecord, Result<(), &str>); 8] = [
            (
                rec("verified", Some(now - H / 2), Some(now - H), None),
                Ok(()),
            ),
            (rec("verified", Some(now - H), Some(now - H), None), Ok(())),
            (
                rec("verified", Some(now - 2 * H), Some(now - 3 * H), None),
                Err("2h0m old, more than directory.max_verify_age (1h0m)"),
            ),
            (
                rec("verified", Some(now - H / 2), Some(now - H / 4), None),
                Err("came before the last sync run"),
            ),
            (rec("verified", None, None, None), Err("without a time")),
            (
                rec(
                    "differs",
                    Some(now - H / 2),
                    None,
                    Some("verify: 1 folder pair(s) differ"),
                ),
                Err("the last verify found differences: verify: 1 folder pair(s) differ"),
            ),
            (
                rec("ready", Some(now - H / 2), None, None),
                Err("copied but not verified"),
            ),
            (
                rec("seeding", None, Some(now), Some("connection lost")),
                Err("the sync has not finished: connection lost"),
            ),
        ];
        for (r, want) in cases {
            let got = sync_proof(&r, now, max);
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(w), Err(g)) => assert!(g.contains(w), "{r:?}: `{g}` should contain `{w}`"),
                _ => panic!("{r:?}: got {got:?}, want {want:?}"),
            }
        }
        let clean = rec("verified", Some(now - 90_000), Some(now - H), None);
        assert_eq!(sync_summary(&clean, now, max), "verified clean 1m30s ago");
        assert!(
            sync_summary(&rec("ready", None, None, None), now, max).starts_with("ready: copied")
        );
    }

    #[test]
    fn groups_need_no_sync_and_a_sync_record_outvotes_the_directory_state() {
        use MigrationState::*;
        let no = || Some(Err("the last verify found differences".to_string()));
        let cases = [
            (Kind::Group, Pending, None, true),
            (Kind::Group, Pending, no(), true),
            (Kind::User, Pending, Some(Ok(())), true),
            (Kind::Shared, Seeding, Some(Ok(())), true),
            (Kind::User, Ready, None, true),
            (Kind::User, RolledBack, None, true),
            (Kind::User, Pending, None, false),
            // An operator's `ready` cannot outvote a verify that found a difference.
            (Kind::User, Ready, no(), false),
            (Kind::User, RolledBack, no(), false),
        ];
        for (kind, state, sync, admitted) in cases {
            let got = ready_for_cutover(kind, state, sync.clone());
            assert_eq!(got.is_ok(), admitted, "{kind} {state} {sync:?}: {got:?}");
        }
        let why = ready_for_cutover(Kind::User, Pending, None).unwrap_err();
        assert!(why.contains("no sync has run"), "{why}");
    }
}
