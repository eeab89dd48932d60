-- Snapshots are rewritten on every batch that touches their account. Leaving room on each page lets
-- Postgres put the new version next to the old one (a HOT update: no index entry to add, and the
-- old version is pruned from the page by later reads, even before any vacuum).
ALTER TABLE account_snapshots SET (fillfactor = 50);
