-- The log's own append, without HTTP: one call of append_events with :group new deliveries, each
-- body the payload behind a prefix unique to the call and the delivery (pgbench -D group=N
-- -D lock_key=K, after setup.sql in a migrated database). Making the bodies and their sha256 is
-- part of each call.
SELECT count(*)
  FROM (SELECT nextval('bench_pick') AS n) s,
       LATERAL (SELECT array_agg('accounts.updated'::text) AS events,
                       array_agg(gen_random_uuid()) AS accounts,
                       array_agg(gen_random_uuid()) AS users,
                       array_agg(b.body) AS bodies,
                       array_agg(sha256(b.body)) AS sha256s,
                       array_agg(NULL::text) AS signatures
                  FROM (SELECT convert_to(s.n || '.' || g, 'UTF8') || p.body AS body
                          FROM generate_series(1, :group) g, bench_payload p) b) a,
       LATERAL append_events(:lock_key, a.events, a.accounts, a.users, a.bodies, a.sha256s, a.signatures,
                             interval '1 hour');
