-- Erasure by crypto-shredding (docs/erasure.md). Every copy of an account's personal data at rest
-- (log bodies, snapshot resources, quarantine reasons, outbound messages) is sealed by the service
-- with a key of its account (crate `sealing`: XChaCha20-Poly1305; sealed bytes start with 0xAE, a
-- byte no JSON text starts with). Account keys are kept here only wrapped by a key-encryption key
-- held outside the database (DATA_KEYS). Erasing an account destroys its key: the log keeps every
-- row, and nothing can read the account's bodies any more.

-- One key per account; the nil UUID is the key of events that name no account. An erased account
-- keeps its row, without a key, so no key can ever be made for it again (the primary key).
CREATE TABLE account_keys (
    account_id      uuid        PRIMARY KEY,
    -- Which key-encryption key wrapped it (sealing::KeyRing ids, 16 hex digits).
    kek_id          text,
    wrapped_key     bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    erased_at       timestamptz,
    -- The erasure event in the log.
    erased_position bigint,
    CHECK ((wrapped_key IS NULL) = (erased_at IS NOT NULL)),
    CHECK ((wrapped_key IS NULL) = (kek_id IS NULL))
);

-- Every column that holds personal data becomes bytes, sealed or (written before this version,
-- until `keys seal`) plaintext. The snapshot keeps its resource's exact JSON text, now as bytes.
ALTER TABLE account_snapshots ALTER COLUMN resource TYPE bytea USING convert_to(resource::text, 'UTF8');
ALTER TABLE account_snapshots_rebuild ALTER COLUMN resource TYPE bytea USING convert_to(resource::text, 'UTF8');
ALTER TABLE quarantine ALTER COLUMN error TYPE bytea USING convert_to(error, 'UTF8');
ALTER TABLE subscriber_messages ALTER COLUMN body TYPE bytea USING convert_to(body, 'UTF8');

-- Ciphertext does not compress: spare TOAST the attempt.
DO $$
BEGIN
    ALTER TABLE events ALTER COLUMN body SET STORAGE EXTERNAL;
    ALTER TABLE account_snapshots ALTER COLUMN resource SET STORAGE EXTERNAL;
    ALTER TABLE account_snapshots_rebuild ALTER COLUMN resource SET STORAGE EXTERNAL;
END;
$$;

-- The erased status, and the erasure's own origin (only it is folded as an erasure).
DO $$
DECLARE
    con record;
BEGIN
    FOR con IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
                WHERE contype = 'c'
                  AND conrelid IN ('account_snapshots'::regclass, 'account_snapshots_rebuild'::regclass)
                  AND pg_get_constraintdef(oid) LIKE '%status%removed%'
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', con.tbl, con.conname);
    END LOOP;
    FOR con IN SELECT conname FROM pg_constraint
                WHERE contype = 'c' AND conrelid = 'events'::regclass
                  AND pg_get_constraintdef(oid) LIKE '%origin%'
    LOOP
        EXECUTE format('ALTER TABLE events DROP CONSTRAINT %I', con.conname);
    END LOOP;
END;
$$;
ALTER TABLE account_snapshots ADD CONSTRAINT account_snapshots_status_check
    CHECK (status IN ('active', 'removed', 'erased'));
ALTER TABLE account_snapshots_rebuild ADD CONSTRAINT account_snapshots_rebuild_status_check
    CHECK (status IN ('active', 'removed', 'erased'));
-- Every row already there satisfies it (the set only grew): no scan of the log under a lock.
ALTER TABLE events ADD CONSTRAINT events_origin_check
    CHECK (origin IN ('webhook', 'argyle_api', 'erasure')) NOT VALID;

-- The append, as V12's, but the body's sha256 is the caller's when the body is sealed: the sha256
-- is of the plaintext (dedup compares deliveries, not ciphertexts), which only the service sees.
-- It is bound to the ciphertext as associated data and checked against the plaintext on every
-- decrypt, so a forged checksum makes the body fail authentication instead of passing as another.
-- A plaintext body (encryption off) still has its sha256 computed here.
CREATE FUNCTION append_to_log(
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
          FROM (SELECT b.i,
                       CASE WHEN substring(b.body FROM 1 FOR 1) = '\xae'::bytea THEN new_sha256s[b.i]
                            ELSE sha256(b.body) END AS sha
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

CREATE FUNCTION append_webhooks(
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    new_sha256s bytea[],
    new_signatures text[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    RETURN QUERY
    SELECT * FROM append_to_log('webhook', new_events, new_accounts, new_users, new_bodies,
                                new_sha256s, new_signatures, dedup_window);
END;
$$;

CREATE FUNCTION append_fetched(
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    new_sha256s bytea[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(new_events) n
                WHERE n IS DISTINCT FROM 'argyle.account_fetched'
                  AND n IS DISTINCT FROM 'argyle.account_not_found'
                  AND n IS DISTINCT FROM 'argyle.account_removed') THEN
        RAISE EXCEPTION 'append_fetched appends only argyle.account_fetched, argyle.account_not_found and argyle.account_removed'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT * FROM append_to_log('argyle_api', new_events, new_accounts, new_users, new_bodies,
                                new_sha256s, array_fill(NULL::text, ARRAY[cardinality(new_bodies)]),
                                dedup_window);
END;
$$;

-- The only way to destroy a key, and it records why: appends the erasure event (built by the
-- service: when, why, by whom, and which earlier events changed the resource; no personal data,
-- in plaintext) and forgets the account's key in one transaction. Erasing twice answers the first
-- erasure's position. Refused while the account has bodies in plaintext (written before
-- encryption at rest: `keys seal` first), which destroying a key would not erase.
CREATE FUNCTION erase_account(target uuid, target_user uuid, erasure_body bytea)
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
    -- The append lock first: no event of the account is appended while it is erased.
    PERFORM pg_advisory_xact_lock(71813133453089);
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

-- The one sanctioned change to the log's rows: `keys seal`, run by the schema's owner, replaces a
-- plaintext body by its sealed bytes, and nothing else. Every other UPDATE, DELETE or TRUNCATE is
-- refused as before.
CREATE OR REPLACE FUNCTION refuse_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Nested: the row's columns are read only for `events` (plpgsql does not short-circuit AND).
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'events'
       AND current_setting('account_projector.sealing_log', true) = 'on' THEN
        IF substring(OLD.body FROM 1 FOR 1) IS DISTINCT FROM '\xae'::bytea
           AND substring(NEW.body FROM 1 FOR 1) = '\xae'::bytea
           AND (NEW.position, NEW.received_at, NEW.event, NEW.account_id, NEW.user_id,
                NEW.body_sha256, NEW.signature, NEW.origin)
               IS NOT DISTINCT FROM
               (OLD.position, OLD.received_at, OLD.event, OLD.account_id, OLD.user_id,
                OLD.body_sha256, OLD.signature, OLD.origin) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'the event log is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- Each run of `keys seal`: when, by whom, how far, and how many bodies it sealed.
CREATE TABLE log_seal_runs (
    id              bigserial   PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    run_by          text        NOT NULL DEFAULT current_user,
    sealed_to       bigint      NOT NULL DEFAULT 0,
    events_sealed   bigint      NOT NULL DEFAULT 0,
    rows_sealed     bigint      NOT NULL DEFAULT 0
);

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], bytea[], text[], interval)
                        SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION append_webhooks(text[], uuid[], uuid[], bytea[], bytea[], text[], interval)
                        SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION append_fetched(text[], uuid[], uuid[], bytea[], bytea[], interval)
                        SET search_path = %I, pg_temp', current_schema());
    EXECUTE format('ALTER FUNCTION erase_account(uuid, uuid, bytea) SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;

REVOKE ALL ON FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], bytea[], text[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION append_webhooks(text[], uuid[], uuid[], bytea[], bytea[], text[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION append_fetched(text[], uuid[], uuid[], bytea[], bytea[], interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION erase_account(uuid, uuid, bytea) FROM PUBLIC;

-- Replaced: they computed the sha256 of what they stored, which is now ciphertext.
DROP FUNCTION append_webhooks(text[], uuid[], uuid[], bytea[], text[], interval);
DROP FUNCTION append_fetched(text[], uuid[], uuid[], bytea[], interval);
DROP FUNCTION append_to_log(text, text[], uuid[], uuid[], bytea[], text[], interval);

-- events_json shows a sealed body as NULL (it is not text); `sealed` says which those are.
CREATE OR REPLACE VIEW events_json AS
SELECT position, received_at, event, account_id, user_id, body_as_jsonb(body) AS payload, signature,
       substring(body FROM 1 FOR 1) = '\xae'::bytea AS sealed
  FROM events;

CREATE OR REPLACE FUNCTION grant_service_role(service name) RETURNS void
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
                      append_webhooks(text[], uuid[], uuid[], bytea[], bytea[], text[], interval),
                      append_fetched(text[], uuid[], uuid[], bytea[], bytea[], interval),
                      erase_account(uuid, uuid, bytea) TO %I', service);
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
    -- /readyz and `serve` check that every migration is applied.
    EXECUTE format('GRANT SELECT ON refinery_schema_history TO %I', service);
END;
$$;
REVOKE ALL ON FUNCTION grant_service_role(name) FROM PUBLIC;

SELECT grant_service_role('account_projector_service');
