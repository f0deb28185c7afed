-- IMAP-to-IMAP sync state (crates/imap). Portable between SQLite and PostgreSQL.
-- Per account status: seeding -> ready (copy finished) -> verified (verify clean,
-- with its timestamp). The control plane's cutover guard reads sync_accounts.
CREATE TABLE IF NOT EXISTS sync_accounts (
    address TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    status_at_ms BIGINT NOT NULL,
    verified_at_ms BIGINT,
    last_error TEXT
);
-- One row per source folder: which target folder it pairs with, and the
-- UIDVALIDITY/MODSEQ seen at the end of the last run (RFC 3501 2.3.1.1, RFC 7162 3.1).
CREATE TABLE IF NOT EXISTS sync_folders (
    address TEXT NOT NULL,
    source_folder TEXT NOT NULL,
    target_folder TEXT NOT NULL,
    source_uidvalidity BIGINT NOT NULL,
    target_uidvalidity BIGINT NOT NULL,
    source_uidnext BIGINT NOT NULL,
    source_highestmodseq BIGINT NOT NULL,
    source_exists BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (address, source_folder)
);
-- One row per copied (or matched) message. digest is SHA-256 of the raw message.
CREATE TABLE IF NOT EXISTS sync_messages (
    address TEXT NOT NULL,
    source_folder TEXT NOT NULL,
    source_uidvalidity BIGINT NOT NULL,
    source_uid BIGINT NOT NULL,
    target_folder TEXT NOT NULL,
    target_uidvalidity BIGINT NOT NULL,
    target_uid BIGINT,
    message_id TEXT,
    digest TEXT NOT NULL,
    flags TEXT NOT NULL,
    copied_at_ms BIGINT NOT NULL,
    PRIMARY KEY (address, source_folder, source_uidvalidity, source_uid)
);
CREATE INDEX IF NOT EXISTS sync_messages_digest ON sync_messages (address, target_folder, digest);
-- Messages that were not copied, and why (over APPENDLIMIT, refused by the target).
CREATE TABLE IF NOT EXISTS sync_skipped (
    address TEXT NOT NULL,
    source_folder TEXT NOT NULL,
    source_uidvalidity BIGINT NOT NULL,
    source_uid BIGINT NOT NULL,
    message_id TEXT,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (address, source_folder, source_uidvalidity, source_uid)
);
-- Re-pairings after a UIDVALIDITY change, kept for the report.
CREATE TABLE IF NOT EXISTS sync_events (
    address TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
