-- The event index: every event, with the keys a trace looks up by. The JSON
-- lines under data_dir/events stay the durable log; this makes a trace over
-- millions of messages an index lookup. Pruned by [events] retention.
CREATE TABLE IF NOT EXISTS events (
    ts_ms BIGINT NOT NULL,
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    queue_id TEXT,
    message_id TEXT,
    rcpt TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_queue_id ON events (queue_id);
CREATE INDEX IF NOT EXISTS events_message_id ON events (message_id);
CREATE INDEX IF NOT EXISTS events_rcpt_ts ON events (rcpt, ts_ms);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts_ms);
