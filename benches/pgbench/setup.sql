-- Baseline tables for the one-run benchmark: what Postgres alone does with the same payload.
-- psql -v body="$(cat tests/fixtures/argyle/05_accounts.updated.json)" -f benches/pgbench/setup.sql
DROP TABLE IF EXISTS bench_insert, bench_payload, bench_select;
CREATE TABLE bench_payload (body bytea NOT NULL);
INSERT INTO bench_payload VALUES (convert_to(:'body', 'UTF8'));
CREATE TABLE bench_insert (id bigserial PRIMARY KEY, body bytea NOT NULL);
CREATE TABLE bench_select (id int PRIMARY KEY, body jsonb NOT NULL);
INSERT INTO bench_select SELECT g, convert_from(body, 'UTF8')::jsonb FROM bench_payload, generate_series(1, 10000) g;
VACUUM ANALYZE bench_select;
-- For append.sql: each call takes the next block of unique body prefixes.
DROP SEQUENCE IF EXISTS bench_pick;
CREATE SEQUENCE bench_pick;
