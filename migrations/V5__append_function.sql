-- Appending runs inside the database, one round trip per batch of deliveries: the lock, the dedup
-- lookups and the inserts, so the append lock (see the store crate's docs) is held as briefly as
-- possible, and concurrent requests can share one transaction and one commit (group commit).
--
-- Takes the transaction-level advisory lock `lock_key`, then, for the deliveries in order: one whose
-- body (sha256) matches the newest event received within `dedup_window`, or an earlier delivery of
-- the same batch, is recorded as a redelivery of that event; every other one becomes a new event at
-- the next position, all received at one instant that never goes back along the log. Returns one row
-- per delivery, in order. Set-based: one INSERT for the events and one for the redeliveries.
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
    received timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT e.position, e.received_at INTO head_position, head_received
      FROM events e
     ORDER BY e.position DESC
     LIMIT 1;
    head_position := coalesce(head_position, 0);
    received := greatest(clock_timestamp(), head_received);
    RETURN QUERY
    WITH input AS (
        SELECT t.i, t.ev, t.acc, t.usr, t.body, t.sha, t.sig
          FROM unnest(new_events, new_accounts, new_users, new_bodies, new_sha256s, new_signatures)
               WITH ORDINALITY AS t(ev, acc, usr, body, sha, sig, i)
    ),
    -- One index probe per distinct body: a plan that stays cheap however large the log grows,
    -- whether the function's statement is planned for these arrays or generically.
    logged AS (
        SELECT s.sha, hit.position
          FROM (SELECT DISTINCT inp.sha FROM input inp) s
          CROSS JOIN LATERAL (
              SELECT e.position
                FROM events e
               WHERE e.body_sha256 = s.sha AND e.received_at > clock_timestamp() - dedup_window
               ORDER BY e.position DESC
               LIMIT 1
          ) hit
    ),
    fresh AS (
        SELECT f.i, f.sha, head_position + row_number() OVER (ORDER BY f.i) AS position
          FROM (SELECT DISTINCT ON (inp.sha) inp.i, inp.sha
                  FROM input inp
                 WHERE NOT EXISTS (SELECT 1 FROM logged l WHERE l.sha = inp.sha)
                 ORDER BY inp.sha, inp.i) f
    ),
    inserted AS (
        INSERT INTO events (position, received_at, event, account_id, user_id, body, body_sha256, payload, signature)
        SELECT f.position, received, inp.ev, inp.acc, inp.usr, inp.body, inp.sha,
               convert_from(inp.body, 'UTF8')::jsonb, inp.sig
          FROM fresh f JOIN input inp ON inp.i = f.i
        RETURNING position
    ),
    answers AS (
        SELECT inp.i, inp.sig,
               coalesce(l.position, f.position) AS position,
               NOT EXISTS (SELECT 1 FROM fresh n WHERE n.i = inp.i) AS duplicate
          FROM input inp
          LEFT JOIN logged l ON l.sha = inp.sha
          LEFT JOIN fresh f ON f.sha = inp.sha
    ),
    redelivered AS (
        INSERT INTO redeliveries (position, received_at, signature)
        SELECT a.position, received, a.sig FROM answers a WHERE a.duplicate
        RETURNING position
    )
    SELECT a.position, a.duplicate
      FROM answers a
     ORDER BY a.i;
END;
$$;
