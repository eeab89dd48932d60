-- Least privilege (deploy/roles.sql): the service role appends to the log only through the two
-- functions below, which run as the schema's owner (SECURITY DEFINER) with a fixed search_path.
-- They choose what a caller must not: the position (the head plus one, under the append lock),
-- the receive time (the database's clock, never before the head's), the body's sha256 (computed
-- here from the body) and where the event came from. The service has no INSERT, UPDATE, DELETE or
-- TRUNCATE on `events` or `redeliveries`, so a leaked service credential cannot leave a gap, back-
-- date an event, forge a checksum, or pass a webhook off as an answer of Argyle's API.

-- Where an event came from: a webhook delivery, or Argyle's API (the enricher's and reconcile's
-- fetches). NULL for events appended before this version, when the event's name alone said so.
ALTER TABLE events ADD COLUMN origin text CHECK (origin IN ('webhook', 'argyle_api'));

-- The append itself (V10's, with the lock key fixed, the sha256 computed and the origin recorded).
-- Not callable by the service: only through the two functions after it.
CREATE FUNCTION append_to_log(
    new_origin text,
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    new_signatures text[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    head_position bigint;
    head_received timestamptz;
    received timestamptz;
BEGIN
    -- store::log::APPEND_LOCK ("APLOG!"): see the store crate's docs for why it keeps the log dense.
    PERFORM pg_advisory_xact_lock(71813133453089);
    SELECT e.position, e.received_at INTO head_position, head_received
      FROM events e
     ORDER BY e.position DESC
     LIMIT 1;
    head_position := coalesce(head_position, 0);
    received := greatest(clock_timestamp(), head_received);
    RETURN QUERY
    WITH probed AS (
        SELECT t.i, t.sha,
               min(t.i) OVER (PARTITION BY t.sha) AS first_i,
               (SELECT e.position
                  FROM events e
                 WHERE e.body_sha256 = t.sha AND e.received_at > clock_timestamp() - dedup_window
                 ORDER BY e.position DESC
                 LIMIT 1) AS logged_position
          FROM (SELECT b.i, sha256(b.body) AS sha
                  FROM unnest(new_bodies) WITH ORDINALITY AS b(body, i)) t
    ),
    numbered AS (
        SELECT p.i, p.sha, p.logged_position,
               CASE WHEN p.logged_position IS NULL AND p.i = p.first_i
                    THEN head_position + count(*) FILTER (WHERE p.logged_position IS NULL AND p.i = p.first_i)
                                         OVER (ORDER BY p.i)
               END AS new_position
          FROM probed p
    ),
    answers AS (
        SELECT n.i, n.sha, n.new_position IS NULL AS duplicate,
               coalesce(n.logged_position, max(n.new_position) OVER (PARTITION BY n.sha)) AS position
          FROM numbered n
    ),
    inserted AS (
        INSERT INTO events (position, received_at, event, account_id, user_id, body, body_sha256,
                            signature, origin)
        SELECT a.position, received, new_events[a.i], new_accounts[a.i], new_users[a.i],
               new_bodies[a.i], a.sha, new_signatures[a.i], new_origin
          FROM answers a
         WHERE NOT a.duplicate
        RETURNING position
    ),
    redelivered AS (
        INSERT INTO redeliveries (position, received_at, signature)
        SELECT a.position, received, new_signatures[a.i] FROM answers a WHERE a.duplicate
        RETURNING position
    )
    SELECT a.position, a.duplicate
      FROM answers a
     ORDER BY a.i;
END;
$$;

-- Webhook deliveries, as ingest received them (a body, its X-Argyle-Signature, and what its
-- envelope says), in order; one answer per delivery: its position and whether it repeated a body
-- received within `dedup_window`.
CREATE FUNCTION append_webhooks(
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    new_signatures text[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    -- plpgsql, not sql: its one statement is planned once per connection, not at every call.
    RETURN QUERY
    SELECT * FROM append_to_log('webhook', new_events, new_accounts, new_users, new_bodies,
                                new_signatures, dedup_window);
END;
$$;

-- Answers of Argyle's API (the enricher's `argyle.account_fetched` / `argyle.account_not_found`):
-- unsigned, and only those names.
CREATE FUNCTION append_fetched(
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(new_events) n
                WHERE n IS DISTINCT FROM 'argyle.account_fetched'
                  AND n IS DISTINCT FROM 'argyle.account_not_found') THEN
        RAISE EXCEPTION 'append_fetched appends only argyle.account_fetched and argyle.account_not_found'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT * FROM append_to_log('argyle_api', new_events, new_accounts, new_users, new_bodies,
                                array_fill(NULL::text, ARRAY[cardinality(new_bodies)]), dedup_window);
END;
$$;

-- A SECURITY DEFINER function must not find a caller's objects first: this schema, then pg_temp
-- last (where it would otherwise be searched first for tables).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], text[], interval)
                        SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION append_webhooks(text[], uuid[], uuid[], bytea[], text[], interval)
                        SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION append_fetched(text[], uuid[], uuid[], bytea[], interval)
                        SET search_path = %I, pg_temp', current_schema());
END;
$$;

REVOKE ALL ON FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], text[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION append_webhooks(text[], uuid[], uuid[], bytea[], text[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION append_fetched(text[], uuid[], uuid[], bytea[], interval) FROM PUBLIC;

-- Replaced: it let its caller pick the lock and the checksums.
DROP FUNCTION append_events(bigint, text[], uuid[], uuid[], bytea[], bytea[], text[], interval);

-- What the service role may do, in one place: deploy/roles.sql says which command needs what.
-- Every later migration that adds a table or a function redefines this and calls it again, so
-- `migrate` alone keeps the service role's grants current. Called with a role that does not exist,
-- it does nothing.
CREATE FUNCTION grant_service_role(service name) RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = service) THEN
        RETURN;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), service);
    -- The log: read, and append only through the functions.
    EXECUTE format('GRANT SELECT ON events, redeliveries, events_json TO %I', service);
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
                      ON events, redeliveries FROM %I', service);
    EXECUTE format('GRANT EXECUTE ON FUNCTION
                      append_webhooks(text[], uuid[], uuid[], bytea[], text[], interval),
                      append_fetched(text[], uuid[], uuid[], bytea[], interval) TO %I', service);
    -- The projection, which the projector and `rebuild` rewrite; no TRUNCATE (it takes an
    -- exclusive lock readers would queue behind).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON account_snapshots, account_snapshots_rebuild
                      TO %I', service);
    EXECUTE format('GRANT SELECT, UPDATE ON projector_checkpoints TO %I', service);
    -- Quarantine: recorded, never edited.
    EXECUTE format('GRANT SELECT, INSERT ON quarantine TO %I', service);
    -- The enricher's queue of fetches.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON enrichment_requests TO %I', service);
    -- /readyz and `serve` check that every migration is applied.
    EXECUTE format('GRANT SELECT ON refinery_schema_history TO %I', service);
END;
$$;
REVOKE ALL ON FUNCTION grant_service_role(name) FROM PUBLIC;

SELECT grant_service_role('account_projector_service');
