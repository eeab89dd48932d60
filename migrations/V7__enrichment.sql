-- The enricher: accounts.* events that arrived without `resource` ask for the account to be fetched
-- from Argyle's API (GET /v2/accounts/{id}); the answer is appended to the log as an event of its own.

-- How far the enricher has scanned the log for such events. It starts at the head: on a log that
-- already holds events, webhooks received before this version are not fetched after the fact (that
-- could be a flood of API calls for accounts long settled).
INSERT INTO projector_checkpoints (name, position)
SELECT 'enricher', coalesce(max(position), 0) FROM events;

-- One row per account ever asked for. A fetch is pending while requested_position > fetched_position;
-- it is due at next_attempt_at, which coalesces bursts (one fetch per account per window) and backs
-- off after failures. Fetching, appending the answer and completing the row commit together.
CREATE TABLE enrichment_requests (
    account_id         uuid        PRIMARY KEY,
    user_id            uuid        NOT NULL,
    -- Position of the newest resource-less event asking for this account.
    requested_position bigint      NOT NULL CHECK (requested_position > 0),
    -- requested_position as it was when the last completed fetch started.
    fetched_position   bigint      NOT NULL DEFAULT 0,
    fetched_at         timestamptz,
    attempts           integer     NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    last_error         text
);

CREATE INDEX enrichment_requests_due ON enrichment_requests (next_attempt_at)
    WHERE requested_position > fetched_position;
