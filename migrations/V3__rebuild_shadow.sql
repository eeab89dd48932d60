-- Scratch space for `account-projector rebuild`: snapshots are refolded here from position 0, then
-- copied over account_snapshots in one transaction. Unlogged: it is rebuilt from the log anyway.
CREATE UNLOGGED TABLE account_snapshots_rebuild (LIKE account_snapshots INCLUDING ALL);
