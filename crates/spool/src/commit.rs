//! Group commit for new queue files: many sessions' messages made durable
//! together, each caller still returning (and so its session still replying
//! 250) only after the syncs that cover its own file.
//!
//! Each writer writes its `tmp/` file and starts its writeback at once
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which only queues I/O), then
//! joins the current batch. The first waiter with no batch in progress
//! becomes the leader for everything queued so far and, in this order:
//!
//! 1. fdatasync()s every file of the batch. Their data is already on its way
//!    to the disk, and the first call commits the file system journal with
//!    every file's size and extents, so the others cost little more than a
//!    cache flush; every file is still fdatasync'ed itself (POSIX promises
//!    durability per file, not per journal).
//! 2. renames each file into `queue/`, only after its data is durable, so a
//!    crash can never leave a torn file under a queue name;
//! 3. fsyncs `queue/` once for the whole batch (shared with concurrent
//!    removals through `DirSync`), which makes every rename durable.
//!
//! Meanwhile the next batch gathers: under load the batch grows until one
//! round of syncs covers the sessions waiting, as in Postfix's or
//! PostgreSQL's group commit.

use crate::SpoolError;
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};

pub(crate) struct Job {
    pub file: File,
    pub tmp: PathBuf,
    pub dst: PathBuf,
    pub queue_id: String,
}

#[derive(Default)]
struct State {
    next: u64,
    pending: Vec<(u64, Job)>,
    done: HashMap<u64, Result<(), SpoolError>>,
    leading: bool,
}

#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    cv: Condvar,
}

/// Queues the file's dirty pages for writeback without waiting (Linux), so
/// the batch's data I/O overlaps; durability still comes from fdatasync.
pub(crate) fn start_writeback(f: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only schedules I/O.
        unsafe {
            libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

impl GroupCommit {
    /// Makes `job` durable under its queue name; `run` performs one batch
    /// (steps 1-3 above) and returns one result per job, in order.
    pub(crate) fn commit(
        &self,
        job: Job,
        run: impl Fn(Vec<Job>) -> Vec<Result<(), SpoolError>>,
    ) -> Result<(), SpoolError> {
        let mut st = self.state.lock().unwrap();
        let ticket = st.next;
        st.next += 1;
        st.pending.push((ticket, job));
        loop {
            if let Some(r) = st.done.remove(&ticket) {
                return r;
            }
            if !st.leading {
                st.leading = true;
                let batch = std::mem::take(&mut st.pending);
                drop(st);
                let (tickets, jobs): (Vec<u64>, Vec<Job>) = batch.into_iter().unzip();
                let results = run(jobs);
                st = self.state.lock().unwrap();
                st.leading = false;
                st.done.extend(tickets.into_iter().zip(results));
                self.cv.notify_all();
            } else {
                st = self.cv.wait(st).unwrap();
            }
        }
    }
}

/// A batch-wide error, given to each job of the batch.
pub(crate) fn copy_err(e: &std::io::Error, path: &std::path::Path) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn job(dir: &std::path::Path, n: usize) -> Job {
        let tmp = dir.join(format!("t{n}"));
        Job {
            file: File::create(&tmp).unwrap(),
            dst: dir.join(format!("q{n}")),
            tmp,
            queue_id: n.to_string(),
        }
    }

    /// Jobs that arrive while a batch is being synced wait for the next
    /// batch, and all of them share it: one round of syncs, not one each.
    #[test]
    fn arrivals_during_a_batch_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let gc = Arc::new(GroupCommit::default());
        let batches = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
        let release = Arc::new(AtomicBool::new(false));
        let run = {
            let (batches, release, gc) = (batches.clone(), release.clone(), gc.clone());
            move |jobs: Vec<Job>| {
                let ids: Vec<String> = jobs.iter().map(|j| j.queue_id.clone()).collect();
                let first = batches.lock().unwrap().is_empty();
                batches.lock().unwrap().push(ids);
                if first {
                    // Hold the first batch until three more jobs queue behind it.
                    while gc.state.lock().unwrap().pending.len() < 3 {
                        std::thread::yield_now();
                    }
                    release.store(true, Ordering::SeqCst);
                }
                jobs.iter().map(|_| Ok(())).collect()
            }
        };
        let d = dir.path().to_path_buf();
        let threads: Vec<_> = (0..4)
            .map(|n| {
                let (gc, run, d, release) = (gc.clone(), run.clone(), d.clone(), release.clone());
                std::thread::spawn(move || {
                    if n > 0 {
                        // Join only once the first batch is under way.
                        while !gc.state.lock().unwrap().leading && !release.load(Ordering::SeqCst) {
                            std::thread::yield_now();
                        }
                    }
                    gc.commit(job(&d, n), run).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let b = batches.lock().unwrap();
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b[0], vec!["0".to_string()]);
        assert_eq!(b[1].len(), 3);
    }
}
