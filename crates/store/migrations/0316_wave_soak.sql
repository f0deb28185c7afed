-- A wave's soak after its cutover (`wave cutover NAME --soak 2h --rollback-if ...`):
-- in the store, not in a process, so it survives a gateway restart. On a
-- fleet, the node holding the lease (owner, lease_until_ms) watches.
CREATE TABLE IF NOT EXISTS wave_soaks (
    wave TEXT PRIMARY KEY,
    started_ms BIGINT NOT NULL,
    until_ms BIGINT NOT NULL,
    rollback_if TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    measured_ms BIGINT NOT NULL DEFAULT 0,
    measurements TEXT,
    breach TEXT,
    rollback_version BIGINT
);
