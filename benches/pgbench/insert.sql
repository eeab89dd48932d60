INSERT INTO bench_insert (body) SELECT body FROM bench_payload;
