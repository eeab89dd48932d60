-- The bench's growth scenario with --growth-vacuum: what autovacuum would do to the projection
-- after a load (this server may run with autovacuum off).
VACUUM ANALYZE account_snapshots;
