-- Outbound webhooks (the notifier role): subscribers, and per subscriber one pending message per
-- account, the latest view not yet delivered (a newer view replaces an undelivered one: bursts
-- collapse, and an account has at most one message in flight).

CREATE TABLE subscribers (
    id              uuid PRIMARY KEY,
    url             text NOT NULL,
    -- `whsec_` + base64 of the signing key (Standard Webhooks).
    secret          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The change feed is turned into messages up to this cursor.
    scanned_to      bigint NOT NULL DEFAULT 0,
    -- `failing` once a message has been retried past the whole schedule; `active` again after a 2xx.
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'failing')),
    failing_since   timestamptz,
    last_success_at timestamptz,
    last_error      text
);

CREATE TABLE subscriber_messages (
    subscriber_id    uuid NOT NULL REFERENCES subscribers (id) ON DELETE CASCADE,
    account_id       uuid NOT NULL,
    -- `webhook-id`: stable across the retries of this body, new for a newer view.
    message_id       uuid NOT NULL,
    last_position    bigint NOT NULL,
    body             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    PRIMARY KEY (subscriber_id, account_id)
);
CREATE INDEX subscriber_messages_due ON subscriber_messages (next_attempt_at);

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
    -- The notifier's subscribers (managed by `subscribers add|remove|replay`) and their messages.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON subscribers, subscriber_messages
                      TO %I', service);
    -- /readyz and `serve` check that every migration is applied.
    EXECUTE format('GRANT SELECT ON refinery_schema_history TO %I', service);
END;
$$;
REVOKE ALL ON FUNCTION grant_service_role(name) FROM PUBLIC;

SELECT grant_service_role('account_projector_service');
