-- Fleet sync (issue 17): which worker holds which account, and the fleet-wide
-- connection slots per server. Portable between SQLite and PostgreSQL; the
-- claims themselves use FOR UPDATE SKIP LOCKED on PostgreSQL (see Dialect).
--
-- One row per account ever synced. state: pending (wanted by the campaign in
-- progress), done, failed. holder/expires_ms is the lease: held while
-- expires_ms is in the future, renewed by the holder's heartbeat.
CREATE TABLE IF NOT EXISTS sync_queue (
    address TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    holder TEXT,
    expires_ms BIGINT NOT NULL DEFAULT 0,
    done_ms BIGINT,
    done_by TEXT,
    claims BIGINT NOT NULL DEFAULT 0
);
-- max_connections_per_server for the whole fleet: slot 0..cap-1 of a server,
-- each leased by the worker whose connection uses it.
CREATE TABLE IF NOT EXISTS sync_slots (
    server TEXT NOT NULL,
    slot BIGINT NOT NULL,
    holder TEXT,
    expires_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (server, slot)
);
-- Every sync process announces itself (fleet status).
CREATE TABLE IF NOT EXISTS sync_workers (
    worker TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    seen_ms BIGINT NOT NULL,
    accounts TEXT NOT NULL
);
