//! Issue 18: what a sync holds in memory is bounded by its batch size, not by
//! the mailbox or the messages. Messages under `stream_threshold` are fetched
//! and appended in batches of at most `max_batch_bytes`; one batch is in
//! flight (its APPENDs sent, answers not yet read) while the next is fetched,
//! so at most two batches and the message being read are in memory. Larger
//! messages go slice by slice. The test binary counts its live heap bytes (a
//! counting global allocator: exact, unlike RSS, which keeps freed pages) and
//! syncs real Dovecots: the peak above the live bytes before the sync stays
//! under that bound, and a mailbox three times larger peaks no higher. Four
//! folders synced at once share the account's two batches (`batch_budget`):
//! without that they held 17.5 MB where the bound is 9.4 MB. With the state
//! lost, the target's messages are read one at a time to re-pair them.
//!
//! One test in this binary, so no other test's allocations are counted.

mod common;

use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded to System unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

const KB: usize = 1 << 10;
const MB: usize = 1 << 20;

/// `medium` messages dealt in turn to `folders` (created), each folder
/// getting the same six sizes in turn (`base` KB and up, base64-encoded:
/// 1.35 times that), then `large` of 4 MB in INBOX.
async fn fill(
    source: &Dovecot,
    user: &str,
    folders: &[&str],
    base: usize,
    medium: usize,
    large: usize,
) {
    let mut s = login(source.port, user).await;
    for f in folders.iter().filter(|f| **f != "INBOX") {
        create(&mut s, f).await;
    }
    for n in 0..medium {
        let size = base * KB + n / folders.len() % 6 * base / 14 * KB;
        let body = with_attachment(&format!("<m{n}@x>"), size);
        let date = format!("{:02}-Mar-2021 10:00:00 +0000", 1 + n % 28);
        append(&mut s, folders[n % folders.len()], "(\\Seen)", &date, &body).await;
    }
    for n in 0..large {
        let body = with_attachment(&format!("<L{n}@x>"), 3 * MB);
        append(&mut s, "INBOX", "()", "01-Apr-2021 10:00:00 +0000", &body).await;
    }
    s.logout().await.unwrap();
}

/// Peak live heap bytes above those live before, while `user` is synced
/// (source and target logins alike) with a new, empty state; the messages
/// the target then holds (the same as the source's) and how many were copied.
async fn sync_peak(
    source: &Dovecot,
    target: &Dovecot,
    user: &str,
    opts: &godwit_imap::engine::SyncOptions,
) -> (usize, usize, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path()).await;
    let ep = endpoints(source, target, 4);
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let r = godwit_imap::engine::sync_account(
        &store,
        &ep,
        user,
        &login_of(user),
        &login_of(user),
        opts,
        Default::default(),
    )
    .await;
    let peak = PEAK.load(Relaxed).saturating_sub(before);
    assert_eq!(r.error, None, "{r:#?}");
    let mut s = login(source.port, user).await;
    let mut t = login(target.port, user).await;
    let want = dump(&mut s).await;
    assert_eq!(dump(&mut t).await, want, "{user}: copied byte for byte");
    (peak, want.values().map(Vec::len).sum(), r.copied())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_holds_two_batches_at_most_whatever_the_mailbox() {
    let (small, large, wide) = ("small@example.com", "large@example.com", "wide@example.com");
    let source = Dovecot::start(Flavor::Source, &[small, large, wide]);
    let target = Dovecot::start(Flavor::Source, &[small, large, wide]);
    // 580-780 KB (base64 of 430-580 KB): three would fit a 2 MB batch that
    // could pass its size, two fit one that cannot.
    let two = ["INBOX", "Archive"];
    fill(&source, small, &two, 430, 12, 1).await;
    fill(&source, large, &two, 430, 36, 3).await;
    // 200-270 KB, in four folders synced at once.
    let four = ["INBOX", "Archive", "Sent", "Lists"];
    fill(&source, wide, &four, 150, 120, 0).await;
    let opts = godwit_imap::engine::SyncOptions {
        max_batch_bytes: 2 * MB,
        stream_threshold: MB,
        stream_slice: 256 * KB,
        parallel_folders: 1,
        ..Default::default()
    };
    let (peak_small, n_small, _) = sync_peak(&source, &target, small, &opts).await;
    let (peak_large, n_large, copied) = sync_peak(&source, &target, large, &opts).await;
    assert_eq!((n_small, n_large, copied), (13, 39, 39));

    // The batch in flight and the one being gathered (2 MB each at most), the
    // message just read that starts the next batch (under the 1 MB
    // threshold) and async-imap's read buffer of it, and 1 MB for the
    // runtime, the listing and the state rows.
    let bound = 2 * opts.max_batch_bytes + 2 * opts.stream_threshold + MB;
    eprintln!(
        "peak heap above the start: {peak_small} bytes syncing {n_small} messages, \
         {peak_large} syncing {n_large}; bound {bound}"
    );
    assert!(
        peak_large < bound,
        "syncing {n_large} messages held {peak_large} bytes at the peak: over {bound}"
    );
    // Three times the messages, the same batches: no more than 512 KB more.
    assert!(
        peak_large < peak_small + 512 * KB,
        "the peak grew with the mailbox: {peak_small} -> {peak_large} bytes"
    );

    // The state lost: every target message is read to pair it by content,
    // each as it arrives and the 4 MB ones slice by slice, then the source's
    // are fetched in batches and paired (nothing appended, so none in
    // flight): one batch, and one message (under the threshold) with its
    // read buffer. Before, a FETCH's worth of target messages was held: 26 MB.
    let (peak_lost, n_lost, copied) = sync_peak(&source, &target, large, &opts).await;
    assert_eq!((n_lost, copied), (39, 0), "re-paired, nothing copied twice");
    let bound = opts.max_batch_bytes + 2 * opts.stream_threshold + MB;
    eprintln!(
        "state lost, {n_lost} target messages re-paired: peak {peak_lost} bytes; bound {bound}"
    );
    assert!(
        peak_lost < bound,
        "re-pairing held {peak_lost} bytes at the peak: over {bound}"
    );

    // Four folders at once share the account's two batches: each may hold
    // only the message it just read (and its read buffer) beyond them, not
    // two batches of its own (four folders x 4 MB).
    let opts = godwit_imap::engine::SyncOptions {
        stream_threshold: 512 * KB,
        parallel_folders: 4,
        ..opts
    };
    let (peak_wide, n_wide, _) = sync_peak(&source, &target, wide, &opts).await;
    assert_eq!(n_wide, 120);
    let bound = godwit_imap::engine::batch_budget(&opts) + 4 * 2 * opts.stream_threshold + MB;
    eprintln!("four folders at once: peak {peak_wide} bytes; bound {bound}");
    assert!(
        peak_wide < bound,
        "four folders held {peak_wide} bytes at the peak: over {bound}"
    );
}
