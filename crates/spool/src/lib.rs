//! The spool: one file per accepted message, in the manner of Postfix's queue
//! file. A file is a sequence of framed records ending in an explicit END
//! record with a checksum, so a file torn by a crash is never mistaken for a
//! whole one:
//!
//! ```text
//! "GODWITQ1\n"
//! u32 len | header JSON (queue id, envelope, arrival, Message-ID)
//! u64 len | message bytes (CRLF-normalized, Received header included)
//! "END!" | u32 crc32 of everything above
//! then zero or more status records: u32 len | JSON | u32 crc32(JSON)
//! ```
//!
//! `store` writes to `tmp/`, fdatasyncs the file, renames it into `queue/`
//! and fsyncs the directory; only then may the SMTP reply be 250. Directory
//! syncs are group-committed (`DirSync`): one fsync covers every rename and
//! unlink of the sessions and deliveries waiting meanwhile. Per-recipient
//! outcomes are appended as status records (fdatasync'ed for final outcomes),
//! so a restart never re-sends to a recipient already delivered. When every
//! recipient is final, the file is removed.

use godwit_smtp_proto::Envelope;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

const MAGIC: &[u8] = b"GODWITQ1\n";
const END: &[u8] = b"END!";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool file {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "spool {path} is in use by another godwit process{holder}: one gateway owns a spool; stop it first, or use the queue commands, which reach it"
    )]
    Locked { path: PathBuf, holder: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the spool keeps about a message besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub queue_id: String,
    pub arrival_ms: i64,
    pub message_id: Option<String>,
    pub envelope: Envelope,
    /// "dsn" for delivery status notifications godwit generated: they go to
    /// the DSN platform, whatever the routing map says, and never get a DSN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// How long the client's transaction took, MAIL FROM to the end of DATA
    /// (the `a` of Postfix's `delays=a/b/c/d`; the spool's fsync that follows
    /// counts from `arrival_ms`); 0 for mail godwit made itself.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub accept_ms: u64,
    /// `[journal]`: which envelope recipient is the journal copy (added at
    /// accept, in this same file, so one fsync makes both durable). It is
    /// sent as a journal report, never bounced, never delays the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalRcpt>,
}

/// The journal recipient of a message (see `Header::journal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalRcpt {
    /// Its index in `envelope.rcpts` (the last one).
    pub rcpt: usize,
    /// `journal.platform` when the message was accepted; None: the routing map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

impl Header {
    /// Whether recipient `i` is the journal copy.
    pub fn is_journal(&self, i: usize) -> bool {
        self.journal.as_ref().is_some_and(|j| j.rcpt == i)
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    #[default]
    Pending,
    Deferred,
    Held,
    Delivered,
    Failed,
    /// Removed from the queue by an operator (`queue delete`): final, never
    /// delivered, and no DSN.
    Deleted,
}

impl RcptStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RcptStatus::Delivered | RcptStatus::Failed | RcptStatus::Deleted
        )
    }
}

/// One status record: the latest record for a recipient index wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRecord {
    pub rcpt: usize,
    pub status: RcptStatus,
    pub at_ms: i64,
    #[serde(default)]
    pub attempts: u32,
    /// When the next attempt is due (deferred recipients), unix ms.
    #[serde(default)]
    pub next_ms: i64,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub reply: Option<String>,
    /// Platforms that hold a copy (dual delivery delivers to each once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered_to: Vec<String>,
    /// Held by an operator (`queue hold`): only `queue release` frees it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operator_hold: bool,
    /// A delay warning was sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warned: bool,
}

/// A message as recovered from disk (or just stored).
#[derive(Debug, Clone)]
pub struct Spooled {
    pub header: Header,
    /// Offset and length of the message bytes inside the file.
    pub body_offset: u64,
    pub body_len: u64,
    /// Latest status per recipient index.
    pub status: Vec<Option<StatusRecord>>,
}

/// Group commit for directory fsyncs: concurrent callers share one fsync
/// that starts after their own rename or unlink, so N sessions cost far fewer
/// than N directory syncs, and each caller still returns only once durable.
struct DirSync {
    /// `queue/`, open for the life of the spool: a group sync is one fsync,
    /// not an open, an fsync and a close.
    dir: File,
    state: std::sync::Mutex<(u64, u64, bool)>, // (requested, synced, syncing)
    cv: std::sync::Condvar,
}

impl DirSync {
    fn sync(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.0 += 1;
        let mine = st.0;
        loop {
            if st.1 >= mine {
                return Ok(());
            }
            if !st.2 {
                st.2 = true;
                let target = st.0;
                drop(st);
                let r = self.dir.sync_all();
                st = self.state.lock().unwrap();
                st.2 = false;
                if r.is_ok() {
                    st.1 = st.1.max(target);
                }
                self.cv.notify_all();
                r?;
            } else {
                st = self.cv.wait(st).unwrap();
            }
        }
    }
}

pub struct Spool {
    /// The exclusive lock on `lock`, held for the life of the value: one
    /// process owns a spool at a time (a serving gateway, or an offline queue
    /// command when none runs). Readers (`list`, `read_body_at`) take no lock
    /// and never write.
    _lock: File,
    dirsync: DirSync,
    queue: PathBuf,
    tmp: PathBuf,
    corrupt: PathBuf,
    counter: AtomicU32,
    /// Distinguishes nodes or restarts within one millisecond.
    node_salt: u32,
    /// Power-loss simulation for tests (`GODWIT_POWERLOSS_SHADOW=DIR`): after
    /// every fsync that makes something durable, the synced state is copied
    /// to DIR; what was written but not synced never reaches it. Starting a
    /// gateway on DIR then shows what a power cut would have left.
    shadow: Option<PathBuf>,
}

/// A damaged queue file moved to `corrupt/`, and why.
pub type Quarantined = (PathBuf, String);

impl Spool {
    /// Opens the spool for exclusive use: takes its lock (or fails with
    /// `SpoolError::Locked` naming the holder), then cleans `tmp/`.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        let queue = dir.join("queue");
        let tmp = dir.join("tmp");
        let corrupt = dir.join("corrupt");
        for d in [&queue, &tmp, &corrupt] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let lock_path = dir.join("lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(SpoolError::Locked {
                    path: dir.to_path_buf(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {pid})")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let _ = lock.set_len(0);
        let _ = lock.write_all_at(std::process::id().to_string().as_bytes(), 0);
        // Only the owner may clean tmp/: a file there is either being written
        // by the owner right now, or (after a crash) was never acknowledged
        // with 250, so its client still holds the message and will retry.
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let dirsync = DirSync {
            dir: File::open(&queue).map_err(io(&queue))?,
            state: Default::default(),
            cv: Default::default(),
        };
        let shadow = std::env::var_os("GODWIT_POWERLOSS_SHADOW").map(PathBuf::from);
        if let Some(dir) = &shadow {
            for d in ["queue", "corrupt", "tmp"] {
                std::fs::create_dir_all(dir.join(d)).map_err(io(dir))?;
            }
        }
        Ok(Spool {
            _lock: lock,
            dirsync,
            queue,
            tmp,
            corrupt,
            counter: AtomicU32::new(rand::random()),
            node_salt: rand::random::<u32>() & 0xfff,
            shadow,
        })
    }

    /// See `shadow`: the file as it is now has just been made durable.
    fn shadow_synced(&self, queue_id: &str) {
        if let Some(dir) = &self.shadow {
            let to = dir.join("queue").join(queue_id);
            let part = to.with_extension("part");
            if std::fs::copy(self.path(queue_id), &part).is_ok() {
                let _ = std::fs::rename(&part, &to);
            }
        }
    }

    /// See `shadow`: a new file's data is durable, but not yet its name in
    /// `queue/` (a power cut now leaves it unlinked, as in `tmp/`).
    fn shadow_data_synced(&self, tmp: &Path, queue_id: &str) {
        if let Some(dir) = &self.shadow {
            let _ = std::fs::copy(tmp, dir.join("tmp").join(queue_id));
        }
    }

    /// See `shadow`: the directory sync after a new file's rename: its name
    /// in `queue/` is durable. Only now may the copy appear there.
    fn shadow_linked(&self, queue_id: &str) {
        if let Some(dir) = &self.shadow {
            let _ = std::fs::rename(
                dir.join("tmp").join(queue_id),
                dir.join("queue").join(queue_id),
            );
        }
    }

    /// See `shadow`: the removal of a file has just been made durable.
    fn shadow_removed(&self, queue_id: &str, to_corrupt: bool) {
        if let Some(dir) = &self.shadow {
            let from = dir.join("queue").join(queue_id);
            if to_corrupt {
                let _ = std::fs::rename(&from, dir.join("corrupt").join(queue_id));
            } else {
                let _ = std::fs::remove_file(from);
            }
        }
    }

    pub fn queue_dir(&self) -> &Path {
        &self.queue
    }

    /// A new queue ID: 9 Crockford base32 characters of arrival time (ms)
    /// followed by 7 of counter and salt. Sorts by arrival, unique per spool.
    pub fn new_queue_id(&self) -> String {
        let ms = now_ms() as u64;
        let c = self.counter.fetch_add(1, Ordering::Relaxed) as u64;
        let tail = (c << 12 | self.node_salt as u64) & ((1 << 35) - 1);
        let mut s = String::with_capacity(20);
        push_base32(&mut s, ms, 9);
        push_base32(&mut s, tail, 7);
        s
    }

    fn path(&self, queue_id: &str) -> PathBuf {
        self.queue.join(queue_id)
    }

    /// Writes the message durably. When this returns Ok, the message survives
    /// a crash or power loss; the caller may then reply 250.
    pub fn store(&self, header: &Header, message: &[u8]) -> Result<Spooled, SpoolError> {
        self.store_parts(header, &[message])
    }

    /// `store` for a message given in parts (the Received header we add,
    /// then the client's content): written one after the other, with the
    /// CRC computed as they go, so a 50 MB message is never copied.
    pub fn store_parts(&self, header: &Header, parts: &[&[u8]]) -> Result<Spooled, SpoolError> {
        self.store_with(header, parts, &[])
    }

    /// `store_parts` with status records written in the same file before its
    /// one data sync (a loop hold decided at accept): durable together with
    /// the message, before the 250, never a moment after.
    pub fn store_with(
        &self,
        header: &Header,
        parts: &[&[u8]],
        records: &[StatusRecord],
    ) -> Result<Spooled, SpoolError> {
        self.store_spilled(header, parts, None, &[], records)
    }

    /// A file in `tmp/` for the middle of a large message while it arrives
    /// (see `Spill`).
    pub fn spill(&self) -> Result<Spill, SpoolError> {
        let path = self.tmp.join(format!("{}.spill", self.new_queue_id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Spill {
            file,
            path,
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    /// `store_with` for a message whose bytes are `before`, then what was
    /// spilled (if anything), then `after`. The spilled bytes are copied
    /// file to file in the kernel (copy_file_range), never through memory;
    /// their CRC was computed as they arrived and is combined here.
    pub fn store_spilled(
        &self,
        header: &Header,
        before: &[&[u8]],
        spilled: Option<&Spill>,
        after: &[&[u8]],
        records: &[StatusRecord],
    ) -> Result<Spooled, SpoolError> {
        let tmp = self.tmp.join(&header.queue_id);
        let dst = self.path(&header.queue_id);
        let head = serde_json::to_vec(header).expect("header serializes");
        let body_len: u64 = before
            .iter()
            .chain(after)
            .map(|p| p.len() as u64)
            .sum::<u64>()
            + spilled.map_or(0, |s| s.len);
        let mut prefix = Vec::with_capacity(MAGIC.len() + 4 + head.len() + 8);
        prefix.extend_from_slice(MAGIC);
        prefix.extend_from_slice(&(head.len() as u32).to_le_bytes());
        prefix.extend_from_slice(&head);
        prefix.extend_from_slice(&body_len.to_le_bytes());
        let body_offset = prefix.len() as u64;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&prefix);
        for p in before {
            crc.update(p);
        }
        if let Some(s) = spilled {
            crc.combine(&s.crc);
        }
        for p in after {
            crc.update(p);
        }
        let mut trailer = Vec::with_capacity(END.len() + 4);
        trailer.extend_from_slice(END);
        trailer.extend_from_slice(&crc.finalize().to_le_bytes());
        trailer.extend_from_slice(&encode_records(records));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io(&tmp))?;
            // One writev for the prefix and the parts held in memory (and
            // one for what follows a spill), not one write each.
            let head = std::iter::once(&prefix[..]).chain(before.iter().copied());
            let tail = after.iter().copied().chain(std::iter::once(&trailer[..]));
            match spilled {
                None => write_all_vectored(&mut f, head.chain(tail)).map_err(io(&tmp))?,
                Some(s) => {
                    write_all_vectored(&mut f, head).map_err(io(&tmp))?;
                    s.copy_to(&mut f).map_err(io(&tmp))?;
                    write_all_vectored(&mut f, tail).map_err(io(&tmp))?;
                }
            }
            // Each session syncs its own file's data in its own thread: on
            // this ext4 (no journal) a data sync cannot be shared, but the
            // syncs of concurrent sessions reach the disk together.
            f.sync_data().map_err(io(&tmp))?;
            drop(f);
            self.shadow_data_synced(&tmp, &header.queue_id);
            // Renamed only once its data is durable, so a crash never leaves
            // a torn file under a queue name.
            std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
            // The rename is durable only once the directory is synced: one
            // group-committed fsync for every session renaming meanwhile
            // (and every removal), so N sessions cost far fewer than N.
            self.dirsync.sync().map_err(io(&self.queue))?;
            self.shadow_linked(&header.queue_id);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(&dst);
        }
        result?;
        let mut status = vec![None; header.envelope.rcpts.len()];
        for r in records {
            if let Some(slot) = status.get_mut(r.rcpt) {
                *slot = Some(r.clone());
            }
        }
        Ok(Spooled {
            header: header.clone(),
            body_offset,
            body_len,
            status,
        })
    }

    /// Reads the message bytes (for delivery).
    pub fn read_body(&self, m: &Spooled) -> Result<Vec<u8>, SpoolError> {
        read_body_from(&self.path(&m.header.queue_id), m)
    }

    /// The first `max` bytes of the message (all of it when shorter): what a
    /// DSN returns or a journal report reads, never a large body whole.
    pub fn read_head(&self, m: &Spooled, max: u64) -> Result<Vec<u8>, SpoolError> {
        let f = self.open_body(m)?;
        let mut head = vec![0u8; m.body_len.min(max) as usize];
        let p = self.path(&m.header.queue_id);
        f.read_exact_at(&mut head, m.body_offset).map_err(io(&p))?;
        Ok(head)
    }

    /// Opens the message bytes for streaming: the file, positioned nowhere,
    /// with the body's offset and length (a 50 MB message is never held
    /// whole).
    pub fn open_body(&self, m: &Spooled) -> Result<File, SpoolError> {
        let p = self.path(&m.header.queue_id);
        let f = File::open(&p).map_err(io(&p))?;
        let meta = f.metadata().map_err(io(&p))?;
        if !meta.is_file() {
            return Err(SpoolError::Corrupt {
                path: p,
                reason: "not a regular file".into(),
            });
        }
        let len = meta.len();
        if len < m.body_offset + m.body_len {
            return Err(SpoolError::Corrupt {
                path: p,
                reason: format!(
                    "{len} bytes, shorter than the message it must hold ({} bytes at {})",
                    m.body_len, m.body_offset
                ),
            });
        }
        Ok(f)
    }

    /// The message bytes as a reader (for one pass front to back, such as
    /// DKIM's body hash), read in the caller's chunks.
    pub fn body_reader(&self, m: &Spooled) -> Result<impl Read + use<>, SpoolError> {
        let mut f = self.open_body(m)?;
        let p = self.path(&m.header.queue_id);
        f.seek(std::io::SeekFrom::Start(m.body_offset))
            .map_err(io(&p))?;
        Ok(f.take(m.body_len))
    }

    /// Moves a message that cannot be delivered from (say, its body can no
    /// longer be read) to `corrupt/`, so it is kept for an operator and never
    /// silently dropped. Returns the new path.
    pub fn quarantine(&self, queue_id: &str) -> Result<PathBuf, SpoolError> {
        let from = self.path(queue_id);
        let to = self.corrupt.join(queue_id);
        std::fs::rename(&from, &to).map_err(io(&from))?;
        self.dirsync.sync().map_err(io(&self.queue))?;
        self.shadow_removed(queue_id, true);
        Ok(to)
    }

    /// Appends one status record. Final outcomes are fdatasync'ed before this
    /// returns, so a crash cannot make us deliver that recipient again.
    pub fn record(&self, queue_id: &str, rec: &StatusRecord) -> Result<(), SpoolError> {
        self.record_many(queue_id, std::slice::from_ref(rec))
    }

    pub fn record_many(&self, queue_id: &str, recs: &[StatusRecord]) -> Result<(), SpoolError> {
        let p = self.path(queue_id);
        let buf = encode_records(recs);
        let mut f = OpenOptions::new().append(true).open(&p).map_err(io(&p))?;
        let before = f.metadata().map_err(io(&p))?.len();
        if let Err(e) = f.write_all(&buf) {
            // A partial append (a full disk) would leave a torn record that
            // hides every later one: cut it off again.
            let _ = f.set_len(before);
            return Err(io(&p)(e));
        }
        if recs
            .iter()
            .any(|r| r.status.is_final() || r.status == RcptStatus::Held)
        {
            f.sync_data().map_err(io(&p))?;
            self.shadow_synced(queue_id);
        }
        Ok(())
    }

    /// Removes a message whose recipients are all final.
    pub fn remove(&self, queue_id: &str) -> Result<(), SpoolError> {
        let p = self.path(queue_id);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Removes a message whose recipients just became final, durably: the
    /// directory is synced (group-committed) before this returns, so a crash
    /// cannot bring the message back. One sync instead of a status record's
    /// fdatasync followed by an unlink.
    pub fn remove_durable(&self, queue_id: &str) -> Result<(), SpoolError> {
        self.remove(queue_id)?;
        self.dirsync.sync().map_err(io(&self.queue))?;
        self.shadow_removed(queue_id, false);
        Ok(())
    }

    /// Loads one message from disk.
    pub fn load(&self, queue_id: &str) -> Result<Spooled, SpoolError> {
        load_file(&self.path(queue_id)).map(|(m, _)| m)
    }

    /// Loads one message's header and status records, skipping its body:
    /// what the relay reads back when a resting message is due (a 50 MB
    /// body is read only once a delivery slot is granted, and streamed).
    /// The checksum, which covers the body, is not checked here: recovery
    /// checked it when the gateway started, and the delivery's stream
    /// reads the body's bytes.
    pub fn load_head(&self, queue_id: &str) -> Result<Spooled, SpoolError> {
        let p = self.path(queue_id);
        let corrupt = |reason: &str| SpoolError::Corrupt {
            path: p.clone(),
            reason: reason.to_string(),
        };
        let f = File::open(&p).map_err(io(&p))?;
        let file_len = f.metadata().map_err(io(&p))?.len();
        let read_at = |off: u64, n: u64| -> Result<Vec<u8>, SpoolError> {
            if off.checked_add(n).is_none_or(|e| e > file_len) {
                return Err(corrupt("truncated"));
            }
            let mut buf = vec![0; n as usize];
            f.read_exact_at(&mut buf, off).map_err(io(&p))?;
            Ok(buf)
        };
        let m = MAGIC.len() as u64;
        let first = read_at(0, m + 4)?;
        if !first.starts_with(MAGIC) {
            return Err(corrupt("missing magic"));
        }
        let hl = u32::from_le_bytes(first[MAGIC.len()..].try_into().unwrap()) as u64;
        let head = read_at(m + 4, hl + 8)?;
        let bl = u64::from_le_bytes(head[hl as usize..].try_into().unwrap());
        let body_offset = m + 4 + hl + 8;
        let end_at = body_offset
            .checked_add(bl)
            .ok_or_else(|| corrupt("truncated"))?;
        let tail = read_at(end_at, file_len.saturating_sub(end_at))?;
        if !tail.starts_with(END) || tail.len() < 8 {
            return Err(corrupt("no END record"));
        }
        let header: Header = serde_json::from_slice(&head[..hl as usize])
            .map_err(|e| corrupt(&format!("header: {e}")))?;
        let mut status = vec![None; header.envelope.rcpts.len()];
        read_records(&tail[8..], &mut status);
        Ok(Spooled {
            header,
            body_offset,
            body_len: bl,
            status,
        })
    }

    /// Every message in the queue, oldest first. Damaged files (a crash in the
    /// middle of a write that was never acknowledged) are moved to `corrupt/`
    /// and reported, never delivered.
    pub fn recover(&self) -> Result<(Vec<Spooled>, Vec<Quarantined>), SpoolError> {
        let mut good = Vec::new();
        let bad = self.recover_each(&mut |m| good.push(m))?;
        Ok((good, bad))
    }

    /// `recover`, handing each message to `take` as it is read: a gateway
    /// restarting on a backlog holds one header at a time, not all of them
    /// (what it keeps of each is its own affair).
    pub fn recover_each(
        &self,
        take: &mut dyn FnMut(Spooled),
    ) -> Result<Vec<Quarantined>, SpoolError> {
        let mut names: Vec<_> = std::fs::read_dir(&self.queue)
            .map_err(io(&self.queue))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        names.sort();
        let mut bad = Vec::new();
        for p in names {
            match load_file(&p) {
                Ok((m, valid)) => {
                    // A record torn by a crash stays at the tail; the next
                    // record would be appended after it and never read. Cut
                    // the file back to its last whole record first.
                    if let Err(e) = truncate_to(&p, valid) {
                        tracing::warn!("{e}");
                    }
                    if m.status
                        .iter()
                        .all(|s| s.as_ref().is_some_and(|s| s.status.is_final()))
                    {
                        let _ = std::fs::remove_file(&p);
                    } else {
                        take(m);
                    }
                }
                Err(e) => {
                    let name = p.file_name().map(|n| n.to_owned()).unwrap_or_default();
                    let _ = std::fs::rename(&p, self.corrupt.join(name));
                    bad.push((p, e.to_string()));
                }
            }
        }
        Ok(bad)
    }
}

/// Writes every byte of `parts` in order, with as few writev(2) calls as
/// the kernel allows (one, for a queue file's few parts).
fn write_all_vectored<'a>(
    f: &mut File,
    parts: impl Iterator<Item = &'a [u8]>,
) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut slices: Vec<IoSlice<'_>> = parts.filter(|p| !p.is_empty()).map(IoSlice::new).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match f.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The middle of a message too large to hold while it arrives: written to
/// `tmp/` as it comes (not synced: `store_spilled` copies it into the queue
/// file, whose one data sync covers it), with its CRC kept as it grows.
/// Removed when dropped; a crash leaves it in `tmp/`, which `open` cleans
/// (its message was never answered 250).
pub struct Spill {
    file: File,
    path: PathBuf,
    crc: crc32fast::Hasher,
    len: u64,
}

impl Spill {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        (&self.file).write_all(bytes).map_err(io(&self.path))?;
        self.crc.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes spilled so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends everything spilled to `to`: `io::copy` from a file to a file
    /// is copy_file_range on Linux, so the bytes stay in the kernel.
    fn copy_to(&self, to: &mut File) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let mut from = &self.file;
        from.seek(SeekFrom::Start(0))?;
        let n = std::io::copy(&mut from.take(self.len), to)?;
        if n != self.len {
            return Err(std::io::Error::other(format!(
                "spill file {}: {n} bytes, {} expected",
                self.path.display(),
                self.len
            )));
        }
        Ok(())
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Status records as framed in the file: u32 len | JSON | u32 crc32(JSON).
fn encode_records(recs: &[StatusRecord]) -> Vec<u8> {
    let mut buf = Vec::new();
    for rec in recs {
        let json = serde_json::to_vec(rec).expect("status serializes");
        buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
        buf.extend_from_slice(&json);
        buf.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    }
    buf
}

/// The file in a spool folder that names the node serving it (its
/// `node_name`), so that `spool adopt` can tell whose spool a disk holds.
const OWNER: &str = "node";

/// The node that last served the spool at `spool_dir`, if it said.
pub fn owner(spool_dir: &Path) -> Option<String> {
    std::fs::read_to_string(spool_dir.join(OWNER))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

impl Spool {
    /// The spool folder (holding `queue/`, `tmp/`, `corrupt/`).
    pub fn dir(&self) -> &Path {
        self.queue.parent().unwrap_or(&self.queue)
    }

    /// Records which node serves this spool (see [`owner`]).
    pub fn record_owner(&self, node: &str) -> Result<(), SpoolError> {
        let p = self.dir().join(OWNER);
        let part = p.with_extension("part");
        std::fs::write(&part, node.as_bytes()).map_err(io(&part))?;
        std::fs::rename(&part, &p).map_err(io(&p))
    }

    /// Whether a queue ID names a file here, queued or quarantined.
    pub fn knows(&self, queue_id: &str) -> bool {
        self.path(queue_id).exists() || self.corrupt.join(queue_id).exists()
    }

    /// Takes message `m` over from `from`, another node's spool that this
    /// process owns (opened and `recover`ed, so `m` passed the END record and
    /// CRC checks and any torn status record is cut off). The file, status
    /// records included, is written here as `store` writes a new one
    /// (tmp/, fdatasync, rename, directory sync) and read back through the
    /// same checks; only then is it removed from `from`. A crash between the
    /// two leaves it in both: the next `adopt` refuses it as known here, so
    /// it is never delivered twice.
    pub fn adopt(&self, from: &Spool, m: &Spooled) -> Result<Spooled, SpoolError> {
        let id = &m.header.queue_id;
        let src = from.path(id);
        let dst = self.path(id);
        if self.knows(id) {
            return Err(SpoolError::Corrupt {
                path: dst,
                reason: "a message with this queue ID is already here".into(),
            });
        }
        let tmp = self.tmp.join(id);
        let result = (|| {
            std::fs::copy(&src, &tmp).map_err(io(&src))?;
            File::open(&tmp)
                .and_then(|f| f.sync_data())
                .map_err(io(&tmp))?;
            self.shadow_data_synced(&tmp, id);
            std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
            self.dirsync.sync().map_err(io(&self.queue))?;
            self.shadow_linked(id);
            load_file(&dst).map(|(m, _)| m)
        })();
        let adopted = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&dst);
                return Err(e);
            }
        };
        from.remove_durable(id)?;
        Ok(adopted)
    }
}

#[cfg(test)]
mod adopt_tests {
    use super::*;
    use godwit_smtp_proto::{MailParams, RcptParams};

    fn store_one(spool: &Spool, rcpts: usize) -> Header {
        let h = Header {
            queue_id: spool.new_queue_id(),
            arrival_ms: now_ms(),
            message_id: Some("<adopt@x>".into()),
            envelope: Envelope {
                mail_from: "a@b".into(),
                mail_params: MailParams::default(),
                rcpts: (0..rcpts)
                    .map(|i| (format!("u{i}@example.com"), RcptParams::default()))
                    .collect(),
                helo: "c".into(),
                esmtp: true,
                client_ip: "127.0.0.1".into(),
                tls: false,
            },
            kind: None,
            accept_ms: 0,
            journal: None,
        };
        spool.store(&h, b"Subject: a\r\n\r\nbody\r\n").unwrap();
        h
    }

    #[test]
    fn adopt_moves_the_file_with_its_status_and_refuses_a_known_id() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Spool::open(a.path()).unwrap();
        from.record_owner("node-a").unwrap();
        assert_eq!(owner(a.path()).as_deref(), Some("node-a"));
        let h = store_one(&from, 2);
        let rec = StatusRecord {
            rcpt: 0,
            status: RcptStatus::Delivered,
            at_ms: now_ms(),
            attempts: 1,
            next_ms: 0,
            platform: Some("old".into()),
            reply: None,
            delivered_to: vec!["old".into()],
            operator_hold: false,
            warned: false,
        };
        from.record(&h.queue_id, &rec).unwrap();
        let here = Spool::open(b.path()).unwrap();
        let (good, bad) = from.recover().unwrap();
        assert!(bad.is_empty());
        let m = here.adopt(&from, &good[0]).unwrap();
        // The delivered recipient stays delivered: it is never sent again.
        assert_eq!(m.status[0].as_ref().unwrap().status, RcptStatus::Delivered);
        assert!(m.status[1].is_none());
        assert_eq!(here.read_body(&m).unwrap(), b"Subject: a\r\n\r\nbody\r\n");
        assert!(from.recover().unwrap().0.is_empty(), "left the source");
        assert!(here.knows(&h.queue_id));
        // The same file again (a restored copy): refused, left where it is.
        std::fs::copy(here.path(&h.queue_id), from.path(&h.queue_id)).unwrap();
        let (good, _) = from.recover().unwrap();
        assert!(here.adopt(&from, &good[0]).is_err());
        assert!(from.path(&h.queue_id).exists());
    }
}

fn truncate_to(p: &Path, valid: u64) -> Result<(), SpoolError> {
    let f = OpenOptions::new().write(true).open(p).map_err(io(p))?;
    if f.metadata().map_err(io(p))?.len() > valid {
        f.set_len(valid).map_err(io(p))?;
        f.sync_data().map_err(io(p))?;
    }
    Ok(())
}

fn read_body_from(p: &Path, m: &Spooled) -> Result<Vec<u8>, SpoolError> {
    let f = File::open(p).map_err(io(p))?;
    let mut body = vec![0u8; m.body_len as usize];
    f.read_exact_at(&mut body, m.body_offset).map_err(io(p))?;
    Ok(body)
}

/// A message's bytes, read-only (for `queue show` beside a running gateway).
pub fn read_body_at(spool_dir: &Path, m: &Spooled) -> Result<Vec<u8>, SpoolError> {
    read_body_from(&spool_dir.join("queue").join(&m.header.queue_id), m)
}

/// The message, and the length of its valid prefix (everything up to the
/// last whole status record). The body is checked against the CRC as it is
/// read, in chunks, and never held: recovering or loading a queued 50 MB
/// message costs a chunk of memory, not 50 MB.
fn load_file(p: &Path) -> Result<(Spooled, u64), SpoolError> {
    let corrupt = |reason: &str| SpoolError::Corrupt {
        path: p.to_path_buf(),
        reason: reason.to_string(),
    };
    let file = File::open(p).map_err(io(p))?;
    let file_len = file.metadata().map_err(io(p))?.len();
    let mut r = std::io::BufReader::with_capacity(64 * 1024, file);
    let mut crc = crc32fast::Hasher::new();
    let exact = |r: &mut std::io::BufReader<File>, n: u64, crc: Option<&mut crc32fast::Hasher>| {
        let mut v = vec![0u8; n as usize];
        match r.read_exact(&mut v) {
            Ok(()) => {
                if let Some(c) = crc {
                    c.update(&v);
                }
                Ok(v)
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(corrupt("truncated")),
            Err(e) => Err(io(p)(e)),
        }
    };
    let magic = exact(&mut r, MAGIC.len() as u64, Some(&mut crc))?;
    if magic != MAGIC {
        return Err(corrupt("missing magic"));
    }
    let hl = u32::from_le_bytes(exact(&mut r, 4, Some(&mut crc))?.try_into().unwrap()) as u64;
    if hl > file_len {
        return Err(corrupt("truncated"));
    }
    let head = exact(&mut r, hl, Some(&mut crc))?;
    let bl = u64::from_le_bytes(exact(&mut r, 8, Some(&mut crc))?.try_into().unwrap());
    let body_offset = MAGIC.len() as u64 + 4 + hl + 8;
    if body_offset.checked_add(bl).is_none_or(|e| e > file_len) {
        return Err(corrupt("truncated"));
    }
    let mut left = bl;
    while left > 0 {
        let chunk = r.fill_buf().map_err(io(p))?;
        if chunk.is_empty() {
            return Err(corrupt("truncated"));
        }
        let n = chunk.len().min(left as usize);
        crc.update(&chunk[..n]);
        r.consume(n);
        left -= n as u64;
    }
    let end = exact(&mut r, 8, None)?;
    if &end[..4] != END {
        return Err(corrupt("no END record"));
    }
    if crc.finalize() != u32::from_le_bytes(end[4..].try_into().unwrap()) {
        return Err(corrupt("checksum mismatch"));
    }
    // What follows is the status records: small, read whole.
    let records_at = body_offset + bl + 8;
    let mut data = Vec::new();
    r.read_to_end(&mut data).map_err(io(p))?;
    let header: Header =
        serde_json::from_slice(&head).map_err(|e| corrupt(&format!("header: {e}")))?;
    let mut status: Vec<Option<StatusRecord>> = vec![None; header.envelope.rcpts.len()];
    let pos = read_records(&data, &mut status);
    Ok((
        Spooled {
            header,
            body_offset,
            body_len: bl,
            status,
        },
        records_at + pos as u64,
    ))
}

/// Reads the status records at the start of `data` into `status` (each
/// recipient's latest); returns how many bytes were whole records. A torn
/// last record (crash mid-append) is ignored; it was never reported as
/// final, so at worst that recipient is retried.
fn read_records(data: &[u8], status: &mut [Option<StatusRecord>]) -> usize {
    let mut pos = 0;
    while pos + 4 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let Some(rec_end) = (pos + 4)
            .checked_add(len)
            .and_then(|e| e.checked_add(4))
            .filter(|&e| e <= data.len())
        else {
            break;
        };
        let json = &data[pos + 4..pos + 4 + len];
        let crc = u32::from_le_bytes(data[rec_end - 4..rec_end].try_into().unwrap());
        if crc32fast::hash(json) != crc {
            break;
        }
        if let Ok(rec) = serde_json::from_slice::<StatusRecord>(json)
            && let Some(slot) = status.get_mut(rec.rcpt)
        {
            *slot = Some(rec);
        }
        pos = rec_end;
    }
    pos
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn push_base32(s: &mut String, mut v: u64, digits: usize) {
    let mut tmp = vec![b'0'; digits];
    for i in (0..digits).rev() {
        tmp[i] = CROCKFORD[(v & 31) as usize];
        v >>= 5;
    }
    s.push_str(std::str::from_utf8(&tmp).unwrap());
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Every message in a spool directory, read-only (for `queue list` beside a
/// running gateway): nothing is moved or removed. Unreadable files are skipped.
pub fn list(spool_dir: &Path) -> Vec<Spooled> {
    let mut names: Vec<_> = std::fs::read_dir(spool_dir.join("queue"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .filter_map(|p| load_file(p).ok().map(|(m, _)| m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use godwit_smtp_proto::{MailParams, RcptParams};

    fn header(spool: &Spool, rcpts: usize) -> Header {
        Header {
            queue_id: spool.new_queue_id(),
            arrival_ms: now_ms(),
            message_id: Some("<m@x>".into()),
            envelope: Envelope {
                mail_from: "a@b".into(),
                mail_params: MailParams::default(),
                rcpts: (0..rcpts)
                    .map(|i| (format!("u{i}@example.com"), RcptParams::default()))
                    .collect(),
                helo: "c".into(),
                esmtp: true,
                client_ip: "127.0.0.1".into(),
                tls: false,
            },
            kind: None,
            accept_ms: 0,
            journal: None,
        }
    }

    fn rec(rcpt: usize, status: RcptStatus) -> StatusRecord {
        StatusRecord {
            rcpt,
            status,
            at_ms: now_ms(),
            attempts: 1,
            next_ms: 0,
            platform: None,
            reply: None,
            delivered_to: vec![],
            operator_hold: false,
            warned: false,
        }
    }

    /// The header-only read gives what the whole read gives (header, body
    /// place, latest records, a torn tail ignored) without the body, and
    /// refuses what is not a whole queue file.
    #[test]
    fn load_head_reads_what_load_reads_but_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 2);
        let body = vec![b'b'; 100_000];
        let m = spool.store(&h, &body).unwrap();
        let id = m.header.queue_id.clone();
        spool.record(&id, &rec(0, RcptStatus::Deferred)).unwrap();
        spool.record(&id, &rec(1, RcptStatus::Delivered)).unwrap();
        spool.record(&id, &rec(0, RcptStatus::Failed)).unwrap();
        // A torn record at the tail (a crash mid-append).
        let p = spool.queue_dir().join(&id);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[200, 0, 0, 0, b'{']).unwrap();
        drop(f);
        let whole = spool.load(&id).unwrap();
        let head = spool.load_head(&id).unwrap();
        assert_eq!(format!("{:?}", head.header), format!("{:?}", whole.header));
        assert_eq!(
            (head.body_offset, head.body_len),
            (whole.body_offset, whole.body_len)
        );
        let st = |m: &Spooled| -> Vec<_> {
            m.status
                .iter()
                .map(|s| s.as_ref().map(|s| s.status))
                .collect()
        };
        assert_eq!(st(&head), st(&whole));
        assert_eq!(
            st(&head),
            [Some(RcptStatus::Failed), Some(RcptStatus::Delivered)]
        );
        assert_eq!(spool.read_body(&head).unwrap(), body);
        // Cut inside the body: not a queue file any more.
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert!(matches!(
            spool.load_head(&id),
            Err(SpoolError::Corrupt { .. })
        ));
        std::fs::write(&p, b"not a queue file").unwrap();
        assert!(matches!(
            spool.load_head(&id),
            Err(SpoolError::Corrupt { .. })
        ));
    }

    /// A message stored from a head, a spill and a tail is whole on disk
    /// and recovers with a valid CRC (the spill's combined into the file's);
    /// the spill file is gone once dropped.
    #[test]
    fn a_spilled_message_is_stored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 1);
        let mut spill = spool.spill().unwrap();
        let middle: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        spill.write(&middle[..100_000]).unwrap();
        spill.write(&middle[100_000..]).unwrap();
        assert_eq!(spill.len(), 300_000);
        let m = spool
            .store_spilled(
                &h,
                &[b"Received: r\r\n", b"Subject: x\r\n\r\n"],
                Some(&spill),
                &[b"end\r\n"],
                &[],
            )
            .unwrap();
        drop(spill);
        let mut want = b"Received: r\r\nSubject: x\r\n\r\n".to_vec();
        want.extend_from_slice(&middle);
        want.extend_from_slice(b"end\r\n");
        assert_eq!(m.body_len, want.len() as u64);
        assert_eq!(spool.read_body(&m).unwrap(), want);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        let (good, bad) = spool.recover().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(spool.read_body(&good[0]).unwrap(), want);
    }

    #[test]
    fn store_recover_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 2);
        let m = spool.store(&h, b"Subject: x\r\n\r\nbody\r\n").unwrap();
        assert_eq!(spool.read_body(&m).unwrap(), b"Subject: x\r\n\r\nbody\r\n");
        spool
            .record(&h.queue_id, &rec(0, RcptStatus::Delivered))
            .unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        let (good, bad) = spool.recover().unwrap();
        assert!(bad.is_empty());
        assert_eq!(good.len(), 1);
        assert_eq!(
            good[0].status[0].as_ref().unwrap().status,
            RcptStatus::Delivered
        );
        assert!(good[0].status[1].is_none());
        // Once every recipient is final, recovery removes the file.
        spool
            .record(&h.queue_id, &rec(1, RcptStatus::Failed))
            .unwrap();
        let (good, _) = spool.recover().unwrap();
        assert!(good.is_empty());
        assert!(!spool.path(&h.queue_id).exists());
    }

    #[test]
    fn every_truncation_is_detected_and_never_recovered_as_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 1);
        spool
            .store(&h, b"Subject: y\r\n\r\nhello world\r\n")
            .unwrap();
        let full = std::fs::read(spool.path(&h.queue_id)).unwrap();
        for cut in 0..full.len() {
            std::fs::write(spool.path(&h.queue_id), &full[..cut]).unwrap();
            let (good, bad) = spool.recover().unwrap();
            assert!(good.is_empty(), "truncated at {cut} recovered as whole");
            assert_eq!(bad.len(), 1);
        }
    }

    /// A body longer than the reader's 64 KB chunks: its CRC is checked
    /// across them, a flipped byte anywhere in it is caught, and the status
    /// record after it is still read.
    #[test]
    fn a_body_longer_than_a_chunk_is_checked_and_its_records_read() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 1);
        let body: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let m = spool.store(&h, &body).unwrap();
        let rec = StatusRecord {
            reply: Some("451 later".into()),
            ..rec(0, RcptStatus::Deferred)
        };
        spool.record(&h.queue_id, &rec).unwrap();
        let got = spool.load(&h.queue_id).unwrap();
        assert_eq!(got.body_len, body.len() as u64);
        assert_eq!(
            got.status[0].as_ref().unwrap().reply.as_deref(),
            Some("451 later")
        );
        let full = std::fs::read(spool.path(&h.queue_id)).unwrap();
        for at in [0, 65_535, 65_536, 200_000, body.len() - 1] {
            let mut bad = full.clone();
            bad[m.body_offset as usize + at] ^= 1;
            std::fs::write(spool.path(&h.queue_id), &bad).unwrap();
            let err = spool.load(&h.queue_id).unwrap_err().to_string();
            assert!(err.contains("checksum mismatch"), "flip at {at}: {err}");
        }
    }

    #[test]
    fn torn_status_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 1);
        spool.store(&h, b"x\r\n").unwrap();
        let before = std::fs::read(spool.path(&h.queue_id)).unwrap();
        spool
            .record(&h.queue_id, &rec(0, RcptStatus::Delivered))
            .unwrap();
        let after = std::fs::read(spool.path(&h.queue_id)).unwrap();
        std::fs::write(spool.path(&h.queue_id), &after[..after.len() - 3]).unwrap();
        let (good, _) = spool.recover().unwrap();
        assert_eq!(good.len(), 1);
        assert!(good[0].status[0].is_none(), "torn record must not count");
        assert!(after.len() > before.len());
    }

    #[test]
    fn a_record_appended_after_a_tear_is_read_after_recovery() {
        // Power loss mid-append leaves a torn record at the tail. Recovery
        // must cut it off, or the next (final) record lands after the tear
        // and is never read: a delivered recipient would be delivered again.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 2);
        spool.store(&h, b"x\r\n").unwrap();
        spool
            .record(&h.queue_id, &rec(0, RcptStatus::Deferred))
            .unwrap();
        let full = std::fs::read(spool.path(&h.queue_id)).unwrap();
        std::fs::write(spool.path(&h.queue_id), &full[..full.len() - 5]).unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        let (good, _) = spool.recover().unwrap();
        assert!(good[0].status[0].is_none());
        spool
            .record(&h.queue_id, &rec(0, RcptStatus::Delivered))
            .unwrap();
        spool
            .record(&h.queue_id, &rec(1, RcptStatus::Held))
            .unwrap();
        let m = spool.load(&h.queue_id).unwrap();
        assert_eq!(m.status[0].as_ref().unwrap().status, RcptStatus::Delivered);
        assert_eq!(m.status[1].as_ref().unwrap().status, RcptStatus::Held);
    }

    #[test]
    fn one_owner_at_a_time_and_readers_never_clean() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let err = Spool::open(dir.path()).err().expect("second owner refused");
        let text = err.to_string();
        assert!(text.contains("in use by another godwit process"), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // A file being written in tmp/ survives readers.
        let wip = dir.path().join("tmp").join("WIP");
        std::fs::write(&wip, b"partial").unwrap();
        let h = header(&spool, 1);
        let m = spool.store(&h, b"Subject: z\r\n\r\nbody\r\n").unwrap();
        assert_eq!(list(dir.path()).len(), 1);
        assert_eq!(
            read_body_at(dir.path(), &m).unwrap(),
            b"Subject: z\r\n\r\nbody\r\n"
        );
        assert!(wip.exists());
        drop(spool);
        // The lock goes with its owner; the next owner cleans tmp/.
        let _spool = Spool::open(dir.path()).unwrap();
        assert!(!wip.exists());
    }

    #[test]
    fn records_stored_with_the_message_are_in_its_first_sync() {
        // A loop hold decided at accept is written before the one data
        // sync: the power-loss shadow (a copy after every sync) already has
        // the hold when `store_with` returns.
        let dir = tempfile::tempdir().unwrap();
        let shadow = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path()).unwrap();
        spool.shadow = Some(shadow.path().to_path_buf());
        for d in ["queue", "corrupt", "tmp"] {
            std::fs::create_dir_all(shadow.path().join(d)).unwrap();
        }
        let mut h = header(&spool, 2);
        h.journal = Some(JournalRcpt {
            rcpt: 1,
            platform: Some("archive".into()),
        });
        let mut held = rec(0, RcptStatus::Held);
        held.operator_hold = true;
        let m = spool
            .store_with(&h, &[b"x\r\n"], std::slice::from_ref(&held))
            .unwrap();
        assert_eq!(m.status[0].as_ref().unwrap().status, RcptStatus::Held);
        assert!(m.status[1].is_none());
        let synced = load_file(&shadow.path().join("queue").join(&h.queue_id))
            .unwrap()
            .0;
        let s0 = synced.status[0].as_ref().expect("hold in the first sync");
        assert!(s0.operator_hold && s0.status == RcptStatus::Held);
        assert_eq!(synced.header.journal, h.journal);
        assert!(synced.header.is_journal(1) && !synced.header.is_journal(0));
    }

    #[test]
    fn quarantine_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let h = header(&spool, 1);
        spool.store(&h, b"x\r\n").unwrap();
        let to = spool.quarantine(&h.queue_id).unwrap();
        assert!(to.exists());
        assert!(!spool.path(&h.queue_id).exists());
    }

    #[test]
    fn queue_ids_are_unique_and_sortable() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..10000).map(|_| spool.new_queue_id()).collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        assert!(
            ids.iter()
                .all(|i| i.len() == 16 && i.chars().all(|c| c.is_ascii_alphanumeric()))
        );
    }
}
