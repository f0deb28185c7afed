-- A command aimed at one gateway (`spool adopt` into a running gateway, a
-- fleet-wide `queue list`) answers with more than a count: its output, JSON.
ALTER TABLE queue_command_results ADD COLUMN output TEXT;
