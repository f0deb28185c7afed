-- The cutover guard trusts only proof: a clean verify that came after the
-- account's last sync run. synced_at_ms is when that run started; a verify
-- that finds a difference sets status `differs` (crates/imap state.rs).
ALTER TABLE sync_accounts ADD COLUMN synced_at_ms BIGINT;
