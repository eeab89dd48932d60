#!/bin/sh
# Run by the postgres image on its first start (/docker-entrypoint-initdb.d): creates the two roles
# of deploy/roles.sql and hands them the database. The app services never connect as the superuser.
set -eu
psql -X -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v db="$POSTGRES_DB" \
    -v owner_password="$DB_OWNER_PASSWORD" \
    -v service_password="$DB_SERVICE_PASSWORD" \
    -f "${ROLES_SQL:-/deploy/roles.sql}"
