-- Appends that overlap (store crate docs, "Why a reader of position > checkpoint never skips an
-- event"). Until V17 every append held one lock from choosing its position until its commit, so
-- appends committed one at a time. Now an append holds that lock only while it takes its positions
-- (microseconds) and commits alongside the others; what kept readers safe is replaced by:
--
-- * an in-flight marker: under the short lock an append also takes a transaction-level advisory
--   lock on its first position (the two-int4 key space: high and low 32 bits), which Postgres
--   releases only after the commit (or abort) is visible to every new snapshot;
-- * the horizon, log_horizon(): the last position with no append in flight at or below it. Every
--   position up to it is settled, committed or abandoned, so a reader of `position > checkpoint
--   AND position <= horizon` never skips an event that commits late;
-- * abandoned_positions: a position whose append never committed (a rollback, a lost connection,
--   a crash) is recorded there by settle_log() once the horizon passes it, so every position up to
--   log_settled is accounted for exactly once, in events or here: the proof that nothing is missing;
-- * dedup by body is made race-free by a transaction-level lock per body sha256 (taken in one
--   order), so a redelivery racing its original waits for it to commit and then finds it.
--
-- The per-statement NOTIFY of V1 goes too: NOTIFY serialises the commits of every notifying
-- transaction (PreCommit_Notify's database-wide lock). The service announces appends itself, from
-- a transaction of its own, after each commit (store::log::announce).

-- No append of the previous version commits while the sequence is seeded (its appends insert under
-- ROW EXCLUSIVE): once this migration commits, they go through the new append_to_log. Its readers
-- are another matter: stop every process of the previous version before migrating (docs/scaling.md).
LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE;

CREATE SEQUENCE event_positions AS bigint MINVALUE 1;
SELECT CASE WHEN max(position) IS NULL THEN setval('event_positions', 1, false)
            ELSE setval('event_positions', max(position)) END
  FROM events;

-- Positions an append took and never committed, noticed once every append at or below them ended.
CREATE TABLE abandoned_positions (
    position   bigint      PRIMARY KEY CHECK (position > 0),
    noticed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER abandoned_positions_append_only BEFORE UPDATE OR DELETE ON abandoned_positions
    FOR EACH ROW EXECUTE FUNCTION refuse_log_change();

-- How far settle_log() has accounted for every position (replicated, unlike the in-flight
-- markers: a standby's readers stop here).
CREATE TABLE log_settled (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    position bigint  NOT NULL CHECK (position >= 0)
);
INSERT INTO log_settled (position) SELECT coalesce(max(position), 0) FROM events;

DROP TRIGGER events_notify ON events;
DROP FUNCTION notify_events_appended();

-- The last position at or below which no append is in flight. On a standby (which sees neither
-- the primary's locks nor its sequence as it is): log_settled.
CREATE FUNCTION log_horizon() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    last_taken bigint;
    taken boolean;
    in_flight bigint;
BEGIN
    IF pg_is_in_recovery() THEN
        RETURN (SELECT s.position FROM log_settled s);
    END IF;
    -- Shared with other readers, exclusive of an append taking its positions: between the
    -- sequence and its marker an append is never half-seen.
    BEGIN
        PERFORM pg_advisory_lock_shared(71813133453089);
        SELECT s.last_value, s.is_called INTO last_taken, taken FROM event_positions s;
        SELECT min((l.classid::bigint << 32) | l.objid::bigint) INTO in_flight
          FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.objsubid = 2
           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
        PERFORM pg_advisory_unlock_shared(71813133453089);
    EXCEPTION WHEN OTHERS OR query_canceled THEN
        PERFORM pg_advisory_unlock_shared(71813133453089);
        RAISE;
    END;
    RETURN coalesce(in_flight - 1, CASE WHEN taken THEN last_taken ELSE last_taken - 1 END);
END;
$$;

-- The horizon, after recording every position up to it that no event holds as abandoned and
-- moving log_settled there (at most 100,000 positions a call). Only under READ COMMITTED: the
-- statement that looks for the events must see every commit the horizon counted as ended.
CREATE FUNCTION settle_log() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    horizon bigint;
    settled bigint;
BEGIN
    IF pg_is_in_recovery() THEN
        RETURN (SELECT s.position FROM log_settled s);
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'settle_log() must run under READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    horizon := log_horizon();
    SELECT s.position INTO settled FROM log_settled s;
    horizon := least(horizon, settled + 100000);
    IF horizon > settled THEN
        INSERT INTO abandoned_positions (position)
        SELECT g FROM generate_series(settled + 1, horizon) g
         WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.position = g)
        ON CONFLICT DO NOTHING;
        UPDATE log_settled SET position = greatest(position, horizon);
    END IF;
    RETURN horizon;
END;
$$;

-- Blocks every append until the caller's transaction ends and waits for those in flight, so
-- that what the caller reads next (under READ COMMITTED) is every event appended so far.
CREATE FUNCTION hold_appends() RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    marker record;
BEGIN
    PERFORM pg_advisory_xact_lock(71813133453089);
    FOR marker IN SELECT l.classid, l.objid FROM pg_locks l
                   WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
                     AND l.pid <> pg_backend_pid()
                     AND l.database = (SELECT d.oid FROM pg_database d
                                        WHERE d.datname = current_database())
    LOOP
        -- Granted once that append's transaction has ended; its position is never taken again.
        PERFORM pg_advisory_xact_lock_shared(marker.classid::bigint::int4,
                                             marker.objid::bigint::bit(32)::int4);
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION append_to_log(
    new_origin text,
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    new_sha256s bytea[],
    new_signatures text[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    shas bytea[];
    logged bigint[];
    firsts boolean[];
    fresh integer;
    sha bytea;
    first_position bigint;
    received timestamptz;
BEGIN
    IF coalesce(cardinality(new_bodies), 0) = 0 THEN
        RETURN;
    END IF;
    -- The sha256 of each body as received: the caller's when the body is sealed (V16).
    SELECT array_agg(CASE WHEN substring(b.body FROM 1 FOR 1) = '\xae'::bytea THEN new_sha256s[b.i]
                          ELSE sha256(b.body) END ORDER BY b.i)
      INTO shas
      FROM unnest(new_bodies) WITH ORDINALITY AS b(body, i);
    -- One lock per body until the commit, in one order (no deadlock between two batches): an
    -- identical body appended concurrently waits here for this one's commit, then finds it.
    FOREACH sha IN ARRAY (SELECT array_agg(DISTINCT s ORDER BY s) FROM unnest(shas) s) LOOP
        PERFORM pg_advisory_xact_lock(('x' || encode(substring(sha FROM 1 FOR 8), 'hex'))::bit(64)::bigint);
    END LOOP;
    -- After those waits: a redelivery is received after the original it waited for.
    received := clock_timestamp();
    SELECT array_agg(p.logged ORDER BY p.i), array_agg(p.i = p.first_i ORDER BY p.i)
      INTO logged, firsts
      FROM (SELECT t.i,
                   min(t.i) OVER (PARTITION BY t.sha) AS first_i,
                   (SELECT e.position
                      FROM events e
                     WHERE e.body_sha256 = t.sha AND e.received_at > clock_timestamp() - dedup_window
                     ORDER BY e.position DESC
                     LIMIT 1) AS logged
              FROM unnest(shas) WITH ORDINALITY AS t(sha, i)) p;
    SELECT count(*) INTO fresh
      FROM unnest(logged, firsts) AS f(l, first)
     WHERE f.l IS NULL AND f.first;
    IF fresh > 0 THEN
        -- store::locks::APPEND_LOCK ("APLOG!"), held only while the positions are taken and
        -- marked; log_horizon() takes it shared.
        BEGIN
            PERFORM pg_advisory_lock(71813133453089);
            first_position := nextval('event_positions');
            IF fresh > 1 THEN
                PERFORM setval('event_positions', first_position + fresh - 1);
            END IF;
            PERFORM pg_advisory_xact_lock((first_position >> 32)::int4, first_position::bit(32)::int4);
            SELECT greatest(clock_timestamp(), max(e.received_at)) INTO received
              FROM (SELECT e.received_at FROM events e ORDER BY e.position DESC LIMIT 1) e;
            PERFORM pg_advisory_unlock(71813133453089);
        EXCEPTION WHEN OTHERS OR query_canceled THEN
            PERFORM pg_advisory_unlock(71813133453089);
            RAISE;
        END;
    END IF;
    RETURN QUERY
    WITH probed AS (
        SELECT t.i, t.sha, t.logged_position, t.first
          FROM unnest(shas, logged, firsts) WITH ORDINALITY AS t(sha, logged_position, first, i)
    ),
    numbered AS (
        SELECT p.i, p.sha, p.logged_position,
               CASE WHEN p.logged_position IS NULL AND p.first
                    THEN first_position - 1
                         + count(*) FILTER (WHERE p.logged_position IS NULL AND p.first)
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

-- As V16's, but appends are held with hold_appends(), which also waits for those in flight.
CREATE OR REPLACE FUNCTION erase_account(target uuid, target_user uuid, erasure_body bytea)
RETURNS TABLE (erasure_position bigint, already_erased boolean)
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    done bigint;
    plain bigint;
    appended bigint;
BEGIN
    IF target = '00000000-0000-0000-0000-000000000000' THEN
        RAISE EXCEPTION 'the nil account holds events that name no account and cannot be erased'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Appends held first: no event of the account is appended while it is erased.
    PERFORM hold_appends();
    SELECT k.erased_position INTO done FROM account_keys k
     WHERE k.account_id = target AND k.erased_at IS NOT NULL;
    IF FOUND THEN
        RETURN QUERY SELECT done, true;
        RETURN;
    END IF;
    SELECT count(*) INTO plain FROM events e
     WHERE e.account_id = target AND e.origin IS DISTINCT FROM 'erasure'
       AND substring(e.body FROM 1 FOR 1) IS DISTINCT FROM '\xae'::bytea;
    IF plain > 0 THEN
        RAISE EXCEPTION '% events of account % are stored in plaintext (appended before encryption at rest); run `account-projector keys seal` as the schema''s owner first', plain, target
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT a.appended_position INTO appended
      FROM append_to_log('erasure', ARRAY['account_projector.account_erased'], ARRAY[target],
                         ARRAY[target_user], ARRAY[erasure_body], ARRAY[NULL::bytea],
                         ARRAY[NULL::text], interval '0') a;
    INSERT INTO account_keys (account_id, kek_id, wrapped_key, erased_at, erased_position)
    VALUES (target, NULL, NULL, now(), appended)
    ON CONFLICT (account_id) DO UPDATE
        SET kek_id = NULL, wrapped_key = NULL, erased_at = excluded.erased_at,
            erased_position = excluded.erased_position;
    RETURN QUERY SELECT appended, false;
END;
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], bytea[], text[], interval)
                        SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION erase_account(uuid, uuid, bytea) SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION log_horizon() SET search_path = %I, pg_catalog, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION settle_log() SET search_path = %I, pg_catalog, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION hold_appends() SET search_path = %I, pg_catalog, pg_temp', current_schema());
END;
$$;
REVOKE ALL ON FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], bytea[], text[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION erase_account(uuid, uuid, bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION log_horizon() FROM PUBLIC;
REVOKE ALL ON FUNCTION settle_log() FROM PUBLIC;
REVOKE ALL ON FUNCTION hold_appends() FROM PUBLIC;
REVOKE ALL ON SEQUENCE event_positions FROM PUBLIC;

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
                      hold_appends() TO %I', service);
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
