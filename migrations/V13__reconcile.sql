-- Reconcile with Argyle (`account-projector reconcile`, and the enricher's RECONCILE_INTERVAL).
--
-- A run pages through GET /v2/accounts and appends, page by page, what the log lacks. Each page
-- commits in one transaction: its appends, the accounts it listed, and the run's cursor and
-- counts. A run killed half way is resumed from the cursor of its last committed page.

CREATE TABLE reconcile_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The API listed (ARGYLE_API_URL) and the scope: a run resumes only one of the same.
    api_url         text NOT NULL,
    scope_user      uuid,
    scope_account   uuid,
    dry_run         boolean NOT NULL,
    -- Who runs it: `cli` or `schedule`.
    started_by      text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    -- running | finished | refused (the missing-at-Argyle guard) | failed | abandoned
    state           text NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'finished', 'refused', 'failed', 'abandoned')),
    -- The next page to read; NULL once the listing is complete (or before the first page).
    next_url        text,
    listing_done    boolean NOT NULL DEFAULT false,
    pages           integer NOT NULL DEFAULT 0,
    listed          bigint NOT NULL DEFAULT 0,
    new             bigint NOT NULL DEFAULT 0,
    newer_at_argyle bigint NOT NULL DEFAULT 0,
    unchanged       bigint NOT NULL DEFAULT 0,
    newer_here      bigint NOT NULL DEFAULT 0,
    removed_here    bigint NOT NULL DEFAULT 0,
    unreadable      bigint NOT NULL DEFAULT 0,
    missing         bigint,
    held_active     bigint,
    removals        bigint NOT NULL DEFAULT 0,
    error           text
);
CREATE INDEX reconcile_runs_unfinished ON reconcile_runs (id) WHERE state = 'running';

-- The accounts a run has listed so far, to find the ones Argyle no longer lists without holding
-- them in memory. Rows of a run are deleted when it ends.
CREATE TABLE reconcile_listed (
    run_id      bigint NOT NULL REFERENCES reconcile_runs (id) ON DELETE CASCADE,
    account_id  uuid NOT NULL,
    PRIMARY KEY (run_id, account_id)
);

-- Answers of Argyle's API now include a removal that reconcile confirmed (the account is not
-- listed, and GET /v2/accounts/{id} answered 404): `argyle.account_removed`, folded like
-- accounts.removed.
CREATE OR REPLACE FUNCTION append_fetched(
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
                  AND n IS DISTINCT FROM 'argyle.account_not_found'
                  AND n IS DISTINCT FROM 'argyle.account_removed') THEN
        RAISE EXCEPTION 'append_fetched appends only argyle.account_fetched, argyle.account_not_found and argyle.account_removed'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT * FROM append_to_log('argyle_api', new_events, new_accounts, new_users, new_bodies,
                                array_fill(NULL::text, ARRAY[cardinality(new_bodies)]), dedup_window);
END;
$$;
-- CREATE OR REPLACE resets the function's settings: a SECURITY DEFINER function keeps its
-- search_path (see V12).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION append_fetched(text[], uuid[], uuid[], bytea[], interval)
                        SET search_path = %I, pg_temp', current_schema());
END;
$$;

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
    -- Reconcile's runs and what each listed (its own bookkeeping, not the log).
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON reconcile_runs TO %I', service);
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON reconcile_listed TO %I', service);
    -- /readyz and `serve` check that every migration is applied.
    EXECUTE format('GRANT SELECT ON refinery_schema_history TO %I', service);
END;
$$;
REVOKE ALL ON FUNCTION grant_service_role(name) FROM PUBLIC;

SELECT grant_service_role('account_projector_service');
