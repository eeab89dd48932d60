-- The bench's partitions scenario: the projection emptied and its checkpoints back at 0, so the
-- next projector folds the whole log again (run as the schema's owner, between runs only).
DELETE FROM account_snapshots;
DELETE FROM projection_partitions;
UPDATE projector_checkpoints SET position = 0 WHERE name = 'account_snapshots';
VACUUM ANALYZE account_snapshots;
