-- Gateway nodes announce themselves (liveness, queue size, destination
-- state), and queue commands from the CLI reach every running node through
-- this table, so they work from a second terminal and across a fleet.
CREATE TABLE IF NOT EXISTS gateway_nodes (
    node TEXT PRIMARY KEY,
    started_ms BIGINT NOT NULL,
    seen_ms BIGINT NOT NULL,
    queue_len BIGINT NOT NULL,
    destinations TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_commands (
    id BIGINT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    op TEXT NOT NULL,
    selector TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_command_results (
    id BIGINT NOT NULL,
    node TEXT NOT NULL,
    done_ms BIGINT NOT NULL,
    affected BIGINT NOT NULL,
    PRIMARY KEY (id, node)
);
