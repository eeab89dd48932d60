-- An experiment, not the service: append_events without what keeps the log in order, to measure
-- appends that overlap. Built from the installed function, so it follows the migrations: the
-- advisory lock and the head lookup become a block of positions from a sequence (far above any
-- position the log holds), the receive time is the clock's, and the NOTIFY trigger is disabled
-- (it serialises notifying commits). Call it with search_path=bench_unordered,public.
CREATE SCHEMA bench_unordered;
CREATE SEQUENCE bench_unordered.block START 1000000;
DO $$
DECLARE
    original text := pg_get_functiondef(
        'public.append_events(bigint, text[], uuid[], uuid[], bytea[], bytea[], text[], interval)'::regprocedure);
    unordered text;
BEGIN
    unordered := regexp_replace(
        replace(original, 'FUNCTION public.append_events(', 'FUNCTION bench_unordered.append_events('),
        'PERFORM pg_advisory_xact_lock\(lock_key\);.*received := greatest\(clock_timestamp\(\), head_received\);',
        $r$head_position := nextval('bench_unordered.block') * 100000; received := clock_timestamp();$r$);
    IF unordered NOT LIKE '%bench_unordered.block%' OR unordered LIKE '%pg_advisory_xact_lock%' THEN
        RAISE EXCEPTION 'append_events no longer has the expected lock and head lookup: update this script';
    END IF;
    EXECUTE unordered;
END;
$$;
ALTER TABLE events DISABLE TRIGGER events_notify;
