#!/bin/sh
# The official redis image's entrypoint contract, for the Debian-package Redis image
# (ops/images/redis.Dockerfile): `docker-entrypoint.sh redis-server ARGS` started as root makes
# /data Redis's own and runs redis-server as the redis user; anything else runs as given.
set -e
if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis:redis '{}' +
    umask 0077
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
