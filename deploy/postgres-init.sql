-- Runs once, when the PostgreSQL volume is empty, as the superuser `postgres` (the image's
-- docker-entrypoint-initdb.d; its password is deploy/secrets/postgres_superuser_password and
-- no other container has it). It creates the one role MLflow uses, `mlflow`: no superuser, no
-- CREATEDB/CREATEROLE/REPLICATION/BYPASSRLS, owner of exactly two databases, `mlflow`
-- (runs, registry) and `mlflow_auth` (basic-auth users and permissions), and of their
-- `public` schema; nobody else may connect to them, and `mlflow` may connect to nothing else.
-- The role's password is read from the secret file (psql variable mlflow_password_file,
-- default /run/secrets/postgres_password), never written here.
\set ON_ERROR_STOP on
\if :{?mlflow_password_file}
\else
  \set mlflow_password_file /run/secrets/postgres_password
\endif
\set mlflow_password `cat :mlflow_password_file`

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password'
  NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
\unset mlflow_password

CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC;

\connect mlflow
ALTER SCHEMA public OWNER TO mlflow;
REVOKE ALL ON SCHEMA public FROM PUBLIC;

\connect mlflow_auth
ALTER SCHEMA public OWNER TO mlflow;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
