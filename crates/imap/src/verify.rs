//! The proof: both servers read independently of the sync state, per folder pair.
//!
//! Messages are keyed by Message-ID, or, without one, by size and INTERNALDATE.
//! A key counted more often on the target than on the source is a duplicate;
//! less often, missing. Flags (without `\Recent`) and INTERNALDATE instants are
//! compared as multisets per key. Messages only on the target (new mail there,
//! or deletes not propagated) are listed but do not make a folder unclean.

use crate::conn::{Conn, Login};
use crate::engine::{Endpoints, flag_string, flags_of, list, message_id};
use crate::state::{self, Skipped};
use crate::{ImapError, mapping};
use async_imap::types::Fetch;
use futures::TryStreamExt;
use godwit_store::Store;
use std::collections::BTreeMap;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    pub message: String,
    pub source: String,
    pub target: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FolderCheck {
    pub source: String,
    pub target: String,
    pub source_count: u64,
    pub target_count: u64,
    pub missing_on_target: Vec<String>,
    pub missing_on_source: Vec<String>,
    pub duplicates_on_target: Vec<String>,
    pub flag_differences: Vec<Difference>,
    pub date_differences: Vec<Difference>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
    pub error: Option<String>,
    /// ACL entries (mapped to target users) that the target lacks or holds
    /// with other rights, with sync.acls.
    pub acl_differences: Vec<String>,
}

impl FolderCheck {
    pub fn is_clean(&self) -> bool {
        self.acl_differences.is_empty()
            && self.error.is_none()
            && self.missing_on_target.is_empty()
            && self.duplicates_on_target.is_empty()
            && self.flag_differences.is_empty()
            && self.date_differences.is_empty()
            && self.skipped.is_empty()
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AccountCheck {
    pub address: String,
    pub clean: bool,
    pub folders: Vec<FolderCheck>,
    pub error: Option<String>,
}

type Snapshot = BTreeMap<String, Vec<(String, i64)>>;

async fn snapshot(conn: &mut Conn, wire: &str) -> Result<(u64, Snapshot), ImapError> {
    let mbox = conn.session.examine(wire).await?;
    let mut snap = Snapshot::new();
    let mut count = 0;
    if mbox.exists > 0 {
        let fetches: Vec<Fetch> = conn
            .session
            .uid_fetch(
                "1:*",
                "(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER])",
            )
            .await?
            .try_collect()
            .await?;
        for f in &fetches {
            count += 1;
            let date = f.internal_date().map(|d| d.timestamp()).unwrap_or(0);
            let key = f.header().and_then(message_id).unwrap_or_else(|| {
                format!("(no Message-ID, {} bytes, {})", f.size.unwrap_or(0), date)
            });
            snap.entry(key)
                .or_default()
                .push((flag_string(flags_of(f).into_iter()), date));
        }
    }
    conn.drain_unsolicited();
    Ok((count, snap))
}

pub fn compare(check: &mut FolderCheck, src: &Snapshot, tgt: &Snapshot) {
    let empty = Vec::new();
    for key in src
        .keys()
        .chain(tgt.keys().filter(|k| !src.contains_key(*k)))
    {
        let s = src.get(key).unwrap_or(&empty);
        let t = tgt.get(key).unwrap_or(&empty);
        if s.is_empty() {
            check.missing_on_source.push(key.clone());
        } else if t.len() < s.len() {
            check.missing_on_target.push(key.clone());
        } else if t.len() > s.len() {
            check.duplicates_on_target.push(key.clone());
        } else {
            let mut sf: Vec<&str> = s.iter().map(|x| x.0.as_str()).collect();
            let mut tf: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
            sf.sort_unstable();
            tf.sort_unstable();
            if sf != tf {
                check.flag_differences.push(Difference {
                    message: key.clone(),
                    source: sf.join(" | "),
                    target: tf.join(" | "),
                });
            }
            let mut sd: Vec<i64> = s.iter().map(|x| x.1).collect();
            let mut td: Vec<i64> = t.iter().map(|x| x.1).collect();
            sd.sort_unstable();
            td.sort_unstable();
            if sd != td {
                let show = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                check.date_differences.push(Difference {
                    message: key.clone(),
                    source: show(&sd),
                    target: show(&td),
                });
            }
        }
    }
}

/// Compares every folder pair of one account. Records `verified` in the state
/// when all are clean.
pub async fn verify_account(
    store: &Store,
    ep: &Endpoints,
    address: &str,
    source: &Login,
    target: &Login,
) -> AccountCheck {
    let mut out = AccountCheck {
        address: address.to_string(),
        ..Default::default()
    };
    let started = godwit_store::now_ms();
    match verify_inner(store, ep, address, source, target, &mut out).await {
        Ok(()) => {
            out.clean = out.folders.iter().all(FolderCheck::is_clean);
            if out.clean {
                let _ = state::set_verified(store, address, started).await;
            } else {
                // The cutover guard refuses `differs` (seed Task 12: "if
                // destination counts are wildly lower, do not cut over").
                let _ = state::set_account_status(
                    store,
                    address,
                    state::Status::Differs,
                    Some(&differences(&out)),
                )
                .await;
            }
        }
        Err(e) => {
            let _ = demote(store, address, &format!("verify failed: {e}")).await;
            out.error = Some(e.to_string());
        }
    }
    out
}

/// The differences of an unclean check in one short line, for the guard's
/// refusal and `wave show`.
pub fn differences(check: &AccountCheck) -> String {
    let unclean: Vec<&FolderCheck> = check.folders.iter().filter(|f| !f.is_clean()).collect();
    let mut parts = Vec::new();
    for f in unclean.iter().take(5) {
        let mut what = Vec::new();
        for (n, label) in [
            (f.missing_on_target.len(), "missing on target"),
            (f.missing_on_source.len(), "extra on target"),
            (f.duplicates_on_target.len(), "duplicated"),
            (f.flag_differences.len(), "flag differences"),
            (f.date_differences.len(), "date differences"),
            (f.skipped.len(), "not copied"),
            (f.acl_differences.len(), "ACL differences"),
        ] {
            if n > 0 {
                what.push(format!("{n} {label}"));
            }
        }
        if let Some(e) = &f.error {
            what.push(e.clone());
        }
        parts.push(format!("{}: {}", f.source, what.join(", ")));
    }
    let more = if unclean.len() > 5 {
        format!("; and {} more folder(s)", unclean.len() - 5)
    } else {
        String::new()
    };
    format!(
        "verify: {} folder pair(s) differ ({}{more})",
        unclean.len(),
        parts.join("; ")
    )
}

/// A verify that could not finish proves nothing: a `verified` account goes
/// back to `ready` (a `differs` stays as it is).
async fn demote(store: &Store, address: &str, why: &str) -> Result<(), godwit_store::sqlx::Error> {
    if let Some(s) = state::account_status(store, address).await?
        && s.status == state::Status::Verified
    {
        state::set_account_status(store, address, state::Status::Ready, Some(why)).await?;
    }
    Ok(())
}

async fn verify_inner(
    store: &Store,
    ep: &Endpoints,
    address: &str,
    source: &Login,
    target: &Login,
    out: &mut AccountCheck,
) -> Result<(), ImapError> {
    let mut src = Conn::open(&ep.source, source).await?;
    let mut tgt = Conn::open(&ep.target, target).await?;
    let src_list = list(&mut src).await?;
    let tgt_list = list(&mut tgt).await?;
    let pairs = mapping::map_folders(&src_list.side, &tgt_list.side, &ep.overrides, &ep.exclude);
    for pair in pairs.iter().filter(|p| p.selectable) {
        let mut check = FolderCheck {
            source: pair.source.clone(),
            target: pair.target.clone(),
            ..Default::default()
        };
        if let Some(n) = &pair.note {
            check.notes.push(n.clone());
        }
        let (sc, s) = snapshot(&mut src, &src_list.wire_name(&pair.source)).await?;
        check.source_count = sc;
        if pair.create {
            // The target folder does not exist: everything in the source is missing.
            check.error = (sc > 0).then(|| format!("target folder {} does not exist", pair.target));
            check.missing_on_target = s.keys().cloned().collect();
        } else {
            let (tc, t) = snapshot(&mut tgt, &tgt_list.wire_name(&pair.target)).await?;
            check.target_count = tc;
            compare(&mut check, &s, &t);
        }
        check.skipped = state::skipped(store, address, &pair.source).await?;
        if ep.acls && src.has("ACL") && tgt.has("ACL") && !pair.create {
            let new_rights = crate::acl::has_rfc4314_rights(tgt.rights_capability().as_deref());
            let from = src.get_acl(&src_list.wire_name(&pair.source)).await?;
            let have = tgt.get_acl(&tgt_list.wire_name(&pair.target)).await?;
            let (want, unmapped) = crate::acl::wanted(&from, &ep.acl_users, new_rights);
            check.acl_differences = crate::acl::differences(&want, &have, new_rights);
            for id in unmapped {
                check.notes.push(format!(
                    "ACL: `{id}` ({}) is not a user in the accounts file, so not on the target",
                    from[&id]
                ));
            }
        }
        out.folders.push(check);
    }
    src.logout().await;
    tgt.logout().await;
    Ok(())
}

/// The table for people.
pub fn render(checks: &[AccountCheck]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for a in checks {
        let verdict = if a.clean {
            "verified clean"
        } else {
            "NOT clean"
        };
        let _ = writeln!(s, "{}: {verdict}", a.address);
        if let Some(e) = &a.error {
            let _ = writeln!(s, "  error: {e}");
        }
        let _ = writeln!(
            s,
            "  {:<32} {:<32} {:>6} {:>6} {:>7} {:>5} {:>4} {:>5} {:>5} {:>7}",
            "SOURCE",
            "TARGET",
            "SRC",
            "TGT",
            "MISSING",
            "EXTRA",
            "DUP",
            "FLAGS",
            "DATES",
            "SKIPPED"
        );
        for f in &a.folders {
            let _ = writeln!(
                s,
                "  {:<32} {:<32} {:>6} {:>6} {:>7} {:>5} {:>4} {:>5} {:>5} {:>7}",
                f.source,
                f.target,
                f.source_count,
                f.target_count,
                f.missing_on_target.len(),
                f.missing_on_source.len(),
                f.duplicates_on_target.len(),
                f.flag_differences.len(),
                f.date_differences.len(),
                f.skipped.len()
            );
            let show = |s: &mut String, label: &str, items: &[String]| {
                for i in items.iter().take(10) {
                    let _ = writeln!(s, "      {label}: {i}");
                }
                if items.len() > 10 {
                    let _ = writeln!(s, "      ... {} more", items.len() - 10);
                }
            };
            show(&mut s, "missing on target", &f.missing_on_target);
            show(&mut s, "duplicate on target", &f.duplicates_on_target);
            show(&mut s, "ACL differs", &f.acl_differences);
            for d in f.flag_differences.iter().take(10) {
                let _ = writeln!(
                    s,
                    "      flags differ: {} source [{}] target [{}]",
                    d.message, d.source, d.target
                );
            }
            for d in f.date_differences.iter().take(10) {
                let _ = writeln!(
                    s,
                    "      date differs: {} source {} target {}",
                    d.message, d.source, d.target
                );
            }
            for k in &f.skipped {
                let _ = writeln!(
                    s,
                    "      skipped UID {} {}: {}",
                    k.source_uid,
                    k.message_id.as_deref().unwrap_or("(no Message-ID)"),
                    k.reason
                );
            }
            for n in &f.notes {
                let _ = writeln!(s, "      note: {n}");
            }
            if let Some(e) = &f.error {
                let _ = writeln!(s, "      error: {e}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(items: &[(&str, &str, i64)]) -> Snapshot {
        let mut s = Snapshot::new();
        for (k, f, d) in items {
            s.entry(k.to_string())
                .or_default()
                .push((f.to_string(), *d));
        }
        s
    }

    #[test]
    fn compare_finds_each_kind_of_difference() {
        let src = snap(&[
            ("<a>", "\\Seen", 1),
            ("<b>", "", 2),
            ("<b>", "$Label1", 3),
            ("<c>", "", 4),
            ("<d>", "", 5),
            ("<e>", "", 6),
        ]);
        let tgt = snap(&[
            ("<a>", "\\Seen", 1),
            ("<b>", "$Label1", 3),
            ("<b>", "", 2),
            ("<c>", "", 4),
            ("<c>", "", 4),
            ("<d>", "\\Seen", 9),
            ("<z>", "", 0),
        ]);
        let mut c = FolderCheck::default();
        compare(&mut c, &src, &tgt);
        assert_eq!(c.duplicates_on_target, vec!["<c>"]);
        assert_eq!(c.missing_on_target, vec!["<e>"]);
        assert_eq!(c.missing_on_source, vec!["<z>"]);
        assert_eq!(c.flag_differences.len(), 1);
        assert_eq!(c.date_differences.len(), 1);
        assert!(!c.is_clean());
        let mut clean = FolderCheck::default();
        compare(&mut clean, &src, &src);
        assert!(clean.is_clean());
    }
}
