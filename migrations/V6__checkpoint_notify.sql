-- Tells listeners (LISTEN checkpoint_advanced) how far the projection has folded, as soon as a
-- projector batch commits: clients can wait for their write to be visible without polling.
CREATE FUNCTION notify_checkpoint_advanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('checkpoint_advanced', NEW.name || ' ' || NEW.position);
    RETURN NULL;
END;
$$;

CREATE TRIGGER projector_checkpoints_notify AFTER UPDATE ON projector_checkpoints
    FOR EACH ROW EXECUTE FUNCTION notify_checkpoint_advanced();
