-- Nothing signed is refused for what it holds, and nothing stalls the projector.
--
-- The projection keeps each resource as the exact JSON text Argyle sent: `json` checks the syntax
-- and stores the text, so an escaped NUL, an escaped surrogate that is not half of a pair and a
-- number beyond `numeric` (valid JSON that `jsonb` refuses) are held as they came, and a snapshot
-- always reads back byte for byte what the fold produced.
ALTER TABLE account_snapshots ALTER COLUMN resource TYPE json USING resource::json;
ALTER TABLE account_snapshots_rebuild ALTER COLUMN resource TYPE json USING resource::json;

-- Who refused an event: the fold (`fold`: the event cannot be applied, decided again by every
-- fold of the log) or the database (`store`: the snapshot the fold produced could not be written;
-- every later fold of the log skips the event, so rebuild and verify agree with the projector).
ALTER TABLE quarantine
    ADD COLUMN refused_by text NOT NULL DEFAULT 'fold' CHECK (refused_by IN ('fold', 'store'));

-- events_json serves bodies jsonb cannot hold as NULL instead of failing the whole query.
CREATE FUNCTION body_as_jsonb(body bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
BEGIN
    RETURN convert_from(body, 'UTF8')::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$;

CREATE OR REPLACE VIEW events_json AS
SELECT position, received_at, event, account_id, user_id, body_as_jsonb(body) AS payload, signature
  FROM events;
