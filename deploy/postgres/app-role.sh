#!/bin/sh
# Run once by the postgres image on a fresh data volume (/docker-entrypoint-initdb.d): the
# application's own login role. It owns nothing; `tandem migrate` (as the owner) grants it the
# app's rights after each upgrade (tandem/core/migrations.py: grant_app_role).
set -eu
psql -v ON_ERROR_STOP=1 -v app_password="$APP_ROLE_PASSWORD" \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE tandem_app LOGIN PASSWORD :'app_password';
SQL
