//! The control plane's writes: directory import, migration states, overrides,
//! waves and rollback, one room each (`import`, `overrides`, `waves`,
//! `rollback`; the cutover guard's evidence in `proof`). Every command is one
//! transaction (`txn`) that
//!
//! 1. claims the next routing version (inserting its row first, so two
//!    administrators racing for the same number serialize on the primary key
//!    and the loser retries on fresh data: nothing is lost);
//! 2. loads the sources of routing for the addresses it touches;
//! 3. changes them in memory;
//! 4. writes the difference (`diff`, pure, then `persist`): the sources, their
//!    before/after (`control_changes`), and the recomputed effective routes
//!    (`route_entries`, with before/after in `route_changes`, which is what
//!    running gateways apply).
//!
//! A wave of 100,000 mailboxes is therefore one version and one transaction:
//! all or nothing.

mod diff;
mod import;
mod overrides;
mod proof;
mod rollback;
#[cfg(test)]
mod tests;
mod txn;
mod waves;

pub use import::{ImportDiff, import, set_state};
pub use overrides::{commit, commit_outcome};
pub use proof::{
    SyncRecord, ready_for_cutover, sync_proof, sync_ready_accounts, sync_records, sync_summary,
};
pub use rollback::rollback_to;
pub use txn::Scope;
pub use waves::{
    check_wave_name, wave_create, wave_cutover, wave_cutover_only, wave_delete,
    wave_members_change, wave_rollback,
};

use crate::Change;
use godwit_config::Config;
use godwit_store::sqlx;
use godwit_store::{Store, StoreError, TxError};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A refusal that names what to do next.
    #[error("{0}")]
    Refused(String),
    #[error(
        "wave `{wave}`: {} of {total} mailbox(es) are not ready for cutover (no proven sync):\n{}{}\n  \
         run godwit sync and godwit verify (or `godwit wave cutover {wave} --final-sync`), remove them from the wave, \
         or run again with --force (recorded in the history)",
        refused.len(), list_refused(refused), more_refused(refused)
    )]
    NotReady {
        wave: String,
        total: usize,
        /// (address, why), in address order.
        refused: Vec<(String, String)>,
    },
}

/// A command that lost a race to another runs again (`godwit_store::retry`).
impl TxError for ControlError {
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            ControlError::Store(e) => Some(e),
            _ => None,
        }
    }
}

impl From<sqlx::Error> for ControlError {
    fn from(e: sqlx::Error) -> Self {
        ControlError::Store(StoreError::Sql(e))
    }
}

fn list_refused(v: &[(String, String)]) -> String {
    v.iter()
        .take(10)
        .map(|(a, why)| format!("  {a}: {why}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn more_refused(v: &[(String, String)]) -> String {
    if v.len() > 10 {
        format!("\n  ... and {} more", v.len() - 10)
    } else {
        String::new()
    }
}

fn list_some(v: &[String]) -> String {
    v.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
}

fn more(v: &[String]) -> String {
    if v.len() > 10 {
        format!(" and {} more", v.len() - 10)
    } else {
        String::new()
    }
}

fn refused(m: impl Into<String>) -> ControlError {
    ControlError::Refused(m.into())
}

/// One before/after of something that is not an effective route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlChange {
    /// mailbox | state | alias | member | override | wave | wave-member | note
    pub subject: String,
    pub item: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

fn cc(
    subject: &str,
    item: impl Into<String>,
    before: Option<String>,
    after: Option<String>,
) -> ControlChange {
    ControlChange {
        subject: subject.into(),
        item: item.into(),
        before,
        after,
    }
}

/// What one command did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The version written (or that a dry run would have written).
    pub version: i64,
    pub applied: bool,
    pub control: Vec<ControlChange>,
    /// Effective-route changes, as running gateways will apply them.
    pub routes: Vec<Change>,
}

impl Outcome {
    /// Route changes that move mail (not just a new reason for the same route).
    pub fn moved(&self) -> impl Iterator<Item = &Change> {
        self.routes.iter().filter(|c| c.before != c.after)
    }
}

/// Logs, at debug level, how long each stage of a command took (what
/// `RUST_LOG=godwit_route=debug` shows when a big wave is slow).
struct Stages(std::time::Instant);

impl Stages {
    fn new() -> Self {
        Stages(std::time::Instant::now())
    }
    fn lap(&mut self, what: &str) {
        tracing::debug!("{what}: {:?}", self.0.elapsed());
        self.0 = std::time::Instant::now();
    }
}

/// The context a command runs in.
pub struct Ctx<'a> {
    pub store: &'a Store,
    pub config: &'a Config,
    pub actor: &'a str,
    pub command: &'a str,
    /// Compute and report, then roll back.
    pub dry_run: bool,
}
