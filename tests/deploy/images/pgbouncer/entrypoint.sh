#!/bin/sh
# edoburu/pgbouncer's entry point, in the part deploy/compose.yaml relies on: the settings
# from the environment, written at start, then the command.
set -eu
: "${DB_HOST:?set DB_HOST}" "${DB_USER:?set DB_USER}" "${DB_PASSWORD:?set DB_PASSWORD}"
# Docker makes a tmpfs writable by everyone; podman's belongs to root, and this image runs
# unprivileged: then the files go to a folder of its own on /tmp, and the command is told.
conf=/etc/pgbouncer
if ! [ -w "$conf" ]; then
    conf=/tmp/pgbouncer
    mkdir -p "$conf"
    set -- $(printf '%s\n' "$@" | sed "s|^/etc/pgbouncer/|$conf/|")
fi
umask 077
printf '"%s" "%s"\n' "$DB_USER" "$DB_PASSWORD" >"$conf/userlist.txt"
cat >"$conf/pgbouncer.ini" <<INI
[databases]
${DB_NAME:-*} = host=${DB_HOST} port=${DB_PORT:-5432} user=${DB_USER}

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = ${LISTEN_PORT:-5432}
unix_socket_dir =
auth_type = ${AUTH_TYPE:-md5}
auth_file = $conf/userlist.txt
admin_users = ${ADMIN_USERS:-postgres}
pool_mode = ${POOL_MODE:-session}
max_client_conn = ${MAX_CLIENT_CONN:-100}
default_pool_size = ${DEFAULT_POOL_SIZE:-20}
reserve_pool_size = ${RESERVE_POOL_SIZE:-0}
reserve_pool_timeout = ${RESERVE_POOL_TIMEOUT:-5}
max_db_connections = ${MAX_DB_CONNECTIONS:-0}
ignore_startup_parameters = extra_float_digits
INI
exec "$@"
