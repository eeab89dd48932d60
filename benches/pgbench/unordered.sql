-- An experiment, not the service: append_webhooks without what keeps the log in order, to measure
-- appends that overlap. Built from the installed functions, so it follows the migrations: the
-- advisory lock and the head lookup become a block of positions from a sequence (far above any
-- position the log holds), the receive time is the clock's, the copies resolve names by the
-- session's search_path, and the NOTIFY trigger is disabled (it serialises notifying commits).
-- Call it with search_path=bench_unordered,public.
CREATE SCHEMA bench_unordered;
CREATE SEQUENCE bench_unordered.block START 1000000;
DO $$
DECLARE
    inner_fn text := pg_get_functiondef(
        'public.append_to_log(text, text[], uuid[], uuid[], bytea[], bytea[], text[], interval)'::regprocedure);
    outer_fn text := pg_get_functiondef(
        'public.append_webhooks(text[], uuid[], uuid[], bytea[], bytea[], text[], interval)'::regprocedure);
BEGIN
    inner_fn := regexp_replace(
        replace(inner_fn, 'FUNCTION public.append_to_log(', 'FUNCTION bench_unordered.append_to_log('),
        'PERFORM pg_advisory_xact_lock\(\d+\);.*received := greatest\(clock_timestamp\(\), head_received\);',
        $r$head_position := nextval('bench_unordered.block') * 100000; received := clock_timestamp();$r$);
    IF inner_fn NOT LIKE '%bench_unordered.block%' OR inner_fn LIKE '%pg_advisory_xact_lock%' THEN
        RAISE EXCEPTION 'append_to_log no longer has the expected lock and head lookup: update this script';
    END IF;
    outer_fn := replace(outer_fn, 'FUNCTION public.append_webhooks(', 'FUNCTION bench_unordered.append_webhooks(');
    inner_fn := regexp_replace(inner_fn, '\n\s*SET search_path TO [^\n]*', '');
    outer_fn := regexp_replace(outer_fn, '\n\s*SET search_path TO [^\n]*', '');
    IF inner_fn LIKE '%search_path%' OR outer_fn LIKE '%search_path%' THEN
        RAISE EXCEPTION 'the append functions no longer set search_path as expected: update this script';
    END IF;
    EXECUTE inner_fn;
    EXECUTE outer_fn;
END;
$$;
ALTER TABLE events DISABLE TRIGGER events_notify;
