# Redis from Debian's redis-server package, for hosts that cannot pull the public redis image:
#   ops/images/base.sh && docker build --network none -f ops/images/redis.Dockerfile \
#       -t carnumber-redis:bookworm ops/images
# then REDIS_IMAGE=carnumber-redis:bookworm for docker-compose.yml. It keeps the official image's
# contract that the compose file relies on: docker-entrypoint.sh, /data, redis-cli.
ARG BASE_IMAGE=carnumber-base:bookworm
FROM ${BASE_IMAGE}
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN redis-server --version && mkdir -p /data && chown redis:redis /data
WORKDIR /data
VOLUME /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server", "--protected-mode", "no"]
