#!/usr/bin/env bash
# Builds the images compose.yaml runs by default, with podman, for hosts that reach
# Debian's mirror and PyPI but no image registry:
#
#   deploy/compose/build.sh [--tag TAG]
#
#   localhost/expense-auth:TAG              the service (deploy/container/build.sh)
#   localhost/expense-auth-postgres:TAG     PostgreSQL 15, Debian's packages
#   localhost/expense-auth-redis:TAG        Redis 7, Debian's packages
#   localhost/expense-auth-otlp-sink:TAG    an OTLP receiver standing in for the collector
#
# TAG is `latest` unless given. PostgreSQL and Redis are built on the same Debian base
# as the service (deploy/container/base.sh), so they share its layer; unchanged layers
# come from podman's cache. Prints one line per image, VARIABLE=IMAGE_ID, the variable
# being the one compose.yaml reads the image's name from.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=latest
while [[ $# -gt 0 ]]; do
    case $1 in
        --tag) tag=$2; shift ;;
        *) echo "usage: $0 [--tag TAG]" >&2; exit 2 ;;
    esac
    shift
done

command -v podman >/dev/null || { echo "build.sh: podman is not installed (Debian package podman)" >&2; exit 1; }
export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/deploy/container/containers.conf}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build NAME DIRECTORY BUILD_ARG: the image id
build() {
    podman build --quiet --format docker --layers --pull=never \
        --build-arg "$3" --tag "localhost/$1:$tag" --iidfile "$work/$1" \
        "$here/$2" >/dev/null
    cat "$work/$1"
}

base=$("$root/deploy/container/base.sh")
app=$("$root/deploy/container/build.sh" --tag "localhost/expense-auth:$tag")
echo "EXPENSE_AUTH_IMAGE=$app"
echo "POSTGRES_IMAGE=$(build expense-auth-postgres postgres "BASE_IMAGE=$base")"
echo "REDIS_IMAGE=$(build expense-auth-redis redis "BASE_IMAGE=$base")"
echo "OTEL_COLLECTOR_IMAGE=$(build expense-auth-otlp-sink otlp-sink "APP_IMAGE=$app")"
