#!/usr/bin/env bash
# A local cluster in one command: Redis, N gateway nodes (default 3) and nginx with the shipped
# config (nginx/nginx.conf, only its listen address changed), every one on a loopback port, in a
# state directory of their own. Stop it with deploy/local/down.sh, which stops exactly what this
# started, by the pids recorded in the state directory.
#
# Usage: deploy/local/up.sh [N]
#
# For many nodes (a million connections needs 50 or more at ~19,000 sockets a node), see
# deploy/SCALING.md: BGW_LOCAL_NGINX=0 deploy/local/up.sh 58, then
# loadtest scale --cluster-dir target/local-cluster.
#
# Environment (all optional):
#   BGW_LOCAL_PORT        nginx, where clients connect (default 8080); node i listens on
#                         BGW_LOCAL_PORT + i (8081, 8082, ...)
#   BGW_LOCAL_ADMIN_PORT  the admin listener of node 1 (default 9091); node i on
#                         BGW_LOCAL_ADMIN_PORT + i - 1 (9091, 9092, ...)
#   BGW_LOCAL_REDIS_PORT  Redis (default 6380, beside a system Redis on 6379)
#   BGW_LOCAL_DIR         the state directory: pids, logs, nginx's prefix, Redis' data
#                         (default target/local-cluster)
#   BGW_GATEWAY_BIN       the gateway binary (default: `cargo build --release -p gateway`, or
#                         target/release/gateway, target/debug/gateway, `gateway` on the PATH)
#   BGW_LOCAL_NGINX       0 to start no nginx: clients connect to the nodes themselves, as
#                         `loadtest scale --cluster-dir` does (default 1)
# Other BGW_ variables (BGW_API_KEY, BGW_JWT_SECRET, ...) reach every node.
#
# Needs Debian's (or Ubuntu's) redis-server and nginx: sudo apt-get install -y redis-server nginx
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

die() {
    printf 'deploy/local/up.sh: %s\n' "$*" >&2
    exit 1
}

nodes=${1:-3}
[[ ${nodes} =~ ^[1-9][0-9]?$ ]] || die "usage: deploy/local/up.sh [N] (N nodes, 1 to 99)"
port=${BGW_LOCAL_PORT:-8080}
admin_port=${BGW_LOCAL_ADMIN_PORT:-9091}
redis_port=${BGW_LOCAL_REDIS_PORT:-6380}
for value in "${port}" "${admin_port}" "${redis_port}"; do
    if ! [[ ${value} =~ ^[1-9][0-9]{0,4}$ ]] || ((value + nodes > 65535)); then
        die "not a port (or too close to 65535 for ${nodes} nodes): ${value}"
    fi
done

# --- what the machine must have -------------------------------------------------------------

with_nginx=${BGW_LOCAL_NGINX:-1}
[[ ${with_nginx} == [01] ]] || die "BGW_LOCAL_NGINX is 0 or 1, not ${with_nginx}"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
((with_nginx == 0)) || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
if ((${#missing[@]} > 0)); then
    die "${missing[*]} not found; install with: sudo apt-get install -y ${missing[*]}"
fi

bin=${BGW_GATEWAY_BIN:-}
if [[ -z ${bin} ]]; then
    if command -v cargo >/dev/null 2>&1; then
        echo "building the gateway: cargo build --release -p gateway" >&2
        (cd "${repo}" && cargo build --release -p gateway) >&2 || die "the gateway did not build"
        bin="${target}/release/gateway"
    else
        for candidate in "${target}/release/gateway" "${target}/debug/gateway" \
            "$(command -v gateway || true)"; do
            if [[ -n ${candidate} && -x ${candidate} ]]; then
                bin=${candidate}
                break
            fi
        done
    fi
fi
[[ -n ${bin} && -x ${bin} ]] || die "no gateway binary${bin:+ at ${bin}}; build it with \
\`cargo build --release -p gateway\` (Rust from https://rustup.rs), or set BGW_GATEWAY_BIN"

# --- the state directory and the ports ------------------------------------------------------

mkdir -p "${dir}"
dir=$(cd "${dir}" && pwd)
pids_file="${dir}/pids"
if [[ -f ${pids_file} ]]; then
    while read -r name pid start; do
        if alive "${pid}" "${start}"; then
            die "${name} (pid ${pid}) of a cluster in ${dir} still runs; stop it with" \
                "deploy/local/down.sh${BGW_LOCAL_DIR:+ (with the same BGW_LOCAL_DIR)}"
        fi
    done <"${pids_file}"
    rm -f "${pids_file}"
fi

node_port() { echo $((port + $1)); }
admin_port_of() { echo $((admin_port + $1 - 1)); }

# Whether something accepts connections on the loopback PORT.
listening() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

ports=("${redis_port}")
((with_nginx == 0)) || ports+=("${port}")
for i in $(seq "${nodes}"); do
    ports+=("$(node_port "${i}")" "$(admin_port_of "${i}")")
done
declare -A taken=()
for wanted in "${ports[@]}"; do
    [[ -z ${taken[${wanted}]:-} ]] || die "port ${wanted} is given twice; change BGW_LOCAL_PORT," \
        "BGW_LOCAL_ADMIN_PORT or BGW_LOCAL_REDIS_PORT"
    taken[${wanted}]=1
    ! listening "${wanted}" || die "port ${wanted} is in use; choose other ports with" \
        "BGW_LOCAL_PORT, BGW_LOCAL_ADMIN_PORT and BGW_LOCAL_REDIS_PORT"
done

mkdir -p "${dir}/logs" "${dir}/redis" "${dir}/nginx"

# Whatever fails from here on, what was started is stopped again.
stop_on_failure() {
    echo "deploy/local/up.sh: failed; stopping what it started (logs: ${dir}/logs)" >&2
    BGW_LOCAL_DIR="${dir}" "${here}/down.sh" >&2 || true
}
trap stop_on_failure EXIT
trap 'exit 130' INT TERM

# Records a process that was just started in the background.
record() {
    local start
    start=$(start_time "$2")
    [[ -n ${start} ]] || die "$1 exited at once; its log: ${dir}/logs/$1.log"
    echo "$1 $2 ${start}" >>"${pids_file}"
}

# Waits up to SECONDS for COMMAND to succeed while process NAME (PID) runs.
wait_until() {
    local seconds=$1 name=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        if ! alive "${pid}" "$(start_time "${pid}")"; then
            tail -n 20 "${dir}/logs/${name}.log" >&2 || true
            die "${name} exited; its log: ${dir}/logs/${name}.log"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "${dir}/logs/${name}.log" >&2 || true
            die "${name} not ready within ${seconds}s; its log: ${dir}/logs/${name}.log"
        fi
        sleep 0.1
    done
}

redis_ready() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/${redis_port}"
        printf 'PING\r\n' >&3
        IFS= read -r -t 2 reply <&3
        [[ ${reply} == +PONG* ]]
    ) 2>/dev/null
}

# Whether GET PATH on the loopback PORT answers 200.
http_ok() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1"
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
        IFS= read -r -t 2 status <&3
        [[ ${status} == "HTTP/1."?" 200"* ]]
    ) 2>/dev/null
}

# Whether the node with admin PORT is ready (`gateway health`: /readyz answers 200).
healthy() {
    "${bin}" health --admin-url "http://127.0.0.1:$1" >/dev/null 2>&1
}

# --- Redis ----------------------------------------------------------------------------------

redis-server --bind 127.0.0.1 --port "${redis_port}" --dir "${dir}/redis" \
    --save '' --appendonly no --daemonize no \
    </dev/null >>"${dir}/logs/redis.log" 2>&1 &
record redis $!
wait_until 10 redis "$!" redis_ready

# --- the gateway nodes ----------------------------------------------------------------------

redis_url="redis://127.0.0.1:${redis_port}"
for i in $(seq "${nodes}"); do
    "${bin}" --listen "127.0.0.1:$(node_port "${i}")" \
        --admin-listen "127.0.0.1:$(admin_port_of "${i}")" \
        --node-id "gateway-${i}" --redis-url "${redis_url}" --trusted-proxies 127.0.0.1/32 \
        </dev/null >>"${dir}/logs/gateway-${i}.log" 2>&1 &
    record "gateway-${i}" $!
done
while read -r name pid _; do
    [[ ${name} == gateway-* ]] || continue
    wait_until 20 "${name}" "${pid}" healthy "$(admin_port_of "${name#gateway-}")"
done <"${pids_file}"

# --- nginx ----------------------------------------------------------------------------------

if ((with_nginx == 1)); then
    # The shipped config, with only the address of its one `listen 8080 ...` line changed.
    shipped="${repo}/nginx/nginx.conf"
    [[ $(grep -cE '^[[:space:]]*listen[[:space:]]+8080[[:space:]]' "${shipped}") == 1 ]] ||
        die "${shipped} no longer has exactly one \`listen 8080 ...\` line"
    sed -E "s/^([[:space:]]*listen[[:space:]]+)8080([[:space:]])/\\1127.0.0.1:${port}\\2/" \
        "${shipped}" >"${dir}/nginx/nginx.conf"
    for i in $(seq "${nodes}"); do
        echo "server 127.0.0.1:$(node_port "${i}") max_fails=1 fail_timeout=10s;"
    done >"${dir}/nginx/upstreams.conf"
    nginx -q -t -p "${dir}/nginx/" -c nginx.conf -e stderr 2>>"${dir}/logs/nginx.log" ||
        die "nginx rejects the config; see ${dir}/logs/nginx.log"
    # `daemon off` in the shipped config: $! is the master. The access log (stdout) has a file of
    # its own.
    nginx -p "${dir}/nginx/" -c nginx.conf -e stderr \
        </dev/null >>"${dir}/logs/nginx-access.log" 2>>"${dir}/logs/nginx.log" &
    record nginx $!
    wait_until 10 nginx "$!" http_ok "${port}" /nginx-health
fi

trap - EXIT INT TERM

# --- what to do with it ---------------------------------------------------------------------

admin1="http://127.0.0.1:$(admin_port_of 1)"
{
    ((with_nginx == 0)) || echo "BGW_LOCAL_CLIENT_URL=ws://127.0.0.1:${port}/ws"
    echo "BGW_LOCAL_REDIS_URL=${redis_url}"
    for i in $(seq "${nodes}"); do
        echo "BGW_LOCAL_ADMIN_URL_${i}=http://127.0.0.1:$(admin_port_of "${i}")"
        echo "BGW_LOCAL_NODE_ADDR_${i}=127.0.0.1:$(node_port "${i}")"
    done
} >"${dir}/cluster.env"

if ((with_nginx == 1)); then
    cat <<EOF
Local cluster up: ${nodes} gateway nodes on Redis behind nginx (state and logs: ${dir}).

  clients (nginx)  ws://127.0.0.1:${port}/ws      curl -fsS http://127.0.0.1:${port}/nginx-health
EOF
else
    echo "Local cluster up: ${nodes} gateway nodes on Redis, no nginx (state and logs: ${dir})."
    echo
fi
for i in $(seq "${nodes}"); do
    printf '  gateway-%-7s  ws://127.0.0.1:%s/ws  admin http://127.0.0.1:%s   curl -fsS http://127.0.0.1:%s/readyz\n' \
        "${i}" "$(node_port "${i}")" "$(admin_port_of "${i}")" "$(admin_port_of "${i}")"
done
cat <<EOF
  redis            ${redis_url}

Subscribe (any WebSocket client, e.g. websocat):
  websocat ws://127.0.0.1:${port}/ws
  {"type":"hello"}
  {"type":"subscribe","channel":"news"}

Publish through any node's admin API:
  ${bin} publish --admin-url ${admin1} news '{"hello":"world"}'
  curl -fsS ${admin1}/v1/publish -H 'content-type: application/json' \\
       -d '{"channel":"news","data":{"hello":"world"}}'

Stop: ${BGW_LOCAL_DIR:+BGW_LOCAL_DIR=${dir} }deploy/local/down.sh
EOF
