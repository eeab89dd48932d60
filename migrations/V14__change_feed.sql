-- The compacted change feed (GET /v1/feed): accounts in the order of the event that last changed
-- them. Each page is a range scan of this index.
CREATE INDEX account_snapshots_last_position_idx ON account_snapshots (last_position);
