#!/usr/bin/env bash
# The docker-compose stack for real: deploy/docker-compose.yml (Redis, gateway-1..3, nginx) on a
# Docker engine of this machine, checked as the README's Deploy section uses it, then browsers
# through its nginx while a node is stopped (gateway/tests/compose.rs): nothing may be lost.
#
# Usage: deploy/test-compose.sh            (deploy/test.sh runs it; root, or sudo, to install)
#
# - The engine: the one that answers `docker info`, else dockerd started here (Debian's
#   docker.io installed when missing) and stopped again at the end, by its pid. Where no engine
#   can start (a container without the privileges to make namespaces, cgroups and overlay
#   mounts), the script says so and why, and skips (exit 0).
# - The images it cannot pull (Docker Hub and gcr.io cannot be reached from every machine) are
#   made from Debian 12 with `debootstrap --variant=minbase` and `docker import`, from the apt
#   mirror of this machine: Redis and nginx from Debian's packages (nginx 1.22: the shipped
#   config needs nothing newer), and the distroless runtime from the same packages it is made
#   of (libc6, libgcc-s1, libstdc++6, libssl3, ca-certificates, tzdata, netbase, base-files).
#   Docker keeps them: the next run reuses them.
# - The gateway's image: deploy/Dockerfile as it is where rust:1-bookworm can be had; else its
#   `runtime` stage with the binary of `cargo build --release -p gateway`, stripped, on top.
# - Its own project name and free loopback ports (BGW_COMPOSE_PORT, BGW_COMPOSE_ADMIN_PORT), so
#   that a stack of yours keeps running; the fixed network 10.201.77.0/24 must be free.
#
# It prints how long each part took.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

started=${SECONDS}
phase_started=${SECONDS}
step() {
    printf '\n==> [compose %ss] %s\n' "$((SECONDS - started))" "$*" >&2
    phase_started=${SECONDS}
}
took() {
    printf '    (%s: %ss)\n' "$1" "$((SECONDS - phase_started))" >&2
}
die() {
    printf 'deploy/test-compose.sh: %s\n' "$*" >&2
    exit 1
}
skip() {
    printf '\ndeploy/test-compose.sh: SKIPPED, the compose stack was not run: %s\n' "$*" >&2
    exit 0
}
as_root() {
    if [[ ${EUID} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}
have() {
    command -v "$1" >/dev/null 2>&1
}
apt_install() {
    as_root apt-get update -q >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

project=bgw-compose-test
compose_file="${repo}/deploy/docker-compose.yml"
state="${CARGO_TARGET_DIR:-${repo}/target}/compose-test"
mkdir -p "${state}"
state=$(cd "${state}" && pwd)

# Images made here, named for what they stand in for. The tag changes with what goes into them.
standin_tag=bookworm-1
services_image="bgw-standin/debian-services:${standin_tag}"
runtime_standin="bgw-standin/distroless-cc:${standin_tag}"
gateway_image=broadcast-gateway:0.1.0

# --- the engine ---------------------------------------------------------------------------

# Whether PID runs (a process that exited but was not yet waited for does not).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

dockerd_pid=
compose=()
stack_up=
cleanup() {
    local status=$?
    if [[ -n ${stack_up} ]]; then
        if ((status != 0)); then
            echo "---- the stack's logs (last 100 lines of each) ----" >&2
            "${compose[@]}" logs --no-color --tail 100 >&2 || true
        fi
        "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [[ -n ${dockerd_pid} ]]; then
        kill -TERM "${dockerd_pid}" 2>/dev/null || true
        # It stops its containers' shims first; a child that exited is a zombie until waited.
        for _ in $(seq 300); do
            running "${dockerd_pid}" || break
            sleep 0.1
        done
        if running "${dockerd_pid}"; then
            echo "dockerd (pid ${dockerd_pid}) still runs after 30 s: SIGKILL" >&2
            kill -KILL "${dockerd_pid}" 2>/dev/null || true
        fi
        wait "${dockerd_pid}" 2>/dev/null || true
        echo "stopped the dockerd this script started (pid ${dockerd_pid})" >&2
    fi
    printf '==> [compose %ss] done\n' "$((SECONDS - started))" >&2
}
trap cleanup EXIT

step "a Docker engine"
have curl || apt_install curl
if ! have dockerd && ! docker info >/dev/null 2>&1; then
    echo "installing docker.io (apt)" >&2
    apt_install docker.io || skip "docker.io could not be installed"
fi
if ! docker info >/dev/null 2>&1; then
    have dockerd || skip "no dockerd, and no engine answers"
    [[ ${EUID} -eq 0 ]] || skip "no engine answers, and only root can start dockerd here"
    dockerd --pidfile "${state}/dockerd.pid" >"${state}/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 300); do
        docker info >/dev/null 2>&1 && break
        running "${dockerd_pid}" || break
        sleep 0.1
    done
    if ! docker info >/dev/null 2>&1; then
        tail -n 5 "${state}/dockerd.log" >&2 || true
        running "${dockerd_pid}" || dockerd_pid=
        skip "dockerd did not start (its log: ${state}/dockerd.log; last lines above)"
    fi
    echo "started dockerd (pid ${dockerd_pid}), log ${state}/dockerd.log" >&2
fi
docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, cgroup {{.CgroupVersion}}' >&2
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
else
    have docker-compose || apt_install docker-compose
    compose=(docker-compose)
fi
compose+=(-p "${project}" -f "${compose_file}")
took engine

# --- the images ---------------------------------------------------------------------------

# Whether IMAGE is here, or could be pulled.
obtainable() {
    docker image inspect "$1" >/dev/null 2>&1 && return 0
    timeout 300 docker pull -q "$1" >/dev/null 2>&1
}

# The apt mirror of this machine, for debootstrap.
debian_mirror() {
    local mirror
    mirror=$(sed -n -E 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n 1 || true)
    if [[ -z ${mirror} ]]; then
        mirror=$(sed -n -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+[a-z]+[[:space:]].*/\2/p' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            grep -v security | head -n 1 || true)
    fi
    echo "${mirror:-http://deb.debian.org/debian}"
}

# Debian 12 in a directory, with what the stand-ins need, once per run at most.
rootfs=
debian_rootfs() {
    [[ -z ${rootfs} ]] || return 0
    have debootstrap || apt_install debootstrap
    rootfs="${state}/rootfs"
    rm -rf "${rootfs}"
    local mirror
    mirror=$(debian_mirror)
    echo "debootstrap --variant=minbase bookworm from ${mirror}" >&2
    debootstrap --variant=minbase \
        --include=redis-server,nginx,curl,ca-certificates,tzdata,netbase \
        bookworm "${rootfs}" "${mirror}" >"${state}/debootstrap.log" 2>&1 ||
        die "debootstrap failed; its log: ${state}/debootstrap.log"
}

# Redis and nginx from Debian's packages, in one image (the compose file gives each its
# command). WORKDIR /data is Redis' volume, as in the official image.
services_standin() {
    docker image inspect "${services_image}" >/dev/null 2>&1 && return 0
    debian_rootfs
    tar -C "${rootfs}" --exclude=./var/cache/apt/archives --exclude=./proc --exclude=./sys \
        --exclude=./dev -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'WORKDIR /data' \
            - "${services_image}" >/dev/null
}

# What gcr.io/distroless/cc-debian12 is made of: the files of these Debian packages, the CA
# bundle, and users root, nobody and nonroot (65532). No shell, no package manager.
runtime_standin_image() {
    docker image inspect "${runtime_standin}" >/dev/null 2>&1 && return 0
    debian_rootfs
    local tree="${state}/distroless" package deb
    rm -rf "${tree}"
    mkdir -p "${tree}"
    for package in base-files netbase tzdata libc6 libgcc-s1 libstdc++6 libssl3; do
        deb=$(find "${rootfs}/var/cache/apt/archives" -name "${package}_*.deb" -print -quit)
        [[ -n ${deb} ]] || die "no ${package} .deb in ${rootfs}/var/cache/apt/archives"
        dpkg-deb -x "${deb}" "${tree}"
    done
    rm -rf "${tree}/usr/share/doc" "${tree}/usr/share/man" "${tree}/usr/share/lintian" \
        "${tree}/usr/share/info" "${tree}/usr/share/gcc" "${tree}/usr/share/gdb"
    mkdir -p "${tree}/etc/ssl/certs" "${tree}/home/nonroot" "${tree}/tmp"
    chmod 1777 "${tree}/tmp"
    chown 65532:65532 "${tree}/home/nonroot"
    cp "${rootfs}/etc/ssl/certs/ca-certificates.crt" "${tree}/etc/ssl/certs/"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"${tree}/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"${tree}/etc/group"
    tar -C "${tree}" -c . |
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
            --change 'USER 65532' \
            - "${runtime_standin}" >/dev/null
    rm -rf "${tree}"
}

step "images: Redis, nginx, the runtime base, the gateway"
env_for_compose=()
if obtainable redis:7.4 && obtainable nginx:1.30; then
    echo "redis:7.4 and nginx:1.30 from their registry" >&2
else
    services_standin
    echo "redis and nginx: ${services_image} (Debian 12's packages; Docker Hub unreachable)" >&2
    env_for_compose+=("BGW_COMPOSE_REDIS_IMAGE=${services_image}"
        "BGW_COMPOSE_NGINX_IMAGE=${services_image}")
fi
runtime_image=gcr.io/distroless/cc-debian12:nonroot
if obtainable "${runtime_image}"; then
    echo "runtime base: ${runtime_image}" >&2
else
    runtime_standin_image
    runtime_image=${runtime_standin}
    echo "runtime base: ${runtime_image} (made of its Debian 12 packages; gcr.io unreachable)" >&2
fi
if obtainable rust:1-bookworm; then
    echo "the gateway: deploy/Dockerfile, built in rust:1-bookworm" >&2
    docker build -q -f deploy/Dockerfile --build-arg "RUNTIME_IMAGE=${runtime_image}" \
        -t "${gateway_image}" . >/dev/null
else
    echo "the gateway: rust:1-bookworm unreachable; deploy/Dockerfile's runtime stage with" \
        "the binary of cargo build --release -p gateway, stripped" >&2
    cargo build --release -p gateway
    context="${state}/context"
    rm -rf "${context}"
    mkdir -p "${context}/empty"
    docker build -q -f deploy/Dockerfile --target runtime \
        --build-arg "RUNTIME_IMAGE=${runtime_image}" -t bgw-test/gateway-runtime \
        "${context}/empty" >/dev/null
    strip -o "${context}/gateway" "${CARGO_TARGET_DIR:-${repo}/target}/release/gateway"
    printf '%s\n' 'FROM bgw-test/gateway-runtime' \
        'COPY gateway /usr/local/bin/gateway' >"${context}/Dockerfile"
    docker build -q -t "${gateway_image}" "${context}" >/dev/null
    rm -rf "${context}"
fi
[[ -z ${rootfs} ]] || rm -rf "${rootfs}"
size=$(docker image inspect -f '{{.Size}}' "${gateway_image}")
echo "${gateway_image}: $((size / 1000000)) MB (on ${runtime_image})" >&2
((size < 50 * 1000 * 1000)) || die "${gateway_image} is $((size / 1000000)) MB, above 50 MB"
[[ $(docker image inspect -f '{{.Config.User}}' "${gateway_image}") == 10001:10001 ]] ||
    die "${gateway_image} does not run as 10001:10001"
took images

# --- the stack ----------------------------------------------------------------------------

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
admin_port=$(free_port)
export BGW_COMPOSE_PORT=${port} BGW_COMPOSE_ADMIN_PORT=${admin_port}
for assignment in "${env_for_compose[@]}"; do
    export "${assignment?}"
done

step "${compose[*]} up -d --no-build (nginx on 127.0.0.1:${port}, gateway-1's admin on ${admin_port})"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
stack_up=1
"${compose[@]}" up -d --no-build
ready=
for _ in $(seq 600); do
    if curl -fsS -o /dev/null "http://127.0.0.1:${port}/nginx-health" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.1
done
[[ -n ${ready} ]] || die "nginx did not answer /nginx-health within 60 s"
"${compose[@]}" ps >&2
took "stack up"

step "the README's checks"
curl -fsS "http://127.0.0.1:${port}/nginx-health"
curl -fsS "http://127.0.0.1:${admin_port}/readyz"
echo
"${compose[@]}" exec -T gateway-2 gateway health
help=$("${compose[@]}" exec -T gateway-2 gateway --help)
grep -q 'BGW_REDIS_URL' <<<"${help}" || die "gateway --help in the image"
curl -fsS "http://127.0.0.1:${admin_port}/v1/publish" -H 'content-type: application/json' \
    -d '{"channel":"news","data":{"hello":"world"}}'
echo
"${compose[@]}" exec -T gateway-3 gateway publish news '{"hello":"again"}'
for node in gateway-1 gateway-2 gateway-3; do
    logs=$("${compose[@]}" logs --no-color "${node}")
    limit=$(grep -m 1 -o 'open-file limit limit=[0-9]*' <<<"${logs}") ||
        die "${node} did not log its open-file limit"
    echo "${node}: ${limit}" >&2
done
took "README checks"

step "browsers through nginx while a node drains (cargo test -p gateway --test compose)"
BGW_TEST_COMPOSE_CLIENT="127.0.0.1:${port}" \
    BGW_TEST_COMPOSE_ADMIN="127.0.0.1:${admin_port}" \
    BGW_TEST_COMPOSE_STOP="${compose[*]} stop" \
    cargo test -p gateway --test compose -- --ignored --nocapture
# The stopped node drained and exited 0.
stopped=0
for node in gateway-1 gateway-2 gateway-3; do
    id=$("${compose[@]}" ps -q "${node}")
    if [[ $(docker inspect -f '{{.State.Running}}' "${id}") == false ]]; then
        code=$(docker inspect -f '{{.State.ExitCode}}' "${id}")
        [[ ${code} == 0 ]] || die "${node} exited with ${code} after its drain"
        logs=$("${compose[@]}" logs --no-color "${node}")
        grep -q 'draining' <<<"${logs}" || die "${node} stopped without draining"
        stopped=$((stopped + 1))
    fi
done
((stopped == 1)) || die "${stopped} nodes stopped, expected 1"
took "drain test"
