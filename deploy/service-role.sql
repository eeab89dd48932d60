-- Least privilege for the running service. Run as the owner of the database, after
-- `account-projector migrate` (migrations need the owner; the service does not):
--
--   CREATE ROLE account_projector_service LOGIN PASSWORD '...';
--   psql "$OWNER_DATABASE_URL" -f deploy/service-role.sql
--
-- The service may append to the log and read it, but never change or delete what is in it: it has
-- no UPDATE or DELETE on `events` or `redeliveries` (and the triggers refuse them to everyone).
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO account_projector_service', current_database());
END;
$$;
GRANT USAGE ON SCHEMA public TO account_projector_service;

-- The event log: append and read only.
GRANT SELECT, INSERT ON events, redeliveries TO account_projector_service;
REVOKE UPDATE, DELETE, TRUNCATE ON events, redeliveries FROM account_projector_service;
GRANT EXECUTE ON FUNCTION append_events(bigint, text[], uuid[], uuid[], bytea[], bytea[], text[], interval)
    TO account_projector_service;

-- The projection, which the projector and `rebuild` rewrite.
GRANT SELECT, INSERT, UPDATE, DELETE ON account_snapshots, account_snapshots_rebuild
    TO account_projector_service;
GRANT SELECT, UPDATE ON projector_checkpoints TO account_projector_service;
GRANT SELECT, INSERT ON quarantine TO account_projector_service;

-- /readyz checks that every migration is applied.
GRANT SELECT ON refinery_schema_history TO account_projector_service;
