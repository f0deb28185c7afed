-- A command aimed at one gateway (`spool adopt` into a running gateway, a
-- fleet-wide `queue list`) answers with more than a count: its output, JSON.
ALTER TABLE queue_command_results ADD COLUMN output TEXT;
-- The arrival time of the oldest message in each gateway's spool (0: empty),
-- for `fleet status`.
ALTER TABLE gateway_nodes ADD COLUMN oldest_ms BIGINT NOT NULL DEFAULT 0;
