-- The log keeps each body once. `payload` held the same bytes parsed as jsonb: Postgres parsed,
-- built and compressed a second copy of every delivery inside the append lock, about a fifth of
-- the database's work per delivery (BENCHMARKS.md), for a column nothing in the service reads:
-- the projector, the API, `rebuild` and `export` all read `body`. Queries by hand read the same
-- JSON through the `events_json` view.
ALTER TABLE events DROP COLUMN payload;

CREATE VIEW events_json AS
SELECT position, received_at, event, account_id, user_id,
       convert_from(body, 'UTF8')::jsonb AS payload, signature
  FROM events;

-- As in V5, without the second copy.
CREATE OR REPLACE FUNCTION append_events(
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
        INSERT INTO events (position, received_at, event, account_id, user_id, body, body_sha256, signature)
        SELECT f.position, received, inp.ev, inp.acc, inp.usr, inp.body, inp.sha, inp.sig
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
