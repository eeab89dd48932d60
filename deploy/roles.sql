-- The two roles account-projector runs as, set up as a DBA would. Run by an administrator (a
-- superuser, or on a managed service its admin user: it needs CREATEROLE and CREATEDB), once,
-- before the first `migrate`; running it again changes nothing but the passwords given:
--
--   psql "$ADMIN_URL" -v db=account_projector \
--        -v owner_password="$OWNER_PASSWORD" -v service_password="$SERVICE_PASSWORD" \
--        -f deploy/roles.sql
--
-- Without a password variable the role gets none (for certificate or IAM authentication).
--
-- account_projector_owner   owns the database and its schema, and runs `migrate` (nothing else).
-- account_projector_service runs every other command and role, with no DDL: it reads the log and
--                           appends to it only through append_webhooks() and append_fetched()
--                           (SECURITY DEFINER, fixed search_path), never by INSERT, UPDATE,
--                           DELETE or TRUNCATE of `events` or `redeliveries`.
--
-- The service role's table grants live in the migrations, in grant_service_role() (V12 first):
-- `migrate`, run as the owner after this script, grants what each version needs, so an upgrade
-- is `migrate` alone. If the service role is created after the schema, this script grants them.
--
-- What each command and role needs (the grants are in grant_service_role()):
--   serve --role ingest       EXECUTE append_webhooks; SELECT refinery_schema_history (/readyz)
--   serve --role projector    SELECT events, redeliveries, quarantine; SELECT, INSERT, UPDATE,
--                             DELETE account_snapshots; SELECT, UPDATE projector_checkpoints;
--                             INSERT quarantine; EXECUTE settle_log (records abandoned
--                             positions, V18); advisory locks (leader), LISTEN
--   serve --role api          SELECT events, redeliveries, account_snapshots, quarantine,
--                             projector_checkpoints; EXECUTE log_horizon (V18); SELECT, INSERT,
--                             DELETE ui_sessions (the pages' sessions, V17). With
--                             READ_DATABASE_URL the same role reads the replica (its grants
--                             replicate), and writes sessions to the primary
--   serve --role enricher     SELECT events; SELECT, INSERT, UPDATE enrichment_requests;
--                             UPDATE projector_checkpoints; EXECUTE append_fetched, log_horizon
--   rebuild [--verify]        SELECT, INSERT, UPDATE, DELETE account_snapshots(_rebuild);
--                             UPDATE projector_checkpoints; INSERT quarantine
--   reconcile, and the enricher with RECONCILE_INTERVAL
--                             SELECT events, quarantine, account_snapshots,
--                             projector_checkpoints; SELECT, INSERT, UPDATE reconcile_runs and
--                             SELECT, INSERT, DELETE reconcile_listed (its own bookkeeping, V13);
--                             EXECUTE append_fetched; advisory lock
--   serve --role notifier, subscribers add|list|remove|replay
--                             SELECT account_snapshots, projector_checkpoints; SELECT, INSERT,
--                             UPDATE, DELETE subscribers, subscriber_messages (V15); advisory lock
--                             (leader), LISTEN
--   export, status            SELECT only
--   migrate                   the owner; the service role may run it on a current schema (it
--                             then does nothing) and is refused, with a sentence saying so, when
--                             migrations are pending
--   every command that reads or writes bodies (serve, rebuild, export, reconcile, erase)
--                             SELECT account_keys; INSERT (account_id, kek_id, wrapped_key)
--                             account_keys (a new account's key; never UPDATE or DELETE)
--   erase                     EXECUTE erase_account (SECURITY DEFINER: appends the erasure and
--                             destroys the key, V16); advisory lock (the append lock)
--   keys rotate, keys seal    the owner (they change keys, and seal the log's plaintext rows)
--   web pages (a later version): what the api role reads, added by its migration.
--
-- An installation that ran as `postgres` so far: after this script, give the existing objects
-- to the owner (in the database, as an administrator: ALTER TABLE / VIEW / FUNCTION ... OWNER TO
-- account_projector_owner for each object `\d` and `\df` list), then run `migrate` as the owner.

\set ON_ERROR_STOP on
\if :{?db}
\else
\set db account_projector
\endif

SELECT 'CREATE ROLE account_projector_owner LOGIN'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'account_projector_owner') \gexec
SELECT 'CREATE ROLE account_projector_service LOGIN'
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'account_projector_service') \gexec

-- Neither role may be a superuser, make roles or databases, replicate, or bypass row security
-- (CREATE ROLE gives none of these; a role made earlier by hand is checked, not changed, since
-- only a superuser may change them).
ALTER ROLE account_projector_owner LOGIN;
ALTER ROLE account_projector_service LOGIN;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles
                WHERE rolname IN ('account_projector_owner', 'account_projector_service')
                  AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication OR rolbypassrls)) THEN
        RAISE EXCEPTION 'account_projector_owner and account_projector_service must not be superusers or have CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS';
    END IF;
END;
$$;
-- An administrator that is not a superuser (a managed service's admin user) acts as the owner
-- below: giving it the database and the schema, and granting on the owner's objects.
GRANT account_projector_owner TO CURRENT_USER;
\if :{?owner_password}
ALTER ROLE account_projector_owner PASSWORD :'owner_password';
\endif
\if :{?service_password}
ALTER ROLE account_projector_service PASSWORD :'service_password';
\endif

-- The database, owned by the owner; nobody else may connect but the service.
SELECT format('CREATE DATABASE %I OWNER account_projector_owner', :'db')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO account_projector_owner', :'db') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO account_projector_service', :'db') \gexec

\connect :"db"
-- The schema: only the owner creates in it (PUBLIC may on Postgres 14 and older by default).
ALTER SCHEMA public OWNER TO account_projector_owner;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO account_projector_service;

-- A schema migrated before the service role existed: grant what its version needs now.
SELECT 'SELECT grant_service_role(''account_projector_service'')'
 WHERE to_regprocedure('public.grant_service_role(name)') IS NOT NULL \gexec
