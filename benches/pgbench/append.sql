-- The log's own append, without HTTP: one call of append_webhooks with :group new deliveries, each
-- body the payload behind a prefix unique to the call and the delivery (pgbench -D group=N, after
-- setup.sql in a migrated database). Making the bodies (and, inside the call, their sha256) is
-- part of each call. The bodies are plaintext (the service seals them first; its cost is in the
-- `encryption` rows), so the function computes their sha256.
SELECT count(*)
  FROM (SELECT nextval('bench_pick') AS n) s,
       LATERAL (SELECT array_agg('accounts.updated'::text) AS events,
                       array_agg(gen_random_uuid()) AS accounts,
                       array_agg(gen_random_uuid()) AS users,
                       array_agg(b.body) AS bodies,
                       array_agg(NULL::bytea) AS sha256s,
                       array_agg(NULL::text) AS signatures
                  FROM (SELECT convert_to(s.n || '.' || g, 'UTF8') || p.body AS body
                          FROM generate_series(1, :group) g, bench_payload p) b) a,
       LATERAL append_webhooks(a.events, a.accounts, a.users, a.bodies, a.sha256s, a.signatures,
                               interval '1 hour');
