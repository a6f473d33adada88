#!/bin/sh
# Fill ops/wheelhouse with every wheel the carnumber image needs, for a build with no network:
#   ops/images/wheelhouse.sh                      (then: docker build --network none \
#       --build-arg OFFLINE=true -f ops/Dockerfile -t carnumber .)
# Run it on a host that can reach a package index, with a CPython 3.11 on Linux x86_64/glibc
# like the image's (PYTHON, default python3). EXTRAS as in ops/Dockerfile (default
# s3,oss,cloud,monitor). Every wheel at its version in constraints.txt, as the image installs.
# setuptools builds carnumber itself; async-timeout is what redis-py needs on Python < 3.11.3
# (Debian bookworm's 3.11.2), listed so that a wheelhouse made on a newer 3.11 still serves it.
set -eu

cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
extras=${EXTRAS:-s3,oss,cloud,monitor}
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { echo "wheelhouse.sh: PYTHON must be a CPython 3.11 (the image's)" >&2; exit 2; }
"$python" -m pip --version > /dev/null \
    || { echo "wheelhouse.sh: $python has no pip (python3 -m venv /tmp/v; PYTHON=/tmp/v/bin/python)" >&2; exit 2; }
"$python" -m pip wheel --quiet --wheel-dir ops/wheelhouse -c constraints.txt ".[${extras}]" \
    "setuptools>=68" "async-timeout>=4"
# The carnumber wheel itself is rebuilt from the sources in the image: drop it, it goes stale.
rm -f ops/wheelhouse/carnumber-*.whl
set -- ops/wheelhouse/*.whl
echo "wheelhouse.sh: $# wheels in ops/wheelhouse"
