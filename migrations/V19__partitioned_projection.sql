-- The projection in hash partitions (PROJECTOR_PARTITIONS): each partition owns the accounts
-- whose id hashes to it, and has its own checkpoint and its own leader (an advisory lock).
--
-- With one partition (the default) this table is empty and the projection's checkpoint is the
-- row `account_snapshots` of `projector_checkpoints`, as before. With N > 1 it holds N rows, all
-- with the same `partitions`, and `account_snapshots` is kept at the lowest of them by every
-- partition's batch, in its own transaction: every reader of the projection's checkpoint (the
-- feed, `min_position`, the pages) keeps reading one row and never sees past a slower partition.
CREATE TABLE projection_partitions (
    partition  integer NOT NULL PRIMARY KEY,
    partitions integer NOT NULL CHECK (partitions BETWEEN 2 AND 64),
    position   bigint  NOT NULL CHECK (position >= 0),
    CHECK (partition >= 0 AND partition < partitions)
);

-- The partition of an account among `partitions`: the first four bytes of the sha256 of its id,
-- big-endian, modulo `partitions`. Argyle's ids begin with a timestamp, so the id's own first
-- bytes would crowd recent accounts into one partition. The projector computes the same in Rust
-- (store::partitions::partition_of) and a test checks that both agree.
CREATE FUNCTION projection_partition(account uuid, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN (('x' || encode(substring(sha256(uuid_send(account)) FROM 1 FOR 4), 'hex'))::bit(32)::bigint
        % partitions)::integer;
REVOKE ALL ON FUNCTION projection_partition(uuid, integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION grant_service_role(service name) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = service) THEN
        RETURN;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), service);
    -- The log: read, and append only through the functions; its horizon read and settled.
    EXECUTE format('GRANT SELECT ON events, redeliveries, events_json, abandoned_positions,
                      log_settled TO %I', service);
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
                      ON events, redeliveries, abandoned_positions, log_settled FROM %I', service);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
                      append_webhooks(text[], uuid[], uuid[], bytea[], bytea[], text[], interval),
                      append_fetched(text[], uuid[], uuid[], bytea[], bytea[], interval),
                      erase_account(uuid, uuid, bytea), log_horizon(), settle_log(),
                      hold_appends(), projection_partition(uuid, integer) TO %I', service);
    -- Account keys: read, and new ones added (never an erased row, never an update); a key is
    -- destroyed only by erase_account, which records the erasure; `keys rotate` and `keys seal`
    -- are the owner's.
    EXECUTE format('GRANT SELECT ON account_keys, log_seal_runs TO %I', service);
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON account_keys FROM %I', service);
    EXECUTE format('GRANT INSERT (account_id, kek_id, wrapped_key) ON account_keys TO %I', service);
    -- The projection, which the projector and `rebuild` rewrite; no TRUNCATE (it takes an
    -- exclusive lock readers would queue behind).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON account_snapshots, account_snapshots_rebuild
                      TO %I', service);
    EXECUTE format('GRANT SELECT, UPDATE ON projector_checkpoints TO %I', service);
    -- The partitions' checkpoints: moved by their leaders, laid out again by a projector that
    -- holds every partition (PROJECTOR_PARTITIONS changed).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON projection_partitions TO %I', service);
    -- Quarantine: recorded, never edited.
    EXECUTE format('GRANT SELECT, INSERT ON quarantine TO %I', service);
    -- The enricher's queue of fetches.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON enrichment_requests TO %I', service);
    -- Reconcile's runs and what each listed (its own bookkeeping, not the log).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON reconcile_runs TO %I', service);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON reconcile_listed TO %I', service);
    -- The notifier's subscribers (managed by `subscribers add|remove|replay`) and their messages.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON subscribers, subscriber_messages
                      TO %I', service);
    -- Sessions of the web pages (/ui/): opened at sign-in, looked up per page, closed at sign-out.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON ui_sessions TO %I', service);
    -- /readyz and `serve` check that every migration is applied.
    EXECUTE format('GRANT SELECT ON refinery_schema_history TO %I', service);
END;
$$;
REVOKE ALL ON FUNCTION grant_service_role(name) FROM PUBLIC;

SELECT grant_service_role('account_projector_service');
