#!/usr/bin/env bash
# Builds the expense-auth image with podman, from the repository root's sources.
#
#   deploy/container/build.sh [--official] [--tag NAME] [--iidfile FILE]
#
# By default the base is made here from Debian's packages (deploy/container/base.sh:
# no image registry needed, cached in podman's store). --official builds on
# docker.io/library/python:3.11-slim-bookworm instead, for hosts that reach a registry.
# Unchanged layers come from podman's cache. Prints the image id.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tag=localhost/expense-auth:latest
official=false
iidfile=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --official) official=true ;;
        --tag) tag=$2; shift ;;
        --iidfile) iidfile=$2; shift ;;
        *) echo "usage: $0 [--official] [--tag NAME] [--iidfile FILE]" >&2; exit 2 ;;
    esac
    shift
done

command -v podman >/dev/null || { echo "build.sh: podman is not installed (Debian package podman)" >&2; exit 1; }
# Hosts like the CI machines need deploy/container/containers.conf (why: see there).
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}

args=()
if [[ $official == false ]]; then
    args+=(--build-arg "BASE_IMAGE=$("$here/base.sh")")
fi
# A host whose pip trusts an extra CA (a TLS-intercepting proxy, as on the CI machines)
# lends that bundle to the build stage's pip, read-only; it is not copied into the image.
if [[ -n ${PIP_CERT:-} && -f $PIP_CERT ]]; then
    args+=(--volume "$PIP_CERT:/run/host-ca.pem:ro" --build-arg PIP_CERT=/run/host-ca.pem)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
podman build --quiet --format docker --layers --pull=never \
    --file "$here/Containerfile" --tag "$tag" --iidfile "$work/iid" \
    "${args[@]}" "$root" >/dev/null
[[ -z $iidfile ]] || cp "$work/iid" "$iidfile"
cat "$work/iid"
echo
