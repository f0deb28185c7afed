-- Routing map and its history. Every change is a numbered version; route_changes
-- holds before/after per address so that a running gateway can apply changes
-- incrementally and `route rollback --to N` can restore any version.
CREATE TABLE IF NOT EXISTS routing_versions (
    version BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    command TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS route_entries (
    address TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS route_changes (
    version BIGINT NOT NULL,
    address TEXT NOT NULL,
    before_route TEXT,
    after_route TEXT,
    PRIMARY KEY (version, address)
);
