\set id random(1, 10000)
SELECT body FROM bench_select WHERE id = :id;
