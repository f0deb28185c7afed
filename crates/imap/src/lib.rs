//! IMAP-to-IMAP mailbox sync: `godwit sync` and `godwit verify`.
//!
//! - [`utf7`]: modified UTF-7 mailbox names (RFC 3501 5.1.3).
//! - [`mapping`]: which target folder each source folder goes to (pure).
//! - [`conn`]: one IMAP connection (TLS, master login, LITERAL+ APPEND).
//! - [`limits`]: connection cap, byte rate and backoff per server.
//! - [`lease`]: account leases and fleet-wide connection slots in the store (issue 17).
//! - [`state`]: the sync state in the store, and the account status the cutover guard reads.
//! - [`plan`]: what to pair, copy, re-flag and delete in one folder pair (pure).
//! - [`engine`]: copy and delta per account, executing each folder's plan.
//! - [`verify`]: the proof, per folder pair.
//! - [`cli`]: `SyncArgs`, `VerifyArgs`, `run_sync`, `run_verify`.

pub mod accounts;
pub mod acl;
pub mod cli;
pub mod conn;
pub mod engine;
pub mod lease;
pub mod limits;
pub mod mapping;
pub mod oauth;
pub mod plan;
pub mod state;
pub mod utf7;
pub mod verify;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot connect to {server}: {message}")]
    Connect { server: String, message: String },
    #[error("login as {user} on {server} refused: {message}")]
    Login {
        server: String,
        user: String,
        message: String,
    },
    #[error("server throttles: {0}")]
    Throttled(String),
    #[error("connection lost")]
    ConnectionLost,
    #[error("I/O: {0}")]
    Io(String),
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("folder {folder}: {message}")]
    Folder { folder: String, message: String },
    #[error(transparent)]
    Utf7(#[from] utf7::Utf7Error),
    #[error(transparent)]
    Store(#[from] godwit_store::StoreError),
    /// No OAuth 2.0 access token (token_url or token_command failed).
    #[error("access token: {0}")]
    Token(String),
    #[error("accounts file {path}: {message}")]
    Accounts { path: String, message: String },
}

impl ImapError {
    /// Worth a reconnect and a retry (as opposed to a refusal that will repeat).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ImapError::Throttled(_)
                | ImapError::ConnectionLost
                | ImapError::Io(_)
                | ImapError::Connect { .. }
        )
    }
}

impl From<async_imap::error::Error> for ImapError {
    fn from(e: async_imap::error::Error) -> Self {
        use async_imap::error::Error as E;
        // Every text here may come from the server: keep it short and printable.
        let short = |t: &str| conn::excerpt(t, 300);
        match e {
            E::Io(e) => conn::io_error(e),
            E::ConnectionLost => ImapError::ConnectionLost,
            E::No(t) | E::Bad(t) if conn::is_throttling(&t) => ImapError::Throttled(short(&t)),
            other => ImapError::Command {
                command: "IMAP".into(),
                message: short(&conn::server_text(&other)),
            },
        }
    }
}

impl From<godwit_store::sqlx::Error> for ImapError {
    fn from(e: godwit_store::sqlx::Error) -> Self {
        ImapError::Store(godwit_store::StoreError::Sql(e))
    }
}
