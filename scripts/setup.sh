#!/usr/bin/env bash
# Prepare this machine (Debian bookworm, run as root) for crank's end-to-end tests, with what
# needs root and a shell:
#   - a running Docker engine (Debian's docker.io; started by tests/services.py),
#   - Debian's slurm-wlm and munge (the tests start a one-node Slurm of their own),
#   - locally built test images (no registry needed): crank-test/busybox:1,
#     crank-test/bash:1, crank-test/snakemake:<host snakemake version> and
#     crank-test/snakemake-s3:<same version> (with the host's S3 storage plugin).
# SeaweedFS and Funnel are started by the tests themselves (tests/services.py).
# Idempotent: when everything is in place it only checks and takes a few seconds.
#
# Environment:
#   CRANK_TEST_STATE     state dir for logs and data (default: ~/.cache/crank-test)
#   CRANK_TEST_FRESH=1   first make this machine look new to the tests: stop the test servers,
#                        remove the test images and the state dir's contents (CI does, so that
#                        every path a fresh machine takes is taken every time)
#   CRANK_DOCKERD_ARGS   extra arguments for dockerd when the engine is started here
#                        (e.g. -H/--data-root/--exec-root/--pidfile for a private engine;
#                        set DOCKER_HOST to match). Never --bridge=none next to another
#                        engine: dockerd then deletes the shared docker0 interface.
set -euo pipefail

STATE=${CRANK_TEST_STATE:-${HOME:?}/.cache/crank-test}
SERVICES=$(cd "$(dirname "$0")/.." && pwd)/tests/services.py
BASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '%s\n' "$*"; }
die() { printf 'setup.sh: FAILED: %s\n' "$*" >&2; exit 1; }
# die with the tail of a log file
die_log() { tail -n 25 "$2" >&2 2>/dev/null || true; die "$1 (log: $2)"; }

[[ $EUID -eq 0 ]] || die "must run as root"
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
BUILD=$STATE/build
# Serialize concurrent runs. What starts a daemon below must not pass fd 9 on (9>&-), or the
# daemon would hold the lock for its whole life.
exec 9>>"$STATE/setup.lock"
if ! flock -n 9; then
    log "waiting for another setup.sh (lock: $STATE/setup.lock)"
    flock -w 1800 9 || die "another setup.sh still holds $STATE/setup.lock"
fi

# ---------------------------------------------------------------- cleanup

# Unmount everything below $1, deepest first. Fails if something stays mounted.
unmount_below() {
    local dir=$1 target
    [[ -d $dir ]] || return 0
    while read -r target; do
        [[ $target == "$dir" || $target == "$dir"/* ]] || continue
        umount "$target" 2>/dev/null || umount -l "$target" || true
    done < <(findmnt -rn -o TARGET | sort -r)
    findmnt -rn -o TARGET | awk -v d="$dir" '$0 == d || index($0, d "/") == 1 { n++ } END { exit n > 0 }'
}

# Remove a build directory, but never while something (e.g. /dev) is bind-mounted below it.
remove_build_dir() {
    local dir=$1
    [[ -e $dir ]] || return 0
    unmount_below "$dir" || { log "WARNING: $dir still has mounts; not removing it" >&2; return 1; }
    rm -rf --one-file-system "$dir"
}

trap 'remove_build_dir "$BUILD" || true' EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- apt

APT_UPDATED=
apt_update() {
    [[ -z $APT_UPDATED ]] || return 0
    log "apt: updating package lists"
    apt-get update >>"$STATE/apt.log" 2>&1 || die_log "apt-get update" "$STATE/apt.log"
    APT_UPDATED=1
}

# apt-get update only when there are no package lists, or when the lists turn out to be stale.
apt_retry() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || apt_update
    "$@" >>"$STATE/apt.log" 2>&1 && return 0
    [[ -z $APT_UPDATED ]] || return 1
    apt_update
    "$@" >>"$STATE/apt.log" 2>&1
}

apt_install() {
    local pkg missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    log "apt: installing ${missing[*]}"
    apt_retry env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
        || die_log "apt-get install ${missing[*]}" "$STATE/apt.log"
}

# Extract a package's files into a directory without installing it on the host.
apt_extract() {
    local pkg=$1 dest=$2 dl=$BUILD/debs
    mkdir -p "$dl"
    # _apt must be able to write here, or apt-get download warns and falls back to root
    chmod 777 "$dl"
    pushd "$dl" >/dev/null
    apt_retry apt-get download "$pkg" || die_log "apt-get download $pkg" "$STATE/apt.log"
    popd >/dev/null
    local debs=("$dl/${pkg}"_*.deb)
    dpkg-deb -x "${debs[0]}" "$dest"
}

# ---------------------------------------------------------------- docker engine

ensure_docker() {
    if docker info >/dev/null 2>&1; then
        log "docker engine: ready"
        return
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        apt_install docker.io
        hash -r
    fi
    # The package may have started it; if not, it is started with the fallbacks a sandbox
    # needs. Its pid stays in $STATE/dockerd.pid for `tests/services.py stop-docker`.
    CRANK_TEST_STATE=$STATE python3 "$SERVICES" docker 9>&- || die "the Docker engine did not start"
}

# ---------------------------------------------------------------- Slurm

# Debian's slurm-wlm and munge for the Funnel-on-Slurm test (tests/services.py starts a
# one-node cluster of its own from them). Without them that test is skipped, loudly: a
# machine whose package sources lack them still runs everything else.
ensure_slurm() {
    local pkg missing=()
    for pkg in slurm-wlm munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
    done
    ((${#missing[@]})) || { log "slurm: installed"; return 0; }
    log "apt: installing ${missing[*]}"
    if ! apt_retry env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
        log "WARNING: apt-get install ${missing[*]} failed (log: $STATE/apt.log); the Funnel-on-Slurm test will be skipped" >&2
    fi
}

# Debian's chromium for the test that opens crank's usage report in a real headless browser;
# without it that test is skipped, loudly.
ensure_chromium() {
    dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'ok installed' && { log "chromium: installed"; return 0; }
    log "apt: installing chromium"
    if ! apt_retry env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; then
        log "WARNING: apt-get install chromium failed (log: $STATE/apt.log); the report's browser test will be skipped" >&2
    fi
}

# ---------------------------------------------------------------- images

# ensure_image NAME BUILDER: build NAME with BUILDER unless it exists.
ensure_image() {
    local name=$1 builder=$2 start=$SECONDS
    if docker image inspect "$name" >/dev/null 2>&1; then
        log "image $name: present"
        return
    fi
    log "image $name: building"
    remove_build_dir "$BUILD" || die "cannot clean $BUILD"
    mkdir -p "$BUILD"
    "$builder" "$name"
    remove_build_dir "$BUILD" || die "cannot clean $BUILD"
    log "image $name: built ($((SECONDS - start))s)"
}

# check_run NAME EXPECTED CMD...: the container's output must equal EXPECTED, else drop the image.
check_run() {
    local name=$1 expected=$2 out
    shift 2
    out=$(docker run --rm --network none "$name" "$@" 2>&1) || true
    [[ $out == "$expected" ]] && return 0
    docker image rm "$name" >/dev/null 2>&1 || true
    die "image $name does not work: expected '$expected', got '$out'"
}

import_rootfs() { # import_rootfs ROOT NAME [docker import options...]
    local root=$1 name=$2
    shift 2
    tar --numeric-owner -C "$root" --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . \
        | docker import "$@" - "$name" >/dev/null || die "docker import $name"
}

busybox_rootfs() {
    local root=$1 applet
    apt_extract busybox-static "$root"
    rm -rf "${root:?}/usr/share"
    while read -r applet; do
        [[ -e $root/$applet || -L $root/$applet ]] && continue
        mkdir -p "$root/${applet%/*}"
        ln -s /bin/busybox "$root/$applet"
    done < <("$root/bin/busybox" --list-full)
    mkdir -p "$root/etc" "$root/root" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
    chmod 1777 "$root/tmp"
    chmod 700 "$root/root"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$root/etc/group"
}

build_busybox() {
    local name=$1 root=$BUILD/rootfs
    busybox_rootfs "$root"
    import_rootfs "$root" "$name" -c "ENV PATH=$BASE_PATH" -c 'CMD ["/bin/sh"]'
    check_run "$name" $'ok\nnobash' sh -c 'echo ok; command -v bash || echo nobash'
}

build_bash() {
    local name=$1 root=$BUILD/rootfs
    busybox_rootfs "$root"
    apt_extract bash-static "$root"
    rm -rf "${root:?}/usr/share"
    ln -s bash-static "$root/bin/bash"
    import_rootfs "$root" "$name" -c "ENV PATH=$BASE_PATH" -c 'CMD ["/bin/bash"]'
    # shellcheck disable=SC2016 # expanded by the container's bash
    check_run "$name" ok bash -c 'set -euo pipefail; [[ -n $BASH_VERSION ]] && echo ok'
}

# First Debian mirror configured for apt (deb822 or one-line format), without the security archive.
debian_mirror() {
    local uri
    uri=$( {
        awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' /etc/apt/sources.list.d/*.sources
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list
    } 2>/dev/null | grep -E '^https?://' | grep -v security | head -n1) || true
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# The host's pip index settings as a pip.conf for the image (the CA bundle is copied alongside).
pip_conf() {
    python3 - <<'EOF'
import ast, subprocess, sys
keys = ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries")
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                     capture_output=True, text=True).stdout
found = {}
for line in out.splitlines():
    name, sep, value = line.partition("=")
    section, _, key = name.partition(".")
    if sep and key in keys:
        rank = {":env:": 2, "install": 1}.get(section, 0)  # env overrides files
        if rank >= found.get(key, (-1, ""))[0]:
            found[key] = (rank, ast.literal_eval(value))
print("[global]")
print("cert = /etc/ssl/certs/ca-certificates.crt")
for key, (_, value) in found.items():
    print(f"{key} = {value}")
EOF
}

build_snakemake() {
    local name=$1 version=${1##*:} root=$BUILD/rootfs mirror blog=$STATE/snakemake-image.log var
    local -a chroot_env=(env -i "PATH=$BASE_PATH" HOME=/root LANG=C.UTF-8)
    for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
        [[ -z ${!var:-} ]] || chroot_env+=("$var=${!var}")
    done
    command -v debootstrap >/dev/null || apt_install debootstrap
    mirror=$(debian_mirror)
    log "  debootstrap bookworm from $mirror (log: $blog)"
    : >"$blog"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,bash \
        bookworm "$root" "$mirror" >>"$blog" 2>&1 || die_log "debootstrap" "$blog"

    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    [[ ! -f /etc/ssl/certs/ca-certificates.crt ]] || cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    pip_conf >"$root/etc/pip.conf" 2>>"$blog" || die_log "reading the host's pip configuration" "$blog"

    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    log "  pip install snakemake==$version"
    {
        "${chroot_env[@]}" chroot "$root" python3 -m venv /opt/snakemake &&
            "${chroot_env[@]}" chroot "$root" /opt/snakemake/bin/pip install --no-cache-dir \
                --disable-pip-version-check "snakemake==$version"
    } >>"$blog" 2>&1 || die_log "pip install snakemake==$version in the image" "$blog"
    unmount_below "$root" || die "cannot unmount $root/proc, $root/dev"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/root/.cache

    import_rootfs "$root" "$name" \
        -c 'ENV PATH=/opt/snakemake/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8'
    check_run "$name" "$version" snakemake --version
}

# The Snakemake image plus the S3 storage plugin the host has (the same version), installed
# by pip in a container of the Snakemake image and committed.
build_snakemake_s3() {
    local name=$1 base=crank-test/snakemake:${1##*:} plugin cid blog=$STATE/snakemake-s3-image.log
    plugin=$(python3 -c 'import importlib.metadata as m; print(m.version("snakemake-storage-plugin-s3"))') \
        || die "snakemake-storage-plugin-s3 is not installed on the host (pip install -e '.[test]')"
    log "  pip install snakemake-storage-plugin-s3==$plugin (log: $blog)"
    cid=$(docker create --network host "$base" pip install --no-cache-dir --disable-pip-version-check \
        "snakemake-storage-plugin-s3==$plugin") || die "docker create $base"
    if ! docker start -a "$cid" >"$blog" 2>&1 || [[ $(docker inspect -f '{{.State.ExitCode}}' "$cid") != 0 ]]; then
        docker rm -f "$cid" >/dev/null 2>&1 || true
        die_log "pip install snakemake-storage-plugin-s3 in $base" "$blog"
    fi
    docker commit "$cid" "$name" >/dev/null || { docker rm -f "$cid" >/dev/null 2>&1; die "docker commit $name"; }
    docker rm -f "$cid" >/dev/null 2>&1 || true
    check_run "$name" ok python3 -c 'import snakemake_storage_plugin_s3; print("ok")'
}

# ---------------------------------------------------------------- main

# As on a new machine: no test images, no test servers, no state. The running engine and its
# own pid and log stay (the engine is not the tests' to remove; an engine setup.sh started is
# stopped by scripts/test.sh at the end as usual).
make_fresh() {
    log "fresh: removing the test images and the test state, as on a new machine"
    CRANK_TEST_STATE=$STATE python3 "$SERVICES" stop 9>&- >/dev/null 2>&1 || true
    local images
    images=$(docker images --format '{{.Repository}}:{{.Tag}}' | grep '^crank-test/' || true)
    [[ -z $images ]] || docker image rm -f $images >/dev/null || die "cannot remove the test images"
    find "$STATE" -mindepth 1 -maxdepth 1 ! -name setup.lock ! -name 'dockerd.*' -exec rm -rf {} +
}

ensure_docker
[[ ${CRANK_TEST_FRESH:-} != 1 ]] || make_fresh
ensure_slurm
ensure_chromium

SNAKEMAKE_VERSION=$(python3 -c 'import snakemake; print(snakemake.__version__)') \
    || die "snakemake is not importable by the host's python3"
ensure_image crank-test/busybox:1 build_busybox
ensure_image crank-test/bash:1 build_bash
ensure_image "crank-test/snakemake:$SNAKEMAKE_VERSION" build_snakemake
ensure_image "crank-test/snakemake-s3:$SNAKEMAKE_VERSION" build_snakemake_s3

out=$(docker run --rm --network none crank-test/busybox:1 true 2>&1) \
    || die "docker run --network none crank-test/busybox:1 true: $out (engine log: $STATE/dockerd.log)"
log "containers: ok"

log "setup: done (state: $STATE)"
