#!/bin/sh
# A Debian bookworm base image made from Debian's own packages, no registry needed:
# debootstrap --variant=minbase with python3, python3-venv and redis-server, then `docker import`.
# The carnumber image (ops/Dockerfile, BASE_IMAGE) and the Redis image (ops/images/redis.Dockerfile)
# both build on it. Runs as root (debootstrap); a few minutes and about 300 MB.
#
#   ops/images/base.sh [TAG]          default TAG: carnumber-base:bookworm
#
# DEBIAN_MIRROR (default http://deb.debian.org/debian) and CARNUMBER_IMAGES_WORK (scratch and
# the .deb cache, default /var/tmp/carnumber-images) are read from the environment.
set -eu

tag=${1:-carnumber-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=${CARNUMBER_IMAGES_WORK:-/var/tmp/carnumber-images}
rootfs=$work/rootfs-$$

command -v debootstrap > /dev/null || { echo "base.sh: apt-get install debootstrap" >&2; exit 2; }
mkdir -p "$work/debs"
trap 'rm -rf "$rootfs"' EXIT
# Bookworm's Python is 3.11.2: redis-py then also needs async-timeout (the wheelhouse has it).
debootstrap --variant=minbase --include=python3,python3-venv,redis-server,ca-certificates \
    --cache-dir="$work/debs" bookworm "$rootfs" "$mirror"
# Package lists and caches are not needed at run time; a container never runs apt here.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/sh"]' \
    - "$tag"
echo "base.sh: built $tag"
