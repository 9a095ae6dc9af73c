#!/usr/bin/env bash
# Builds the container base image from Debian's own packages, for hosts that reach
# Debian's mirror but no image registry: a root filesystem made with mmdebstrap from
# the host's configured Debian mirror, imported into podman's image store.
#
#   deploy/container/base.sh            prints the base image's name, building it if needed
#
# The image is named by a hash of everything that goes into it: this script, the
# package list, the mirror lines, and the checksum of each suite's package index. A
# Debian point release or a security update changes an index, and so the name, and the
# base is rebuilt; otherwise the image already in podman's store is reused. That store
# is the cache (it outlives clones of the repository): no file of it lives in the tree.
set -euo pipefail

SUITE=bookworm
# The runtime needs Python 3.11 (Debian's python3) and its shared library: pyvoy loads
# libpython into Envoy's process. tini is PID 1 (see the Containerfile);
# ca-certificates for Google's certificate URL over HTTPS.
PACKAGES=python3,libpython3.11,ca-certificates,tini
REPO_NAME=localhost/expense-auth-base

log() { echo "base.sh: $*" >&2; }

# The Debian suites this host's apt is configured with (deb.debian.org or a local
# mirror): SUITE, SUITE-updates and SUITE-security, one "deb URI SUITE main" line each.
mirror_lines() {
    # shellcheck disable=SC2016  # $(...) are apt's placeholders, not the shell's
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' \
        | awk -v s="$SUITE" '$2 ~ "^" s "(-updates|-security)?$" { print "deb " $1 " " $2 " main" }' \
        | sort -u
}

# The checksum of each suite's package index, from its InRelease file: it changes when
# a package is added or updated, not when the archive is merely re-signed.
package_indexes() {
    local line uri suite release index
    index="main/binary-$(dpkg --print-architecture)/Packages"
    while read -r line; do
        read -r _ uri suite _ <<<"$line"
        release=$(curl -fsS --max-time 30 "${uri%/}/dists/$suite/InRelease") \
            || { log "cannot read $uri $suite InRelease"; return 1; }
        awk -v index_="$index" '/^SHA256:/ { f = 1; next } /^[^ ]/ { f = 0 }
            f && $3 == index_ { print $1; found = 1 } END { exit !found }' <<<"$release" \
            || { log "no $index in $uri $suite InRelease"; return 1; }
    done
}

main() {
    command -v mmdebstrap >/dev/null || { log "mmdebstrap is not installed (Debian package mmdebstrap)"; exit 1; }
    local mirrors
    mirrors=$(mirror_lines)
    if [[ $(grep -c . <<<"$mirrors") -lt 3 ]]; then
        log "apt is not configured with $SUITE, $SUITE-updates and $SUITE-security:"
        log "$mirrors"
        exit 1
    fi
    local key image
    key=$( { cat "$0"; echo "$PACKAGES"; echo "$mirrors"; package_indexes <<<"$mirrors"; } \
        | sha256sum | cut -c1-16)
    image="$REPO_NAME:$SUITE-$key"
    if podman image exists "$image"; then
        echo "$image"
        return
    fi
    # global: the EXIT trap runs after main returns
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    log "building $image with mmdebstrap"
    local mirror_args=()
    while read -r line; do mirror_args+=("$line"); done <<<"$mirrors"
    # minbase: Essential packages and apt (the build stage installs python3-venv with it).
    # The merged-usr hook makes the /usr symlinks itself: otherwise the usrmerge package
    # and the whole of perl (~50 MB) stay in the image. No documentation, manual pages
    # or translations: nobody reads them in a container.
    mmdebstrap --variant=minbase --include="$PACKAGES" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$SUITE" "$work/rootfs.tar" "${mirror_args[@]}" >"$work/mmdebstrap.log" 2>&1 \
        || { cat "$work/mmdebstrap.log" >&2; log "mmdebstrap failed"; exit 1; }
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        "$work/rootfs.tar" "$image" >/dev/null
    echo "$image"
}

main "$@"
