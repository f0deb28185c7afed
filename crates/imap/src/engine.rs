//! The copy engine: one account at a time, folder by folder.
//!
//! Per folder pair:
//! 1. `STATUS` on the source. With CONDSTORE (RFC 7162 3.1) an unchanged
//!    UIDVALIDITY, UIDNEXT, MESSAGES and HIGHESTMODSEQ mean nothing happened since
//!    the last run: the folder costs this one round trip.
//! 2. `UID FETCH 1:* (UID FLAGS)` on the source, compared with the sync state:
//!    new UIDs are copied, changed flags are stored on the target, UIDs gone
//!    from the source are expunged on the target with `--propagate-deletes`.
//! 3. Target messages the state does not know (state lost, a run killed between
//!    APPEND and the state commit, a target UIDVALIDITY change) are indexed by
//!    Message-ID plus SHA-256 digest; a source message that matches one is
//!    paired with it instead of being copied again.
//! 4. After a source UIDVALIDITY change (RFC 3501 2.3.1.1) the old rows are
//!    matched by Message-ID plus digest too: re-paired and reported, not re-copied.
//!
//! Copies are `UID FETCH ... BODY.PEEK[]` in UID batches (the source streams
//! them while the target appends) and APPENDs with LITERAL+ (RFC 7888) in
//! batches, each returning APPENDUID (RFC 4315 3).

use crate::conn::{AppendItem, Conn, FolderStatus, Login, Server};
use crate::mapping::{self, Folder, FolderPair, Side, SpecialUse};
use crate::state::{self, FolderState, MessageRow};
use crate::{ImapError, utf7};
use async_imap::types::{Fetch, Flag, NameAttribute};
use futures::TryStreamExt;
use godwit_store::Store;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What every account shares: the two servers (with their limits) and the
/// folder rules.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub source: Server,
    pub target: Server,
    pub overrides: BTreeMap<String, String>,
    pub exclude: Vec<String>,
    /// Copy folder ACLs (RFC 4314) where both servers advertise ACL.
    pub acls: bool,
    /// Source identifier (login user or address, lowercase) → target user,
    /// from the accounts file: how ACL entries naming delegates map.
    pub acl_users: Arc<BTreeMap<String, String>>,
}

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub propagate_deletes: bool,
    /// UIDs per FETCH command.
    pub fetch_batch: usize,
    /// Bytes of message data held in memory per account before appending.
    pub max_batch_bytes: usize,
    pub max_reconnects: u32,
    /// Folders synced at once per account, each over its own connection pair
    /// (only as far as the per-server caps allow).
    pub parallel_folders: usize,
    /// Messages larger than this are copied slice by slice.
    pub stream_threshold: usize,
    pub stream_slice: usize,
    /// `godwit sync --dry-run`: read both sides and the state, decide with the
    /// same functions as a real run, and report what would be done; never
    /// write to the target or the sync state.
    pub dry_run: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            propagate_deletes: false,
            fetch_batch: 200,
            max_batch_bytes: 8 << 20,
            max_reconnects: 5,
            parallel_folders: 4,
            stream_threshold: 4 << 20,
            stream_slice: 1 << 20,
            dry_run: false,
        }
    }
}

/// Live counters for a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub messages_total: AtomicU64,
    pub messages_done: AtomicU64,
    pub bytes_done: AtomicU64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FolderReport {
    pub source: String,
    pub target: String,
    /// Skipped by the CONDSTORE/STATUS shortcut.
    pub unchanged: bool,
    pub copied: u64,
    pub bytes: u64,
    /// Found already on the target (lost state or interrupted run) and paired.
    pub matched: u64,
    /// Re-paired after a UIDVALIDITY change.
    pub repaired: u64,
    pub flags_updated: u64,
    pub deleted: u64,
    /// The target folder was created (with --dry-run: would be).
    pub created: bool,
    /// ACL entries set on the target folder (RFC 4314 3.1).
    pub acls_set: u64,
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AccountReport {
    pub address: String,
    pub folders: Vec<FolderReport>,
    pub reconnects: u32,
    /// Why each reconnect happened.
    pub interruptions: Vec<String>,
    pub error: Option<String>,
    /// A --dry-run report: the counts are what a real run would do.
    pub dry_run: bool,
}

impl AccountReport {
    pub fn copied(&self) -> u64 {
        self.folders.iter().map(|f| f.copied).sum()
    }
    pub fn skipped(&self) -> usize {
        self.folders.iter().map(|f| f.skipped.len()).sum()
    }
}

/// One side's folder list with wire names kept (a server may send a
/// non-canonical encoding that must be echoed back as sent).
pub struct Listing {
    pub side: Side,
    pub wire: HashMap<String, String>,
    pub notes: Vec<String>,
}

impl Listing {
    pub fn wire_name(&self, name: &str) -> String {
        self.wire
            .get(name)
            .cloned()
            .unwrap_or_else(|| utf7::encode(name))
    }
}

/// LIST "" "*" (RFC 3501 6.3.8) with special-use attributes (RFC 6154 2).
pub async fn list(conn: &mut Conn) -> Result<Listing, ImapError> {
    let names: Vec<_> = conn
        .session
        .list(Some(""), Some("*"))
        .await?
        .try_collect()
        .await?;
    conn.drain_unsolicited();
    let mut separator = None;
    let mut folders = Vec::new();
    let mut wire = HashMap::new();
    let mut notes = Vec::new();
    for n in &names {
        if separator.is_none() {
            separator = n.delimiter().and_then(|d| d.chars().next());
        }
        let raw = unquote(n.name());
        let name = match utf7::decode(&raw) {
            Ok(s) => s,
            Err(e) => {
                notes.push(format!("folder skipped: {e}"));
                continue;
            }
        };
        let mut special = None;
        let mut selectable = true;
        for a in n.attributes() {
            match a {
                NameAttribute::Sent => special = Some(SpecialUse::Sent),
                NameAttribute::Drafts => special = Some(SpecialUse::Drafts),
                NameAttribute::Trash => special = Some(SpecialUse::Trash),
                NameAttribute::Junk => special = Some(SpecialUse::Junk),
                NameAttribute::Archive => special = Some(SpecialUse::Archive),
                NameAttribute::NoSelect => selectable = false,
                NameAttribute::Extension(e) if e.eq_ignore_ascii_case("\\NonExistent") => {
                    selectable = false
                }
                _ => {}
            }
        }
        wire.insert(name.clone(), raw);
        folders.push(Folder {
            name,
            special,
            selectable,
        });
    }
    let separator = separator.unwrap_or('/');
    let prefix = match &conn.server.namespace_prefix {
        Some(p) => p.clone(),
        None => detect_prefix(&folders, separator),
    };
    Ok(Listing {
        side: Side {
            separator,
            prefix,
            folders,
        },
        wire,
        notes,
    })
}

/// imap-proto hands back a quoted mailbox name with its escapes (RFC 3501 4.3:
/// `\"` and `\\`) still in place; async-imap quotes again on the way out.
pub fn unquote(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Courier-style servers put every folder under `INBOX.` (RFC 2342 personal
/// namespace). NAMESPACE is not parsed by async-imap, so infer it: when every
/// other folder sits below INBOX, that is the prefix.
fn detect_prefix(folders: &[Folder], sep: char) -> String {
    let prefix = format!("INBOX{sep}");
    let others: Vec<_> = folders
        .iter()
        .filter(|f| !mapping::is_inbox(&f.name))
        .collect();
    if others.len() >= 2
        && others.iter().all(|f| {
            f.name.len() > prefix.len() && f.name[..prefix.len()].eq_ignore_ascii_case(&prefix)
        })
    {
        let actual = &others[0].name[..prefix.len()];
        actual.to_string()
    } else {
        String::new()
    }
}

pub fn flag_string(flags: impl Iterator<Item = String>) -> String {
    let set: BTreeSet<String> = flags.collect();
    set.into_iter().collect::<Vec<_>>().join(" ")
}

/// System flags and keywords, never `\Recent` (RFC 3501 2.3.2: a session cannot
/// set it) nor `\*`.
pub fn flags_of(fetch: &Fetch) -> Vec<String> {
    fetch
        .flags()
        .filter_map(|f| match f {
            Flag::Seen => Some("\\Seen".to_string()),
            Flag::Answered => Some("\\Answered".into()),
            Flag::Flagged => Some("\\Flagged".into()),
            Flag::Deleted => Some("\\Deleted".into()),
            Flag::Draft => Some("\\Draft".into()),
            Flag::Recent | Flag::MayCreate => None,
            Flag::Custom(c) if c.eq_ignore_ascii_case("\\Recent") => None,
            Flag::Custom(c) => Some(c.to_string()),
        })
        .collect()
}

pub fn digest(body: &[u8]) -> String {
    let d = Sha256::digest(body);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Message-ID with its angle brackets, from the header block only.
pub fn message_id(raw: &[u8]) -> Option<String> {
    let msg = mail_parser::MessageParser::new().parse_headers(raw)?;
    msg.message_id().map(|id| format!("<{}>", id.trim()))
}

/// RFC 3501 9 date-time for APPEND.
fn append_date(fetch: &Fetch) -> Option<String> {
    fetch
        .internal_date()
        .map(|d| d.format("%d-%b-%Y %H:%M:%S %z").to_string())
}

/// "1:4,7,9:12" from sorted UIDs (RFC 3501 9 sequence-set).
pub fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

type Key = (Option<String>, String);

/// Syncs one account, reconnecting and resuming after transient failures
/// (dropped connection, throttling). Resuming is safe because every step is
/// recorded in the state before the next one starts.
pub async fn sync_account(
    store: &Store,
    ep: &Endpoints,
    address: &str,
    source: &Login,
    target: &Login,
    opts: &SyncOptions,
    progress: Arc<Progress>,
) -> AccountReport {
    let mut report = AccountReport {
        address: address.to_string(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    if !opts.dry_run {
        let _ = state::sync_run_started(store, address).await;
    }
    let mut attempt = 0;
    // Work done by interrupted attempts, added into the final report.
    let mut carried: Vec<FolderReport> = Vec::new();
    loop {
        carried.append(&mut report.folders);
        match sync_once(
            store,
            ep,
            address,
            source,
            target,
            opts,
            &progress,
            &mut report,
        )
        .await
        {
            Ok(()) => {
                merge_reports(&mut report.folders, carried);
                ep.source.limits.succeeded();
                if !opts.dry_run {
                    let _ =
                        state::set_account_status(store, address, state::Status::Ready, None).await;
                }
                return report;
            }
            Err(e) if e.is_transient() && attempt < opts.max_reconnects => {
                attempt += 1;
                report.reconnects = attempt;
                report.interruptions.push(e.to_string());
                let wait = match &e {
                    ImapError::Throttled(_) => ep.source.limits.throttled(),
                    _ => std::time::Duration::from_millis(500 * u64::from(attempt)),
                };
                tracing::warn!(address, error = %e, ?wait, "sync interrupted; reconnecting to resume");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                carried.append(&mut report.folders);
                report.folders = carried;
                let text = e.to_string();
                if !opts.dry_run {
                    let _ = state::set_account_status(
                        store,
                        address,
                        state::Status::Seeding,
                        Some(&text),
                    )
                    .await;
                }
                report.error = Some(text);
                return report;
            }
        }
    }
}

/// The CONDSTORE shortcut (RFC 7162 3.1): HIGHESTMODSEQ grows with every flag
/// change and expunge, so with UIDVALIDITY, UIDNEXT, MESSAGES and HIGHESTMODSEQ
/// as recorded (and the target's UIDVALIDITY too) nothing happened.
#[allow(clippy::too_many_arguments)]
async fn folder_unchanged(
    store: &Store,
    address: &str,
    pair: &FolderPair,
    prev: Option<&FolderState>,
    status: &FolderStatus,
    tstatus: &FolderStatus,
    condstore: bool,
    opts: &SyncOptions,
) -> Result<bool, ImapError> {
    let Some(p) = prev else { return Ok(false) };
    let same = condstore
        && status.highest_modseq > 0
        && p.target_folder == pair.target
        && p.source_uidvalidity == status.uid_validity
        && p.source_uidnext == status.uid_next
        && p.source_highestmodseq == status.highest_modseq
        && p.source_exists == status.messages
        && p.target_uidvalidity == tstatus.uid_validity;
    if !same {
        return Ok(false);
    }
    // Fewer rows than source messages: some were skipped (refused by the
    // target) and are tried again. More rows: deletes left on the target by a
    // run without --propagate-deletes, which matter only when propagating.
    let rows = state::count_messages(store, address, &pair.source, status.uid_validity).await?;
    let messages = u64::from(status.messages);
    if rows < messages || (opts.propagate_deletes && rows > messages) {
        return Ok(false);
    }
    Ok(true)
}

fn merge_reports(into: &mut Vec<FolderReport>, earlier: Vec<FolderReport>) {
    for e in earlier {
        match into
            .iter_mut()
            .find(|f| f.source == e.source && !e.source.is_empty())
        {
            Some(f) => {
                f.unchanged &= e.unchanged;
                f.copied += e.copied;
                f.bytes += e.bytes;
                f.matched += e.matched;
                f.repaired += e.repaired;
                f.flags_updated += e.flags_updated;
                f.deleted += e.deleted;
                f.created |= e.created;
                f.acls_set += e.acls_set;
                f.skipped.extend(e.skipped);
                f.notes.extend(
                    e.notes
                        .into_iter()
                        .filter(|n| !f.notes.contains(n))
                        .collect::<Vec<_>>(),
                );
            }
            None => into.push(e),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn sync_once(
    store: &Store,
    ep: &Endpoints,
    address: &str,
    source: &Login,
    target: &Login,
    opts: &SyncOptions,
    progress: &Progress,
    report: &mut AccountReport,
) -> Result<(), ImapError> {
    // Source first, then target, in every account: ordered acquisition of the
    // two servers' connection permits cannot deadlock.
    let mut src = Conn::open(&ep.source, source).await?;
    let mut tgt = Conn::open(&ep.target, target).await?;
    let src_list = list(&mut src).await?;
    let mut tgt_list = list(&mut tgt).await?;
    let pairs = mapping::map_folders(&src_list.side, &tgt_list.side, &ep.overrides, &ep.exclude);
    let to_create = mapping::folders_to_create(&tgt_list.side, &pairs);
    for name in to_create.iter().filter(|_| !opts.dry_run).cloned() {
        let wire = utf7::encode(&name);
        match tgt.session.create(&wire).await {
            Ok(()) => {}
            // RFC 3501 6.3.3: CREATE of an existing name is NO; a concurrent run may have made it.
            Err(async_imap::error::Error::No(t)) if t.to_ascii_lowercase().contains("exist") => {}
            Err(e) => {
                return Err(ImapError::Folder {
                    folder: name,
                    message: format!("CREATE on the target: {e}"),
                });
            }
        }
        let _ = tgt.session.subscribe(&wire).await;
        tgt_list.wire.insert(name.clone(), wire);
        tgt_list.side.folders.push(Folder::new(&name));
    }
    tgt.drain_unsolicited();
    // Every folder's STATUS on both servers, each side in one round trip
    // (both at once): the CONDSTORE shortcut then needs nothing more.
    let selectable: Vec<&FolderPair> = pairs.iter().filter(|p| p.selectable).collect();
    let src_names: Vec<String> = selectable
        .iter()
        .map(|p| src_list.wire_name(&p.source))
        .collect();
    // With --dry-run a folder still to be created has no target STATUS: it
    // is empty, with no UIDVALIDITY yet.
    let missing = |p: &FolderPair| opts.dry_run && to_create.contains(&p.target);
    let tgt_names: Vec<String> = selectable
        .iter()
        .filter(|p| !missing(p))
        .map(|p| tgt_list.wire_name(&p.target))
        .collect();
    let items = if src.has("CONDSTORE") {
        "(MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ)"
    } else {
        "(MESSAGES UIDNEXT UIDVALIDITY)"
    };
    let (ss, ts) = tokio::join!(
        src.status_many(&src_names, items),
        tgt.status_many(&tgt_names, "(UIDVALIDITY)")
    );
    let (ss, mut ts) = (ss?, ts?.into_iter());
    let ts: Vec<Result<FolderStatus, String>> = selectable
        .iter()
        .map(|p| {
            if missing(p) {
                Ok(FolderStatus::default())
            } else {
                ts.next().unwrap_or_else(|| Err("no STATUS answer".into()))
            }
        })
        .collect();
    let mut statuses: HashMap<String, (FolderStatus, FolderStatus)> = HashMap::new();
    let mut todo: Vec<&FolderPair> = Vec::new();
    for ((pair, s), t) in selectable.iter().zip(ss).zip(ts) {
        let s = s.map_err(|m| ImapError::Folder {
            folder: pair.source.clone(),
            message: format!("STATUS: {m}"),
        })?;
        let t = t.map_err(|m| ImapError::Folder {
            folder: pair.target.clone(),
            message: format!("STATUS: {m}"),
        })?;
        statuses.insert(pair.source.clone(), (s, t));
        let prev = state::folder_state(store, address, &pair.source).await?;
        if !folder_unchanged(
            store,
            address,
            pair,
            prev.as_ref(),
            &s,
            &t,
            src.has("CONDSTORE"),
            opts,
        )
        .await?
        {
            todo.push(pair);
        }
    }
    for pair in pairs
        .iter()
        .filter(|p| !todo.iter().any(|t| t.source == p.source))
    {
        let mut fr = FolderReport {
            source: pair.source.clone(),
            target: pair.target.clone(),
            unchanged: true,
            created: to_create.contains(&pair.target),
            ..Default::default()
        };
        if let Some(n) = &pair.note {
            fr.notes.push(n.clone());
        }
        report.folders.push(fr);
    }
    let statuses = &statuses;

    // Folders run in parallel over extra connection pairs, opened only where
    // both servers' caps have room now (never waiting: see try_connection_slot).
    let mut workers = vec![(src, tgt)];
    while workers.len() < opts.parallel_folders.max(1).min(todo.len()) {
        let Some(s) = Conn::try_open(&ep.source, source).await else {
            break;
        };
        let s = s?;
        let Some(t) = Conn::try_open(&ep.target, target).await else {
            break;
        };
        workers.push((s, t?));
    }
    let queue = std::sync::Mutex::new(todo.into_iter().collect::<std::collections::VecDeque<_>>());
    let (src_list, tgt_list, to_create) = (&src_list, &tgt_list, &to_create);
    let results = futures::future::join_all(workers.into_iter().map(|(mut src, mut tgt)| {
        let queue = &queue;
        async move {
            let mut done = Vec::new();
            loop {
                let Some(pair) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front() else {
                    break;
                };
                let mut fr = FolderReport {
                    source: pair.source.clone(),
                    target: pair.target.clone(),
                    created: to_create.contains(&pair.target),
                    ..Default::default()
                };
                if let Some(n) = &pair.note {
                    fr.notes.push(n.clone());
                }
                fr.unchanged = !pair.selectable;
                if pair.selectable {
                    let src_wire = src_list.wire_name(&pair.source);
                    let tgt_wire = tgt_list.wire_name(&pair.target);
                    let r = sync_folder(
                        store,
                        address,
                        &mut src,
                        &mut tgt,
                        pair,
                        &src_wire,
                        &tgt_wire,
                        opts,
                        progress,
                        &mut fr,
                        statuses[&pair.source],
                        to_create.contains(&pair.target),
                    )
                    .await;
                    if let Err(e) = r {
                        // Stop taking folders; the other workers finish theirs.
                        queue.lock().unwrap_or_else(|e| e.into_inner()).clear();
                        done.push(fr);
                        return (done, Some(e));
                    }
                }
                done.push(fr);
            }
            src.logout().await;
            tgt.logout().await;
            (done, None)
        }
    }))
    .await;
    let mut first_error = None;
    for (done, err) in results {
        report.folders.extend(done);
        if first_error.is_none() {
            first_error = err;
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    report.folders.sort_by(|a, b| a.target.cmp(&b.target));
    if ep.acls {
        copy_acls(
            ep, source, target, &pairs, src_list, tgt_list, to_create, opts, report,
        )
        .await?;
    }
    for n in src_list.notes.iter().cloned() {
        report.folders.push(FolderReport {
            notes: vec![n],
            ..Default::default()
        });
    }
    Ok(())
}

/// Copies each folder's ACL entries (GETACL, then SETACL for each entry the
/// target lacks or holds with other rights; RFC 4314 3.1, 3.3), mapping
/// delegates to their target users. Identifiers with no target user are
/// reported on the folder, never dropped silently. With --dry-run, the
/// entries that would be set are reported and nothing is set.
#[allow(clippy::too_many_arguments)]
async fn copy_acls(
    ep: &Endpoints,
    source: &Login,
    target: &Login,
    pairs: &[FolderPair],
    src_list: &Listing,
    tgt_list: &Listing,
    to_create: &[String],
    opts: &SyncOptions,
    report: &mut AccountReport,
) -> Result<(), ImapError> {
    let mut src = Conn::open(&ep.source, source).await?;
    let mut tgt = Conn::open(&ep.target, target).await?;
    if !(src.has("ACL") && tgt.has("ACL")) {
        let side = if src.has("ACL") { "target" } else { "source" };
        report.folders.push(FolderReport {
            notes: vec![format!(
                "ACL: the {side} does not advertise ACL (RFC 4314); folder ACLs were not copied"
            )],
            ..Default::default()
        });
        src.logout().await;
        tgt.logout().await;
        return Ok(());
    }
    let new_rights = crate::acl::has_rfc4314_rights(tgt.rights_capability().as_deref());
    let mut new_folder_acl: Option<crate::acl::Acl> = None;
    for pair in pairs.iter().filter(|p| p.selectable) {
        let from = src.get_acl(&src_list.wire_name(&pair.source)).await?;
        let tgt_wire = tgt_list.wire_name(&pair.target);
        // A folder a dry run did not create has no ACL to read: it is taken
        // to start as a new folder does on the servers we know (Dovecot,
        // Cyrus, Exchange), with the owner's full rights, as on INBOX.
        let have = if opts.dry_run && to_create.contains(&pair.target) {
            if new_folder_acl.is_none() {
                new_folder_acl = Some(tgt.get_acl("INBOX").await.unwrap_or_default());
            }
            new_folder_acl.clone().unwrap_or_default()
        } else {
            tgt.get_acl(&tgt_wire).await?
        };
        let (want, unmapped) = crate::acl::wanted(&from, &ep.acl_users, new_rights);
        let mut notes = Vec::new();
        let mut set = 0;
        for (id, rights) in crate::acl::changes(&want, &have, new_rights) {
            if opts.dry_run {
                notes.push(format!("ACL: would set {id} to {rights}"));
                set += 1;
                continue;
            }
            match tgt.set_acl(&tgt_wire, &id, &rights).await {
                Ok(()) => {
                    notes.push(format!("ACL: {id} set to {rights}"));
                    set += 1;
                }
                Err(e) => notes.push(format!("ACL: {id} {rights} refused by the target: {e}")),
            }
        }
        for id in unmapped {
            notes.push(format!(
                "ACL: `{id}` ({}) is not a user in the accounts file; not copied",
                from[&id]
            ));
        }
        if let Some(fr) = report.folders.iter_mut().find(|f| f.source == pair.source) {
            fr.notes.extend(notes);
            fr.acls_set += set;
        }
    }
    src.logout().await;
    tgt.logout().await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn sync_folder(
    store: &Store,
    address: &str,
    src: &mut Conn,
    tgt: &mut Conn,
    pair: &FolderPair,
    src_wire: &str,
    tgt_wire: &str,
    opts: &SyncOptions,
    progress: &Progress,
    fr: &mut FolderReport,
    statuses: (FolderStatus, FolderStatus),
    create: bool,
) -> Result<(), ImapError> {
    let (status, _) = statuses;
    let validity = status.uid_validity;
    let modseq = status.highest_modseq;
    let uidnext = status.uid_next;
    // Source: every UID and its flags. EXAMINE (RFC 3501 6.3.2) never changes the source.
    let sbox = src
        .session
        .examine(src_wire)
        .await
        .map_err(|e| folder_err(&pair.source, "EXAMINE", e))?;
    let validity = sbox.uid_validity.unwrap_or(validity);
    let mut source_flags: BTreeMap<u32, String> = BTreeMap::new();
    let mut sizes: HashMap<u32, u32> = HashMap::new();
    if sbox.exists > 0 {
        let fetches: Vec<Fetch> = src
            .session
            .uid_fetch("1:*", "(UID FLAGS RFC822.SIZE)")
            .await?
            .try_collect()
            .await?;
        for f in &fetches {
            if let Some(uid) = f.uid {
                source_flags.insert(uid, flag_string(flags_of(f).into_iter()));
                sizes.insert(uid, f.size.unwrap_or(0));
            }
        }
    }
    src.drain_unsolicited();
    if opts.dry_run {
        return plan_folder_dry(
            store,
            address,
            tgt,
            pair,
            tgt_wire,
            validity,
            &source_flags,
            &sizes,
            opts,
            fr,
            create,
        )
        .await;
    }

    // Target: which UIDs the state knows.
    let tbox = tgt
        .session
        .select(tgt_wire)
        .await
        .map_err(|e| folder_err(&pair.target, "SELECT", e))?;
    let tvalidity = tbox.uid_validity.unwrap_or(0);
    let rows = state::messages(store, address, &pair.source).await?;
    let (mut current, old): (Vec<MessageRow>, Vec<MessageRow>) = rows
        .into_iter()
        .partition(|r| r.source_uidvalidity == validity);
    let mut repair_pool: HashMap<Key, Vec<MessageRow>> = HashMap::new();
    if !old.is_empty() {
        fr.notes.push(format!(
            "source UIDVALIDITY changed ({} -> {validity}): re-pairing {} messages by Message-ID and digest",
            old[0].source_uidvalidity,
            old.len()
        ));
        for r in &old {
            repair_pool
                .entry((r.message_id.clone(), r.digest.clone()))
                .or_default()
                .push(r.clone());
        }
    }
    // Rows pointing into another target folder or an older target UIDVALIDITY
    // no longer name a target message: re-match those by content.
    let stale_target: Vec<MessageRow> = current
        .iter()
        .filter(|r| r.target_folder != pair.target || r.target_uidvalidity != tvalidity)
        .cloned()
        .collect();
    if !stale_target.is_empty() {
        fr.notes.push(format!(
            "target folder or UIDVALIDITY changed: re-pairing {} messages",
            stale_target.len()
        ));
        current.retain(|r| r.target_folder == pair.target && r.target_uidvalidity == tvalidity);
    }
    // Old-UIDVALIDITY rows still name their target messages: keep those out of
    // the unknown pool so that one target message is never paired twice.
    let known_target: HashSet<u32> = current
        .iter()
        .chain(
            old.iter()
                .filter(|r| r.target_folder == pair.target && r.target_uidvalidity == tvalidity),
        )
        .filter_map(|r| r.target_uid)
        .collect();
    // Target messages the state does not know, by content, with their flags.
    let mut target_pool: HashMap<Key, Vec<(u32, String)>> = HashMap::new();
    if tbox.exists > 0 {
        let uids: Vec<Fetch> = tgt
            .session
            .uid_fetch("1:*", "(UID)")
            .await?
            .try_collect()
            .await?;
        let mut unknown: Vec<u32> = uids
            .iter()
            .filter_map(|f| f.uid)
            .filter(|u| !known_target.contains(u))
            .collect();
        unknown.sort_unstable();
        for chunk in unknown.chunks(opts.fetch_batch) {
            let fetches: Vec<Fetch> = tgt
                .session
                .uid_fetch(uid_set(chunk), "(UID FLAGS BODY.PEEK[])")
                .await?
                .try_collect()
                .await?;
            for f in &fetches {
                if let (Some(uid), Some(body)) = (f.uid, f.body()) {
                    target_pool
                        .entry((message_id(body), digest(body)))
                        .or_default()
                        .push((uid, flag_string(flags_of(f).into_iter())));
                }
            }
        }
    }
    tgt.drain_unsolicited();

    // Rows whose target message was lost track of: pair again by content, using
    // the metadata the state kept (no source download needed).
    let mut repaired_rows = Vec::new();
    for mut r in stale_target {
        if let Some((uid, tflags)) = target_pool
            .get_mut(&(r.message_id.clone(), r.digest.clone()))
            .and_then(Vec::pop)
        {
            r.target_uid = Some(uid);
            r.flags = tflags;
            r.target_uidvalidity = tvalidity;
            r.target_folder = pair.target.clone();
            fr.repaired += 1;
            repaired_rows.push(r);
        } else {
            // Gone from the target: forget it so that the next run copies it again.
            state::forget_messages(
                store,
                address,
                &pair.source,
                &[(r.source_uidvalidity, r.source_uid)],
            )
            .await?;
            fr.notes.push(format!(
                "source UID {} no longer on the target; will be copied again",
                r.source_uid
            ));
        }
    }
    state::record_messages(store, address, &pair.source, &repaired_rows).await?;
    current.extend(repaired_rows);

    let new_uids = new_messages(&source_flags, &current);
    progress
        .messages_total
        .fetch_add(new_uids.len() as u64, Ordering::Relaxed);
    let append_limit = tgt.append_limit();

    let mut new_uids_whole: Vec<u32> = Vec::new();
    // Large messages never sit whole in memory: they are copied in slices.
    let (large, new_uids): (Vec<u32>, Vec<u32>) = new_uids.into_iter().partition(|u| {
        sizes
            .get(u)
            .is_some_and(|s| *s as usize > opts.stream_threshold)
    });
    for uid in large {
        let size = sizes[&uid];
        if let Some(reason) = over_append_limit(u64::from(size), append_limit) {
            state::record_skipped(store, address, &pair.source, validity, uid, None, &reason)
                .await?;
            fr.skipped.push(format!("UID {uid}: {reason}"));
            continue;
        }
        let placed = stream_large(
            src,
            tgt,
            pair,
            tgt_wire,
            tvalidity,
            validity,
            uid,
            size,
            opts,
            &mut repair_pool,
            &mut target_pool,
            fr,
        )
        .await?;
        progress.messages_done.fetch_add(1, Ordering::Relaxed);
        match placed {
            Large::Placed(row) => {
                state::record_messages(store, address, &pair.source, &[row]).await?
            }
            Large::Refused { message_id, reason } => {
                state::record_skipped(
                    store,
                    address,
                    &pair.source,
                    validity,
                    uid,
                    message_id.as_deref(),
                    &reason,
                )
                .await?;
                fr.skipped.push(format!(
                    "UID {uid} {}: {reason}",
                    message_id.as_deref().unwrap_or("(no Message-ID)")
                ));
            }
            Large::SizeUnreliable => {
                // RFC822.SIZE did not match BODY[]: copy it whole instead.
                new_uids_whole.push(uid);
            }
        }
    }
    let mut new_uids = new_uids;
    new_uids.append(&mut new_uids_whole);
    new_uids.sort_unstable();

    // Copy (or pair) new messages, streaming batches from the source.
    let timeout = src.server.command_timeout;
    let mut in_flight: Option<InFlight> = None;
    for chunk in new_uids.chunks(opts.fetch_batch) {
        src.server.limits.pace().await;
        let asked = std::time::Instant::now();
        let mut stream = src
            .session
            .uid_fetch(uid_set(chunk), "(UID FLAGS INTERNALDATE BODY.PEEK[])")
            .await?;
        let mut batch: Vec<Fetch> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut first = true;
        let mut received = 0usize;
        loop {
            // A server that stops answering mid-FETCH is a dropped connection.
            let next = tokio::time::timeout(timeout, stream.try_next())
                .await
                .map_err(|_| {
                    ImapError::Io(format!(
                        "no answer to FETCH in {} for {timeout:?}",
                        pair.source
                    ))
                })??;
            if first {
                first = false;
                src.server.limits.observe_latency(asked.elapsed());
            }
            let done = next.is_none();
            if let Some(f) = next {
                received += usize::from(f.uid.is_some_and(|u| chunk.binary_search(&u).is_ok()));
                let len = f.body().map(<[u8]>::len).unwrap_or(0);
                if let Some(bw) = &src.bandwidth {
                    bw.consume(len as u64).await;
                }
                batch_bytes += len;
                batch.push(f);
            }
            if (done && !batch.is_empty())
                || batch_bytes >= opts.max_batch_bytes
                || batch.len() >= 64
            {
                let (rows, flight) = place_batch(
                    store,
                    address,
                    tgt,
                    pair,
                    tgt_wire,
                    tvalidity,
                    validity,
                    &batch,
                    append_limit,
                    &mut repair_pool,
                    &mut target_pool,
                    progress,
                    fr,
                )
                .await?;
                state::record_messages(store, address, &pair.source, &rows).await?;
                // The previous batch's APPENDs were answered while this one was
                // fetched: record them now, and leave this batch in flight.
                if let Some(prev) = std::mem::replace(&mut in_flight, flight) {
                    let rows = land_batch(
                        store, address, tgt, pair, tvalidity, validity, prev, progress, fr,
                    )
                    .await?;
                    state::record_messages(store, address, &pair.source, &rows).await?;
                }
                batch.clear();
                batch_bytes = 0;
            }
            if done {
                break;
            }
        }
        drop(stream);
        if received < chunk.len() {
            // Fewer answers than UIDs asked: expunged meanwhile (RFC 3501
            // 6.4.8 lets a server omit them), or the stream ended because the
            // server said BYE and closed, which async-imap reports as the end
            // of the FETCH. A NOOP tells which.
            src.session
                .noop()
                .await
                .map_err(|_| ImapError::ConnectionLost)?;
        }
        src.drain_unsolicited();
    }
    if let Some(last) = in_flight.take() {
        let rows = land_batch(
            store, address, tgt, pair, tvalidity, validity, last, progress, fr,
        )
        .await?;
        state::record_messages(store, address, &pair.source, &rows).await?;
    }

    // Flag changes on the source since the last run (RFC 3501 6.4.6 STORE FLAGS
    // replaces the set), including messages paired this run whose target copy
    // carries other flags. The state now holds every pairing: read it back.
    let current: Vec<MessageRow> = state::messages(store, address, &pair.source)
        .await?
        .into_iter()
        .filter(|r| {
            r.source_uidvalidity == validity
                && r.target_folder == pair.target
                && r.target_uidvalidity == tvalidity
        })
        .collect();
    let (by_flags, updated) = flag_updates(&source_flags, &current);
    for (flags, uids) in by_flags {
        let _: Vec<Fetch> = tgt
            .session
            .uid_store(uid_set(&uids), format!("FLAGS.SILENT ({flags})"))
            .await?
            .try_collect()
            .await?;
        fr.flags_updated += uids.len() as u64;
    }
    state::record_messages(store, address, &pair.source, &updated).await?;

    // Expunged on the source since the last run.
    let gone = expunged_on_source(&source_flags, &current);
    if !gone.is_empty() && opts.propagate_deletes {
        let tuids = target_uids(&gone);
        if !tuids.is_empty() {
            if !tgt.has("UIDPLUS") {
                fr.notes.push("target lacks UIDPLUS: deletes not propagated (EXPUNGE would remove other messages)".into());
            } else {
                let set = uid_set(&tuids);
                let _: Vec<Fetch> = tgt
                    .session
                    .uid_store(&set, "+FLAGS.SILENT (\\Deleted)")
                    .await?
                    .try_collect()
                    .await?;
                // RFC 4315 2.1: UID EXPUNGE removes only these messages.
                let _: Vec<u32> = tgt.session.uid_expunge(&set).await?.try_collect().await?;
                fr.deleted += tuids.len() as u64;
            }
        }
        let keys: Vec<(u32, u32)> = gone
            .iter()
            .map(|r| (r.source_uidvalidity, r.source_uid))
            .collect();
        state::forget_messages(store, address, &pair.source, &keys).await?;
    }
    tgt.drain_unsolicited();

    if !old.is_empty() {
        let keys: Vec<(u32, u32)> = old
            .iter()
            .map(|r| (r.source_uidvalidity, r.source_uid))
            .collect();
        state::forget_messages(store, address, &pair.source, &keys).await?;
        let detail = format!(
            "{}: UIDVALIDITY {} -> {validity}; {} re-paired, {} copied, {} old rows without a match",
            pair.source,
            old[0].source_uidvalidity,
            fr.repaired,
            fr.copied,
            repair_pool.values().map(Vec::len).sum::<usize>()
        );
        state::record_event(store, address, "uidvalidity", &detail).await?;
    }
    state::save_folder_state(
        store,
        address,
        &pair.source,
        &FolderState {
            target_folder: pair.target.clone(),
            source_uidvalidity: validity,
            target_uidvalidity: tvalidity,
            source_uidnext: uidnext,
            source_highestmodseq: modseq,
            source_exists: status.messages,
        },
    )
    .await?;
    Ok(())
}

/// Source UIDs the state has no row for: the messages to copy (RFC 3501
/// 2.3.1.1: rows of the current UIDVALIDITY only). Pure: the real run and
/// --dry-run both decide with it.
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

/// The target UIDs of `rows`, sorted (rows without one name no target message).
pub fn target_uids(rows: &[&MessageRow]) -> Vec<u32> {
    let mut t: Vec<u32> = rows.iter().filter_map(|r| r.target_uid).collect();
    t.sort_unstable();
    t
}

/// `--dry-run` for one folder: the same decisions as `sync_folder` from the
/// same inputs (the source's UIDs, flags and sizes, the state's rows), with
/// the target only EXAMINEd (RFC 3501 6.3.2: read-only) and nothing written.
/// What a dry run cannot know without downloading bodies is said in a note:
/// copies that match a target message the state does not know, or a row
/// from before a UIDVALIDITY change, are paired by a real run instead.
#[allow(clippy::too_many_arguments)]
async fn plan_folder_dry(
    store: &Store,
    address: &str,
    tgt: &mut Conn,
    pair: &FolderPair,
    tgt_wire: &str,
    validity: u32,
    source_flags: &BTreeMap<u32, String>,
    sizes: &HashMap<u32, u32>,
    opts: &SyncOptions,
    fr: &mut FolderReport,
    create: bool,
) -> Result<(), ImapError> {
    let (tvalidity, texists) = if create {
        (0, 0)
    } else {
        let tbox = tgt
            .session
            .examine(tgt_wire)
            .await
            .map_err(|e| folder_err(&pair.target, "EXAMINE", e))?;
        tgt.drain_unsolicited();
        (tbox.uid_validity.unwrap_or(0), tbox.exists)
    };
    let rows = state::messages(store, address, &pair.source).await?;
    let (current, old): (Vec<MessageRow>, Vec<MessageRow>) = rows
        .into_iter()
        .partition(|r| r.source_uidvalidity == validity);
    // As in sync_folder: rows naming another target folder or UIDVALIDITY
    // no longer name a target message, and their messages count as new.
    let current: Vec<MessageRow> = current
        .into_iter()
        .filter(|r| r.target_folder == pair.target && r.target_uidvalidity == tvalidity)
        .collect();
    let append_limit = tgt.append_limit();
    for uid in new_messages(source_flags, &current) {
        let size = u64::from(sizes.get(&uid).copied().unwrap_or(0));
        match over_append_limit(size, append_limit) {
            Some(reason) => fr.skipped.push(format!("UID {uid}: {reason}")),
            None => {
                fr.copied += 1;
                fr.bytes += size;
            }
        }
    }
    let unknown = u64::from(texists).saturating_sub(current.len() as u64);
    if unknown > 0 && fr.copied > 0 {
        fr.notes.push(format!(
            "the target holds {unknown} messages the sync state does not know: copies identical to one of them (Message-ID and digest) are paired instead"
        ));
    }
    if !old.is_empty() {
        fr.notes.push(format!(
            "source UIDVALIDITY changed ({} -> {validity}): {} messages are re-paired by Message-ID and digest where they match",
            old[0].source_uidvalidity,
            old.len()
        ));
    }
    let (by_flags, _) = flag_updates(source_flags, &current);
    fr.flags_updated = by_flags.values().map(|u| u.len() as u64).sum();
    let gone = expunged_on_source(source_flags, &current);
    if opts.propagate_deletes && !gone.is_empty() {
        if tgt.has("UIDPLUS") {
            fr.deleted = target_uids(&gone).len() as u64;
        } else {
            fr.notes.push(
                "target lacks UIDPLUS: deletes would not be propagated (EXPUNGE would remove other messages)"
                    .into(),
            );
        }
    }
    Ok(())
}

enum Large {
    Placed(MessageRow),
    Refused {
        message_id: Option<String>,
        reason: String,
    },
    SizeUnreliable,
}

/// Fetches `BODY.PEEK[]<offset.len>` (RFC 3501 6.4.5 partial fetch).
async fn fetch_slice(
    src: &mut Conn,
    uid: u32,
    offset: u32,
    len: u32,
    meta: bool,
) -> Result<(Vec<u8>, Option<Fetch>), ImapError> {
    let items = if meta {
        format!("(UID FLAGS INTERNALDATE BODY.PEEK[]<{offset}.{len}>)")
    } else {
        format!("(UID BODY.PEEK[]<{offset}.{len}>)")
    };
    let fetches: Vec<Fetch> = src
        .session
        .uid_fetch(uid.to_string(), items)
        .await?
        .try_collect()
        .await?;
    src.drain_unsolicited();
    let f = fetches.into_iter().find(|f| f.uid == Some(uid));
    let data = f
        .as_ref()
        .and_then(|f| f.body())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    if let Some(bw) = &src.bandwidth {
        bw.consume(data.len() as u64).await;
    }
    Ok((data, if meta { f } else { None }))
}

/// Copies one large message slice by slice: at most one slice is in memory.
/// The APPEND literal's length is announced up front (RFC 3501 4.3), so the
/// size is checked first; when lost state or a UIDVALIDITY change needs the
/// digest before deciding, the message is read once for that, then copied.
#[allow(clippy::too_many_arguments)]
async fn stream_large(
    src: &mut Conn,
    tgt: &mut Conn,
    pair: &FolderPair,
    tgt_wire: &str,
    tvalidity: u32,
    validity: u32,
    uid: u32,
    size: u32,
    opts: &SyncOptions,
    repair_pool: &mut HashMap<Key, Vec<MessageRow>>,
    target_pool: &mut HashMap<Key, Vec<(u32, String)>>,
    fr: &mut FolderReport,
) -> Result<Large, ImapError> {
    let slice = opts.stream_slice.max(1024) as u32;
    // The last byte must exist and nothing may follow it.
    let (tail, meta) = fetch_slice(src, uid, size - 1, 2, true).await?;
    if tail.len() != 1 {
        return Ok(Large::SizeUnreliable);
    }
    let meta = meta.ok_or(ImapError::Folder {
        folder: pair.source.clone(),
        message: format!("UID {uid} vanished"),
    })?;
    let flags = flags_of(&meta);
    let date = append_date(&meta);
    let row = |message_id: Option<String>, digest: String, target_uid: Option<u32>| MessageRow {
        source_uidvalidity: validity,
        source_uid: uid,
        target_folder: pair.target.clone(),
        target_uidvalidity: tvalidity,
        target_uid,
        message_id,
        digest,
        flags: flag_string(flags.iter().cloned()),
    };
    if !repair_pool.is_empty() || !target_pool.is_empty() {
        let mut hasher = Sha256::new();
        let mut mid = None;
        let mut offset = 0;
        while offset < size {
            let (data, _) = fetch_slice(src, uid, offset, slice.min(size - offset), false).await?;
            if data.is_empty() {
                return Ok(Large::SizeUnreliable);
            }
            if offset == 0 {
                mid = message_id(&data);
            }
            hasher.update(&data);
            offset += data.len() as u32;
        }
        let dig: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = (mid.clone(), dig.clone());
        if let Some(old) = repair_pool.get_mut(&key).and_then(Vec::pop) {
            fr.repaired += 1;
            if old.target_folder == pair.target && old.target_uidvalidity == tvalidity {
                return Ok(Large::Placed(MessageRow {
                    flags: old.flags,
                    ..row(mid, dig, old.target_uid)
                }));
            }
        }
        if let Some((tuid, tflags)) = target_pool.get_mut(&key).and_then(Vec::pop) {
            fr.matched += 1;
            return Ok(Large::Placed(MessageRow {
                flags: tflags,
                ..row(mid, dig, Some(tuid))
            }));
        }
    }
    let tag = tgt
        .append_begin(tgt_wire, &flags, date.as_deref(), size)
        .await?;
    let mut hasher = Sha256::new();
    let mut mid = None;
    let mut offset = 0;
    while offset < size {
        let (data, _) = fetch_slice(src, uid, offset, slice.min(size - offset), false).await?;
        if data.is_empty() || offset + data.len() as u32 > size {
            // Mid-literal: the only way out is dropping the target connection,
            // which discards the partial APPEND (RFC 3501 6.3.11).
            return Err(ImapError::Io(format!(
                "UID {uid} in {} changed size while being copied",
                pair.source
            )));
        }
        if offset == 0 {
            mid = message_id(&data);
        }
        hasher.update(&data);
        tgt.write_literal(&data).await?;
        offset += data.len() as u32;
    }
    let dig: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    match tgt.append_end(&tag).await? {
        Ok(appended) => {
            fr.copied += 1;
            fr.bytes += u64::from(size);
            let target_uid = appended.filter(|(v, _)| *v == tvalidity).map(|(_, u)| u);
            Ok(Large::Placed(row(mid, dig, target_uid)))
        }
        Err(text) => Ok(Large::Refused {
            message_id: mid,
            reason: format!("target refused APPEND: {text}"),
        }),
    }
}

fn folder_err(folder: &str, command: &str, e: async_imap::error::Error) -> ImapError {
    match ImapError::from(e) {
        t if t.is_transient() => t,
        other => ImapError::Folder {
            folder: folder.into(),
            message: format!("{command}: {other}"),
        },
    }
}

/// APPENDs sent for one batch, with the rows they will fill in.
struct InFlight {
    rows: Vec<MessageRow>,
    sizes: Vec<u64>,
    sent: crate::conn::Sent,
}

/// Reads the answers to a batch's APPENDs; returns the rows to record.
#[allow(clippy::too_many_arguments)]
async fn land_batch(
    store: &Store,
    address: &str,
    tgt: &mut Conn,
    pair: &FolderPair,
    tvalidity: u32,
    validity: u32,
    flight: InFlight,
    progress: &Progress,
    fr: &mut FolderReport,
) -> Result<Vec<MessageRow>, ImapError> {
    let mut rows = Vec::new();
    let results = tgt.append_collect(flight.sent).await?;
    for ((row, size), result) in flight.rows.into_iter().zip(flight.sizes).zip(results) {
        match result {
            Ok(appended) => {
                fr.copied += 1;
                fr.bytes += size;
                progress.bytes_done.fetch_add(size, Ordering::Relaxed);
                let target_uid = appended.filter(|(v, _)| *v == tvalidity).map(|(_, u)| u);
                rows.push(MessageRow { target_uid, ..row });
            }
            Err(text) => {
                let reason = format!("target refused APPEND: {text}");
                state::record_skipped(
                    store,
                    address,
                    &pair.source,
                    validity,
                    row.source_uid,
                    row.message_id.as_deref(),
                    &reason,
                )
                .await?;
                fr.skipped.push(format!(
                    "UID {} {}: {reason}",
                    row.source_uid,
                    row.message_id.as_deref().unwrap_or("(no Message-ID)")
                ));
            }
        }
    }
    Ok(rows)
}

/// Pairs one batch of fetched source messages with target copies, or sends
/// their APPENDs; returns the rows paired now and the APPENDs in flight.
#[allow(clippy::too_many_arguments)]
async fn place_batch(
    store: &Store,
    address: &str,
    tgt: &mut Conn,
    pair: &FolderPair,
    tgt_wire: &str,
    tvalidity: u32,
    validity: u32,
    batch: &[Fetch],
    append_limit: Option<u64>,
    repair_pool: &mut HashMap<Key, Vec<MessageRow>>,
    target_pool: &mut HashMap<Key, Vec<(u32, String)>>,
    progress: &Progress,
    fr: &mut FolderReport,
) -> Result<(Vec<MessageRow>, Option<InFlight>), ImapError> {
    let mut rows = Vec::new();
    let mut to_append: Vec<(usize, MessageRow)> = Vec::new();
    let mut items = Vec::new();
    for (i, f) in batch.iter().enumerate() {
        let (Some(uid), Some(body)) = (f.uid, f.body()) else {
            continue;
        };
        let flags = flags_of(f);
        let mid = message_id(body);
        let dig = digest(body);
        let key = (mid.clone(), dig.clone());
        let row = MessageRow {
            source_uidvalidity: validity,
            source_uid: uid,
            target_folder: pair.target.clone(),
            target_uidvalidity: tvalidity,
            target_uid: None,
            message_id: mid.clone(),
            digest: dig,
            flags: flag_string(flags.iter().cloned()),
        };
        progress.messages_done.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = repair_pool.get_mut(&key).and_then(Vec::pop) {
            fr.repaired += 1;
            if old.target_folder == pair.target && old.target_uidvalidity == tvalidity {
                // The flags the target holds; the flag pass below brings them up to date.
                rows.push(MessageRow {
                    target_uid: old.target_uid,
                    flags: old.flags,
                    ..row
                });
                continue;
            }
        }
        if let Some((tuid, tflags)) = target_pool.get_mut(&key).and_then(Vec::pop) {
            fr.matched += 1;
            rows.push(MessageRow {
                target_uid: Some(tuid),
                flags: tflags,
                ..row
            });
            continue;
        }
        if let Some(reason) = over_append_limit(body.len() as u64, append_limit) {
            state::record_skipped(
                store,
                address,
                &pair.source,
                validity,
                uid,
                mid.as_deref(),
                &reason,
            )
            .await?;
            fr.skipped.push(format!(
                "UID {uid} {}: {reason}",
                mid.as_deref().unwrap_or("(no Message-ID)")
            ));
            continue;
        }
        items.push(AppendItem {
            flags,
            internal_date: append_date(f),
            body,
        });
        to_append.push((i, row));
    }
    if items.is_empty() {
        return Ok((rows, None));
    }
    let sent = tgt.append_send(tgt_wire, &items).await?;
    let sizes = items.iter().map(|i| i.body.len() as u64).collect();
    Ok((
        rows,
        Some(InFlight {
            rows: to_append.into_iter().map(|(_, r)| r).collect(),
            sizes,
            sent,
        }),
    ))
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
    fn uid_sets() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[9]), "9");
        assert_eq!(uid_set(&[]), "");
    }

    #[test]
    fn message_ids() {
        assert_eq!(
            message_id(b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody").as_deref(),
            Some("<a@b>")
        );
        assert_eq!(
            message_id(b"Subject: x\r\n\r\nMessage-ID: <not@header>\r\n"),
            None
        );
    }

    #[test]
    fn prefix_detection() {
        let f = |names: &[&str]| names.iter().map(|n| Folder::new(n)).collect::<Vec<_>>();
        assert_eq!(
            detect_prefix(&f(&["INBOX", "INBOX.Sent", "INBOX.Trash"]), '.'),
            "INBOX."
        );
        assert_eq!(
            detect_prefix(&f(&["INBOX", "Sent", "INBOX.Trash"]), '.'),
            ""
        );
    }
}
