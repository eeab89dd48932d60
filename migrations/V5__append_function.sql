-- Appending runs inside the database, one round trip per batch of deliveries: the lock, the dedup
-- lookups and the inserts, so the append lock (see the store crate's docs) is held as briefly as
-- possible, and concurrent requests can share one transaction and one commit (group commit).
--
-- Takes the transaction-level advisory lock `lock_key`, then, for each delivery in order, either
-- records a redelivery of the newest event with the same body received within `dedup_window`
-- (an identical body earlier in the same batch counts), or appends a new event at head + 1 with a
-- receive time that never goes back along the log. Returns one row per delivery, in order.
CREATE FUNCTION append_events(
    lock_key bigint,
    new_events text[],
    new_accounts uuid[],
    new_users uuid[],
    new_bodies bytea[],
    new_sha256s bytea[],
    new_signatures text[],
    dedup_window interval
)
RETURNS TABLE (appended_position bigint, is_duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    head_position bigint;
    head_received timestamptz;
    original bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT e.position, e.received_at INTO head_position, head_received
      FROM events e
     ORDER BY e.position DESC
     LIMIT 1;
    head_position := coalesce(head_position, 0);
    FOR i IN 1 .. coalesce(array_length(new_bodies, 1), 0) LOOP
        SELECT e.position INTO original
          FROM events e
         WHERE e.body_sha256 = new_sha256s[i] AND e.received_at > clock_timestamp() - dedup_window
         ORDER BY e.position DESC
         LIMIT 1;
        IF FOUND THEN
            INSERT INTO redeliveries (position, received_at, signature)
            VALUES (original, clock_timestamp(), new_signatures[i]);
            appended_position := original;
            is_duplicate := true;
        ELSE
            head_position := head_position + 1;
            head_received := greatest(clock_timestamp(), head_received);
            INSERT INTO events (position, received_at, event, account_id, user_id, body, body_sha256, payload, signature)
            VALUES (head_position, head_received, new_events[i], new_accounts[i], new_users[i], new_bodies[i],
                    new_sha256s[i], convert_from(new_bodies[i], 'UTF8')::jsonb, new_signatures[i]);
            appended_position := head_position;
            is_duplicate := false;
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;
