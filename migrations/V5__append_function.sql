-- One round trip per append: the lock, the dedup lookup and the insert run inside the database, so
-- the append lock (see the store crate's docs) is held for as short a time as possible.
--
-- Takes the transaction-level advisory lock `lock_key`, then either records a redelivery of the
-- newest event with the same body received within `dedup_window`, or appends a new event at
-- head + 1 with a receive time that never goes back along the log.
CREATE FUNCTION append_event(
    lock_key bigint,
    new_event text,
    new_account uuid,
    new_user uuid,
    new_body bytea,
    new_sha256 bytea,
    new_signature text,
    dedup_window interval,
    OUT appended_position bigint,
    OUT is_duplicate boolean
)
LANGUAGE plpgsql AS $$
DECLARE
    head_position bigint;
    head_received timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT e.position INTO appended_position
      FROM events e
     WHERE e.body_sha256 = new_sha256 AND e.received_at > clock_timestamp() - dedup_window
     ORDER BY e.position DESC
     LIMIT 1;
    IF FOUND THEN
        INSERT INTO redeliveries (position, received_at, signature)
        VALUES (appended_position, clock_timestamp(), new_signature);
        is_duplicate := true;
        RETURN;
    END IF;
    SELECT e.position, e.received_at INTO head_position, head_received
      FROM events e
     ORDER BY e.position DESC
     LIMIT 1;
    appended_position := coalesce(head_position, 0) + 1;
    INSERT INTO events (position, received_at, event, account_id, user_id, body, body_sha256, payload, signature)
    VALUES (appended_position, greatest(clock_timestamp(), head_received), new_event, new_account, new_user,
            new_body, new_sha256, convert_from(new_body, 'UTF8')::jsonb, new_signature);
    is_duplicate := false;
END;
$$;
