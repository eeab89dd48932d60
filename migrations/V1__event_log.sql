-- The event log: the audit record of everything Argyle told us. Append-only.
--
-- One row per distinct event. `position` is dense and gap-free: appends are serialised by a
-- transaction-level advisory lock (see the store crate's docs), so positions become visible in
-- order and a reader of `position > checkpoint` never skips one.
CREATE TABLE events (
    position    bigint      PRIMARY KEY CHECK (position > 0),
    -- The database's clock when the delivery was appended; never decreases along `position`.
    received_at timestamptz NOT NULL,
    event       text        NOT NULL,
    -- data.account / data.user; required for accounts.* events, NULL where another family has none.
    account_id  uuid,
    user_id     uuid,
    -- The request body exactly as received (the signature covers these bytes).
    body        bytea       NOT NULL,
    body_sha256 bytea       NOT NULL CHECK (length(body_sha256) = 32),
    -- The body parsed, for queries by hand; the projector reads `body`.
    payload     jsonb       NOT NULL,
    -- The X-Argyle-Signature header as received (NULL when it was absent).
    signature   text
);

-- Bodies are ~2 KB, just over the TOAST threshold, so most are stored compressed; lz4 decompresses
-- several times faster than the default pglz, which is what replays and rebuilds spend time on.
DO $$
BEGIN
    ALTER TABLE events ALTER COLUMN body SET COMPRESSION lz4;
    ALTER TABLE events ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server lacks lz4; event bodies keep the default compression';
END;
$$;

CREATE INDEX events_account_position_idx ON events (account_id, position);
CREATE INDEX events_user_position_idx ON events (user_id, position);
-- Dedup looks up the newest event with the same body inside the window.
CREATE INDEX events_body_sha256_idx ON events (body_sha256, position);

-- Every later delivery of an identical body within the dedup window: the same event, delivered again.
CREATE TABLE redeliveries (
    position    bigint      NOT NULL REFERENCES events (position),
    received_at timestamptz NOT NULL,
    signature   text
);

CREATE INDEX redeliveries_position_idx ON redeliveries (position);

CREATE FUNCTION refuse_log_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_log_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_log_change();
CREATE TRIGGER redeliveries_append_only BEFORE UPDATE OR DELETE ON redeliveries
    FOR EACH ROW EXECUTE FUNCTION refuse_log_change();
CREATE TRIGGER redeliveries_no_truncate BEFORE TRUNCATE ON redeliveries
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_log_change();

-- Wakes projectors (LISTEN events_appended) when an append commits; they also poll as a fallback.
CREATE FUNCTION notify_events_appended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('events_appended', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events_appended();
