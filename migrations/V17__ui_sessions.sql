-- Sessions of the web pages (/ui/). A sign-in exchanges an API token for a session; the cookie
-- carries a random id, and only its sha256 is kept here, with the sha256 of the token it was
-- opened with (a token removed from API_TOKENS ends its sessions) and when it expires. Sign-out
-- deletes the row, so a copied cookie stops working at once, on every process.
CREATE TABLE ui_sessions (
    id_sha256    bytea PRIMARY KEY CHECK (length(id_sha256) = 32),
    token_sha256 bytea NOT NULL CHECK (length(token_sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);
CREATE INDEX ui_sessions_expires_at ON ui_sessions (expires_at);

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
    -- Sessions of the web pages (/ui/): opened at sign-in, looked up per page, closed at sign-out.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON ui_sessions TO %I', service);
    -- /readyz and `serve` check that every migration is applied.
    EXECUTE format('GRANT SELECT ON refinery_schema_history TO %I', service);
END;
$$;
REVOKE ALL ON FUNCTION grant_service_role(name) FROM PUBLIC;

SELECT grant_service_role('account_projector_service');
