-- Control plane: the directory (mailboxes, aliases, groups), each mailbox's
-- migration state, per-address overrides, waves, and the before/after of every
-- change that is not itself an effective route (those stay in route_changes).
--
-- route_entries stays the one table a gateway reads: the effective route of
-- every known address, recomputed by each control command inside the same
-- transaction that changes its sources. `basis` says what decided it
-- (NULL: an override from before the directory existed).
CREATE TABLE IF NOT EXISTS directory_objects (
    address TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    platform TEXT NOT NULL,
    state TEXT NOT NULL,
    version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS directory_aliases (
    alias TEXT PRIMARY KEY,
    mailbox TEXT NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS directory_aliases_mailbox ON directory_aliases (mailbox);
CREATE TABLE IF NOT EXISTS directory_members (
    group_address TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (group_address, member)
);
CREATE INDEX IF NOT EXISTS directory_members_member ON directory_members (member);
-- Explicit per-address routes (`route set`). Until now route_entries held
-- exactly these; carry them over so nothing changes for existing users.
CREATE TABLE IF NOT EXISTS route_overrides (
    address TEXT PRIMARY KEY,
    route TEXT NOT NULL,
    version BIGINT NOT NULL
);
INSERT INTO route_overrides (address, route, version)
    SELECT address, route, version FROM route_entries;
ALTER TABLE route_entries ADD COLUMN basis TEXT;
ALTER TABLE route_changes ADD COLUMN basis TEXT;
CREATE TABLE IF NOT EXISTS waves (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_version BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS wave_members (
    wave TEXT NOT NULL,
    address TEXT NOT NULL,
    PRIMARY KEY (wave, address)
);
CREATE INDEX IF NOT EXISTS wave_members_address ON wave_members (address);
-- subject: mailbox | state | alias | member | override | wave | wave-member | note
CREATE TABLE IF NOT EXISTS control_changes (
    version BIGINT NOT NULL,
    subject TEXT NOT NULL,
    item TEXT NOT NULL,
    before_value TEXT,
    after_value TEXT,
    PRIMARY KEY (version, subject, item)
);
