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
//! What to pair, copy, repair, forget, re-flag and expunge is decided by the
//! pure [`crate::plan::FolderPlan`]; `sync_folder` executes it and
//! `plan_folder_dry` reports it.
//!
//! Copies are `UID FETCH ... BODY.PEEK[]` in UID batches (the source streams
//! them while the target appends) and APPENDs with LITERAL+ (RFC 7888) in
//! batches, each returning APPENDUID (RFC 4315 3).

use crate::conn::{AppendItem, Conn, FolderStatus, Login, Server};
use crate::mapping::{self, Folder, FolderPair, Side, SpecialUse};
use crate::plan::{self, Action, FolderPlan, How, Pools, SourceListing};
use crate::state::{self, FolderState, MessageRow};
use crate::{ImapError, utf7};
use async_imap::types::{Fetch, Flag, NameAttribute};
use futures::TryStreamExt;
use godwit_store::Store;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Bytes of message data in one APPEND batch. An account's folders share
    /// twice this (the batch in flight and the one being gathered, see
    /// [`batch_budget`]), so its parallel folders do not multiply it.
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
    hex(&Sha256::digest(body))
}

/// Lowercase hex of a SHA-256 digest (the state's `digest` column).
fn hex(d: &[u8]) -> String {
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

/// A fetched message's APPEND: its flags, internal date and body as fetched.
fn append_item(fetch: &Fetch) -> AppendItem<'_> {
    AppendItem {
        flags: flags_of(fetch),
        internal_date: append_date(fetch),
        body: fetch.body().unwrap_or_default(),
    }
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
    let held = &tokio::sync::Semaphore::new(batch_budget(opts));

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
                    let job = FolderJob {
                        store,
                        address,
                        pair,
                        src_wire: &src_wire,
                        tgt_wire: &tgt_wire,
                        opts,
                        progress,
                        status: statuses[&pair.source].0,
                        create: to_create.contains(&pair.target),
                        held,
                    };
                    let r = sync_folder(&job, &mut src, &mut tgt, &mut fr).await;
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

/// One folder pair, as `sync_once` hands it to a worker.
struct FolderJob<'a> {
    store: &'a Store,
    address: &'a str,
    pair: &'a FolderPair,
    src_wire: &'a str,
    tgt_wire: &'a str,
    opts: &'a SyncOptions,
    progress: &'a Progress,
    /// The source folder's STATUS, saved with the folder state for the next
    /// run's CONDSTORE shortcut.
    status: FolderStatus,
    /// The target folder is created by this run (with --dry-run: would be).
    create: bool,
    /// Bytes of fetched messages the account's folders may hold in batches
    /// (a permit per byte, [`batch_budget`]).
    held: &'a tokio::sync::Semaphore,
}

/// The bytes of whole messages an account holds at most, shared by its
/// parallel folders: a lone folder's batch in flight and the one it gathers
/// meanwhile. Without a shared budget, four folders would hold four times
/// that.
pub fn batch_budget(opts: &SyncOptions) -> usize {
    opts.max_batch_bytes
        .max(1)
        .saturating_mul(2)
        .min(u32::MAX as usize)
}

/// Lists the source folder, builds its [`FolderPlan`] and executes it (with
/// --dry-run: reports it, see `plan_folder_dry`).
async fn sync_folder(
    job: &FolderJob<'_>,
    src: &mut Conn,
    tgt: &mut Conn,
    fr: &mut FolderReport,
) -> Result<(), ImapError> {
    let (store, address, pair, opts) = (job.store, job.address, job.pair, job.opts);
    // Source: every UID and its flags. EXAMINE (RFC 3501 6.3.2) never changes the source.
    let sbox = src
        .session
        .examine(job.src_wire)
        .await
        .map_err(|e| folder_err(&pair.source, "EXAMINE", e))?;
    let mut listing = SourceListing {
        uidvalidity: sbox.uid_validity.unwrap_or(job.status.uid_validity),
        ..Default::default()
    };
    if sbox.exists > 0 {
        let fetches: Vec<Fetch> = src
            .session
            .uid_fetch("1:*", "(UID FLAGS RFC822.SIZE)")
            .await?
            .try_collect()
            .await?;
        for f in &fetches {
            if let Some(uid) = f.uid {
                listing
                    .flags
                    .insert(uid, flag_string(flags_of(f).into_iter()));
                listing.sizes.insert(uid, f.size.unwrap_or(0));
            }
        }
    }
    src.drain_unsolicited();
    if opts.dry_run {
        return plan_folder_dry(job, tgt, &listing, fr).await;
    }
    let validity = listing.uidvalidity;

    // Target: which UIDs the state knows.
    let tbox = tgt
        .session
        .select(job.tgt_wire)
        .await
        .map_err(|e| folder_err(&pair.target, "SELECT", e))?;
    let tvalidity = tbox.uid_validity.unwrap_or(0);
    let rows = state::messages(store, address, &pair.source).await?;
    let mut plan = FolderPlan::new(&pair.target, validity, tvalidity, rows);
    if let Some(first) = plan.old.first() {
        fr.notes.push(format!(
            "source UIDVALIDITY changed ({} -> {validity}): re-pairing {} messages by Message-ID and digest",
            first.source_uidvalidity,
            plan.old.len()
        ));
    }
    if !plan.stale_target.is_empty() {
        fr.notes.push(format!(
            "target folder or UIDVALIDITY changed: re-pairing {} messages",
            plan.stale_target.len()
        ));
    }
    // Target messages the state does not know, by content, with their flags:
    // each digested as it arrives (never a FETCH's worth held), and one above
    // the stream threshold slice by slice, as a streamed copy is read.
    let mut index = Vec::new();
    if tbox.exists > 0 {
        let all: Vec<Fetch> = tgt
            .session
            .uid_fetch("1:*", "(UID RFC822.SIZE)")
            .await?
            .try_collect()
            .await?;
        let sizes: HashMap<u32, u32> = all
            .iter()
            .filter_map(|f| Some((f.uid?, f.size.unwrap_or(0))))
            .collect();
        let uids: Vec<u32> = all.iter().filter_map(|f| f.uid).collect();
        let (large, whole): (Vec<u32>, Vec<u32>) = plan
            .unknown_target(&uids)
            .into_iter()
            .partition(|u| sizes[u] as usize > opts.stream_threshold);
        for chunk in whole.chunks(opts.fetch_batch) {
            let mut stream = tgt
                .session
                .uid_fetch(uid_set(chunk), "(UID FLAGS BODY.PEEK[])")
                .await?;
            while let Some(f) = stream.try_next().await? {
                if let (Some(uid), Some(body)) = (f.uid, f.body()) {
                    index.push((
                        (message_id(body), digest(body)),
                        uid,
                        flag_string(flags_of(&f).into_iter()),
                    ));
                }
            }
        }
        let slice = opts.stream_slice.max(1024) as u32;
        for uid in large {
            let d = digest_slices(tgt, uid, None, slice, true).await?;
            let flags = d.meta.as_ref().map(flags_of).unwrap_or_default();
            index.push((
                (d.message_id, d.digest),
                uid,
                flag_string(flags.into_iter()),
            ));
        }
    }
    tgt.drain_unsolicited();
    let mut pools = plan.pools(index);

    // Rows whose target message was lost track of: paired again by content,
    // or forgotten so that this run copies them again.
    let rematch = plan.rematch(&mut pools);
    if !rematch.lost.is_empty() {
        let keys = plan::source_keys(&rematch.lost);
        state::forget_messages(store, address, &pair.source, &keys).await?;
        for r in &rematch.lost {
            fr.notes.push(format!(
                "source UID {} no longer on the target; will be copied again",
                r.source_uid
            ));
        }
    }
    fr.repaired += rematch.repaired.len() as u64;
    state::record_messages(store, address, &pair.source, &rematch.repaired).await?;

    let append_limit = tgt.append_limit();
    let copies = plan.copies(&listing, opts.stream_threshold, append_limit);
    job.progress
        .messages_total
        .fetch_add(copies.len() as u64, Ordering::Relaxed);
    let mut copying = Copying {
        job,
        plan: &plan,
        append_limit,
        pools,
        fr,
    };
    let whole = copying.copy_large(src, tgt, &copies).await?;
    copying.copy_whole(src, tgt, &whole).await?;
    let Copying { pools, fr, .. } = copying;

    // Flag changes on the source since the last run (RFC 3501 6.4.6 STORE FLAGS
    // replaces the set), including messages paired this run whose target copy
    // carries other flags, and deletes. The state now holds every pairing:
    // read it back.
    let rows = plan.paired(state::messages(store, address, &pair.source).await?);
    let finish = plan.finish(&listing, &rows, opts.propagate_deletes, tgt.has("UIDPLUS"));
    for (flags, uids) in &finish.flag_stores {
        let _: Vec<Fetch> = tgt
            .session
            .uid_store(uid_set(uids), format!("FLAGS.SILENT ({flags})"))
            .await?
            .try_collect()
            .await?;
        fr.flags_updated += uids.len() as u64;
    }
    state::record_messages(store, address, &pair.source, &finish.flagged).await?;
    if finish.no_uidplus {
        fr.notes.push(
            "target lacks UIDPLUS: deletes not propagated (EXPUNGE would remove other messages)"
                .into(),
        );
    }
    if !finish.expunge.is_empty() {
        let set = uid_set(&finish.expunge);
        let _: Vec<Fetch> = tgt
            .session
            .uid_store(&set, "+FLAGS.SILENT (\\Deleted)")
            .await?
            .try_collect()
            .await?;
        // RFC 4315 2.1: UID EXPUNGE removes only these messages.
        let _: Vec<u32> = tgt.session.uid_expunge(&set).await?.try_collect().await?;
        fr.deleted += finish.expunge.len() as u64;
    }
    if !finish.forget.is_empty() {
        state::forget_messages(store, address, &pair.source, &finish.forget).await?;
    }
    tgt.drain_unsolicited();

    if let Some(first) = plan.old.first() {
        let keys = plan::source_keys(&plan.old);
        state::forget_messages(store, address, &pair.source, &keys).await?;
        let detail = format!(
            "{}: UIDVALIDITY {} -> {validity}; {} re-paired, {} copied, {} old rows without a match",
            pair.source,
            first.source_uidvalidity,
            fr.repaired,
            fr.copied,
            pools.unmatched_old()
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
            source_uidnext: job.status.uid_next,
            source_highestmodseq: job.status.highest_modseq,
            source_exists: job.status.messages,
        },
    )
    .await?;
    Ok(())
}

/// `--dry-run` for one folder: the same [`FolderPlan`] as `sync_folder` from
/// the same inputs (the source's UIDs, flags and sizes, the state's rows),
/// with the target only EXAMINEd (RFC 3501 6.3.2: read-only) and nothing
/// written. With no target bodies read there is nothing to pair by content:
/// rows that lost their target message count as copies, as the real run's
/// unmatched ones do, and a note says what a real run may pair instead.
async fn plan_folder_dry(
    job: &FolderJob<'_>,
    tgt: &mut Conn,
    listing: &SourceListing,
    fr: &mut FolderReport,
) -> Result<(), ImapError> {
    let pair = job.pair;
    let (tvalidity, texists) = if job.create {
        (0, 0)
    } else {
        let tbox = tgt
            .session
            .examine(job.tgt_wire)
            .await
            .map_err(|e| folder_err(&pair.target, "EXAMINE", e))?;
        tgt.drain_unsolicited();
        (tbox.uid_validity.unwrap_or(0), tbox.exists)
    };
    let rows = state::messages(job.store, job.address, &pair.source).await?;
    let mut plan = FolderPlan::new(&pair.target, listing.uidvalidity, tvalidity, rows);
    plan.rematch(&mut Pools::default());
    let append_limit = tgt.append_limit();
    let f = plan::forecast(
        &plan.copies(listing, job.opts.stream_threshold, append_limit),
        append_limit,
    );
    fr.copied += f.copied;
    fr.bytes += f.bytes;
    fr.skipped.extend(f.skipped);
    let unknown = u64::from(texists).saturating_sub(plan.current.len() as u64);
    if unknown > 0 && fr.copied > 0 {
        fr.notes.push(format!(
            "the target holds {unknown} messages the sync state does not know: copies identical to one of them (Message-ID and digest) are paired instead"
        ));
    }
    if let Some(first) = plan.old.first() {
        fr.notes.push(format!(
            "source UIDVALIDITY changed ({} -> {}): {} messages are re-paired by Message-ID and digest where they match",
            first.source_uidvalidity,
            listing.uidvalidity,
            plan.old.len()
        ));
    }
    let finish = plan.finish(
        listing,
        &plan.current,
        job.opts.propagate_deletes,
        tgt.has("UIDPLUS"),
    );
    fr.flags_updated = finish.flag_stores.values().map(|u| u.len() as u64).sum();
    fr.deleted = finish.expunge.len() as u64;
    if finish.no_uidplus {
        fr.notes.push(
            "target lacks UIDPLUS: deletes would not be propagated (EXPUNGE would remove other messages)"
                .into(),
        );
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

/// A message read slice by slice (never whole): its Message-ID (from the
/// first slice), SHA-256, length, and with `meta` the first slice's FLAGS
/// and INTERNALDATE.
struct Sliced {
    message_id: Option<String>,
    digest: String,
    len: u32,
    meta: Option<Fetch>,
}

/// Reads `uid` in slices of `slice` bytes (RFC 3501 6.4.5 BODY[]<offset.len>)
/// up to `size`, or without one, to the first short slice; an empty slice
/// before `size` ends it early (the caller compares `len`).
async fn digest_slices(
    conn: &mut Conn,
    uid: u32,
    size: Option<u32>,
    slice: u32,
    meta: bool,
) -> Result<Sliced, ImapError> {
    let mut hasher = Sha256::new();
    let (mut message_id_of, mut first_meta, mut offset) = (None, None, 0u32);
    loop {
        let want = size.map_or(slice, |s| slice.min(s - offset));
        let (data, m) = fetch_slice(conn, uid, offset, want, meta && offset == 0).await?;
        if offset == 0 {
            message_id_of = message_id(&data);
            first_meta = m;
        }
        hasher.update(&data);
        offset += data.len() as u32;
        let done = match size {
            Some(s) => data.is_empty() || offset >= s,
            None => (data.len() as u32) < slice,
        };
        if done {
            break;
        }
    }
    Ok(Sliced {
        message_id: message_id_of,
        digest: hex(&hasher.finalize()),
        len: offset,
        meta: first_meta,
    })
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

/// A batch whose APPENDs were sent and are not yet answered. It owns the
/// batch's FETCH responses (the only copy of the bodies in memory): a refused
/// MULTIAPPEND sends the appended ones again (`Conn::append_collect`).
struct InFlight<'a> {
    rows: Vec<MessageRow>,
    sent: crate::conn::Sent,
    fetched: Vec<Fetch>,
    /// Indices into `fetched` of the messages appended, in order.
    appended: Vec<usize>,
    /// The batch's share of the account's budget, returned when it lands.
    _held: Option<tokio::sync::SemaphorePermit<'a>>,
}

/// A batch being gathered: its messages and their share of the budget.
#[derive(Default)]
struct Gathered<'a> {
    fetched: Vec<Fetch>,
    bytes: usize,
    held: Option<tokio::sync::SemaphorePermit<'a>>,
}

/// Whether the batch being gathered goes to the target before the message
/// just fetched joins it: it would pass `max_bytes` (a batch is at most
/// `max_bytes`, or one message when that alone is larger) or already holds
/// `max_messages`.
fn cut_before(
    batch_len: usize,
    batch_bytes: usize,
    next_len: usize,
    max_bytes: usize,
    max_messages: usize,
) -> bool {
    batch_len > 0 && (batch_bytes + next_len > max_bytes || batch_len >= max_messages)
}

/// Messages per MULTIAPPEND batch.
const BATCH_MESSAGES: usize = 64;

/// A real run executing one folder's copies: the plan, its pools (each
/// entry pairs once) and the report.
struct Copying<'a> {
    job: &'a FolderJob<'a>,
    plan: &'a FolderPlan,
    append_limit: Option<u64>,
    pools: Pools,
    fr: &'a mut FolderReport,
}

impl<'a> Copying<'a> {
    /// The row a copied source message is recorded with (no target UID yet).
    fn row(
        &self,
        uid: u32,
        message_id: Option<String>,
        digest: String,
        flags: String,
    ) -> MessageRow {
        MessageRow {
            source_uidvalidity: self.plan.source_uidvalidity,
            source_uid: uid,
            target_folder: self.plan.target_folder.clone(),
            target_uidvalidity: self.plan.target_uidvalidity,
            target_uid: None,
            message_id,
            digest,
            flags,
        }
    }

    async fn record(&self, rows: &[MessageRow]) -> Result<(), ImapError> {
        state::record_messages(
            self.job.store,
            self.job.address,
            &self.job.pair.source,
            rows,
        )
        .await?;
        Ok(())
    }

    /// Records and reports a message the target will not take, never
    /// dropped silently (`message_id` is `Some` once the header was read).
    async fn skip(
        &mut self,
        uid: u32,
        message_id: Option<Option<&str>>,
        reason: &str,
    ) -> Result<(), ImapError> {
        state::record_skipped(
            self.job.store,
            self.job.address,
            &self.job.pair.source,
            self.plan.source_uidvalidity,
            uid,
            message_id.flatten(),
            reason,
        )
        .await?;
        self.fr
            .skipped
            .push(plan::skip_line(uid, message_id, reason));
        Ok(())
    }

    /// Refuses or streams the large copies; returns the UIDs to copy whole
    /// (sorted), with any large one whose size turned out unreliable.
    async fn copy_large(
        &mut self,
        src: &mut Conn,
        tgt: &mut Conn,
        copies: &[plan::NewMessage],
    ) -> Result<Vec<u32>, ImapError> {
        let mut whole = Vec::new();
        for c in copies {
            match &c.how {
                How::Whole => whole.push(c.uid),
                How::Refuse(reason) => self.skip(c.uid, None, reason).await?,
                How::Stream => {
                    let placed = self.stream_large(src, tgt, c.uid, c.size).await?;
                    self.job
                        .progress
                        .messages_done
                        .fetch_add(1, Ordering::Relaxed);
                    match placed {
                        Large::Placed(row) => self.record(&[row]).await?,
                        Large::Refused { message_id, reason } => {
                            self.skip(c.uid, Some(message_id.as_deref()), &reason)
                                .await?
                        }
                        // RFC822.SIZE did not match BODY[]: copy it whole instead.
                        Large::SizeUnreliable => whole.push(c.uid),
                    }
                }
            }
        }
        whole.sort_unstable();
        Ok(whole)
    }

    /// Copies (or pairs) whole messages, streaming batches from the source
    /// while the previous batch's APPENDs are answered.
    async fn copy_whole(
        &mut self,
        src: &mut Conn,
        tgt: &mut Conn,
        uids: &[u32],
    ) -> Result<(), ImapError> {
        let opts = self.job.opts;
        let timeout = src.server.command_timeout;
        let mut in_flight: Option<InFlight<'a>> = None;
        for chunk in uids.chunks(opts.fetch_batch) {
            src.server.limits.pace().await;
            let asked = std::time::Instant::now();
            let mut stream = src
                .session
                .uid_fetch(uid_set(chunk), "(UID FLAGS INTERNALDATE BODY.PEEK[])")
                .await?;
            let mut batch = Gathered::default();
            let mut first = true;
            let mut received = 0usize;
            loop {
                // A server that stops answering mid-FETCH is a dropped connection.
                let next = tokio::time::timeout(timeout, stream.try_next())
                    .await
                    .map_err(|_| {
                        ImapError::Io(format!(
                            "no answer to FETCH in {} for {timeout:?}",
                            self.job.pair.source
                        ))
                    })??;
                if first {
                    first = false;
                    src.server.limits.observe_latency(asked.elapsed());
                }
                let Some(f) = next else {
                    if !batch.fetched.is_empty() {
                        self.send_batch(tgt, std::mem::take(&mut batch), &mut in_flight)
                            .await?;
                    }
                    break;
                };
                received += usize::from(f.uid.is_some_and(|u| chunk.binary_search(&u).is_ok()));
                let len = f.body().map(<[u8]>::len).unwrap_or(0);
                if let Some(bw) = &src.bandwidth {
                    bw.consume(len as u64).await;
                }
                if cut_before(
                    batch.fetched.len(),
                    batch.bytes,
                    len,
                    opts.max_batch_bytes,
                    BATCH_MESSAGES,
                ) {
                    self.send_batch(tgt, std::mem::take(&mut batch), &mut in_flight)
                        .await?;
                }
                let permit = self.hold(tgt, len, &mut batch, &mut in_flight).await?;
                match &mut batch.held {
                    Some(p) => p.merge(permit),
                    None => batch.held = Some(permit),
                }
                batch.bytes += len;
                batch.fetched.push(f);
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
            let rows = self.land_batch(tgt, last).await?;
            self.record(&rows).await?;
        }
        Ok(())
    }

    /// Copies one large message slice by slice: at most one slice is in memory.
    /// The APPEND literal's length is announced up front (RFC 3501 4.3), so the
    /// size was checked by the plan; when lost state or a UIDVALIDITY change
    /// needs the digest before deciding, the message is read once for that,
    /// then copied.
    async fn stream_large(
        &mut self,
        src: &mut Conn,
        tgt: &mut Conn,
        uid: u32,
        size: u32,
    ) -> Result<Large, ImapError> {
        let source = &self.job.pair.source;
        let slice = self.job.opts.stream_slice.max(1024) as u32;
        // The last byte must exist and nothing may follow it.
        let (tail, meta) = fetch_slice(src, uid, size - 1, 2, true).await?;
        if tail.len() != 1 {
            return Ok(Large::SizeUnreliable);
        }
        let meta = meta.ok_or(ImapError::Folder {
            folder: source.clone(),
            message: format!("UID {uid} vanished"),
        })?;
        let flags = flags_of(&meta);
        let date = append_date(&meta);
        let flag_text = flag_string(flags.iter().cloned());
        if !self.pools.is_empty() {
            let d = digest_slices(src, uid, Some(size), slice, false).await?;
            if d.len != size {
                return Ok(Large::SizeUnreliable);
            }
            let mid = d.message_id;
            let row = self.row(uid, mid.clone(), d.digest, flag_text.clone());
            let p = self.pools.place(row, u64::from(size), self.append_limit);
            self.fr.repaired += u64::from(p.repaired);
            self.fr.matched += u64::from(p.matched);
            match p.action {
                Action::Pair(row) => return Ok(Large::Placed(row)),
                Action::Skip(reason) => {
                    return Ok(Large::Refused {
                        message_id: mid,
                        reason,
                    });
                }
                Action::Append(_) => {}
            }
        }
        let tag = tgt
            .append_begin(self.job.tgt_wire, &flags, date.as_deref(), size)
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
                    "UID {uid} in {source} changed size while being copied"
                )));
            }
            if offset == 0 {
                mid = message_id(&data);
            }
            hasher.update(&data);
            tgt.write_literal(&data).await?;
            offset += data.len() as u32;
        }
        let dig = hex(&hasher.finalize());
        match tgt.append_end(&tag).await? {
            Ok(appended) => {
                self.fr.copied += 1;
                self.fr.bytes += u64::from(size);
                let tvalidity = self.plan.target_uidvalidity;
                let target_uid = appended.filter(|(v, _)| *v == tvalidity).map(|(_, u)| u);
                Ok(Large::Placed(MessageRow {
                    target_uid,
                    ..self.row(uid, mid, dig, flag_text)
                }))
            }
            Err(text) => Ok(Large::Refused {
                message_id: mid,
                reason: format!("target refused APPEND: {text}"),
            }),
        }
    }

    /// Places a gathered batch and leaves its APPENDs in flight; the previous
    /// batch's APPENDs were answered while this one was fetched, so they are
    /// collected and recorded now. At most two batches are in memory: the one
    /// in flight and the one being fetched.
    async fn send_batch(
        &mut self,
        tgt: &mut Conn,
        batch: Gathered<'a>,
        in_flight: &mut Option<InFlight<'a>>,
    ) -> Result<(), ImapError> {
        let (rows, flight) = self.place_batch(tgt, batch).await?;
        self.record(&rows).await?;
        if let Some(prev) = std::mem::replace(in_flight, flight) {
            self.land(tgt, prev).await?;
        }
        Ok(())
    }

    async fn land(&mut self, tgt: &mut Conn, flight: InFlight<'a>) -> Result<(), ImapError> {
        let rows = self.land_batch(tgt, flight).await?;
        self.record(&rows).await
    }

    /// `bytes` of the account's budget for a message just fetched. When the
    /// folders hold it all, this folder first sends what it gathered and
    /// lands what it has in flight, then waits holding nothing: a folder
    /// waits only for folders that are still moving, never for one that
    /// waits too.
    async fn hold(
        &mut self,
        tgt: &mut Conn,
        bytes: usize,
        batch: &mut Gathered<'a>,
        in_flight: &mut Option<InFlight<'a>>,
    ) -> Result<tokio::sync::SemaphorePermit<'a>, ImapError> {
        let held = self.job.held;
        // A message larger than the whole budget waits for all of it.
        let want = bytes.min(batch_budget(self.job.opts)).max(1) as u32;
        loop {
            if let Ok(p) = held.try_acquire_many(want) {
                return Ok(p);
            }
            if !batch.fetched.is_empty() {
                self.send_batch(tgt, std::mem::take(batch), in_flight)
                    .await?;
            } else if let Some(prev) = in_flight.take() {
                self.land(tgt, prev).await?;
            } else {
                return held
                    .acquire_many(want)
                    .await
                    .map_err(|_| ImapError::Io("the batch budget was closed".into()));
            }
        }
    }

    /// Reads the answers to a batch's APPENDs; returns the rows to record.
    async fn land_batch(
        &mut self,
        tgt: &mut Conn,
        flight: InFlight<'a>,
    ) -> Result<Vec<MessageRow>, ImapError> {
        let mut rows = Vec::new();
        let items: Vec<AppendItem<'_>> = flight
            .appended
            .iter()
            .map(|&i| append_item(&flight.fetched[i]))
            .collect();
        let sizes: Vec<u64> = items.iter().map(|i| i.body.len() as u64).collect();
        let results = tgt.append_collect(flight.sent, &items).await?;
        for ((row, size), result) in flight.rows.into_iter().zip(sizes).zip(results) {
            match result {
                Ok(appended) => {
                    self.fr.copied += 1;
                    self.fr.bytes += size;
                    self.job
                        .progress
                        .bytes_done
                        .fetch_add(size, Ordering::Relaxed);
                    let tvalidity = self.plan.target_uidvalidity;
                    let target_uid = appended.filter(|(v, _)| *v == tvalidity).map(|(_, u)| u);
                    rows.push(MessageRow { target_uid, ..row });
                }
                Err(text) => {
                    let reason = format!("target refused APPEND: {text}");
                    self.skip(row.source_uid, Some(row.message_id.as_deref()), &reason)
                        .await?;
                }
            }
        }
        Ok(rows)
    }

    /// Places one batch of fetched source messages ([`Pools::place`]): pairs
    /// them with target copies, or sends their APPENDs; returns the rows
    /// paired now and the APPENDs in flight.
    async fn place_batch(
        &mut self,
        tgt: &mut Conn,
        gathered: Gathered<'a>,
    ) -> Result<(Vec<MessageRow>, Option<InFlight<'a>>), ImapError> {
        let batch = gathered.fetched;
        let mut rows = Vec::new();
        let mut to_append = Vec::new();
        let mut appended = Vec::new();
        for (i, f) in batch.iter().enumerate() {
            let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                continue;
            };
            let mid = message_id(body);
            let row = self.row(
                uid,
                mid.clone(),
                digest(body),
                flag_string(flags_of(f).iter().cloned()),
            );
            self.job
                .progress
                .messages_done
                .fetch_add(1, Ordering::Relaxed);
            let p = self.pools.place(row, body.len() as u64, self.append_limit);
            self.fr.repaired += u64::from(p.repaired);
            self.fr.matched += u64::from(p.matched);
            match p.action {
                Action::Pair(row) => rows.push(row),
                Action::Skip(reason) => self.skip(uid, Some(mid.as_deref()), &reason).await?,
                Action::Append(row) => {
                    appended.push(i);
                    to_append.push(row);
                }
            }
        }
        if appended.is_empty() {
            return Ok((rows, None));
        }
        let items: Vec<AppendItem<'_>> = appended.iter().map(|&i| append_item(&batch[i])).collect();
        let sent = tgt.append_send(self.job.tgt_wire, &items).await?;
        drop(items);
        Ok((
            rows,
            Some(InFlight {
                rows: to_append,
                sent,
                fetched: batch,
                appended,
                _held: gathered.held,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_holds_two_batches() {
        const MB: usize = 1 << 20;
        for (batch, budget) in [(8 * MB, 16 * MB), (0, 2), (usize::MAX, u32::MAX as usize)] {
            let opts = SyncOptions {
                max_batch_bytes: batch,
                ..Default::default()
            };
            assert_eq!(batch_budget(&opts), budget, "max_batch_bytes {batch}");
        }
    }

    #[test]
    fn a_batch_is_cut_before_it_would_pass_its_bytes_or_count() {
        const MB: usize = 1 << 20;
        // (messages in the batch, its bytes, the next message's bytes, cut first?)
        let table = [
            (0, 0, 20 * MB, false), // an empty batch takes any message: one alone may pass 8 MB
            (0, 0, 100, false),
            (1, 100, 100, false),
            (3, 7 * MB, MB, false), // exactly 8 MB: still one batch
            (3, 7 * MB, MB + 1, true),
            (1, 5 * MB, 4 * MB, true), // 9 MB would be over: the 4 MB message starts the next
            (63, 63 * 100, 100, false),
            (64, 64 * 100, 100, true), // 64 messages at most
        ];
        for (len, bytes, next, want) in table {
            assert_eq!(
                cut_before(len, bytes, next, 8 * MB, BATCH_MESSAGES),
                want,
                "{len} messages, {bytes} bytes, next {next}"
            );
        }
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
