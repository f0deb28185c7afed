-- The routing version each running gateway has applied, so `route set` and
-- the wave commands can wait until every gateway routes the new way.
ALTER TABLE gateway_nodes ADD COLUMN routing_version BIGINT NOT NULL DEFAULT 0;
