-- Roles for a Triage database on PostgreSQL 15: an owner that owns the schema and runs the
-- migrations, and the application role the service and workers log in as.
--
-- The application role may INSERT and SELECT the audit tables (audit_events,
-- audit_checkpoints) and nothing else on them: no UPDATE, DELETE or TRUNCATE, and it owns
-- nothing, so it cannot drop the append-only triggers either. On every other table it gets
-- SELECT/INSERT/UPDATE/DELETE, and USAGE/SELECT/UPDATE on the sequences.
--
-- Run as a superuser, connected to the Triage database, idempotently:
--   1. psql -v ON_ERROR_STOP=1 -d triage -f deploy/postgres/roles.sql     (creates the roles)
--   2. set passwords: ALTER ROLE triage_owner PASSWORD '...'; ALTER ROLE triage_app PASSWORD '...';
--   3. migrate as the owner:  TRIAGE_DATABASE_URL=postgresql+psycopg://triage_owner@db/triage triage migrate
--   4. run this file again (grants on the tables the migration created; it also hands any
--      table created by another role, e.g. a superuser's earlier migration, to the owner).
-- Repeat 3 and 4 at every upgrade: the service (as triage_app) finds the schema current and
-- runs no DDL. Default privileges cover tables a later migration adds; step 4 keeps the
-- audit tables' revocations in force whatever the order.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'triage_owner') THEN
        CREATE ROLE triage_owner LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'triage_app') THEN
        CREATE ROLE triage_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
END
$$;

ALTER SCHEMA public OWNER TO triage_owner;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON SCHEMA public FROM triage_app;
GRANT USAGE ON SCHEMA public TO triage_app;

-- Everything in the schema belongs to the owner, never to the application.
DO $$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm')
          AND pg_get_userbyid(c.relowner) <> 'triage_owner'
    LOOP
        EXECUTE format('ALTER TABLE public.%I OWNER TO triage_owner', item.relname);
    END LOOP;
    FOR item IN
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'S'
          AND pg_get_userbyid(c.relowner) <> 'triage_owner'
          AND NOT EXISTS (  -- sequences owned by a column follow their table
              SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER SEQUENCE public.%I OWNER TO triage_owner', item.relname);
    END LOOP;
    FOR item IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> 'triage_owner'
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO triage_owner', item.signature);
    END LOOP;
END
$$;

-- Normal rights on the existing tables and sequences, and on those later migrations create.
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO triage_app;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO triage_app;
ALTER DEFAULT PRIVILEGES FOR ROLE triage_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO triage_app;
ALTER DEFAULT PRIVILEGES FOR ROLE triage_owner IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO triage_app;

-- The audit tables: append and read only. The schema version: read only.
DO $$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['audit_events', 'audit_checkpoints'] LOOP
        IF to_regclass('public.' || name) IS NOT NULL THEN
            EXECUTE format('REVOKE ALL ON public.%I FROM triage_app, PUBLIC', name);
            EXECUTE format('GRANT SELECT, INSERT ON public.%I TO triage_app', name);
        END IF;
    END LOOP;
    IF to_regclass('public.alembic_version') IS NOT NULL THEN
        REVOKE ALL ON public.alembic_version FROM triage_app;
        GRANT SELECT ON public.alembic_version TO triage_app;
    END IF;
END
$$;
