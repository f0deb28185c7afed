//! What to do in one folder pair, decided from what was read: the source's
//! listing, the target's UIDVALIDITY and UIDs, and the sync state's rows.
//!
//! Pure. `engine::sync_folder` executes a [`FolderPlan`] (FETCH, APPEND,
//! STORE, EXPUNGE and the state writes), and `sync --dry-run` reports the same
//! plan with nothing fetched or written, so the two decide alike:
//! - [`FolderPlan::new`] sorts the stored rows: still paired, from an older
//!   source UIDVALIDITY (RFC 3501 2.3.1.1), or naming a target folder or
//!   target UIDVALIDITY that no longer holds their message;
//! - [`FolderPlan::unknown_target`]: target messages the state does not know,
//!   to index by content ([`Pools`]);
//! - [`FolderPlan::rematch`]: rows that lost their target message, paired
//!   again by content or forgotten (to be copied again);
//! - [`FolderPlan::copies`]: the source messages to copy, whole or slice by
//!   slice, and those the target's APPENDLIMIT refuses before any FETCH;
//! - [`Pools::place`]: per fetched message, pair it (repair or match) or
//!   APPEND it;
//! - [`FolderPlan::finish`]: flag STOREs and propagated deletes.

use crate::state::MessageRow;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A message's content: its Message-ID (if any) and SHA-256 digest.
pub type Key = (Option<String>, String);

/// The source folder as `UID FETCH 1:* (UID FLAGS RFC822.SIZE)` listed it.
#[derive(Debug, Clone, Default)]
pub struct SourceListing {
    pub uidvalidity: u32,
    /// UID → flags (`engine::flag_string`).
    pub flags: BTreeMap<u32, String>,
    /// UID → RFC822.SIZE.
    pub sizes: HashMap<u32, u32>,
}

/// One folder pair's plan, from the listings and the stored rows.
#[derive(Debug, Clone)]
pub struct FolderPlan {
    pub target_folder: String,
    pub source_uidvalidity: u32,
    pub target_uidvalidity: u32,
    /// Rows of the source's UIDVALIDITY that still name their target message.
    pub current: Vec<MessageRow>,
    /// Rows of an older source UIDVALIDITY: their UIDs mean nothing now
    /// (RFC 3501 2.3.1.1), so they are re-paired by content ([`Pools`]).
    pub old: Vec<MessageRow>,
    /// Rows of the source's UIDVALIDITY whose target folder or UIDVALIDITY
    /// changed: they no longer name a target message.
    pub stale_target: Vec<MessageRow>,
}

/// How one new source message is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// `BODY.PEEK[]` in UID batches, APPENDed in batches.
    Whole,
    /// Larger than the stream threshold: slice by slice, never whole in memory.
    Stream,
    /// Over the target's APPENDLIMIT (RFC 7889): refused before any FETCH.
    Refuse(String),
}

/// One new source message to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub uid: u32,
    /// RFC822.SIZE from the listing.
    pub size: u32,
    pub how: How,
}

/// Rows re-paired by content, and rows whose message is gone from the target.
#[derive(Debug, Default)]
pub struct Rematch {
    pub repaired: Vec<MessageRow>,
    pub lost: Vec<MessageRow>,
}

/// Messages the state does not place, by content: rows from an older source
/// UIDVALIDITY, and target messages no row names. A message found in either
/// is paired instead of copied again; each entry pairs once.
#[derive(Debug, Default)]
pub struct Pools {
    repair: HashMap<Key, Vec<MessageRow>>,
    /// (target UID, its flags).
    target: HashMap<Key, Vec<(u32, String)>>,
}

/// What to do with one fetched source message (its row as it would be
/// recorded after an APPEND, without a target UID yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Already on the target: record the row (with the target's flags; the
    /// flag pass brings them up to date).
    Pair(MessageRow),
    /// APPEND it, then record the row with the APPENDUID (RFC 4315 3).
    Append(MessageRow),
    /// The target would refuse it (RFC 7889 APPENDLIMIT).
    Skip(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub action: Action,
    /// It matched a row of an older source UIDVALIDITY.
    pub repaired: bool,
    /// It matched a target message the state did not know.
    pub matched: bool,
}

/// Flag STOREs and deletes, once every new message is paired or copied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Finish {
    /// Flag set → target UIDs (see [`flag_updates`]).
    pub flag_stores: BTreeMap<String, Vec<u32>>,
    /// The rows as they are after those STOREs.
    pub flagged: Vec<MessageRow>,
    /// Target UIDs to delete with UID EXPUNGE (RFC 4315 2.1).
    pub expunge: Vec<u32>,
    /// Deletes were to be propagated but the target lacks UIDPLUS: a plain
    /// EXPUNGE (RFC 3501 6.4.3) would remove other \Deleted messages too.
    pub no_uidplus: bool,
    /// (source UIDVALIDITY, source UID) of the rows to forget: their source
    /// message is gone and deletes are propagated.
    pub forget: Vec<(u32, u32)>,
}

/// The dry run's account of the copies: what a real run copies when no
/// copy turns out to be on the target already.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Forecast {
    pub copied: u64,
    pub bytes: u64,
    /// Report lines, as [`skip_line`] writes them.
    pub skipped: Vec<String>,
}

impl FolderPlan {
    /// Sorts the stored rows against the folders' UIDVALIDITYs.
    pub fn new(
        target_folder: &str,
        source_uidvalidity: u32,
        target_uidvalidity: u32,
        rows: Vec<MessageRow>,
    ) -> FolderPlan {
        let (current, old): (Vec<MessageRow>, Vec<MessageRow>) = rows
            .into_iter()
            .partition(|r| r.source_uidvalidity == source_uidvalidity);
        let mut plan = FolderPlan {
            target_folder: target_folder.to_string(),
            source_uidvalidity,
            target_uidvalidity,
            current: Vec::new(),
            old,
            stale_target: Vec::new(),
        };
        let (current, stale) = current.into_iter().partition(|r| plan.names_target(r));
        plan.current = current;
        plan.stale_target = stale;
        plan
    }

    /// The row names a message in this target folder as it is now.
    fn names_target(&self, r: &MessageRow) -> bool {
        r.target_folder == self.target_folder && r.target_uidvalidity == self.target_uidvalidity
    }

    /// The rows (read back from the state) that pair a source message of this
    /// UIDVALIDITY with a message of this target folder.
    pub fn paired(&self, rows: Vec<MessageRow>) -> Vec<MessageRow> {
        rows.into_iter()
            .filter(|r| r.source_uidvalidity == self.source_uidvalidity && self.names_target(r))
            .collect()
    }

    /// Of the target's UIDs, those no row names (sorted): they are indexed by
    /// content. Old-UIDVALIDITY rows still name their target messages, so
    /// those stay out and one target message is never paired twice.
    pub fn unknown_target(&self, target_uids: &[u32]) -> Vec<u32> {
        let known: HashSet<u32> = self
            .current
            .iter()
            .chain(self.old.iter().filter(|r| self.names_target(r)))
            .filter_map(|r| r.target_uid)
            .collect();
        let mut unknown: Vec<u32> = target_uids
            .iter()
            .copied()
            .filter(|u| !known.contains(u))
            .collect();
        unknown.sort_unstable();
        unknown
    }

    /// The pools: old rows, and the unknown target messages indexed by
    /// content as `(key, target UID, flags)`.
    pub fn pools(&self, target: impl IntoIterator<Item = (Key, u32, String)>) -> Pools {
        let mut pools = Pools::default();
        for r in &self.old {
            pools
                .repair
                .entry((r.message_id.clone(), r.digest.clone()))
                .or_default()
                .push(r.clone());
        }
        for (key, uid, flags) in target {
            pools.target.entry(key).or_default().push((uid, flags));
        }
        pools
    }

    /// Pairs the rows that lost their target message again, by the content
    /// the state kept (no source download needed); those found become
    /// current, the others are lost (forgotten, so that they are copied).
    pub fn rematch(&mut self, pools: &mut Pools) -> Rematch {
        let mut out = Rematch::default();
        for r in std::mem::take(&mut self.stale_target) {
            match pools.take_target(&(r.message_id.clone(), r.digest.clone())) {
                Some((uid, flags)) => out.repaired.push(MessageRow {
                    target_uid: Some(uid),
                    flags,
                    target_uidvalidity: self.target_uidvalidity,
                    target_folder: self.target_folder.clone(),
                    ..r
                }),
                None => out.lost.push(r),
            }
        }
        self.current.extend(out.repaired.iter().cloned());
        out
    }

    /// The source messages no current row pairs, in UID order, and how each
    /// is copied: slice by slice above `stream_threshold` bytes; a streamed
    /// message is checked against the APPENDLIMIT first, because its literal
    /// length is announced before any byte (RFC 3501 4.3). Whole messages are
    /// checked when fetched ([`Pools::place`]): one already on the target
    /// is paired, whatever its size.
    pub fn copies(
        &self,
        source: &SourceListing,
        stream_threshold: usize,
        append_limit: Option<u64>,
    ) -> Vec<NewMessage> {
        new_messages(&source.flags, &self.current)
            .into_iter()
            .map(|uid| {
                let size = source.sizes.get(&uid).copied().unwrap_or(0);
                let how = if size as usize > stream_threshold {
                    match over_append_limit(u64::from(size), append_limit) {
                        Some(reason) => How::Refuse(reason),
                        None => How::Stream,
                    }
                } else {
                    How::Whole
                };
                NewMessage { uid, size, how }
            })
            .collect()
    }

    /// Flag STOREs for the paired `rows` (read back after the copies, so that
    /// this run's pairings count) and, with `propagate_deletes`, the deletes.
    pub fn finish(
        &self,
        source: &SourceListing,
        rows: &[MessageRow],
        propagate_deletes: bool,
        uidplus: bool,
    ) -> Finish {
        let (flag_stores, flagged) = flag_updates(&source.flags, rows);
        let mut finish = Finish {
            flag_stores,
            flagged,
            ..Default::default()
        };
        let gone = expunged_on_source(&source.flags, rows);
        if propagate_deletes && !gone.is_empty() {
            let tuids = target_uids(&gone);
            if uidplus {
                finish.expunge = tuids;
            } else {
                finish.no_uidplus = !tuids.is_empty();
            }
            finish.forget = source_keys(gone);
        }
        finish
    }
}

/// What a dry run can say of `copies` without bodies: each is copied unless
/// refused for its listed size; pairing needs the digest, which only a real
/// run reads.
pub fn forecast(copies: &[NewMessage], append_limit: Option<u64>) -> Forecast {
    let mut f = Forecast::default();
    for c in copies {
        let refused = match &c.how {
            How::Refuse(reason) => Some(reason.clone()),
            How::Stream => None,
            How::Whole => over_append_limit(u64::from(c.size), append_limit),
        };
        match refused {
            Some(reason) => f.skipped.push(skip_line(c.uid, None, &reason)),
            None => {
                f.copied += 1;
                f.bytes += u64::from(c.size);
            }
        }
    }
    f
}

impl Pools {
    /// Nothing left to pair with: a streamed message need not be read for
    /// its digest before it is copied.
    pub fn is_empty(&self) -> bool {
        self.repair.values().all(Vec::is_empty) && self.target.values().all(Vec::is_empty)
    }

    /// Old rows no fetched message matched (reported with the UIDVALIDITY event).
    pub fn unmatched_old(&self) -> usize {
        self.repair.values().map(Vec::len).sum()
    }

    fn take_target(&mut self, key: &Key) -> Option<(u32, String)> {
        self.target.get_mut(key).and_then(Vec::pop)
    }

    /// Decides for one fetched source message of `len` bytes, given the row
    /// it would be recorded with: an old row of the same content still naming
    /// its target message is that message (re-paired); else an unknown target
    /// message of the same content is it (matched); else it is APPENDed,
    /// unless the target's APPENDLIMIT (RFC 7889) refuses it.
    pub fn place(&mut self, row: MessageRow, len: u64, append_limit: Option<u64>) -> Placement {
        let key = (row.message_id.clone(), row.digest.clone());
        let mut repaired = false;
        if let Some(old) = self.repair.get_mut(&key).and_then(Vec::pop) {
            repaired = true;
            if old.target_folder == row.target_folder
                && old.target_uidvalidity == row.target_uidvalidity
            {
                return Placement {
                    action: Action::Pair(MessageRow {
                        target_uid: old.target_uid,
                        flags: old.flags,
                        ..row
                    }),
                    repaired,
                    matched: false,
                };
            }
        }
        if let Some((tuid, tflags)) = self.take_target(&key) {
            return Placement {
                action: Action::Pair(MessageRow {
                    target_uid: Some(tuid),
                    flags: tflags,
                    ..row
                }),
                repaired,
                matched: true,
            };
        }
        let action = match over_append_limit(len, append_limit) {
            Some(reason) => Action::Skip(reason),
            None => Action::Append(row),
        };
        Placement {
            action,
            repaired,
            matched: false,
        }
    }
}

/// A skipped message's report line: by Message-ID once its header was read
/// (`message_id` is `Some`), by UID alone before.
pub fn skip_line(uid: u32, message_id: Option<Option<&str>>, reason: &str) -> String {
    match message_id {
        None => format!("UID {uid}: {reason}"),
        Some(mid) => format!("UID {uid} {}: {reason}", mid.unwrap_or("(no Message-ID)")),
    }
}

/// Source UIDs the state has no row for: the messages to copy (RFC 3501
/// 2.3.1.1: rows of the current UIDVALIDITY only).
pub fn new_messages(source_flags: &BTreeMap<u32, String>, rows: &[MessageRow]) -> Vec<u32> {
    let known: HashSet<u32> = rows.iter().map(|r| r.source_uid).collect();
    source_flags
        .keys()
        .copied()
        .filter(|u| !known.contains(u))
        .collect()
}

/// The target's APPENDLIMIT (RFC 7889) refuses a message this large: why.
pub fn over_append_limit(size: u64, limit: Option<u64>) -> Option<String> {
    limit
        .filter(|l| size > *l)
        .map(|l| format!("{size} bytes exceeds the target's APPENDLIMIT of {l}"))
}

/// Paired messages whose source flags differ from what the target holds:
/// target UIDs grouped by the flag set to store (RFC 3501 6.4.6 STORE FLAGS
/// replaces the set, so one STORE per distinct set), and the rows as they
/// will be after it.
pub fn flag_updates(
    source_flags: &BTreeMap<u32, String>,
    rows: &[MessageRow],
) -> (BTreeMap<String, Vec<u32>>, Vec<MessageRow>) {
    let mut by_flags: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut updated = Vec::new();
    for r in rows {
        if let (Some(f), Some(tuid)) = (source_flags.get(&r.source_uid), r.target_uid)
            && *f != r.flags
        {
            by_flags.entry(f.clone()).or_default().push(tuid);
            updated.push(MessageRow {
                flags: f.clone(),
                ..r.clone()
            });
        }
    }
    for uids in by_flags.values_mut() {
        uids.sort_unstable();
    }
    (by_flags, updated)
}

/// Rows whose source message is gone (expunged since the last run).
pub fn expunged_on_source<'a>(
    source_flags: &BTreeMap<u32, String>,
    rows: &'a [MessageRow],
) -> Vec<&'a MessageRow> {
    rows.iter()
        .filter(|r| !source_flags.contains_key(&r.source_uid))
        .collect()
}

/// (source UIDVALIDITY, source UID) of `rows`: the state's key, to forget them.
pub fn source_keys<'a>(rows: impl IntoIterator<Item = &'a MessageRow>) -> Vec<(u32, u32)> {
    rows.into_iter()
        .map(|r| (r.source_uidvalidity, r.source_uid))
        .collect()
}

/// The target UIDs of `rows`, sorted (rows without one name no target message).
pub fn target_uids(rows: &[&MessageRow]) -> Vec<u32> {
    let mut t: Vec<u32> = rows.iter().filter_map(|r| r.target_uid).collect();
    t.sort_unstable();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: u32, tuid: Option<u32>, flags: &str) -> MessageRow {
        MessageRow {
            source_uidvalidity: 7,
            source_uid: uid,
            target_folder: "INBOX".into(),
            target_uidvalidity: 9,
            target_uid: tuid,
            message_id: None,
            digest: String::new(),
            flags: flags.into(),
        }
    }

    /// A row with content `c` (Message-ID `<c>`, digest `d-c`).
    fn content(uid: u32, tuid: Option<u32>, c: &str) -> MessageRow {
        MessageRow {
            message_id: Some(format!("<{c}>")),
            digest: format!("d-{c}"),
            ..row(uid, tuid, "")
        }
    }

    fn key(c: &str) -> Key {
        (Some(format!("<{c}>")), format!("d-{c}"))
    }

    fn listing(entries: &[(u32, &str, u32)]) -> SourceListing {
        SourceListing {
            uidvalidity: 7,
            flags: entries
                .iter()
                .map(|(u, f, _)| (*u, f.to_string()))
                .collect(),
            sizes: entries.iter().map(|(u, _, s)| (*u, *s)).collect(),
        }
    }

    fn uids(rows: &[MessageRow]) -> Vec<u32> {
        rows.iter().map(|r| r.source_uid).collect()
    }

    #[test]
    fn folder_decisions() {
        // Source: UIDs 1..=5 with flags; state: 1 (same flags), 2 (flags
        // changed), 3 (changed, but no target UID: cannot be stored), 6
        // (expunged from the source) and 8 (expunged, no target UID).
        let source: BTreeMap<u32, String> = [
            (1, "\\Seen"),
            (2, "\\Flagged \\Seen"),
            (3, "\\Seen"),
            (4, ""),
            (5, "\\Seen"),
        ]
        .into_iter()
        .map(|(u, f)| (u, f.to_string()))
        .collect();
        let rows = vec![
            row(1, Some(11), "\\Seen"),
            row(2, Some(12), "\\Seen"),
            row(3, None, ""),
            row(6, Some(16), ""),
            row(8, None, ""),
        ];
        assert_eq!(new_messages(&source, &rows), vec![4, 5]);
        let (by_flags, updated) = flag_updates(&source, &rows);
        assert_eq!(
            by_flags.into_iter().collect::<Vec<_>>(),
            vec![("\\Flagged \\Seen".to_string(), vec![12])]
        );
        assert_eq!(updated.len(), 1);
        assert_eq!(updated[0].flags, "\\Flagged \\Seen");
        let gone = expunged_on_source(&source, &rows);
        assert_eq!(
            gone.iter().map(|r| r.source_uid).collect::<Vec<_>>(),
            vec![6, 8]
        );
        assert_eq!(target_uids(&gone), vec![16]);
        assert_eq!(over_append_limit(10, None), None);
        assert_eq!(over_append_limit(10, Some(10)), None);
        assert_eq!(
            over_append_limit(11, Some(10)).as_deref(),
            Some("11 bytes exceeds the target's APPENDLIMIT of 10")
        );
        // Several flag sets: one STORE each, UIDs sorted.
        let source: BTreeMap<u32, String> = [(1, "a"), (2, "b"), (3, "a")]
            .into_iter()
            .map(|(u, f)| (u, f.to_string()))
            .collect();
        let rows = vec![
            row(3, Some(30), ""),
            row(1, Some(10), ""),
            row(2, Some(20), ""),
        ];
        let (by_flags, _) = flag_updates(&source, &rows);
        assert_eq!(by_flags["a"], vec![10, 30]);
        assert_eq!(by_flags["b"], vec![20]);
    }

    #[test]
    fn rows_are_sorted_by_what_they_still_name() {
        let moved = MessageRow {
            target_folder: "Archive".into(),
            ..row(3, Some(13), "")
        };
        let renumbered = MessageRow {
            target_uidvalidity: 8,
            ..row(4, Some(14), "")
        };
        let old = MessageRow {
            source_uidvalidity: 6,
            ..row(5, Some(15), "")
        };
        // (case, rows, current, stale target, old)
        let cases = vec![
            ("nothing stored", vec![], vec![], vec![], vec![]),
            (
                "all current",
                vec![row(1, Some(11), ""), row(2, None, "")],
                vec![1, 2],
                vec![],
                vec![],
            ),
            (
                "another target folder",
                vec![row(1, Some(11), ""), moved.clone()],
                vec![1],
                vec![3],
                vec![],
            ),
            (
                "target UIDVALIDITY changed",
                vec![renumbered.clone()],
                vec![],
                vec![4],
                vec![],
            ),
            (
                "source UIDVALIDITY changed",
                vec![old.clone(), row(1, Some(11), "")],
                vec![1],
                vec![],
                vec![5],
            ),
        ];
        for (case, rows, current, stale, old) in cases {
            let plan = FolderPlan::new("INBOX", 7, 9, rows);
            assert_eq!(uids(&plan.current), current, "{case}");
            assert_eq!(uids(&plan.stale_target), stale, "{case}");
            assert_eq!(uids(&plan.old), old, "{case}");
        }
        // Read back after the copies: only this UIDVALIDITY and target.
        let plan = FolderPlan::new("INBOX", 7, 9, vec![]);
        let back = plan.paired(vec![row(1, Some(11), ""), moved, renumbered, old]);
        assert_eq!(uids(&back), vec![1]);
    }

    #[test]
    fn unknown_target_messages_exclude_every_one_a_row_names() {
        let old_here = MessageRow {
            source_uidvalidity: 6,
            ..row(5, Some(15), "")
        };
        let old_elsewhere = MessageRow {
            source_uidvalidity: 6,
            target_uidvalidity: 8,
            ..row(6, Some(16), "")
        };
        let plan = FolderPlan::new(
            "INBOX",
            7,
            9,
            vec![
                row(1, Some(11), ""),
                row(2, None, ""),
                old_here,
                old_elsewhere,
            ],
        );
        // 11 is current, 15 an old row's still; 16 belongs to another target
        // UIDVALIDITY, so that UID here is some other message.
        assert_eq!(plan.unknown_target(&[17, 16, 15, 11, 12]), vec![12, 16, 17]);
        assert_eq!(plan.unknown_target(&[]), Vec::<u32>::new());
    }

    #[test]
    fn rows_that_lost_their_target_message_are_found_by_content_or_forgotten() {
        let stale = |uid, c: &str| MessageRow {
            target_uidvalidity: 8,
            ..content(uid, Some(100 + uid), c)
        };
        let mut plan = FolderPlan::new(
            "INBOX",
            7,
            9,
            vec![content(1, Some(11), "a"), stale(2, "b"), stale(3, "c")],
        );
        let mut pools = plan.pools([(key("b"), 42, "\\Seen".to_string())]);
        let r = plan.rematch(&mut pools);
        assert_eq!(r.repaired.len(), 1);
        let b = &r.repaired[0];
        assert_eq!(
            (
                b.source_uid,
                b.target_uid,
                b.target_uidvalidity,
                b.flags.as_str()
            ),
            (2, Some(42), 9, "\\Seen")
        );
        assert_eq!(uids(&r.lost), vec![3]);
        assert_eq!(uids(&plan.current), vec![1, 2]);
        assert!(plan.stale_target.is_empty());
        // The target message is taken: nothing else pairs with it.
        assert!(pools.is_empty());
        // With no target index (a dry run), every stale row is lost.
        let mut plan = FolderPlan::new("INBOX", 7, 9, vec![stale(2, "b")]);
        let r = plan.rematch(&mut Pools::default());
        assert_eq!((r.repaired.len(), uids(&r.lost)), (0, vec![2]));
    }

    #[test]
    fn copies_are_whole_streamed_or_refused_in_uid_order() {
        let source = listing(&[
            (1, "", 10),
            (2, "", 500),
            (3, "", 2000),
            (4, "", 90),
            (5, "", 600),
        ]);
        // (case, stored rows, stream threshold, APPENDLIMIT, copies)
        let cases = vec![
            (
                "all new, no limit",
                vec![],
                100,
                None,
                vec![
                    (1, How::Whole),
                    (2, How::Stream),
                    (3, How::Stream),
                    (4, How::Whole),
                    (5, How::Stream),
                ],
            ),
            (
                "stored ones are not copied",
                vec![row(1, Some(11), ""), row(3, None, "")],
                100,
                None,
                vec![(2, How::Stream), (4, How::Whole), (5, How::Stream)],
            ),
            (
                // A whole message is judged when fetched (it may be on the
                // target already); a streamed one before.
                "APPENDLIMIT 550",
                vec![],
                100,
                Some(550),
                vec![
                    (1, How::Whole),
                    (2, How::Stream),
                    (
                        3,
                        How::Refuse("2000 bytes exceeds the target's APPENDLIMIT of 550".into()),
                    ),
                    (4, How::Whole),
                    (
                        5,
                        How::Refuse("600 bytes exceeds the target's APPENDLIMIT of 550".into()),
                    ),
                ],
            ),
            (
                "threshold above every size",
                vec![row(2, Some(12), "")],
                1 << 20,
                Some(550),
                vec![
                    (1, How::Whole),
                    (3, How::Whole),
                    (4, How::Whole),
                    (5, How::Whole),
                ],
            ),
        ];
        for (case, rows, threshold, limit, want) in cases {
            let plan = FolderPlan::new("INBOX", 7, 9, rows);
            let got: Vec<(u32, How)> = plan
                .copies(&source, threshold, limit)
                .into_iter()
                .map(|c| {
                    assert_eq!(c.size, source.sizes[&c.uid], "{case}");
                    (c.uid, c.how)
                })
                .collect();
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn a_fetched_message_is_repaired_matched_appended_or_skipped() {
        let fetched = |c: &str| content(20, None, c);
        let old = |c: &str, tuid, tvalidity| MessageRow {
            source_uidvalidity: 6,
            target_uidvalidity: tvalidity,
            flags: "\\Answered".into(),
            ..content(3, Some(tuid), c)
        };
        let paired = |tuid, flags: &str| {
            Action::Pair(MessageRow {
                target_uid: Some(tuid),
                flags: flags.into(),
                ..fetched("a")
            })
        };
        // (case, old rows, target index, length, APPENDLIMIT, action, repaired, matched)
        let cases = vec![
            (
                "new",
                vec![],
                vec![],
                10,
                None,
                Action::Append(fetched("a")),
                false,
                false,
            ),
            (
                "over the APPENDLIMIT",
                vec![],
                vec![],
                11,
                Some(10),
                Action::Skip("11 bytes exceeds the target's APPENDLIMIT of 10".into()),
                false,
                false,
            ),
            (
                "an old row still naming its target message",
                vec![old("a", 33, 9)],
                vec![(key("a"), 44, "\\Seen".into())],
                10,
                None,
                paired(33, "\\Answered"),
                true,
                false,
            ),
            (
                "an old row of another target UIDVALIDITY, the target copy unknown",
                vec![old("a", 33, 8)],
                vec![(key("a"), 44, "\\Seen".into())],
                10,
                None,
                paired(44, "\\Seen"),
                true,
                true,
            ),
            (
                "an old row of another target UIDVALIDITY, no target copy",
                vec![old("a", 33, 8)],
                vec![],
                10,
                None,
                Action::Append(fetched("a")),
                true,
                false,
            ),
            (
                "on the target, unknown to the state, whatever the APPENDLIMIT",
                vec![],
                vec![(key("a"), 44, "\\Seen".into())],
                11,
                Some(10),
                paired(44, "\\Seen"),
                false,
                true,
            ),
            (
                "other content on the target",
                vec![old("b", 33, 9)],
                vec![(key("b"), 44, "".into())],
                10,
                None,
                Action::Append(fetched("a")),
                false,
                false,
            ),
        ];
        for (case, old_rows, target, len, limit, action, repaired, matched) in cases {
            let plan = FolderPlan::new("INBOX", 7, 9, old_rows);
            let mut pools = plan.pools(target);
            let p = pools.place(fetched("a"), len, limit);
            assert_eq!(
                p,
                Placement {
                    action,
                    repaired,
                    matched
                },
                "{case}"
            );
        }
    }

    #[test]
    fn each_pool_entry_pairs_once() {
        // Two identical source messages, one copy on the target: the second
        // is appended.
        let plan = FolderPlan::new("INBOX", 7, 9, vec![]);
        let mut pools = plan.pools([(key("a"), 44, String::new())]);
        let first = pools.place(content(1, None, "a"), 10, None);
        let second = pools.place(content(2, None, "a"), 10, None);
        assert!(first.matched);
        assert_eq!(second.action, Action::Append(content(2, None, "a")));
        // Old rows likewise; those left over are counted.
        let old = |uid| MessageRow {
            source_uidvalidity: 6,
            ..content(uid, Some(30 + uid), "a")
        };
        let plan = FolderPlan::new("INBOX", 7, 9, vec![old(1), old(2)]);
        let mut pools = plan.pools([]);
        assert_eq!(pools.unmatched_old(), 2);
        assert!(pools.place(content(5, None, "a"), 10, None).repaired);
        assert_eq!(pools.unmatched_old(), 1);
    }

    #[test]
    fn flags_and_deletes_once_everything_is_paired() {
        let source = listing(&[(1, "\\Seen", 1), (2, "", 1)]);
        let rows = vec![
            row(1, Some(11), ""),
            row(2, Some(12), ""),
            row(3, Some(13), ""),
            row(4, None, ""),
        ];
        let plan = FolderPlan::new("INBOX", 7, 9, vec![]);
        // (case, propagate, UIDPLUS, expunge, no_uidplus, forget)
        let cases = [
            ("deletes not propagated", false, true, vec![], false, vec![]),
            (
                "propagated",
                true,
                true,
                vec![13],
                false,
                vec![(7, 3), (7, 4)],
            ),
            (
                "no UIDPLUS",
                true,
                false,
                vec![],
                true,
                vec![(7, 3), (7, 4)],
            ),
        ];
        for (case, propagate, uidplus, expunge, no_uidplus, forget) in cases {
            let f = plan.finish(&source, &rows, propagate, uidplus);
            assert_eq!(
                f.flag_stores.into_iter().collect::<Vec<_>>(),
                vec![("\\Seen".to_string(), vec![11])],
                "{case}"
            );
            assert_eq!(uids(&f.flagged), vec![1], "{case}");
            assert_eq!(
                (f.expunge, f.no_uidplus, f.forget),
                (expunge, no_uidplus, forget),
                "{case}"
            );
        }
        // Gone rows without a target UID: forgotten, and nothing to refuse.
        let f = plan.finish(&source, &[row(4, None, "")], true, false);
        assert_eq!((f.no_uidplus, f.forget), (false, vec![(7, 4)]));
        // Nothing gone.
        assert_eq!(
            plan.finish(&source, &rows[..2], true, true),
            Finish {
                flag_stores: [("\\Seen".to_string(), vec![11])].into_iter().collect(),
                flagged: vec![row(1, Some(11), "\\Seen")],
                ..Default::default()
            }
        );
    }

    /// The dry run's forecast is what the real run decides when no copy is on
    /// the target already: every streamed copy not refused is copied, and
    /// every whole one is placed by `Pools::place` with its listed size.
    #[test]
    fn the_forecast_is_what_placing_with_nothing_to_pair_decides() {
        let source = listing(&[
            (1, "", 10),
            (2, "", 500),
            (3, "", 2000),
            (4, "", 90),
            (5, "", 600),
        ]);
        for limit in [None, Some(50), Some(550), Some(5000)] {
            for threshold in [0, 100, 1 << 20] {
                let plan = FolderPlan::new("INBOX", 7, 9, vec![row(4, Some(14), "")]);
                let copies = plan.copies(&source, threshold, limit);
                let mut pools = plan.pools([]);
                let mut real = Forecast::default();
                for c in &copies {
                    let refused = match &c.how {
                        How::Refuse(reason) => Some(reason.clone()),
                        How::Stream => None,
                        How::Whole => match pools
                            .place(row(c.uid, None, ""), u64::from(c.size), limit)
                            .action
                        {
                            Action::Skip(reason) => Some(reason),
                            _ => None,
                        },
                    };
                    match refused {
                        Some(reason) => real.skipped.push(skip_line(c.uid, None, &reason)),
                        None => {
                            real.copied += 1;
                            real.bytes += u64::from(c.size);
                        }
                    }
                }
                let f = forecast(&copies, limit);
                assert_eq!(f, real, "{limit:?} {threshold}");
                assert_eq!(f.copied + f.skipped.len() as u64, 4);
            }
        }
        let f = forecast(
            &FolderPlan::new("INBOX", 7, 9, vec![]).copies(&source, 100, Some(550)),
            Some(550),
        );
        assert_eq!((f.copied, f.bytes), (3, 600));
        assert_eq!(
            f.skipped,
            vec![
                "UID 3: 2000 bytes exceeds the target's APPENDLIMIT of 550",
                "UID 5: 600 bytes exceeds the target's APPENDLIMIT of 550"
            ]
        );
    }

    #[test]
    fn skip_lines() {
        assert_eq!(skip_line(3, None, "r"), "UID 3: r");
        assert_eq!(skip_line(3, Some(Some("<a@b>")), "r"), "UID 3 <a@b>: r");
        assert_eq!(skip_line(3, Some(None), "r"), "UID 3 (no Message-ID): r");
    }
}
